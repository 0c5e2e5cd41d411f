"""Mixed precision (--amp-dtype): the Taylor scores under float16 with a loss scale and under
bfloat16 without one are those of float32, and a pruning run under bfloat16 autocast on the
CPU reaches its cut with the budget met."""
import pytest
import torch

from conftest import check_ok, micro, o1_weights, run_cli
from engine import autocast
from pruning import DepthAwarePruner, PruneConfig, PruneSchedule
from utils import read_log

C = 10


def scores_after_one_step(amp=None, scale=None, undo_scale=True):
    """The pruner's Taylor sums after one forward and backward of a fixed batch; with `scale`,
    the loss is scaled as a GradScaler does and the pruner told (or not) to undo it."""
    model = o1_weights(micro(0), seed=1)
    schedule = PruneSchedule(steps_per_epoch=10, start_epoch=0, sparse_epoch=1, finalize_epoch=2,
                             steps_update_mask=100)
    pruner = DepthAwarePruner(model, C, PruneConfig(prune_ratio=0.5, round_to=1), schedule)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, C, (32,), generator=g)
    criterion = torch.nn.CrossEntropyLoss()
    with autocast(torch.device('cpu'), amp):
        logits, aux = pruner.module(x)
        loss = criterion(logits, y) + pruner.aux_loss(aux, y, criterion)
    if scale is not None:
        scaler = torch.amp.GradScaler('cpu', init_scale=scale)
        scaler.scale(loss).backward()
        grad_scale = scaler.get_scale() if undo_scale else 1.0
    else:
        loss.backward()
        grad_scale = 1.0
    pruner.step(grad_scale=grad_scale)
    return torch.cat([s.flatten() for s in pruner.taylor.sum.values()])


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def test_taylor_scores_under_float16_and_bfloat16_are_those_of_float32():
    full = scores_after_one_step()
    assert full.abs().sum() > 0
    half = scores_after_one_step(torch.float16, scale=2. ** 10)
    bf16 = scores_after_one_step(torch.bfloat16)
    assert relative_error(half, full) < 0.01  # measured 0.14%
    assert relative_error(bf16, full) < 0.05  # measured 1.2%
    # the scale is undone where it must be: left in, the scores are scale² too large
    kept = scores_after_one_step(torch.float16, scale=2. ** 10, undo_scale=False)
    assert float(kept.sum() / half.sum()) == pytest.approx(2. ** 20, rel=1e-3)


def test_a_pruning_run_under_bfloat16_autocast_on_the_cpu_reaches_its_cut(tmp_path):
    out = tmp_path / 'out'
    proc = check_ok(run_cli(['--amp-dtype', 'bfloat16', '--prune-method', 'block_pr', '--prune-ratio', '0.5',
                             '--epochs', '2', '--prune-start-epoch', '0', '--prune-sparse-epoch', '1',
                             '--output_dir', out], tmp_path))
    assert 'autocast: bfloat16 (no loss scale)' in proc.stdout and 'Accuracy of the cut model' in proc.stdout
    final = [r for r in read_log(out / 'pruning_log.jsonl') if r.get('event') == 'finalize'][0]
    # within 1% of the budget (kept widths rounded to multiples of 8 on a width-64 model)
    assert final['params_cut'] == pytest.approx(0.5 * final['params_dense'], rel=0.02)
    assert final['total_kept_cost'] == pytest.approx(final['target_total_cost'], rel=0.02)
    args = __import__('json').loads((out / 'args.json').read_text())
    assert args['amp_dtype'] == 'bfloat16'
