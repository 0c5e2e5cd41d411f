"""Time and memory per optimizer step: plain fine-tuning vs DAP pruning, same model, batch, machine.

Prints both step times and their ratio, the peak memory of both steps (CUDA: max allocated
during the steps, above what was allocated before them; CPU: peak RSS growth of the process
over the steps), an evaluation pass with and without the pruner's heads, and one mask update as
a share of an epoch (about 3 per epoch, as the authors advise). Each measurement runs in a
fresh process, fine-tuning and pruning alternating, `--rounds` pairs of them (default 5); the
ratio reported is the median over the pairs of each pair's DAP / fine-tune ratio, with its min
and max, so that one noisy process cannot set the figure. JSON too.

A fresh process is this script again (`--child`, a new interpreter, never a fork: CUDA cannot
start in a forked child), with a time limit (`--timeout`) and its exit code checked: a
measurement that dies or hangs ends the script with one line that names it.

    python scripts/benchmark_train_step.py --model deit_tiny_patch16_224 --batch-size 16 \
        --input-size 224 --bpi-mode fast
"""
import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import timm
import torch

import common  # first: it puts the repository root on sys.path
import fresh_process
import models  # noqa: F401  (registers the models with timm)
from engine import autocast
from errors import UsageError
from losses import DistillationLoss, base_of, training_loss
from pruning import DepthAwarePruner, PruneConfig, PruneSchedule
from train.check_args import check_device
from utils import synchronize


def amp_dtype(args, device):
    """main.py's rule: autocast in --amp-dtype on CUDA; on the CPU only bfloat16, when asked."""
    dtype = getattr(torch, args.amp_dtype)
    return dtype if device.type == 'cuda' or dtype == torch.bfloat16 else None


def build(args, prune, device):
    torch.manual_seed(0)
    model = models.create_model(args.model, num_classes=args.num_classes, img_size=args.size).to(device)
    pruner = None
    if prune:
        # scores accumulate from step 0; no update during the timed steps
        schedule = PruneSchedule(steps_per_epoch=args.steps_per_epoch, start_epoch=0, sparse_epoch=1,
                                 finalize_epoch=2, steps_update_mask=10 ** 9)
        config = PruneConfig(prune_ratio=0.5, delta_psi_mode=args.bpi_mode,
                             delta_psi_width_div=args.bpi_fast_width, delta_psi_grid=args.bpi_fast_grid,
                             delta_psi_fraction=args.bpi_fast_fraction)
        pruner = DepthAwarePruner(model, args.num_classes, config, schedule)
    gates = {id(p) for p in model.gate_parameters()}
    params = [p for p in model.parameters() if id(p) not in gates]
    extra = pruner.param_groups(1e-4, 0.05) if pruner is not None else []
    return model, pruner, torch.optim.AdamW([{'params': params}] + extra, lr=1e-4)


def make_criterion(args, device):
    """Cross-entropy, or with --teacher-model DeiT's soft distillation loss (α 0.5, τ 1) with a
    teacher of that name (random weights: only its cost is measured)."""
    criterion = torch.nn.CrossEntropyLoss()
    if not args.teacher_model:
        return criterion
    torch.manual_seed(1)
    extra = {'img_size': args.size} if models.is_supported(args.teacher_model) else {}
    teacher = timm.create_model(args.teacher_model, num_classes=args.num_classes, **extra).to(device)
    return DistillationLoss(criterion, teacher, 'soft', 0.5, 1.0)


def make_step(model, pruner, optimizer, x, y, criterion, amp):
    net = pruner.module if pruner is not None else model
    if getattr(model, 'distilled', False):
        model.set_distilled_training(isinstance(criterion, DistillationLoss))

    def step():
        with autocast(x.device, amp):
            logits, aux = net(x) if pruner is not None else (net(x), None)
            loss = training_loss(criterion, x, logits, y)
            if pruner is not None:
                loss = loss + pruner.aux_loss(aux, y, base_of(criterion))
        loss.backward()
        optimizer.step()
        if pruner is not None:
            pruner.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def make_eval(model, pruner, x, amp):
    net = pruner.module if pruner is not None else model

    @torch.no_grad()
    def forward():
        net.eval()
        with autocast(x.device, amp):
            return net.forward_eval(x) if pruner is not None else net(x)
    return forward


def time_it(fn, device, warmup, iters):
    for _ in range(warmup):
        fn()
    synchronize(device)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - t) / iters


def rss_peak_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def measure(args, prune):
    """In a fresh process: one configuration's step time, peak memory of its steps, eval time
    and (pruning) one mask update."""
    device = torch.device(args.device)
    if device.type == 'cpu':
        torch.set_flush_denormal(True)
    amp = amp_dtype(args, device)
    x = torch.randn(args.batch_size, 3, args.size, args.size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    model, pruner, opt = build(args, prune, device)
    step = make_step(model, pruner, opt, x, y, make_criterion(args, device), amp)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = rss_peak_bytes()
    out = {'step_s': time_it(step, device, args.warmup, args.iters)}
    out['peak_mem_bytes'] = (torch.cuda.max_memory_allocated(device) if device.type == 'cuda'
                             else rss_peak_bytes()) - before
    out['eval_s'] = time_it(make_eval(model, pruner, x, amp), device, args.warmup, args.iters)
    if pruner is not None:
        out['mask_update_s'] = time_it(lambda: pruner.update_masks(pruner.schedule.step_start),
                                       device, 1, max(args.iters // 2, 1))
    if device.type == 'cuda':
        out['device_name'] = torch.cuda.get_device_name(device)
    return out


def run_fresh(args, prune, what):
    """`measure` in a fresh process (this script with --child); ChildFailed (one line naming
    `what`) if it dies or takes longer than --timeout."""
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, 'result.json')
        fresh_process.run(fresh_process.python(os.path.basename(__file__), *args.argv, '--child',
                                               'prune' if prune else 'finetune', '--child-out', result),
                          what, args.timeout)
        with open(result) as f:
            return json.load(f)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', default='deit_micro_patch4_32')
    p.add_argument('--input-size', type=int, default=None)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--num-classes', type=int, default=10)
    # the parent only reads this answer: every measurement starts CUDA in a new interpreter
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--iters', type=int, default=10)
    p.add_argument('--rounds', type=int, default=5,
                   help='pairs of fresh-process measurements, fine-tuning and DAP alternating')
    p.add_argument('--amp-dtype', default='float16', choices=['float16', 'bfloat16'],
                   help='autocast dtype as main.py\'s flag: on CUDA either; on the CPU bfloat16 turns it on')
    p.add_argument('--teacher-model', default='',
                   help='both steps distil from a teacher of this timm name (soft, DeiT\'s alpha and tau)')
    p.add_argument('--bpi-mode', default='faithful', choices=['faithful', 'fast'])
    p.add_argument('--bpi-fast-width', type=int, default=2)
    p.add_argument('--bpi-fast-grid', type=int, default=7)
    p.add_argument('--bpi-fast-fraction', type=float, default=1.0)
    p.add_argument('--steps-per-epoch', type=int, default=231,
                   help='optimizer steps per epoch, for the mask-update share (default: iFood 2019, '
                        '118,475 images / (64 x 4 GPUs x 2 accumulation))')
    p.add_argument('--json', default=None, help='write the figures here as JSON')
    p.add_argument('--timeout', type=float, default=600, help='seconds one fresh-process measurement may take')
    # a fresh process runs this script again with these two: measure one step, write its JSON
    p.add_argument('--child', choices=['finetune', 'prune'], help=argparse.SUPPRESS)
    p.add_argument('--child-out', help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.argv = argv
    for flag, value in (('--rounds', args.rounds), ('--iters', args.iters), ('--batch-size', args.batch_size)):
        if value < 1:
            p.exit(2, f'error: {flag} must be at least 1, got {value}\n')
    if args.input_size is None and not models.is_supported(args.model):
        p.exit(2, f'error: --model {args.model}: give its --input-size (not a supported ViT, --list-models)\n')
    args.size = args.input_size or models.vit_config(args.model).img_size
    return args


def measure_rounds(args):
    """{'finetune': [...], 'prune': [...]}: --rounds pairs of fresh-process measurements."""
    runs = {'finetune': [], 'prune': []}
    for i in range(args.rounds):
        for name in runs:
            what = f'{name} measurement, round {i + 1} of {args.rounds}'
            runs[name].append(run_fresh(args, name == 'prune', what))
    return runs


def main(argv=None):
    args = get_args(argv)
    if args.child:
        with open(args.child_out, 'w') as f:
            json.dump(measure(args, args.child == 'prune'), f)
        return None
    try:
        check_device(args.device)
        if args.json:
            common.prepare_out(args.json, '--json')
        runs = measure_rounds(args)
    except (UsageError, fresh_process.ChildFailed) as e:
        sys.exit(f'error: {e}')
    # each round's pair saw the same machine state: the ratio is taken per pair, then the median
    ratios = sorted(p['step_s'] / f['step_s'] for f, p in zip(runs['finetune'], runs['prune']))
    median = statistics.median(ratios)
    best = {name: min(r, key=lambda o: o['step_s']) for name, r in runs.items()}
    ft, pr = best['finetune'], best['prune']
    update = min(o['mask_update_s'] for o in runs['prune'])
    result = {
        'model': args.model, 'input_size': args.size, 'batch_size': args.batch_size,
        'device': ft.get('device_name', args.device),
        'threads': torch.get_num_threads(), 'bpi_mode': args.bpi_mode, 'teacher': args.teacher_model or None,
        'autocast': str(amp_dtype(args, torch.device(args.device))).replace('torch.', ''),
        'bpi_fast': {'width_div': args.bpi_fast_width, 'grid': args.bpi_fast_grid,
                     'fraction': args.bpi_fast_fraction} if args.bpi_mode == 'fast' else None,
        'finetune_step_s': statistics.median(o['step_s'] for o in runs['finetune']),
        'dap_step_s': statistics.median(o['step_s'] for o in runs['prune']),
        'ratio': median, 'ratio_min': ratios[0], 'ratio_max': ratios[-1], 'rounds': args.rounds,
        'ratio_of_best_steps': pr['step_s'] / ft['step_s'],
        'finetune_peak_mem_bytes': ft['peak_mem_bytes'], 'dap_peak_mem_bytes': pr['peak_mem_bytes'],
        'eval_s': ft['eval_s'], 'dap_eval_s': pr['eval_s'], 'eval_ratio': pr['eval_s'] / ft['eval_s'],
        'mask_update_s': update, 'steps_per_epoch': args.steps_per_epoch,
        'mask_updates_share_of_epoch': 3 * update / (args.steps_per_epoch * pr['step_s']),
    }
    mib = 2 ** 20
    print(f'{args.model} @ {args.size}px, batch {args.batch_size}, {result["device"]}, '
          f'ΔΨ heads: {args.bpi_mode}' + (f' {result["bpi_fast"]}' if result['bpi_fast'] else '')
          + (f', teacher {args.teacher_model} (soft distillation in both steps)' if args.teacher_model else ''))
    print(f'  fine-tuning step : {result["finetune_step_s"] * 1e3:9.1f} ms (median of {args.rounds})   '
          f'peak memory +{ft["peak_mem_bytes"] / mib:7.0f} MiB')
    print(f'  DAP pruning step : {result["dap_step_s"] * 1e3:9.1f} ms (median of {args.rounds})   '
          f'peak memory +{pr["peak_mem_bytes"] / mib:7.0f} MiB')
    print(f'  ratio            : {median:.2f}x, the median over {args.rounds} pairs of fresh processes '
          f'(min {ratios[0]:.2f}x, max {ratios[-1]:.2f}x)')
    print(f'  evaluation pass  : {ft["eval_s"] * 1e3:9.1f} ms plain, {pr["eval_s"] * 1e3:.1f} ms while '
          f'pruning   ratio {result["eval_ratio"]:.2f}x')
    print(f'  one mask update  : {update * 1e3:9.1f} ms   3 per epoch of {args.steps_per_epoch} '
          f'steps = {100 * result["mask_updates_share_of_epoch"]:.3f}% of the epoch')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == '__main__':
    main()
