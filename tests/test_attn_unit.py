"""`--prune-attn-unit head` (issue 31, docs/METHOD.md §9): the attention's middle gate over whole
heads. The default is the paper's cut bit for bit; with `head` the cut keeps whole heads at the
dense head_dim, computes what the gated model computes, and works with every policy, resume,
export and the distilled family. The budget in each unit: tests/test_cost.py."""
import hashlib
import json

import pytest
import timm
import torch

import models
from conftest import check_ok, micro, o1_weights, run_cli
from models import HEAD_GATE
from pruning import DepthAwarePruner, PruneConfig, PruneSchedule, cut_model
from pruning.random_scores import fill_random_scores, random_cut

X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def structure_digest(**kw) -> str:
    """What random-score cuts of the micro models keep (read / written dims, head_dim or hidden
    width per sub-block), over every policy, both parameter and FLOPs budgets and two roundings,
    as one hash."""
    out = {}
    for name in ('deit_micro_patch4_32', 'deit_micro_distilled_patch4_32'):
        for method in ('block_pr', 'uniform', 'global'):
            for budget in ('params', 'flops'):
                for r in (1, 8):
                    _, cut = random_cut(name, 0.6, 10, 32, seed=3, method=method, budget=budget, round_to=r, **kw)
                    out[str((name, method, budget, r))] = [
                        None if b[k] is None else
                        (len(b[k]['in_idx'] or []), b[k].get('head_dim', b[k].get('hidden_features')),
                         len(b[k]['out_idx'] or []))
                        for b in cut.arch()['blocks'] for k in ('attn', 'mlp')]
    return hashlib.sha256(json.dumps(sorted(out.items())).encode()).hexdigest()[:16]


# structure_digest() as commit 0eda037 computed it, before the option (and issue 29) existed
PAPERS_CUT = 'd93367ad000862b3'


def test_the_default_is_the_papers_cut_as_before_the_option():
    assert PruneConfig(prune_ratio=0.5).attn_unit == 'head_dim'
    assert structure_digest() == PAPERS_CUT
    model = micro()
    DepthAwarePruner(model, 10, PruneConfig(prune_ratio=0.5), schedule())
    assert set(model.blocks[0].gates) == set(models.GATE_NAMES)  # §2's six gates, no head gate


def schedule():
    return PruneSchedule(steps_per_epoch=1, start_epoch=0, sparse_epoch=0, finalize_epoch=1, steps_update_mask=1)


@pytest.mark.parametrize('method', ['block_pr', 'uniform', 'global'])
@pytest.mark.parametrize('name', ['deit_micro_patch4_32', 'deit_micro_distilled_patch4_32'])
def test_whole_heads_are_cut_exactly(name, method):
    model = o1_weights(micro(1, name=name), 7).eval()
    pruner = DepthAwarePruner(model, 10, PruneConfig(prune_ratio=0.6, method=method, attn_unit='head'), schedule())
    assert set(model.blocks[0].gates) == {'attn_in', HEAD_GATE, 'attn_out', 'mlp_in', 'mlp_hid', 'mlp_out'}
    assert [sb.gate_sizes for sb in pruner.sbs[:2]] == [(64, 4, 64), (64, 256, 64)]
    fill_random_scores(pruner, 2, heavy_tailed=True)
    pruner.update_masks(step=0, tau=0.0, final=True)
    with torch.no_grad():
        gated = model(X)
    cut = cut_model(model).eval()
    with torch.no_grad():
        assert (cut(X) - gated).abs().max().item() < 1e-4
    heads = [b['attn'] and b['attn']['num_heads'] for b in cut.arch()['blocks']]
    assert all(b['attn'] is None or b['attn']['head_dim'] == 16 for b in cut.arch()['blocks'])  # whole heads
    assert any(h is not None and h < 4 for h in heads), heads  # heads were removed
    assert cut.num_parameters() < 0.5 * micro(name=name).num_parameters()


def test_a_sub_block_without_heads_is_removed_and_head_counts_are_not_rounded():
    model = micro(2)
    kappa = [0.0, 0.5, 0.3, 0.5, 0.6, 0.5, 0.15, 0.5]  # attn0 keeps nothing; the others 1-3 heads
    pruner = DepthAwarePruner(model, 10, PruneConfig(prune_ratio=0.5, attn_unit='head', round_to=8,
                                                     keep_ratio_handcraft=kappa), schedule())
    fill_random_scores(pruner, 3)
    cut, _ = pruner.finalize()
    arch = cut.arch()['blocks']
    assert arch[0]['attn'] is None and cut.blocks[0].attn is None  # no head left: the sub-block is gone
    kept = [b['attn'] for b in arch if b['attn'] is not None]
    assert any(a['num_heads'] % 8 for a in kept)  # 1-3 heads: --prune-round-to does not apply to heads
    assert all(len(a[k]) % 8 == 0 for a in kept for k in ('in_idx', 'out_idx') if a[k] is not None)


def test_the_cut_exports_as_timm_and_onnx(tmp_path):
    import sys
    from conftest import REPO
    _, cut = random_cut('deit_micro_patch4_32', 0.6, 10, 32, seed=5, attn_unit='head')
    cut.eval()
    models.write_timm_folder(cut, str(tmp_path / 'folder'), {'input_size': [3, 32, 32], 'num_classes': 10})
    again = timm.create_model(f'local-dir:{tmp_path / "folder"}').eval()
    with torch.no_grad():
        assert torch.equal(again(X), cut(X))
    pytest.importorskip('onnxruntime')
    sys.path.insert(0, f'{REPO}/scripts')
    import export
    export.export_onnx(cut, str(tmp_path / 'cut.onnx'))
    assert export.max_difference(cut, str(tmp_path / 'cut.onnx'), X) < 1e-4


PRUNE = ['--input-size', '16', '--batch-size', '32', '--prune-method', 'block_pr', '--prune-ratio', '0.5',
         '--prune-steps-update-mask', '4', '--prune-attn-unit', 'head']


def test_a_head_run_resumed_mid_pruning_gives_the_same_cut_and_refuses_another_unit(tmp_path):
    """Killed during epoch 2 of 3 (after epoch 1's checkpoint), resumed: the cut model of the
    uninterrupted run, bit for bit. A resume with the other unit is refused in one line."""
    from conftest import killed_after_first_epoch
    args = [*PRUNE, '--epochs', '3', '--prune-start-epoch', '1', '--prune-sparse-epoch', '2']
    full, out = tmp_path / 'full', tmp_path / 'interrupted'
    check_ok(run_cli([*args, '--output_dir', full], tmp_path))
    killed_after_first_epoch(args, out, tmp_path)
    assert not (out / 'first_sparse_checkpoint.pth').exists()
    other = [a if a != 'head' else 'head_dim' for a in args]
    refused = run_cli([*other, '--output_dir', out, '--resume', out / 'checkpoint.pth'], tmp_path)
    assert refused.returncode == 2 and '--prune-attn-unit' in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    check_ok(run_cli([*args, '--output_dir', out, '--resume', out / 'checkpoint.pth'], tmp_path))
    a = torch.load(full / 'first_sparse_checkpoint.pth', map_location='cpu', weights_only=True)
    b = torch.load(out / 'first_sparse_checkpoint.pth', map_location='cpu', weights_only=True)
    assert any(blk['attn'] is None or blk['attn']['num_heads'] < 4 for blk in a['arch']['blocks'])
    assert a['arch'] == b['arch'] and all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
