"""What only a CUDA GPU shows (marker `cuda`: tests/conftest.py skips these, counted as skipped,
where torch.cuda.is_available() is False; `.ci/run` collects them with every other test):
the default DAP run of main.py on CUDA under float16 with a GradScaler, through its cut; the
pruner's mask updates and cut on a CUDA model under each budget unit; and the GPU check
finishing within a small budget. Written for CUDA's rules: every tensor that meets the model's
is on its device, and nothing here would pass on the CPU by accident."""
import json
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, check_ok, cli_env, micro, run_cli
from models import is_gate
from pruning import BUDGET_UNITS, DepthAwarePruner, PruneConfig, PruneSchedule

pytestmark = pytest.mark.cuda

# the default method (block_pr) and budget (params): epoch 0 ramps, epoch 1 sharpens, then the cut
CUDA_RUN = ['--device', 'cuda', '--amp-dtype', 'float16', '--prune-method', 'block_pr', '--epochs', '2',
            '--prune-start-epoch', '0', '--prune-sparse-epoch', '1', '--prune-ratio', '0.5',
            '--prune-steps-update-mask', '4']


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def latency_table(tmp_path, batch=16):
    """The micro model's latency table at 32 px, measured on this GPU under float16 autocast."""
    out = tmp_path / 'latency_table.json'
    proc = subprocess.run([sys.executable, 'scripts/latency_table.py', '--model', 'deit_micro_patch4_32',
                           '--num-classes', '10', '--input-size', '32', '--batch-size', str(batch),
                           '--device', 'cuda', '--amp', '--check-ratios', '--out', str(out)],
                          cwd=REPO, env=cli_env(tmp_path), capture_output=True, text=True, timeout=600)
    check_ok(proc)
    return out


@pytest.mark.parametrize('extra', [[], ['--prune-budget', 'flops'], ['--prune-train-gates']],
                         ids=['params', 'flops', 'train-gates'])
def test_dap_run_on_cuda_with_a_grad_scaler_reaches_its_cut(tmp_path, extra):
    out = tmp_path / 'out'
    proc = check_ok(run_cli([*CUDA_RUN, *extra, '--output_dir', out], tmp_path, timeout=900))
    assert 'autocast: float16 (a loss scale)' in proc.stdout
    ckpt = load(out / 'first_sparse_checkpoint.pth')
    summary = ckpt['summary']
    assert summary['params_cut'] == sum(v.numel() for v in ckpt['model'].values())
    if extra == ['--prune-budget', 'flops']:
        assert summary['flops_cut'] == pytest.approx(0.5 * summary['flops_dense'], rel=0.05)
    else:
        assert summary['params_cut'] == pytest.approx(0.5 * summary['params_dense'], rel=0.01)
    assert 0 <= ckpt['acc1'] <= 100 and 'parameter digest' in proc.stdout


def gated_on_cuda(budget, table):
    model = micro().cuda()
    schedule = PruneSchedule(steps_per_epoch=4, start_epoch=0, sparse_epoch=1, finalize_epoch=2,
                             steps_update_mask=2)
    config = PruneConfig(prune_ratio=0.5, budget=budget, latency_table=str(table) if table else None)
    pruner = DepthAwarePruner(model, 10, config, schedule)
    params = [p for n, p in model.named_parameters() if not is_gate(n)]
    optimizer = torch.optim.AdamW([{'params': params}] + pruner.param_groups(1e-3, 0.05), lr=1e-3)
    return model, pruner, optimizer


@pytest.mark.parametrize('budget', BUDGET_UNITS)
def test_mask_updates_and_cut_of_a_cuda_model_under_each_budget(tmp_path, budget):
    """A few float16 steps with a GradScaler, the mask updates they trigger and one more, then
    finalize: the cut model is on the GPU, runs, and meets the budget in its unit."""
    table = latency_table(tmp_path) if budget == 'latency' else None
    model, pruner, optimizer = gated_on_cuda(budget, table)
    scaler, criterion = torch.amp.GradScaler('cuda'), torch.nn.CrossEntropyLoss()
    g = torch.Generator(device='cuda').manual_seed(0)
    updates = []
    for _ in range(8):
        x = torch.randn(16, 3, 32, 32, device='cuda', generator=g)
        y = torch.randint(0, 10, (16,), device='cuda', generator=g)
        with torch.autocast('cuda', dtype=torch.float16):
            logits, aux = pruner.module(x)
            loss = criterion(logits, y) + pruner.aux_loss(aux, y, criterion)
        scaler.scale(loss).backward()
        scale = scaler.get_scale()  # the scale these gradients carry, before update() moves it
        scaler.step(optimizer)
        scaler.update()
        record = pruner.step(scale)
        optimizer.zero_grad(set_to_none=True)
        if record is not None:
            updates.append(record)
    assert updates, 'no mask update ran'
    pruner.update_masks(pruner.step_count - 1)
    cut, rows = pruner.finalize()
    assert all(p.is_cuda for p in cut.parameters()) and len(rows) == 2 * model.depth
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.float16):
        out = cut.eval()(x)
    assert out.shape == (16, 10) and torch.isfinite(out).all()
    report = pruner.final_budget
    assert report['budget'] == budget
    assert report['total_kept_cost'] == pytest.approx(report['target_total_cost'], rel=0.05)


def test_gpu_check_finishes_within_a_small_budget(tmp_path):
    """The check on this GPU with a 3-minute budget: it ends (exit 0), the first DAP run passed,
    every other row passed or is listed as skipped."""
    out = tmp_path / 'check.json'
    started = time.monotonic()
    proc = subprocess.run([sys.executable, 'scripts/gpu_check.py', '--budget-min', '3', '--json', str(out)],
                          cwd=REPO, env=cli_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.monotonic() - started < 3 * 60 + 120
    rows = json.loads(out.read_text())['rows']
    assert rows[0]['part'] == 'main.py' and rows[0]['status'] == 'passed'
    assert {r['status'] for r in rows} <= {'passed', 'skipped'}
