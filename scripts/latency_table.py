"""Measure the latency table of `--prune-budget latency` on this device (pruning/cost.py).

Times one batch through sub-blocks of the cut model's forms (read: LayerNorm and the gather of
the dims it reads; attention or MLP; write: the add into the dims it writes) over a grid of
their widths, all heads kept as DAP keeps them, and the rest of the model (patch embedding,
tokens, final norm, head). The budget interpolates in the grid; the table records what it was
measured on (device, torch, threads, batch, input size). It then checks itself: predicted
against measured milliseconds of the dense model and of cuts made from random scores.
`--attn-unit head` times the attention over head counts at the full head_dim instead (the
grid's middle axis `heads`), for `--prune-attn-unit head`'s cuts of whole heads.

    python scripts/latency_table.py --model deit_small_patch16_224 --input-size 224 \
        --batch-size 32 --device cpu --out tables/deit_small_cpu_b32.json
"""
import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

# common first: it puts the repository root on sys.path
from common import check_at_least, checked_script_args, prepare_out, script_device
import models
from errors import UsageError
from models import median_seconds
from models.layers import Block
from train.check_args import model_config
from pruning.cost import TABLE_FORMAT, LatencyTable, timed_layer_options
from pruning.gates import ATTN_UNITS
from pruning.random_scores import random_cut
from train.check_args import check_device


def axis(size: int, points: int, step: int = 8):
    """`points` widths from `step` to `size`, multiples of `step`, and `size − step`: the last
    interval holds the step from a full width (no gather, a plain add) to a partial one."""
    step = min(step, size)
    values = {max(step, round(step + (size - step) * k / (points - 1)) // step * step) for k in range(points)}
    values |= {size, max(step, size - step)}
    return sorted(v for v in values if v <= size)


def spread(width: int, size: int):
    """`width` of `size` dims spread over the range (None: all of them), as a cut keeps them."""
    if width >= size:
        return None
    return sorted({int(i * size / width) for i in range(width)})


def head_axis(H: int, points: int):
    """Head counts of the `heads` axis (--attn-unit head): every count from 1 to H when H ≤ 16,
    else `points` counts spread over them (with H − 1 and H)."""
    return list(range(1, H + 1)) if H <= 16 else axis(H, points, step=1)


def sub_block(kind, model, d_in, middle, d_out, device, dtype, attn_unit='head_dim'):
    """A one-sub-block Block of the given widths (random weights) with the layer options of the
    dense `model` (qkv bias, LayerScale, qk_norm, activation), in eval mode, adding in place. The
    attention's `middle` is its head_dim with all H heads, or with `attn_unit` 'head' its head
    count at the full head_dim D // H."""
    D, H = model.embed_dim, model.num_heads
    heads, head_dim = (H, middle) if attn_unit == 'head_dim' else (middle, D // H)
    sub = ({'in_idx': spread(d_in, D), 'out_idx': spread(d_out, D), 'num_heads': heads, 'head_dim': head_dim}
           if kind == 'attn' else
           {'in_idx': spread(d_in, D), 'out_idx': spread(d_out, D), 'hidden_features': middle})
    blk = Block(D, {'attn': None, 'mlp': None, kind: sub}, model.attn_scale, model.qkv_bias, **model.layer_options())
    blk = blk.to(device=device, dtype=dtype).eval()
    for w in blk.writes():
        w.inplace = True
    return blk


@torch.no_grad()
def time_grid(kind, model, axes, x, amp, warmup, iters, attn_unit='head_dim'):
    """Milliseconds of one batch x through each sub-block of the grid (nested lists)."""
    D, H = model.embed_dim, model.num_heads
    run = 'forward_attn' if kind == 'attn' else 'forward_mlp'
    grid = torch.zeros([len(a) for a in axes], dtype=torch.float64)
    for i, a in enumerate(axes[0]):
        for j, b in enumerate(axes[1]):
            for k, c in enumerate(axes[2]):
                blk = sub_block(kind, model, a, b, c, x.device, x.dtype, attn_unit)
                with torch.autocast(x.device.type, enabled=amp):
                    grid[i, j, k] = 1e3 * median_seconds(lambda: getattr(blk, run)(x), x.device, warmup, iters)
    return grid


def monotone(grid: torch.Tensor, full_width_dims=(0, 2)) -> torch.Tensor:
    """The grid made non-decreasing along every axis (the running maximum), so that noise
    cannot make keeping more cost less, except at the full width of the residual dims read and
    written (`full_width_dims`): a sub-block that reads or writes every dim needs no gather or
    scatter, and that dip is real (raising it overpredicted the dense deit_small by 28%)."""
    for dim in range(grid.ndim):
        n = grid.shape[dim] - (1 if dim in full_width_dims else 0)
        rising = torch.cummax(grid.narrow(dim, 0, n), dim=dim).values
        grid = torch.cat([rising, grid.narrow(dim, n, grid.shape[dim] - n)], dim=dim)
    return grid


def rest_of_model(model):
    """The model with every sub-block removed: patch embedding, tokens, final norm and head."""
    arch = model.arch()
    arch.update(blocks=[{'attn': None, 'mlp': None} for _ in arch['blocks']], cut=True)
    return models.load_model({'arch': arch}, weights=False)


@torch.no_grad()
def time_model(model, images, amp, warmup, iters):
    model.eval()
    with torch.autocast(images.device.type, enabled=amp):
        return 1e3 * median_seconds(lambda: model(images), images.device, warmup, iters)


def check_table(table: LatencyTable, args, dense, images, amp):
    """Predicted against measured ms per batch: the dense model and random-score DAP cuts at
    prune ratios 0.5 and 0.75 of parameters (interleaved, best of 2 rounds), cutting the
    attention by the table's --attn-unit."""
    cases = {'dense': dense}
    for pr in args.check_ratios:
        _, cut = random_cut(args.model, pr, dense.num_classes, args.input_size, seed=args.seed,
                            attn_unit=args.attn_unit)
        cases[f'cut pr {pr} (params)'] = cut.to(images.device).set_inplace_writes(True)
    dense.set_inplace_writes(True)
    measured = {name: [] for name in cases}
    for _ in range(2):
        for name, m in cases.items():
            measured[name].append(time_model(m, images, amp, args.warmup, args.iters))
    return [{'model': name, 'predicted_ms': table.predict_ms(m), 'measured_ms': min(measured[name])}
            for name, m in cases.items()]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', default='deit_small_patch16_224')
    p.add_argument('--input-size', type=int, default=None, help='default: the model\'s')
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--num-classes', type=int, default=1000)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--amp', action='store_true', help='time under float16 autocast (CUDA)')
    p.add_argument('--points', type=int, default=5,
                   help='grid points per width axis (the hidden width gets one more), besides the '
                        'step below the full width')
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--iters', type=int, default=5)
    p.add_argument('--check-ratios', type=float, nargs='*', default=[0.5, 0.75],
                   help='prune ratios of the random-score cuts the table is checked on')
    p.add_argument('--attn-unit', default='head_dim', choices=ATTN_UNITS,
                   help='the attention grid\'s middle axis: head_dim widths with all heads (for the '
                        'paper\'s cut) or head counts at the full head_dim (for --prune-attn-unit head)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', required=True, help='the table, JSON')
    return p.parse_args(argv)


def check_args(args):
    config = model_config(args.model)
    check_at_least((('--batch-size', args.batch_size, 1), ('--points', args.points, 2),
                    ('--iters', args.iters, 1), ('--warmup', args.warmup, 0),
                    ('--num-classes', args.num_classes, 1), ('--input-size', args.input_size, 1)))
    if not all(0 < r < 1 for r in args.check_ratios):
        raise UsageError(f'--check-ratios must lie in (0, 1), got {args.check_ratios}')
    check_device(args.device)
    if args.amp and not args.device.startswith('cuda'):
        raise UsageError('--amp times float16 autocast on CUDA; this --device is not')
    patch = config.patch_size
    if args.input_size is not None and args.input_size % patch:
        # the patch embedding would drop the rest: the table would be of a smaller input size
        raise UsageError(f'--input-size {args.input_size} is not a multiple of {args.model}\'s patch '
                         f'{patch}: its tokens would be those of {args.input_size // patch * patch} px')
    prepare_out(args.out)
    try:  # writable now, not after minutes of timing
        with open(f'{args.out}.tmp', 'w'):
            pass
        os.remove(f'{args.out}.tmp')
    except OSError as e:
        raise UsageError(f'--out {args.out}: cannot write there: {e.strerror or e}') from None


def main(argv=None):
    args = checked_script_args(get_args, check_args, argv)
    device = script_device(args.device)
    args.input_size = args.input_size or models.vit_config(args.model).img_size
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    dense = models.create_model(args.model, num_classes=args.num_classes, img_size=args.input_size).to(device).eval()
    D, H = dense.embed_dim, dense.num_heads
    hidden, tokens = int(D * dense.mlp_ratio), dense.patch_embed.num_patches + dense.num_prefix_tokens
    x = torch.randn(args.batch_size, tokens, D, device=device)
    images = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    middle = axis(D // H, max(2, args.points - 1)) if args.attn_unit == 'head_dim' else head_axis(H, args.points)
    axes = {'attn': [axis(D, args.points), middle, axis(D, args.points)],
            'mlp': [axis(D, args.points), axis(hidden, args.points + 1), axis(D, args.points)]}
    names = {'attn': ('d_in', LatencyTable.ATTN_MIDDLE[args.attn_unit], 'd_out'), 'mlp': ('d_in', 'hidden', 'd_out')}
    table = {
        'format': TABLE_FORMAT, 'model': args.model, 'layer_options': timed_layer_options(dense),
        'embed_dim': D, 'num_heads': H, 'head_dim': D // H,
        'mlp_hidden': hidden, 'tokens': tokens, 'batch_size': args.batch_size, 'input_size': args.input_size,
        'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else f'cpu ({platform.processor() or platform.machine()})',
        'torch': torch.__version__, 'threads': torch.get_num_threads(),
        'amp': 'float16' if args.amp else None, 'warmup': args.warmup, 'iters': args.iters,
        'created': datetime.datetime.now().isoformat(timespec='seconds'),
        'unit': 'milliseconds per batch (median of iters)',
        'other_ms': time_model(rest_of_model(dense).to(device), images, args.amp, args.warmup, args.iters)}
    for kind in ('attn', 'mlp'):
        raw = time_grid(kind, dense, axes[kind], x, args.amp, args.warmup, args.iters, args.attn_unit)
        table[kind] = {'axes': dict(zip(names[kind], axes[kind])), 'ms': monotone(raw).tolist(),
                       'measured_ms': raw.tolist()}
        print(f'{kind}: {raw.numel()} sub-blocks timed, {raw.min():.2f} … {raw.max():.2f} ms')
    table['seconds_to_measure'] = time.perf_counter() - started
    checks = check_table(LatencyTable(table), args, dense, images, args.amp)
    table['check'] = checks
    table['seconds_to_build'] = time.perf_counter() - started
    tmp = f'{args.out}.tmp'
    try:
        with open(tmp, 'w') as f:
            json.dump(table, f, indent=1)
        os.replace(tmp, args.out)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        sys.exit(f'error: --out {args.out} could not be written: {e.strerror or e}')
    print(f'{args.model} @ {args.input_size}px, batch {args.batch_size}, {table["device"]}, '
          f'{table["threads"]} threads, torch {table["torch"]}: grid measured in '
          f'{table["seconds_to_measure"]:.0f} s')
    print(f'{"model":<24}{"predicted ms":>14}{"measured ms":>13}{"error":>8}')
    for c in checks:
        err = c['predicted_ms'] / c['measured_ms'] - 1
        print(f'{c["model"]:<24}{c["predicted_ms"]:>14.1f}{c["measured_ms"]:>13.1f}{err:>+8.1%}')
    print(f'wrote {args.out}')
    return table


if __name__ == '__main__':
    try:
        main()
    except KeyboardInterrupt:
        print('stopped by Ctrl-C: no table was written', file=sys.stderr)
        sys.exit(130)
