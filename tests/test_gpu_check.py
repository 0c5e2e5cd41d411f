"""scripts/gpu_check.py and scripts/benchmark_train_step.py finish and keep what they measured:
every row and every measurement in a fresh process (a new interpreter, never a fork), with a
time limit and its exit code read; a child that dies or hangs is one line, not a hang; the
table and the JSON are written row by row; rows over the budget are listed as skipped."""
import json
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, cli_env

sys.path.insert(0, f'{REPO}/scripts')
import fresh_process  # noqa: E402
import gpu_check  # noqa: E402

MAIN_PY_ROWS = [
    'DAP bfloat16, params budget + resized fine-tune', 'DAP bfloat16, flops budget',
    'DAP bfloat16, params budget, whole heads (--prune-attn-unit head)', 'latency table of the micro model',
    'DAP bfloat16, latency budget', 'DAP bfloat16, --prune-train-gates',
    'DAP bfloat16, torchrun --nproc_per_node=1 (gloo)', 'DAP stopped mid-pruning, --resume: same parameter digest',
    'WD-Prune, one epoch', 'SaViT, one epoch']


def gpu_check_cmd(out, *extra):
    return [sys.executable, 'scripts/gpu_check.py', '--smoke', '--json', str(out), *extra]


def row_keys(rows):
    return [(r['part'], r['name'], r.get('batch'), r.get('mode')) for r in rows]


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    """The whole smoke check, once (about 2.5 minutes on 2 cores): (process, its JSON)."""
    tmp = tmp_path_factory.mktemp('gpu_check')
    out = tmp / 'check.json'
    proc = subprocess.run(gpu_check_cmd(out, '--budget-min', '30'), cwd=REPO, env=cli_env(tmp),
                          capture_output=True, text=True, timeout=1200)
    return proc, json.loads(out.read_text()) if out.exists() else None


def test_smoke_runs_every_row_on_the_cpu_and_each_passes(smoke):
    """main.py's rows first (DAP through its cut and a fine-tune under each budget unit, cutting
    whole heads, with trained gates, under torchrun, resumed with the same digest; WD-Prune,
    SaViT), then the training steps and the inference rows (dense, DAP at both ratios under
    both budgets and cutting whole heads, the uncut reference; each batch; eager and compiled)."""
    proc, res = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = res['rows']
    assert [(r['name'], r['status']) for r in rows if r['status'] != 'passed'] == []
    assert [r['name'] for r in rows if r['part'] == 'main.py'] == MAIN_PY_ROWS
    runs = [r for r in rows if r['part'] == 'main.py']
    assert all(0 <= r['top1'] <= 100 and r['seconds'] > 0 for r in runs if 'top1' in r)
    assert [r['note'] for r in runs if r['name'].startswith('DAP stopped')] == \
        ['stopped after 1 of 2 epochs; same digest']
    train = [(r['part'], r['name']) for r in rows if r['part'].startswith('train step')]
    steps = ('fine-tune', 'DAP step, faithful ΔΨ', 'DAP step, fast ΔΨ')
    assert train == [('train step, bfloat16', m) for m in steps]
    cuts = [f'DAP pr {pr}, {b}' for pr in (0.5, 0.75)
            for b in ('params budget', 'params budget, whole heads', 'latency budget')]
    inference = {(r['name'], r['batch'], r['mode']) for r in rows if r['part'].startswith('inference')}
    assert inference == {(m, b, mode) for m in ['dense', *cuts, 'deit_micro_patch4_32 (uncut)']
                         for b in res['config']['batches'] for mode in ('eager', 'compiled')}
    assert all(r['ms'] > 0 for r in rows if 'ms' in r)
    assert all(r['speedup'] == 1 for r in rows if r['name'] in ('dense', 'fine-tune'))
    assert all(r['flops_ideal'] > 1 for r in rows if r['name'] in cuts)
    # one table: the header once, then a line per row as it finished
    assert proc.stdout.count('GPU check (smoke): cpu') == 1 and 'FLOPs-ideal' in proc.stdout
    assert len(proc.stdout.splitlines()) == len(rows) + 3


def test_a_budget_too_small_lists_every_row_as_skipped(smoke, tmp_path):
    proc = subprocess.run(gpu_check_cmd(tmp_path / 'check.json', '--budget-min', '0.01'), cwd=REPO,
                          env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / 'check.json').read_text())['rows']
    assert row_keys(rows) == row_keys(smoke[1]['rows'])  # the same rows, none lost
    assert {r['status'] for r in rows} == {'skipped'}
    assert all(r['reason'].startswith(('does not fit the budget', 'needs the row')) for r in rows)
    assert proc.stdout.count('SKIPPED: ') == len(rows)


def test_a_check_stopped_from_outside_keeps_the_rows_it_finished(tmp_path):
    """The JSON is rewritten (atomically) after each row: killed after its first finished row,
    the check leaves a whole JSON with that row and every other row listed."""
    out = tmp_path / 'check.json'
    proc = subprocess.Popen(gpu_check_cmd(out, '--budget-min', '0.5'), cwd=REPO, env=cli_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300

    def finished():
        return [r for r in json.loads(out.read_text())['rows'] if r['status'] not in ('pending', 'skipped')]

    try:
        while proc.poll() is None and time.monotonic() < deadline and not (out.exists() and finished()):
            time.sleep(0.1)
    finally:
        fresh_process.stop(proc)
    rows = json.loads(out.read_text())['rows']
    assert {r['status'] for r in rows} <= {'passed', 'skipped', 'pending'}
    assert [r['status'] for r in rows if r['status'] != 'skipped'][0] == 'passed'
    planned = gpu_check.plan(gpu_check.SMOKE, {'device': 'cpu'}, gpu_check.get_args(['--smoke']))
    assert len(rows) == sum(len(j['rows']) for j in planned)


def job(key, fn, needs=(), estimate_s=1):
    return {'key': key, 'part': 'main.py', 'rows': [{'name': key}], 'estimate_s': estimate_s, 'needs': needs,
            'fn': fn}


def test_a_row_that_fails_or_hangs_is_recorded_and_the_check_goes_on():
    ctx = {'budget_end': time.monotonic() + 60, 'passed': {}, 'digests': {}}
    sleeper = [sys.executable, '-c', 'import time; time.sleep(60)']

    def dies(c, deadline):
        return fresh_process.run([sys.executable, '-c', 'import sys; sys.exit("error: --teacher-model x")'],
                                 'the run', deadline - time.monotonic())

    def hangs(c, deadline):
        return fresh_process.run(sleeper, 'the sleeper', deadline - time.monotonic())

    assert gpu_check.run_job(job('a', dies), ctx) == [
        {'name': 'a', 'status': 'failed', 'reason': 'the run: exit 1: error: --teacher-model x'}]
    assert gpu_check.run_job(job('b', lambda c, d: [{'name': 'b', 'top1': 50.0}], ('a',)), ctx)[0]['reason'] == \
        'needs the row "a", which did not pass'
    assert gpu_check.run_job(job('c', lambda c, d: [{'name': 'c'}], estimate_s=3600), ctx)[0]['reason'] \
        .startswith('does not fit the budget: about 3600 s')
    ok = gpu_check.run_job(job('d', lambda c, d: [{'name': 'd', 'top1': 50.0, 'digest': 'ab'}]), ctx)
    assert ok[0]['status'] == 'passed' and ctx['passed'] == {'a': False, 'd': True} and ctx['digests'] == {'d': 'ab'}
    # a row still running at the budget's end is stopped there: skipped, with what stopped it
    ctx['budget_end'] = time.monotonic() + 2
    started = time.monotonic()
    row, = gpu_check.run_job(job('e', hangs), ctx)
    assert time.monotonic() - started < 30
    assert row['status'] == 'skipped' and row['reason'].startswith('the budget ran out while it ran')


def test_a_child_past_its_time_limit_is_killed_with_one_line():
    started = time.monotonic()
    with pytest.raises(fresh_process.ChildFailed, match=r'^the sleeper: no result after 1 s \(timed out\)$') as e:
        fresh_process.run([sys.executable, '-c', 'import time; time.sleep(60)'], 'the sleeper', 1)
    assert e.value.timed_out and time.monotonic() - started < 30


def test_benchmark_train_step_child_that_dies_is_one_line(tmp_path):
    """An unknown --teacher-model kills the first measurement's process: one line that names
    the measurement and the reason, a non-zero exit, no traceback and no hang."""
    proc = subprocess.run([sys.executable, 'scripts/benchmark_train_step.py', '--batch-size', '2', '--rounds', '1',
                           '--iters', '1', '--warmup', '0', '--device', 'cpu', '--teacher-model', 'no_such_model'],
                          cwd=REPO, env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ''
    assert proc.stderr.splitlines() == ['error: finetune measurement, round 1 of 1: exit 1: RuntimeError: '
                                        'Unknown model (no_such_model)']


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
@pytest.mark.parametrize('script', ['benchmark_train_step.py', 'gpu_check.py'])
def test_cuda_asked_for_without_cuda_is_one_line(tmp_path, script):
    proc = subprocess.run([sys.executable, f'scripts/{script}', '--device', 'cuda'], cwd=REPO,
                          env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == ['error: --device cuda: no CUDA GPU is available here (use --device cpu)']
