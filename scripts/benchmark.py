"""Dense vs cut ViT: parameters, FLOPs, throughput and latency, measured in one run.

Either give a cut checkpoint (first_sparse_checkpoint.pth or a fine-tuned one with `arch`):

    python scripts/benchmark.py --checkpoint OUT/first_sparse_checkpoint.pth

or a model name and a prune ratio: a cut architecture is then made with DAP's budget from
random ΔΨ and random Taylor scores (or SaViT's, `--prune-method savit`), so speed can be
measured without training:

    python scripts/benchmark.py --model deit_small_patch16_224 --prune-ratio 0.5 --batch-size 32

`--prune-budget flops` or `--prune-budget latency --latency-table FILE` (scripts/latency_table.py)
make that cut remove the share of FLOPs or of the table's latency instead of parameters.
Several prune ratios and attention units are cut and timed side by side in one run, interleaved
(`--prune-attn-unit head` cuts whole heads, DAP's default head_dim channels of every head):

    python scripts/benchmark.py --prune-ratio 0.5 0.75 --prune-attn-unit head_dim head

FLOPs are counted by torch.utils.flop_counter (matmuls and convolutions; a multiply-add is 2
FLOPs). The dense model is the uncut model of the same family, input size and class count.
"""
import argparse
import copy
import json
import sys

import torch

# common first: it puts the repository root on sys.path
from common import check_at_least, checked_script_args, export_onnx, prepare_out, script_device
import models
from errors import UsageError
from pruning import BUDGET_UNITS, ConfigError, LatencyTable
from pruning.gates import ATTN_UNITS
from pruning.random_scores import random_cut
from train.check_args import check_device, model_config
from train.checkpoints import load_checkpoint_file
from pruning.cost import count_flops
from utils import synchronize


def from_checkpoint(path):
    """(dense, cut) models of a cut checkpoint; UsageError (one line) if it holds no cut model."""
    ckpt = load_checkpoint_file(path, '--checkpoint')
    if ckpt.get('arch') is None or not isinstance(ckpt.get('model'), dict):
        raise UsageError(f'--checkpoint {path} has no "arch" and "model": it is not a cut model '
                         '(first_sparse_checkpoint.pth)')
    try:
        cut = models.load_model(ckpt)
    except ValueError as e:
        raise UsageError(f'--checkpoint {path}: {e}') from None
    arch = ckpt['arch']
    dense = models.create_model(arch['family'], num_classes=arch['num_classes'], img_size=arch['img_size'])
    return dense, cut


@torch.no_grad()
def measure(model, x, amp, warmup, iters):
    """Seconds per batch (median of `iters` timed forwards)."""
    model.eval()
    with torch.autocast(x.device.type, enabled=amp):
        return models.median_seconds(lambda: model(x), x.device, warmup, iters)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--checkpoint', default=None, help='a cut checkpoint (with "arch")')
    p.add_argument('--model', default='deit_small_patch16_224')
    p.add_argument('--prune-ratio', type=float, nargs='+', default=[0.5],
                   help='one or more: each gives a cut (without --checkpoint), timed side by side')
    p.add_argument('--prune-method', default='block_pr', choices=['block_pr', 'uniform', 'global', 'savit'],
                   help='whose cut architecture to make from random scores (without --checkpoint)')
    p.add_argument('--num-classes', type=int, default=1000)
    p.add_argument('--input-size', type=int, default=None)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--iters', type=int, default=10)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--align', type=int, default=0,
                   help='also measure the cut model with widths padded to this multiple '
                        '(models.align_widths; 8 suits GPU tensor cores)')
    p.add_argument('--compile', action='store_true',
                   help='measure torch.compile\'d models (fuses the norms, gathers and scatters)')
    p.add_argument('--reference', default=None,
                   help='also time this uncut model (e.g. deit_tiny_patch16_224): how close a '
                        'hand-designed smaller model of the same family gets to its FLOPs-ideal speedup')
    p.add_argument('--deploy', default='measure', choices=['measure', 'none'],
                   help='measure: every cut sub-block in its fastest exact form on this device '
                        '(models.deploy, chosen per sub-block by timing); none: the plain cut model')
    p.add_argument('--prune-budget', default='params', choices=BUDGET_UNITS,
                   help='what --prune-ratio removes a share of in the random DAP cut')
    p.add_argument('--latency-table', default=None,
                   help='--prune-budget latency: the table (scripts/latency_table.py); with any '
                        'budget, also print the latency it predicts')
    p.add_argument('--prune-attn-unit', nargs='+', default=['head_dim'], choices=ATTN_UNITS,
                   help='what the random DAP cut removes of attention, one or more: head_dim channels of every '
                        'head (the paper\'s) or whole heads; each gives a cut at each --prune-ratio')
    p.add_argument('--prune-round-to', type=int, default=None,
                   help='round kept widths to this multiple in the random cut (default: --prune-round-to\'s)')
    p.add_argument('--onnx', action='store_true',
                   help='also time dense and cut exported to ONNX in onnxruntime (CPU)')
    p.add_argument('--profile', action='store_true',
                   help='also print where the time goes: torch.profiler, by operator, dense and cut')
    p.add_argument('--json', default=None, help='also write the figures here')
    return p.parse_args(argv)


def cut_names(args):
    """{name: (prune ratio, attention unit)} of the cuts: 'cut' when there is one (a --checkpoint
    or one ratio and unit), else one name per ratio and unit."""
    cuts = [(pr, unit) for pr in args.prune_ratio for unit in args.prune_attn_unit]
    if len(cuts) == 1:
        return {'cut': cuts[0]}
    return {f'cut pr {pr}, {unit}': (pr, unit) for pr, unit in cuts}


def build_variants(args):
    """(source description, {name: model timed}, {name: model counted}) on the device: dense,
    each cut (`cut_names`), and the optional ones. A deployed cut is timed; its parameters and
    FLOPs are the cut model's own (the deployment's dense forms only add exact zeros)."""
    cuts = {}
    if args.checkpoint:
        dense, cuts['cut'] = from_checkpoint(args.checkpoint)
        source = args.checkpoint
    else:
        size = args.input_size or model_config(args.model).img_size
        for name, (pr, unit) in cut_names(args).items():
            try:
                dense, cuts[name] = random_cut(args.model, pr, args.num_classes, size, args.seed,
                                               args.prune_method, args.prune_round_to, args.prune_budget,
                                               args.latency_table if args.prune_budget == 'latency' else None,
                                               attn_unit=unit)
            except ConfigError as e:
                raise UsageError(e.reason if e.field == 'latency_table' else str(e)) from None
        ratios = ', '.join(map(str, args.prune_ratio))
        units = '' if args.prune_attn_unit == ['head_dim'] else \
            f', attention cut by {" and by ".join(args.prune_attn_unit)}'
        source = (f'{args.model}, {args.prune_method} at prune ratio {ratios} of '
                  f'{args.prune_budget}{units}, random scores (seed {args.seed})')
    if args.latency_table:  # the one check main.py makes too: the table was measured for this model
        args.table.check_model(dense, UsageError)
    device = torch.device(args.device)
    variants = {'dense': dense.to(device), **{name: cut.to(device) for name, cut in cuts.items()}}
    if args.align:
        variants[f'cut, aligned to {args.align}'] = models.align_widths(variants['cut'], args.align)
    if args.reference:
        variants[args.reference] = models.create_model(
            args.reference, num_classes=dense.num_classes, img_size=dense.img_size).to(device)
    for m in variants.values():  # residual writes add in place: an inference-only switch
        m.set_inplace_writes(True)
    counted = dict(variants)
    if args.deploy == 'measure':
        x = torch.randn(args.batch_size, 3, dense.img_size, dense.img_size, device=device)
        for name in cuts:
            variants[name], plan = models.deploy(variants[name], x, amp=device.type == 'cuda')
            forms = [f'{f["read"]}/{f["write"]}' for p in plan.values() for f in p.values()]
            forms = ', '.join(f'{forms.count(f)}× {f}' for f in sorted(set(forms)))
            source += f'; forms (read/write): {forms}' if len(cuts) == 1 else f'\n{name}, forms (read/write): {forms}'
    return source, variants, counted


def time_variants(variants, x, amp, args):
    """Seconds per batch of each model; the models interleaved so that all see the same
    machine state, the best of 3 rounds of medians."""
    run = {name: torch.compile(m) if args.compile else m for name, m in variants.items()}
    times = {name: [] for name in variants}
    for _ in range(3):
        for name, model in run.items():
            times[name].append(measure(model, x, amp, args.warmup, args.iters))
    return {name: min(t) for name, t in times.items()}


def time_onnx(variants, x, args):
    """Seconds per batch of dense and cut exported to ONNX (scripts/export.py) in onnxruntime on
    the CPU, interleaved and aggregated as the PyTorch timings are (best of 3 rounds of medians)."""
    import tempfile
    import numpy as np
    import onnxruntime as ort
    sessions, feed = {}, {'images': x.cpu().numpy().astype(np.float32)}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ('dense', 'cut'):
            path = f'{tmp}/{name}.onnx'
            export_onnx(copy.deepcopy(variants[name]).cpu().float().set_inplace_writes(False), path)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = torch.get_num_threads()
            sessions[name] = ort.InferenceSession(path, opts, providers=['CPUExecutionProvider'])
    times = {name: [] for name in sessions}
    for _ in range(3):
        for name, sess in sessions.items():
            times[name].append(models.median_seconds(lambda: sess.run(None, feed), torch.device('cpu'),
                                                     args.warmup, args.iters))
    return {name: min(t) for name, t in times.items()}


@torch.no_grad()
def profile(variants, x, amp, top=12):
    """Self time per operator of one forward of each model (after a warm-up), as a table."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.device.type == 'cuda' else [])
    for name in ('dense', 'cut'):
        model = variants[name]
        with torch.autocast(x.device.type, enabled=amp):
            model(x)
            with torch_profile(activities=activities) as prof:
                model(x)
                synchronize(x.device)
        key = 'self_cuda_time_total' if x.device.type == 'cuda' else 'self_cpu_time_total'
        print(f'-- {name}: where one forward of batch {x.shape[0]} spends its time')
        print(prof.key_averages().table(sort_by=key, row_limit=top))


def report(res, variants, args):
    cuts = [name for name in variants if name in res.get('cuts', ['cut'])]
    width = 20 if cuts == ['cut'] else max(20, *(len(name) + 2 for name in variants))
    print(f'{res["source"]}\n{res["family"]} @ {res["input_size"]}px, batch {args.batch_size}, '
          f'{res["device"]}{", AMP" if res["amp"] else ""}{", torch.compile" if args.compile else ""}')
    print(f'{"":{width}}{"params":>14}{"GFLOPs/img":>12}{"ms/batch":>11}{"img/s":>10}')
    for name in variants:
        r = res[name]
        print(f'{name:{width}}{r["params"]:>14,}{r["flops_per_image"] / 1e9:>12.3f}'
              f'{r["latency_ms_per_batch"]:>11.1f}{r["throughput_img_s"]:>10.1f}')
    if cuts == ['cut']:
        print(f'speedup {res["speedup"]:.2f}x, FLOPs-ideal {res["flops_ideal_speedup"]:.2f}x '
              f'({res["speedup_vs_ideal"]:.2f} of ideal)'
              + (f'; aligned cut: {res["speedup_aligned"]:.2f}x' if args.align else ''))
        print(f'cut / dense: latency {res["latency_ratio"]:.3f}, FLOPs {res["flops_ratio"]:.3f}, params '
              f'{res["cut"]["params"] / res["dense"]["params"]:.3f}')
    else:  # one row per cut, side by side
        print(f'{"cut / dense":{width}}{"latency":>9}{"FLOPs":>8}{"params":>8}{"speedup":>9}{"FLOPs-ideal":>13}'
              f'{"of ideal":>10}')
        for name in cuts:
            r = res[name]
            print(f'{name:{width}}{r["latency_ratio"]:>9.3f}{r["flops_ratio"]:>8.3f}{r["params_ratio"]:>8.3f}'
                  f'{r["speedup"]:>8.2f}x{r["flops_ideal_speedup"]:>12.2f}x{r["speedup_vs_ideal"]:>10.2f}')
    if args.latency_table:
        t = args.table.table
        pd = res['dense']['predicted_ms_per_batch']
        predicted = [(name, res[name]['predicted_ms_per_batch']) for name in cuts]
        print(f'latency table {args.latency_table} ({t["device"]}, batch {t["batch_size"]}): predicts dense '
              f'{pd:.1f} ms, ' + ', '.join(f'{name} {pc:.1f} ms (cut / dense {pc / pd:.3f})' for name, pc in predicted))
    if args.reference:
        r = res[args.reference]
        print(f'{args.reference} (uncut reference): {r["speedup"]:.2f}x, FLOPs-ideal '
              f'{r["flops_ideal_speedup"]:.2f}x ({r["speedup_vs_ideal"]:.2f} of ideal)')


def cut_figures(res, times, name):
    """The cut `name` against the dense model: measured latency, FLOPs and speed-up, the speed-up
    its FLOPs promise and the share of it measured."""
    flops = res[name]['flops_per_image'], res['dense']['flops_per_image']
    out = {'latency_ratio': times[name] / times['dense'], 'flops_ratio': flops[0] / flops[1],
           'speedup': times['dense'] / times[name], 'flops_ideal_speedup': flops[1] / flops[0]}
    out['speedup_vs_ideal'] = out['speedup'] / out['flops_ideal_speedup']
    return out


def check_args(args):
    """The numbers in their ranges and --json writable, before anything is built or timed."""
    for pr in args.prune_ratio:
        if not 0 < pr < 1:
            raise UsageError(f'--prune-ratio must be in (0, 1), got {pr}')
    if (args.checkpoint or args.prune_method == 'savit') and args.prune_attn_unit != ['head_dim']:
        raise UsageError('--prune-attn-unit sets the random DAP cut; '
                         + ('a --checkpoint is already cut' if args.checkpoint else 'SaViT searches heads itself'))
    if args.checkpoint and len(args.prune_ratio) > 1:
        raise UsageError('several --prune-ratio values make random cuts; a --checkpoint is already cut')
    several = [f for f, on in (('--align', args.align), ('--onnx', args.onnx), ('--profile', args.profile)) if on]
    if len(cut_names(args)) > 1 and several:
        raise UsageError(f'{several[0]} measures one cut: give one --prune-ratio and one --prune-attn-unit')
    check_at_least((('--iters', args.iters, 1), ('--warmup', args.warmup, 0),
                    ('--batch-size', args.batch_size, 1), ('--num-classes', args.num_classes, 1),
                    ('--align', args.align, 0), ('--prune-round-to', args.prune_round_to, 1),
                    ('--input-size', args.input_size, 1)))
    if args.prune_budget == 'latency' and not args.latency_table:
        raise UsageError('--prune-budget latency needs --latency-table FILE (scripts/latency_table.py)')
    if args.prune_budget != 'params' and (args.checkpoint or args.prune_method == 'savit'):
        raise UsageError(f'--prune-budget {args.prune_budget} sets the budget of the random DAP cut; '
                         + ('a --checkpoint is already cut' if args.checkpoint else 'SaViT counts parameters'))
    if args.latency_table:
        try:
            args.table = LatencyTable.load(args.latency_table)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if args.reference is not None:
        model_config(args.reference, '--reference')
    check_device(args.device)
    if args.json:
        prepare_out(args.json, '--json')


def main(argv=None):
    args = checked_script_args(get_args, check_args, argv)
    device = script_device(args.device)
    amp = device.type == 'cuda'
    try:
        source, variants, counted = build_variants(args)
    except UsageError as e:
        sys.exit(f'error: {e}')
    dense = counted['dense']
    size = dense.img_size
    times = time_variants(variants, torch.randn(args.batch_size, 3, size, size, device=device), amp, args)
    res = {'source': source, 'family': dense.family, 'input_size': size,
           'batch_size': args.batch_size, 'amp': amp, 'compiled': args.compile,
           'device': torch.cuda.get_device_name(device) if device.type == 'cuda'
           else f'cpu ({torch.get_num_threads()} threads)',
           'flop_counter': 'torch.utils.flop_counter (matmul + conv, 2 FLOPs per multiply-add)'}
    for name, model in counted.items():
        t = times[name]
        res[name] = {'params': sum(q.numel() for q in model.parameters()),
                     'flops_per_image': count_flops(model, size, device),
                     'latency_ms_per_batch': 1e3 * t, 'throughput_img_s': args.batch_size / t}
        if args.latency_table:
            res[name]['predicted_ms_per_batch'] = args.table.predict_ms(model)
    res['budget'] = args.prune_budget
    names = cut_names(args)  # one, 'cut', with a --checkpoint
    if len(names) == 1:
        res.update(cut_figures(res, times, 'cut'))
    else:
        res['cuts'] = list(names)
        for name, (pr, unit) in names.items():
            res[name].update(prune_ratio=pr, attn_unit=unit, params_ratio=res[name]['params'] / res['dense']['params'],
                             **cut_figures(res, times, name))
    if args.align:
        res['speedup_aligned'] = times['dense'] / times[f'cut, aligned to {args.align}']
    if args.reference:
        r = res[args.reference]
        r['speedup'] = times['dense'] / times[args.reference]
        r['flops_ideal_speedup'] = res['dense']['flops_per_image'] / r['flops_per_image']
        r['speedup_vs_ideal'] = r['speedup'] / r['flops_ideal_speedup']
    if args.onnx:
        onnx = time_onnx(variants, torch.randn(args.batch_size, 3, size, size), args)
        res['onnx'] = {'dense_ms_per_batch': 1e3 * onnx['dense'], 'cut_ms_per_batch': 1e3 * onnx['cut'],
                       'speedup': onnx['dense'] / onnx['cut']}
        res['onnx']['speedup_vs_ideal'] = res['onnx']['speedup'] / res['flops_ideal_speedup']
    report(res, variants, args)
    if args.profile:
        profile(variants, torch.randn(args.batch_size, 3, size, size, device=device), amp)
    if args.onnx:
        o = res['onnx']
        print(f'onnxruntime (CPU): dense {o["dense_ms_per_batch"]:.1f} ms, cut {o["cut_ms_per_batch"]:.1f} ms '
              f'per batch: speedup {o["speedup"]:.2f}x ({o["speedup_vs_ideal"]:.2f} of ideal)')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == '__main__':
    main()
