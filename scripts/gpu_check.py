"""The GPU check in one command: what a user of DAP meets on one GPU, as one table, in the order
they meet it.

1. main.py as a user runs it (scripts/gpu_check_runs.py): a short DAP run on DIGITS with the
   micro model through its cut and a fine-tune, in float16 (GradScaler) and bfloat16, under the
   params, FLOPs and latency budgets (the latency table measured first, on this device), cutting
   whole heads (--prune-attn-unit head), with --prune-train-gates, under torchrun (1 process,
   nccl), and stopped in the middle of pruning then resumed (the parameter digest must be the
   uninterrupted run's); then one epoch of WD-Prune and of SaViT. Each row: passed or failed,
   seconds, the last top-1 printed.
2. a training step: fine-tuning against a DAP step (faithful and fast ΔΨ heads) under each
   autocast dtype (scripts/benchmark_train_step.py, one pair of fresh processes), peak memory;
3. inference: the dense model against DAP cuts at prune ratios 0.5 and 0.75 under the
   parameter and the latency budget (a latency table measured in the same check), the
   parameter budget's cut of whole heads (--prune-attn-unit head) beside it, and the uncut
   reference model; eager, then torch.compile'd; ms per batch, speed-up over dense, the
   FLOPs-ideal speed-up, and the peak memory of the forward.

Every row runs in a fresh process (a new interpreter, never a fork) with a time limit and its
exit code checked: a row that dies or hangs is recorded as failed with a one-line reason, and
the check goes on. The table is printed and the JSON (--json) rewritten, atomically, after each
row, so that a check stopped from outside keeps what it measured. Rows that no longer fit the
budget (--budget-min) are listed as skipped, with the reason. Exit 0 when no row failed
(skipped rows included), 1 when one did, 2 on a bad command line.

    python scripts/gpu_check.py --json output/gpu_check.json        # within 8 minutes on one H100
    python scripts/gpu_check.py --smoke --json output/smoke.json    # the same rows on the CPU, 2-3 min

Cut models of the inference rows come from random scores (pruning/random_scores.py, as
scripts/benchmark.py's): their speed depends on their widths, not on what training would have
chosen.
"""
import argparse
import json
import os
import sys
import time

# common first: it puts the repository root on sys.path
from common import prepare_out, script_device
import fresh_process
import gpu_check_runs
from errors import UsageError
from fresh_process import ChildFailed
from train.check_args import check_device

FULL = {'model': 'deit_small_patch16_224', 'reference': 'deit_tiny_patch16_224', 'input_size': 224,
        'train_batch': 64, 'batches': [1, 256, 1024], 'table_batch': 256, 'warmup': 5, 'iters': 20,
        'train_iters': 10, 'backend': 'inductor', 'num_classes': 1000, 'amp_dtypes': ['float16', 'bfloat16'],
        'run_size': 32, 'dap_epochs': ['--epochs', '4', '--prune-sparse-epoch', '2', '--prune-finalize-epoch', '3'],
        # seconds a job is expected to take (guesses for an H100: none was at hand to measure)
        'estimates': {'train': 30, 'table': 30, 'eager': 40, 'compiled': 60}}
# the same rows on the CPU: the micro model, small batches, one autocast dtype, 16 px main.py runs
# (a 4x4 patch grid keeps the ΔΨ patch heads cheap), and torch.compile through dynamo without
# code generation (no C++ compiler needed)
SMOKE = {'model': 'deit_micro_patch4_32', 'reference': 'deit_micro_patch4_32', 'input_size': 32,
         'train_batch': 8, 'batches': [1, 8], 'table_batch': 8, 'warmup': 2, 'iters': 2,
         'train_iters': 2, 'backend': 'eager', 'num_classes': 10, 'amp_dtypes': ['bfloat16'],
         'run_size': 16, 'dap_epochs': ['--epochs', '2', '--prune-sparse-epoch', '1'],
         'estimates': {'train': 13, 'table': 6, 'eager': 12, 'compiled': 15}}  # measured on 2 CPU cores
RATIOS = (0.5, 0.75)
STEP_ROWS = {'faithful': ('fine-tune', 'DAP step, faithful ΔΨ'), 'fast': ('DAP step, fast ΔΨ',)}


# ---- the rows of parts 2 and 3 ------------------------------------------------------------------
def step_rows(cfg, ctx, dtype, mode, deadline):
    """One pair of fresh processes of scripts/benchmark_train_step.py: (fine-tune,) DAP step."""
    out = os.path.join(ctx['work'], f'train_step_{dtype}_{mode}.json')
    cmd = fresh_process.python(
        'benchmark_train_step.py', '--model', cfg['model'], '--input-size', cfg['input_size'],
        '--batch-size', cfg['train_batch'], '--device', ctx['device'], '--warmup', '1',
        '--iters', cfg['train_iters'], '--bpi-mode', mode, '--num-classes', cfg['num_classes'],
        '--amp-dtype', dtype, '--rounds', '1', '--json', out)
    fresh_process.run(cmd, 'scripts/benchmark_train_step.py', deadline - time.monotonic(), env=ctx['env'],
                      log=out.replace('.json', '.log'))
    with open(out) as f:
        res = json.load(f)
    dap = 'DAP step, faithful ΔΨ' if mode == 'faithful' else 'DAP step, fast ΔΨ'
    ft = res['finetune_step_s']
    figures = {'fine-tune': (ft, res['finetune_peak_mem_bytes']), dap: (res['dap_step_s'], res['dap_peak_mem_bytes'])}
    # peak memory: max allocated on CUDA, RSS growth on the CPU (benchmark_train_step.py's)
    return [{'name': name, 'batch': cfg['train_batch'], 'mode': 'eager', 'ms': 1e3 * s, 'speedup': ft / s,
             'flops_ideal': None, 'peak_mib': peak / 2 ** 20}
            for name, (s, peak) in figures.items() if name in STEP_ROWS[mode]]


# the inference rows' cuts: (budget, --prune-attn-unit) -> the row's name at a prune ratio
CUTS = {('params', 'head_dim'): 'DAP pr {pr}, params budget',
        ('params', 'head'): 'DAP pr {pr}, params budget, whole heads',
        ('latency', 'head_dim'): 'DAP pr {pr}, latency budget'}


def inference_names(cfg):
    cuts = [name.format(pr=pr) for pr in RATIOS for name in CUTS.values()]
    return ['dense', *cuts, f'{cfg["reference"]} (uncut)']


def inference_rows(cfg, ctx, mode, deadline, args):
    """The inference rows of one mode, measured in a fresh process (this script, --child) that
    writes each row as soon as it has it: a child stopped at the budget's end keeps them."""
    out = os.path.join(ctx['work'], f'inference_{mode}.jsonl')
    if os.path.exists(out):
        os.remove(out)
    cmd = fresh_process.python('gpu_check.py', '--child', mode, '--child-out', out, '--device', ctx['device'],
                               '--child-table', ctx['table'], *(['--smoke'] if args.smoke else []))
    try:
        fresh_process.run(cmd, f'inference, {mode}', deadline - time.monotonic(), env=ctx['env'],
                          log=out.replace('.jsonl', '.log'))
    except ChildFailed as e:
        raise PartialRows(read_rows(out), str(e), e.timed_out) from None
    return read_rows(out)


def read_rows(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class PartialRows(ChildFailed):
    """A child failed after it had measured some rows: those rows are kept."""

    def __init__(self, rows, message, timed_out):
        super().__init__(message, timed_out)
        self.rows = rows


def measure_inference(args, out):
    """--child eager|compiled: the rows of one mode, each appended to `out` (JSON lines)."""
    import torch
    import models
    from pruning.random_scores import random_cut
    from pruning.cost import count_flops
    cfg, device = SMOKE if args.smoke else FULL, script_device(args.device)
    size, amp = cfg['input_size'], device.type == 'cuda'
    nets = {}
    for pr in RATIOS:
        for (budget, unit), name in CUTS.items():
            dense, nets[name.format(pr=pr)] = random_cut(
                cfg['model'], pr, cfg['num_classes'], size, budget=budget,
                latency_table=args.child_table if budget == 'latency' else None, attn_unit=unit)
    nets = {'dense': dense, **nets, f'{cfg["reference"]} (uncut)':
            models.create_model(cfg['reference'], num_classes=cfg['num_classes'], img_size=size)}
    nets = {name: m.to(device).eval().set_inplace_writes(True) for name, m in nets.items()}
    flops = {name: count_flops(m, size, device) for name, m in nets.items()}
    dense_ms = {}
    # eager: batch by batch; compiled: model by model (one compilation each, dense first)
    order = [(b, n) for b in cfg['batches'] for n in nets] if args.child == 'eager' else \
        [(b, n) for n in nets for b in cfg['batches']]
    compiled = {}
    for batch, name in order:
        model = nets[name]
        if args.child == 'compiled':
            model = compiled.setdefault(name, torch.compile(model, backend=cfg['backend'], dynamic=True))
        x = torch.randn(batch, 3, size, size, device=device)
        ms, peak = time_forward(model, x, amp, cfg['warmup'], cfg['iters'])
        dense_ms.setdefault(batch, ms)
        row = {'name': name, 'batch': batch, 'mode': args.child, 'ms': ms, 'speedup': dense_ms[batch] / ms,
               'flops_ideal': flops['dense'] / flops[name], 'peak_mib': peak}
        with open(out, 'a') as f:
            f.write(json.dumps(row) + '\n')


def time_forward(model, x, amp, warmup, iters):
    """(ms per batch, peak MiB of the forward above what was allocated before; None on CPU)."""
    import torch
    from models import median_seconds
    device = x.device
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with torch.no_grad(), torch.autocast(device.type, enabled=amp):
        ms = 1e3 * median_seconds(lambda: model(x), device, warmup, iters)
    peak = (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20 if device.type == 'cuda' else None
    return ms, peak


# ---- the plan: every row in order, each run by a job in fresh processes -------------------------
def plan(cfg, ctx, args):
    """[job]: {'key', 'part', 'rows' (the table rows it fills), 'estimate_s', 'needs', 'fn'}."""
    jobs = [{'key': key, 'part': 'main.py', 'rows': [{'name': name}], 'estimate_s': seconds, 'needs': needs,
             'fn': lambda c, d, fn=fn, key=key, name=name: [{'name': name, **fn(c, key, d)}]}
            for key, name, seconds, needs, fn in gpu_check_runs.rows(args.smoke)]
    est = cfg['estimates']
    for dtype in cfg['amp_dtypes']:
        for mode, names in STEP_ROWS.items():
            jobs.append({'key': f'train_step_{dtype}_{mode}', 'part': f'train step, {dtype}',
                         'rows': [{'name': n, 'batch': cfg['train_batch'], 'mode': 'eager'} for n in names],
                         'estimate_s': est['train'], 'needs': (),
                         'fn': lambda c, d, dtype=dtype, mode=mode: step_rows(cfg, c, dtype, mode, d)})
    table = f'{cfg["model"]} @ {cfg["input_size"]} px, batch {cfg["table_batch"]}'
    jobs.append({'key': 'latency_table', 'part': 'latency table', 'rows': [{'name': table}],
                 'estimate_s': est['table'], 'needs': (),
                 'fn': lambda c, d: [{'name': table, **latency_table(cfg, c, d)}]})
    part = f'inference, {"float16" if ctx["device"].startswith("cuda") else "float32"}'
    for mode in ('eager', 'compiled')[:1 if args.no_compile else 2]:
        jobs.append({'key': f'inference_{mode}', 'part': part, 'estimate_s': est[mode], 'needs': ('latency_table',),
                     'rows': [{'name': n, 'batch': b, 'mode': mode} for n in inference_names(cfg)
                              for b in cfg['batches']],
                     'fn': lambda c, d, mode=mode: inference_rows(cfg, c, mode, d, args)})
    return jobs


def latency_table(cfg, ctx, deadline):
    """The table of the inference rows' latency budget, measured on this device."""
    cmd = fresh_process.python(
        'latency_table.py', '--model', cfg['model'], '--input-size', cfg['input_size'],
        '--num-classes', cfg['num_classes'], '--batch-size', cfg['table_batch'], '--device', ctx['device'],
        '--iters', max(cfg['iters'] // 4, 2), '--warmup', '1', '--out', ctx['table'],
        *(['--amp'] if ctx['device'].startswith('cuda') else []), *(['--check-ratios'] if ctx['smoke'] else []))
    fresh_process.run(cmd, 'scripts/latency_table.py', deadline - time.monotonic(), env=ctx['env'],
                      log=os.path.join(ctx['work'], 'latency_table.log'))
    return {'note': ctx['table']}


def run_job(job, ctx):
    """The job's rows, each filled: passed (its figures), failed or skipped (with the reason)."""
    now = time.monotonic()
    left = ctx['budget_end'] - now
    missing = [k for k in job['needs'] if not ctx['passed'].get(k)]
    names = ctx.get('names', {})
    skip = (f'needs the row "{names.get(missing[0], missing[0])}", which did not pass' if missing else
            f'does not fit the budget: about {job["estimate_s"]:.0f} s, {max(left, 0):.0f} s left'
            if job['estimate_s'] > left else None)
    if skip:
        return [{**r, 'status': 'skipped', 'reason': skip} for r in job['rows']]
    # a row's own limit: several times its estimate (a hang, not a slow machine), at most the budget
    deadline = min(now + 5 * job['estimate_s'] + 60, ctx['budget_end'])
    try:
        got, status, reason = job['fn'](ctx, deadline), 'failed', 'its process gave no result for this row'
    except ChildFailed as e:
        got = getattr(e, 'rows', [])
        # stopped at the budget's end, not by its own limit: its unmeasured rows did not fit
        status, reason = ('skipped', f'the budget ran out while it ran ({e})') \
            if e.timed_out and deadline >= ctx['budget_end'] else ('failed', str(e))
    seconds = time.monotonic() - now
    done = {(g['name'], g.get('batch'), g.get('mode')): g for g in got}
    out = []
    for r in job['rows']:
        g = done.get((r['name'], r.get('batch'), r.get('mode')))
        out.append({**r, 'status': 'passed', 'seconds': seconds, **g} if g is not None
                   else {**r, 'status': status, 'reason': reason})
    ctx['passed'][job['key']] = all(r['status'] == 'passed' for r in out)
    if len(got) == 1 and 'digest' in got[0]:
        ctx['digests'][job['key']] = got[0]['digest']
    return out


# ---- the table and the JSON, row by row ---------------------------------------------------------
COLUMNS = (f'{"":<22}{"row":<58}{"batch":>6} {"mode":<9}{"ms":>9}{"× base":>8}{"FLOPs-ideal":>12}'
           f'{"peak MiB":>10}   (main.py rows: seconds, last top-1)')


def format_row(r):
    head = f'{r["part"]:<22}{r["name"]:<58}'
    if r['status'] != 'passed':
        where = f'{r["batch"]:>6} {r["mode"]:<9}' if 'batch' in r else ''
        return f'{head}{where}{r["status"].upper()}: {r.get("reason", "")}'
    if 'ms' in r:
        ideal = f'{r["flops_ideal"]:>12.2f}' if r.get('flops_ideal') is not None else f'{"":>12}'
        peak = f'{r["peak_mib"]:>10.0f}' if r.get('peak_mib') is not None else f'{"–":>10}'
        return f'{head}{r["batch"]:>6} {r["mode"]:<9}{r["ms"]:>9.2f}{r["speedup"]:>8.2f}{ideal}{peak}'
    top1 = f'   top-1 {r["top1"]:.1f}' if 'top1' in r else ''
    return f'{head}passed {r["seconds"]:>5.0f} s{top1}' + (f'   {r["note"]}' if r.get('note') else '')


def write_json(path, report):
    """The report, atomically: a check stopped while writing leaves the previous one whole."""
    tmp = f'{path}.tmp.{os.getpid()}'
    with open(tmp, 'w') as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


# ---- the command line ---------------------------------------------------------------------------
def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--smoke', action='store_true', help='the same rows on the CPU with the tiny models, 2-3 minutes')
    p.add_argument('--device', default=None, help='default: cuda (cpu with --smoke)')
    p.add_argument('--budget-min', type=float, default=8.0,
                   help='minutes for the whole check; rows that no longer fit are listed as skipped')
    p.add_argument('--no-compile', action='store_true', help='leave out the torch.compile\'d rows')
    p.add_argument('--json', default=None, help='also write the rows here (rewritten after each row)')
    p.add_argument('--work-dir', default=None, help='the runs\' folders and logs (default: beside --json, '
                                                    'or output/gpu_check_runs)')
    p.add_argument('--table-out', default=None, help='the inference rows\' latency table (default: in --work-dir)')
    # the inference rows' fresh process: this script again, measuring one mode into a file
    p.add_argument('--child', choices=['eager', 'compiled'], help=argparse.SUPPRESS)
    p.add_argument('--child-out', help=argparse.SUPPRESS)
    p.add_argument('--child-table', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.device = args.device or ('cpu' if args.smoke else 'cuda')
    if args.budget_min <= 0:
        p.exit(2, f'error: --budget-min must be above 0, got {args.budget_min}\n')
    return args


def setup(args, cfg):
    """ctx: where and how the rows run; UsageError (one line) if the device or a path is wrong."""
    check_device(args.device)
    work = args.work_dir or (os.path.splitext(args.json)[0] + '_runs' if args.json else 'output/gpu_check_runs')
    for path, flag in ((args.json, '--json'), (os.path.join(work, 'x'), '--work-dir'), (args.table_out, '--table-out')):
        if path:
            prepare_out(path, flag)
    env = dict(os.environ)
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'SLURM_PROCID', 'SLURM_NTASKS'):
        env.pop(k, None)  # the runs are not part of a distributed job this check may sit in
    probe = fresh_process.run([sys.executable, '-c', 'import torch; print(torch.__version__, torch.get_num_threads()); '
                               f'print(torch.cuda.get_device_name({args.device!r}) if {args.device.startswith("cuda")} '
                               'else "cpu")'], f'the first use of --device {args.device}', 120, env=env).split('\n')
    version, threads = probe[0].split()
    name = probe[1] if args.device.startswith('cuda') else f'cpu ({threads} threads)'
    return {'device': args.device, 'device_name': name, 'torch': version, 'smoke': args.smoke, 'env': env,
            'work': os.path.abspath(work), 'size': cfg['run_size'], 'dtypes': cfg['amp_dtypes'],
            'dap_epochs': cfg['dap_epochs'], 'reference': 'dap_params', 'passed': {}, 'digests': {},
            'micro_table': os.path.abspath(os.path.join(work, 'latency_table_micro.json')),
            'table': os.path.abspath(args.table_out or os.path.join(work, 'latency_table.json'))}


def main(argv=None):
    args = get_args(argv)
    if args.child:
        return measure_inference(args, args.child_out)
    cfg = dict(SMOKE if args.smoke else FULL)
    try:
        ctx = setup(args, cfg)
    except (UsageError, ChildFailed) as e:
        sys.exit(f'error: {e}')
    started = time.monotonic()
    ctx['budget_end'] = started + 60 * args.budget_min
    jobs = plan(cfg, ctx, args)
    ctx['names'] = {j['key']: j['rows'][0]['name'] for j in jobs}
    rows = [{'part': j['part'], **r, 'status': 'pending'} for j in jobs for r in j['rows']]
    report = {'device': ctx['device_name'], 'torch': ctx['torch'], 'smoke': args.smoke, 'config': cfg,
              'budget_min': args.budget_min, 'minutes': 0.0, 'work_dir': ctx['work'], 'latency_table': ctx['table'],
              'micro_latency_table': ctx['micro_table'], 'rows': rows}
    print(f'GPU check{" (smoke)" if args.smoke else ""}: {ctx["device_name"]}, torch {ctx["torch"]}, budget '
          f'{args.budget_min:g} min; runs and logs in {ctx["work"]}\n{COLUMNS}', flush=True)
    at = 0
    for job in jobs:
        done = [{'part': job['part'], **r} for r in run_job(job, ctx)]
        rows[at:at + len(done)] = done
        at += len(done)
        for r in done:
            print(format_row(r), flush=True)
        report['minutes'] = (time.monotonic() - started) / 60
        if args.json:
            write_json(args.json, report)
    counts = {s: sum(r['status'] == s for r in rows) for s in ('passed', 'failed', 'skipped')}
    print(f'{counts["passed"]} rows passed, {counts["failed"]} failed, {counts["skipped"]} skipped, in '
          f'{report["minutes"]:.1f} min. × base: speed-up over the fine-tuning step (train step rows) or over '
          'the dense model at the same batch and mode (inference rows); FLOPs-ideal: the speed-up its FLOPs promise')
    if counts['failed']:
        sys.exit(1)
    return rows


if __name__ == '__main__':
    main()
