"""The GPU check's main.py rows (a module of scripts/gpu_check.py, not a script): what a user
runs first — a short DAP run of main.py on DIGITS (scikit-learn's bundled digits) with the micro
model, through its cut and a fine-tune — each main.py in a fresh process with a time limit.

Every row is a function `(ctx, key, deadline) -> row fields`, raising ChildFailed (one line)
when a run fails; `ctx` says where and how (device, input size, epochs, work folder, env).
"""
import os
import re
import shutil
import socket
import sys
import time

import fresh_process
from fresh_process import ChildFailed

DIGITS = ['--num_workers', '0', '--model', 'deit_micro_patch4_32', '--data-set', 'DIGITS', '--batch-size', '64']
# a learning rate that trains the micro model within a few DIGITS epochs (warm-up, then a step)
SCHEDULE = ['--lr', '5e-3', '--sched', 'step', '--decay-epochs', '2', '--warmup-epochs', '1', '--warmup-lr', '1e-4']
DAP = ['--prune-method', 'block_pr', '--prune-ratio', '0.5', '--prune-steps-update-mask', '4',
       '--prune-start-epoch', '0']
# the baselines' short runs of tests/test_baselines_cli.py: one epoch each
WDPRUNE = ['--prune-method', 'wdprune', '--prune-ratio', '0.5', '--wdprune-lr', '0.1', '--wdprune-round', '8',
           '--classifiers', '2', '3', '--epochs', '1']
SAVIT = ['--prune-method', 'savit', '--prune-ratio', '0.5', '--savit-fraction', '0.5', '--savit-population', '20',
         '--savit-children', '10', '--savit-generations', '10', '--epochs', '1']
TOP1 = re.compile(r'^\* Acc@1 (\S+)', re.M)
DIGEST = re.compile(r'parameter digest ([0-9a-f]{16})')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def main_py(ctx, args, dtype=None, torchrun=False):
    """The command line of main.py on DIGITS with the micro model (under torchrun, 1 process)."""
    launcher = [sys.executable]
    if torchrun:
        launcher += ['-m', 'torch.distributed.run', '--nproc_per_node=1', f'--master_port={free_port()}']
    return [*launcher, os.path.join(fresh_process.REPO, 'main.py'), *DIGITS, *SCHEDULE,
            '--input-size', str(ctx['size']), '--device', ctx['device'],
            '--amp-dtype', dtype or ctx['dtypes'][0], *map(str, args)]


def row_dir(ctx, key):
    """The row's own folder under the work folder, emptied: each row starts from nothing."""
    folder = os.path.join(ctx['work'], key)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    return folder


def run(ctx, cmd, what, deadline, log, stop_when=None):
    return fresh_process.run(cmd, what, max(deadline - time.monotonic(), 1), log=log, env=ctx['env'],
                             stop_when=stop_when)


def results(text, what):
    """{'top1': the last top-1 printed, 'digest': the parameter digest}; ChildFailed if absent."""
    top1, digest = TOP1.findall(text), DIGEST.findall(text)
    if not top1:
        raise ChildFailed(f'{what}: it printed no "* Acc@1" line')
    return {'top1': float(top1[-1]), **({'digest': digest[-1]} if digest else {})}


def dap(ctx, key, deadline, extra=(), dtype=None, torchrun=False, finetune=False, epochs=None):
    """A DAP run through its cut (and, by its epochs past the cut, a fine-tune in the same run);
    with `finetune` also the paper's second command: a new run of the cut model rebuilt from
    first_sparse_checkpoint.pth by --resize-model-by-checkpoint."""
    folder = row_dir(ctx, key)
    prune = os.path.join(folder, 'prune')
    cmd = main_py(ctx, [*DAP, *(epochs or ctx['dap_epochs']), *extra, '--output_dir', prune], dtype, torchrun)
    text = run(ctx, cmd, 'the pruning run', deadline, os.path.join(folder, 'prune.log'))
    row = results(text, 'the pruning run')
    cut = os.path.join(prune, 'first_sparse_checkpoint.pth')
    if not os.path.isfile(cut):
        raise ChildFailed(f'the pruning run wrote no {cut}')
    if finetune:
        cmd = main_py(ctx, ['--epochs', '1', '--model-path', cut, '--resize-model-by-checkpoint',
                            '--output_dir', os.path.join(folder, 'finetune')], dtype)
        text = run(ctx, cmd, 'the fine-tune', deadline, os.path.join(folder, 'finetune.log'))
        row['top1'] = results(text, 'the fine-tune')['top1']
    return row


def baseline(ctx, key, deadline, flags):
    """A few steps of a baseline (WD-Prune, SaViT): one epoch, its cut, its accuracy."""
    folder = row_dir(ctx, key)
    cmd = main_py(ctx, [*flags, '--output_dir', os.path.join(folder, 'run')])
    return results(run(ctx, cmd, 'the run', deadline, os.path.join(folder, 'run.log')), 'the run')


def latency_table(ctx, key, deadline):
    """The latency table of the micro model at the runs' input size on this device."""
    folder = row_dir(ctx, key)
    cmd = fresh_process.python('latency_table.py', '--model', 'deit_micro_patch4_32', '--num-classes', '10',
                               '--input-size', ctx['size'], '--batch-size', '64', '--device', ctx['device'],
                               '--out', ctx['micro_table'], '--iters', '3', '--warmup', '1',
                               *(['--amp'] if ctx['device'].startswith('cuda') else []), '--check-ratios')
    run(ctx, cmd, 'scripts/latency_table.py', deadline, os.path.join(folder, 'latency_table.log'))
    return {'note': ctx['micro_table']}


def resume(ctx, key, deadline):
    """The first row's run, killed once it wrote checkpoint.pth (in the middle of pruning),
    then `--resume OUT/checkpoint.pth`: its parameter digest must be the uninterrupted run's."""
    folder = row_dir(ctx, key)
    first = os.path.join(folder, 'stopped')
    checkpoint = os.path.join(first, 'checkpoint.pth')
    flags = [*DAP, *ctx['dap_epochs']]
    text = run(ctx, main_py(ctx, [*flags, '--output_dir', first]), 'the run to stop', deadline,
               os.path.join(folder, 'stopped.log'), stop_when=lambda: os.path.isfile(checkpoint))
    if DIGEST.search(text) or not os.path.isfile(checkpoint):
        raise ChildFailed('the run to stop ended before it wrote checkpoint.pth and could be stopped')
    with open(os.path.join(first, 'log.txt')) as f:
        logged = sum(1 for line in f if line.strip())
    cmd = main_py(ctx, [*flags, '--output_dir', first, '--resume', checkpoint])
    text = run(ctx, cmd, 'the resumed run', deadline, os.path.join(folder, 'resumed.log'))
    row = results(text, 'the resumed run')
    expected = ctx['digests'][ctx['reference']]
    if row.get('digest') != expected:
        raise ChildFailed(f'parameter digest {row.get("digest")} after the resume, {expected} uninterrupted')
    return {**row, 'note': f'stopped after {logged} of {ctx["dap_epochs"][1]} epochs; same digest'}


def rows(smoke):
    """[(key, name, estimate_s, needs, function(ctx, key, deadline))]: the main.py rows in the
    order a user meets them; estimates in seconds (measured on 2 CPU cores for --smoke, guesses
    for an H100 otherwise: none was at hand to measure)."""
    dtype = 'bfloat16' if smoke else 'float16'
    short = {'epochs': ['--epochs', '1', '--prune-sparse-epoch', '1']} if smoke else {}
    dap_s, run_s = (30, 15) if smoke else (40, 20)
    out = [('dap_params', f'DAP {dtype}{"" if smoke else " GradScaler"}, params budget + resized fine-tune',
            dap_s, (), lambda c, k, d: dap(c, k, d, finetune=True))]
    if not smoke:
        out.append(('dap_bfloat16', 'DAP bfloat16, params budget', run_s, (),
                    lambda c, k, d: dap(c, k, d, dtype='bfloat16')))
    out += [
        ('dap_flops', f'DAP {dtype}, flops budget', run_s, (),
         lambda c, k, d: dap(c, k, d, ['--prune-budget', 'flops'], **short)),
        ('dap_heads', f'DAP {dtype}, params budget, whole heads (--prune-attn-unit head)', run_s, (),
         lambda c, k, d: dap(c, k, d, ['--prune-attn-unit', 'head'], **short)),
        ('latency_table_micro', 'latency table of the micro model', run_s, (), latency_table),
        ('dap_latency', f'DAP {dtype}, latency budget', run_s, ('latency_table_micro',),
         lambda c, k, d: dap(c, k, d, ['--prune-budget', 'latency', '--latency-table', c['micro_table']], **short)),
        ('dap_train_gates', f'DAP {dtype}, --prune-train-gates', run_s, (),
         lambda c, k, d: dap(c, k, d, ['--prune-train-gates'], **short)),
        ('dap_torchrun', f'DAP {dtype}, torchrun --nproc_per_node=1 ({"gloo" if smoke else "nccl"})', run_s + 10,
         (), lambda c, k, d: dap(c, k, d, ['--dist-eval'], torchrun=True, **short)),
        ('dap_resume', 'DAP stopped mid-pruning, --resume: same parameter digest', 2 * run_s, ('dap_params',),
         resume),
        ('wdprune', 'WD-Prune, one epoch', run_s, (), lambda c, k, d: baseline(c, k, d, WDPRUNE)),
        ('savit', 'SaViT, one epoch', run_s, (), lambda c, k, d: baseline(c, k, d, SAVIT)),
    ]
    return out
