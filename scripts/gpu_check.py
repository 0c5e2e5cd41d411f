"""The GPU check in one command: what a user of DAP feels on one GPU, as one table.

- a training step: fine-tuning against a DAP step (faithful and fast ΔΨ heads), under float16
  and bfloat16 autocast (the CPU smoke run: bfloat16 only), each in a fresh process
  (scripts/benchmark_train_step.py), with its peak memory;
- inference: the dense model against DAP cuts at prune ratios 0.5 and 0.75 under the
  parameter and the latency budget (the latency table built on this GPU in the same run,
  scripts/latency_table.py), and the uncut deit_tiny as the reference of a hand-made smaller
  model; at batch 1, 256 and 1024, eager and torch.compile'd; milliseconds per batch, speed-up
  over dense, the FLOPs-ideal speed-up, and the peak memory of the forward.

    python scripts/gpu_check.py --json output/gpu_check.json      # about 5–8 minutes on an H100
    python scripts/gpu_check.py --smoke                           # the same code on the CPU, ~1 min

Cut models come from random scores (scripts/benchmark.py's `random_cut`): their speed depends on
their widths, not on what training would have chosen.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchmark  # noqa: E402
import benchmark_train_step  # noqa: E402
import latency_table  # noqa: E402
import models  # noqa: E402
import timm  # noqa: E402
from train.validate import check_device  # noqa: E402
from utils import UsageError, count_flops, prepare_out, script_device  # noqa: E402

FULL = {'model': 'deit_small_patch16_224', 'reference': 'deit_tiny_patch16_224', 'input_size': 224,
        'train_batch': 64, 'batches': [1, 256, 1024], 'table_batch': 256, 'warmup': 5, 'iters': 20,
        'train_iters': 10, 'backend': 'inductor', 'num_classes': 1000, 'amp_dtypes': ['float16', 'bfloat16']}
# the same code on the CPU in about a minute: the tiny test models, small batches, and
# torch.compile through dynamo without code generation (no C++ compiler needed)
SMOKE = {'model': 'deit_micro_patch4_32', 'reference': 'deit_micro_patch4_32', 'input_size': 32,
         'train_batch': 8, 'batches': [1, 8], 'table_batch': 8, 'warmup': 2, 'iters': 2,
         'train_iters': 2, 'backend': 'eager', 'num_classes': 10, 'amp_dtypes': ['bfloat16']}
RATIOS = (0.5, 0.75)


def train_rows(cfg, device):
    """Fine-tuning and DAP steps (faithful, fast) under each autocast dtype, each in a fresh
    process; speed-up against the fine-tuning step of the same dtype."""
    rows = []
    for dtype in cfg['amp_dtypes']:
        base = None
        for name, prune, mode in (('fine-tune', False, 'faithful'), ('DAP step, faithful ΔΨ', True, 'faithful'),
                                  ('DAP step, fast ΔΨ', True, 'fast')):
            ns = benchmark_train_step.get_args([
                '--model', cfg['model'], '--input-size', str(cfg['input_size']),
                '--batch-size', str(cfg['train_batch']), '--device', device, '--warmup', '1',
                '--iters', str(cfg['train_iters']), '--bpi-mode', mode, '--num-classes', str(cfg['num_classes']),
                '--amp-dtype', dtype])
            out = benchmark_train_step.run_fresh(ns, prune)
            base = out['step_s'] if base is None else base
            rows.append({'part': f'train, {dtype}', 'model': name, 'batch': cfg['train_batch'],
                         'mode': 'eager', 'ms': 1e3 * out['step_s'], 'speedup': base / out['step_s'],
                         'flops_ideal': None, 'peak_mib': out['peak_mem_bytes'] / 2 ** 20})
    return rows


def inference_models(cfg, device, table_path):
    """{name: model} on the device: dense, the four cuts, the uncut reference."""
    size = cfg['input_size']
    dense, out = None, {}
    for pr in RATIOS:
        for budget in ('params', 'latency'):
            dense, cut = benchmark.random_cut(cfg['model'], pr, cfg['num_classes'], size, budget=budget,
                                              latency_table=table_path if budget == 'latency' else None)
            out[f'DAP pr {pr}, {budget} budget'] = cut
    ref = timm.create_model(cfg['reference'], num_classes=cfg['num_classes'], img_size=size)
    models_ = {'dense': dense, **out, f'{cfg["reference"]} (uncut)': ref}
    return {name: m.to(device).eval().set_inplace_writes(True) for name, m in models_.items()}


@torch.no_grad()
def time_forward(model, x, amp, warmup, iters):
    """(ms per batch, peak MiB of the forward above what was allocated before; None on CPU)."""
    device = x.device
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with torch.autocast(device.type, enabled=amp):
        ms = 1e3 * models.median_seconds(lambda: model(x), device, warmup, iters)
    peak = (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20 if device.type == 'cuda' else None
    return ms, peak


def inference_rows(cfg, device, table_path, compile_too=True):
    nets = inference_models(cfg, device, table_path)
    size, amp = cfg['input_size'], device.type == 'cuda'
    flops = {name: count_flops(m, size, device) for name, m in nets.items()}
    modes = {'eager': nets}
    if compile_too:
        modes['compiled'] = {name: torch.compile(m, backend=cfg['backend'], dynamic=True) for name, m in nets.items()}
    rows = []
    for batch in cfg['batches']:
        x = torch.randn(batch, 3, size, size, device=device)
        for mode, run in modes.items():
            times = {}
            for name, m in run.items():
                times[name] = time_forward(m, x, amp, cfg['warmup'], cfg['iters'])
            for name, (ms, peak) in times.items():
                rows.append({'part': f'inference, {"float16" if amp else "float32"}', 'model': name,
                             'batch': batch, 'mode': mode, 'ms': ms, 'speedup': times['dense'][0] / ms,
                             'flops_ideal': flops['dense'] / flops[name], 'peak_mib': peak})
    return rows


def print_table(rows, header):
    print(header)
    print(f'{"":<22}{"model":<36}{"batch":>6}  {"mode":<9}{"ms":>10}{"× base":>8}{"FLOPs-ideal":>12}{"peak MiB":>10}')
    for r in rows:
        ideal = f'{r["flops_ideal"]:>12.2f}' if r['flops_ideal'] is not None else f'{"":>12}'
        peak = f'{r["peak_mib"]:>10.0f}' if r['peak_mib'] is not None else f'{"–":>10}'
        print(f'{r["part"]:<22}{r["model"]:<36}{r["batch"]:>6}  {r["mode"]:<9}{r["ms"]:>10.2f}'
              f'{r["speedup"]:>8.2f}{ideal}{peak}')
    print('× base: speed-up over fine-tuning (training rows) or over the dense model at the same batch '
          'and mode (inference rows); FLOPs-ideal: the speed-up its FLOPs promise')


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--smoke', action='store_true', help='the same code on the CPU with tiny models, ~1 minute')
    p.add_argument('--device', default=None, help='default: cuda (cpu with --smoke)')
    p.add_argument('--no-compile', action='store_true', help='leave out the torch.compile\'d rows')
    p.add_argument('--json', default=None, help='also write the rows here')
    p.add_argument('--table-out', default=None, help='where the latency table goes (default: beside --json, '
                                                     'or output/gpu_check_latency_table.json)')
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    cfg = dict(SMOKE if args.smoke else FULL)
    device_name = args.device or ('cpu' if args.smoke else 'cuda')
    table_path = args.table_out or (os.path.splitext(args.json)[0] + '_latency_table.json' if args.json
                                    else 'output/gpu_check_latency_table.json')
    try:
        check_device(device_name)
        for path, flag in ((args.json, '--json'), (table_path, '--table-out')):
            if path:
                prepare_out(path, flag)
    except UsageError as e:
        sys.exit(f'error: {e}')
    started = time.perf_counter()
    rows = train_rows(cfg, device_name)  # fresh processes first: this one has not touched the GPU yet
    device = script_device(device_name)
    latency_table.main(['--model', cfg['model'], '--input-size', str(cfg['input_size']),
                        '--num-classes', str(cfg['num_classes']),
                        '--batch-size', str(cfg['table_batch']), '--device', device_name,
                        '--iters', str(max(cfg['iters'] // 4, 2)), '--warmup', '1', '--out', table_path]
                       + (['--amp'] if device.type == 'cuda' else []) + (['--check-ratios'] if args.smoke else []))
    rows += inference_rows(cfg, device, table_path, compile_too=not args.no_compile)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'cpu ({torch.get_num_threads()} threads)'
    minutes = (time.perf_counter() - started) / 60
    print_table(rows, f'GPU check{" (smoke)" if args.smoke else ""}: {name}, torch {torch.__version__}, '
                      f'{cfg["model"]} @ {cfg["input_size"]} px, {minutes:.1f} min; latency table at batch '
                      f'{cfg["table_batch"]}: {table_path}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'device': name, 'torch': torch.__version__, 'config': cfg, 'minutes': minutes,
                       'latency_table': table_path, 'rows': rows}, f, indent=1)
    return rows


if __name__ == '__main__':
    main()
