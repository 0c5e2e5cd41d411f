"""Time per optimizer step: plain fine-tuning vs DAP pruning, same model, batch and machine.

Prints both times, their ratio, and the time of one mask update as a share of an epoch
(with about 3 updates per epoch, as the authors advise). Writes the figures as JSON too.

    python scripts/benchmark_train_step.py --model deit_tiny_patch16_224 --batch-size 32
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models  # noqa: E402,F401  (registers the models with timm)
import timm  # noqa: E402
from pruning import DepthAwarePruner, PruneConfig, PruneSchedule  # noqa: E402
from utils import synchronize  # noqa: E402


def make_step(model, pruner, optimizer, x, y, criterion, amp):
    net = pruner.module if pruner is not None else model

    def step():
        with torch.autocast(x.device.type, enabled=amp):
            if pruner is not None:
                logits, aux = net(x)
                loss = criterion(logits, y) + pruner.aux_loss(aux, y, criterion)
            else:
                loss = criterion(net(x), y)
        loss.backward()
        optimizer.step()
        if pruner is not None:
            pruner.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def time_it(fn, device, warmup, iters):
    for _ in range(warmup):
        fn()
    synchronize(device)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - t) / iters


def build(name, img_size, num_classes, prune, device, steps_per_epoch):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=num_classes, img_size=img_size).to(device)
    pruner = None
    if prune:
        # scores accumulate from step 0; no update during the timed steps
        schedule = PruneSchedule(steps_per_epoch=steps_per_epoch, start_epoch=0, sparse_epoch=1,
                                 finalize_epoch=2, steps_update_mask=10 ** 9)
        pruner = DepthAwarePruner(model, num_classes, PruneConfig(prune_ratio=0.5), schedule)
    gates = {id(p) for p in model.gate_parameters()}
    params = [p for p in model.parameters() if id(p) not in gates]
    if pruner is not None:
        params += list(pruner.heads.parameters())
    return model, pruner, torch.optim.AdamW(params, lr=1e-4)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', default='deit_micro_patch4_32')
    p.add_argument('--input-size', type=int, default=None)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--num-classes', type=int, default=10)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--iters', type=int, default=10)
    p.add_argument('--steps-per-epoch', type=int, default=231,
                   help='optimizer steps per epoch, for the mask-update share (default: iFood 2019, '
                        '118,475 images / (64 x 4 GPUs x 2 accumulation))')
    p.add_argument('--json', default=None, help='write the figures here as JSON')
    args = p.parse_args(argv)
    device = torch.device(args.device)
    amp = device.type == 'cuda'
    if device.type == 'cpu':
        torch.set_flush_denormal(True)
    size = args.input_size or models.CONFIGS[args.model].img_size
    x = torch.randn(args.batch_size, 3, size, size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    criterion = torch.nn.CrossEntropyLoss()

    times = {}
    for prune in (False, True):
        model, pruner, opt = build(args.model, size, args.num_classes, prune, device,
                                   args.steps_per_epoch)
        times['dap' if prune else 'finetune'] = time_it(
            make_step(model, pruner, opt, x, y, criterion, amp), device, args.warmup, args.iters)
        if prune:
            update = time_it(lambda: pruner.update_masks(pruner.schedule.step_start),
                             device, 1, max(args.iters // 2, 1))
    epoch = args.steps_per_epoch * times['dap']
    result = {
        'model': args.model, 'input_size': size, 'batch_size': args.batch_size,
        'device': str(device) if device.type != 'cuda' else torch.cuda.get_device_name(device),
        'amp': amp, 'finetune_step_s': times['finetune'], 'dap_step_s': times['dap'],
        'ratio': times['dap'] / times['finetune'], 'mask_update_s': update,
        'steps_per_epoch': args.steps_per_epoch,
        'mask_updates_share_of_epoch': 3 * update / epoch,
    }
    print(f'{args.model} @ {size}px, batch {args.batch_size}, {result["device"]}'
          f'{" (AMP)" if amp else ""}')
    print(f'  fine-tuning step : {times["finetune"] * 1e3:9.1f} ms')
    print(f'  DAP pruning step : {times["dap"] * 1e3:9.1f} ms   ratio {result["ratio"]:.2f}x')
    print(f'  one mask update  : {update * 1e3:9.1f} ms   3 per epoch of {args.steps_per_epoch} '
          f'steps = {100 * result["mask_updates_share_of_epoch"]:.3f}% of the epoch')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == '__main__':
    main()
