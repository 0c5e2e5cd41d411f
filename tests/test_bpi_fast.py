"""`--bpi-mode fast` (pruning/delta_psi.py HeadShape): cheaper ΔΨ heads for the same §4
pipeline. Faithful stays the authors' heads (every other test runs it)."""
import copy
import math
import re
import sys

import pytest
import torch

from conftest import check_ok, free_port, micro, run_cli
from pruning import DepthAwarePruner, PruneConfig, PruneSchedule
from pruning.delta_psi import DeltaPsi, DeltaPsiHeads, HeadShape

FAST = ['--bpi-mode', 'fast', '--bpi-fast-fraction', '0.5']
PRUNE = ['--input-size', '16', '--batch-size', '32', '--prune-method', 'block_pr',
         '--prune-steps-update-mask', '4', '--no-train-mode']


def conv_macs(head, grid):
    """Multiply-adds of a patch head's convolutions on one map (what dominates its cost)."""
    macs, (h, w) = 0, grid
    for m in head.convs:
        if isinstance(m, torch.nn.AdaptiveAvgPool2d):
            h, w = m.output_size
        if isinstance(m, torch.nn.Conv2d):
            macs += m.in_channels * m.out_channels * 9 * h * w
    return macs


def test_fast_patch_heads_are_narrower_and_pooled():
    faithful = DeltaPsiHeads(4, 384, 10, (14, 14))
    fast = DeltaPsiHeads(4, 384, 10, (14, 14), HeadShape('fast', width_div=4, grid=7))
    ratio = conv_macs(faithful.patch[0], (14, 14)) / conv_macs(fast.patch[0], (14, 14))
    # width 96 instead of 384: (384² · 2) / (384·96 + 96²) = 6.4x; 7x7 instead of 14x14: 4x
    assert ratio == pytest.approx(2 * 384 ** 2 / (384 * 96 + 96 ** 2) * 4)
    stream = [torch.randn(3, 197, 384) for _ in range(5)]
    (cf, pf), (cq, pq) = faithful(stream), fast(stream)
    assert cf.shape == cq.shape == pf.shape == pq.shape == (4, 2, 3, 10)


def one_call_per_application(heads, stream):
    """The heads as METHOD.md §3 writes them, one call per head and per x: the reference of the
    stacked forward (each x_i's map made once, each patch head on its input and output at once)."""
    stream = [x.detach() for x in stream]
    k = math.ceil(heads.fraction * stream[0].shape[0])

    def patch(h, x):
        p = x[:k, 1:]
        return h.fc(h.convs(p.transpose(1, 2).reshape(k, p.shape[2], *h.grid)).mean(dim=(2, 3)))

    cls = torch.stack([torch.stack([h(stream[i][:, 0]), h(stream[i + 1][:, 0])]) for i, h in enumerate(heads.cls)])
    return cls, torch.stack([torch.stack([patch(h, stream[i]), patch(h, stream[i + 1])])
                             for i, h in enumerate(heads.patch)])


@pytest.mark.parametrize('mode', ['faithful', 'fast'])
@pytest.mark.parametrize('train', [True, False])
def test_stacked_heads_give_the_same_delta_psi(mode, train):
    """ΔΨ, the head losses' gradients and the BatchNorm running statistics are those of one call
    per head and application, in training mode (statistics per application) and in eval mode."""
    model = micro(img_size=16)
    pruner = DepthAwarePruner(model, 10, PruneConfig(prune_ratio=0.5, delta_psi_mode=mode,
                                                     delta_psi_fraction=0.75),
                              PruneSchedule(steps_per_epoch=2, start_epoch=0, sparse_epoch=1, finalize_epoch=2))
    heads, ref = pruner.heads.train(train), copy.deepcopy(pruner.heads).train(train)
    criterion = torch.nn.CrossEntropyLoss()
    torch.manual_seed(5)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    for _ in range(2):  # the second step sees the running statistics the first one left
        with torch.no_grad():
            _, stream = model.forward_stream(x)
        perf = DeltaPsi(8, 'cpu')
        lc, lp = perf.head_losses(heads(stream), y, criterion)
        rc, rp = perf.head_losses(one_call_per_application(ref, stream), y, criterion)
        torch.testing.assert_close(lc, rc, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lp, rp, rtol=1e-6, atol=1e-6)
        (lc.sum() + lp.sum()).backward()
        (rc.sum() + rp.sum()).backward()
        for (name, a), b in zip(heads.named_parameters(), ref.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
        for (name, a), b in zip(heads.named_buffers(), ref.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
    assert not torch.equal(lp[:, 0], lp[:, 1])  # the heads' input and output differ
    if train:
        assert heads.patch[0].convs[-2].num_batches_tracked == 4  # two applications per step


def test_a_batch_fraction_is_the_same_estimator_on_a_random_half():
    """With fixed heads (BatchNorm on its statistics), ΔΨ on the first half of a batch and on the
    second half average to ΔΨ on the whole batch: over the random order of a shuffled batch,
    the estimate on its first half is unbiased."""
    torch.manual_seed(0)
    heads = DeltaPsiHeads(2, 64, 10, (4, 4), HeadShape('fast', 4, 7, fraction=0.5)).eval()
    full = DeltaPsiHeads(2, 64, 10, (4, 4), HeadShape('fast', 4, 7, fraction=1.0)).eval()
    full.load_state_dict(heads.state_dict())
    stream = [torch.randn(8, 17, 64) for _ in range(3)]
    y = torch.randint(0, 10, (8,))
    crit = torch.nn.CrossEntropyLoss()

    def delta(h, s, t):
        w = DeltaPsi(2, 'cpu')
        w.add(*w.head_losses(h(s), t, crit))
        return w.mean()[1]

    swap = torch.cat([torch.arange(4, 8), torch.arange(4)])
    with torch.no_grad():
        first = delta(heads, stream, y)
        second = delta(heads, [s[swap] for s in stream], y[swap])
        whole = delta(full, stream, y)
    assert heads(stream)[1].shape[2] == 4  # the patch heads saw half of the batch
    torch.testing.assert_close((first + second) / 2, whole, atol=1e-6, rtol=0)  # float32 losses
    assert not torch.allclose(first, whole)  # a half alone differs: an estimate


def test_evaluation_runs_only_the_reported_heads():
    model = micro(img_size=16)
    pruner = DepthAwarePruner(model, 10, PruneConfig(prune_ratio=0.5, delta_psi_mode='fast'),
                              PruneSchedule(steps_per_epoch=2, start_epoch=0, sparse_epoch=1, finalize_epoch=2))
    ran = []  # (head, sub-block, rows its classifier saw)
    for i, (c, p) in enumerate(zip(pruner.heads.cls, pruner.heads.patch)):
        c.register_forward_hook(lambda m, inp, out, i=i: ran.append(('cls', i, len(out))))
        p.fc.register_forward_hook(lambda m, inp, out, i=i: ran.append(('patch', i, len(out))))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        logits, heads = pruner.module.forward_eval(x)
        assert ran == [('cls', 7, 2), ('patch', 7, 2)] and set(heads) == {'cls_head', 'patch_head'}
        torch.testing.assert_close(logits, model(x))
        ran.clear()
        pruner.module(x)
    # training: every class head on input and output; every patch head once on both, stacked
    assert sorted(ran) == sorted([('cls', i, 2) for i in range(8)] * 2 + [('patch', i, 4) for i in range(8)])


def test_fast_resume_in_the_middle_of_pruning_is_exact(tmp_path):
    from conftest import killed_after_first_epoch
    args = [*PRUNE, *FAST, '--epochs', '3', '--prune-start-epoch', '1', '--prune-sparse-epoch', '2',
            '--prune-ratio', '0.5']
    full = tmp_path / 'full'
    check_ok(run_cli([*args, '--output_dir', full], tmp_path))
    out = tmp_path / 'interrupted'
    killed_after_first_epoch(args, out, tmp_path)
    assert not (out / 'first_sparse_checkpoint.pth').exists()
    check_ok(run_cli([*args, '--output_dir', out, '--resume', out / 'checkpoint.pth'], tmp_path))
    a = torch.load(full / 'first_sparse_checkpoint.pth', weights_only=True)
    b = torch.load(out / 'first_sparse_checkpoint.pth', weights_only=True)
    assert a['arch'] == b['arch'] and all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])


def test_fast_two_ranks_agree(tmp_path):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}']
    proc = check_ok(run_cli([*PRUNE, *FAST, '--batch-size', '16', '--epochs', '2', '--prune-start-epoch', '0',
                             '--prune-sparse-epoch', '1', '--prune-ratio', '0.5', '--dist-eval',
                             '--output_dir', tmp_path / 'out'], tmp_path, launcher=cmd))
    digests = dict(re.findall(r'\[rank (\d)\] parameter digest (\w+)', proc.stdout + proc.stderr))
    assert set(digests) == {'0', '1'} and digests['0'] == digests['1']


@pytest.mark.parametrize('extra,needle', [
    (['--prune-method', 'wdprune', '--bpi-mode', 'fast'], '--bpi-mode belongs to --prune-method'),
    (['--prune-method', 'block_pr', '--bpi-mode', 'fast', '--bpi-fast-fraction', '0'],
     '--bpi-fast-fraction must be in (0, 1]'),
    (['--prune-method', 'block_pr', '--bpi-mode', 'fast', '--bpi-fast-width', '0'],
     '--bpi-fast-width must be at least 1'),
])
def test_bad_fast_flags(tmp_path, extra, needle):
    proc = run_cli(['--epochs', '1', '--output_dir', tmp_path / 'out', *extra], tmp_path)
    assert proc.returncode == 2 and needle in proc.stderr and not (tmp_path / 'out').exists()
