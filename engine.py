"""Train and eval loops (DeiT's engine.py), device-agnostic, driving the pruner when there is one."""
import math
from contextlib import nullcontext
from typing import Iterable, Optional

import torch
from timm.utils import accuracy

from datasets import UNREADABLE, UnreadableImageError
from losses import base_of, training_loss
from pruning import PrunerModule
from errors import NonFiniteLossError
from utils import MetricLogger, SmoothedValue


def autocast(device: torch.device, amp):
    """The autocast of `amp`: off (None or False), a dtype (torch.float16, torch.bfloat16),
    or True (float16, DeiT's)."""
    if not amp:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if amp is True else amp)


def loss_scale(loss_scaler):
    """The scale that this step's gradients will carry (1.0 without a scaler), read before the
    step updates it and without waiting for the device: a copy of the GradScaler's own scale
    tensor (`get_scale()` and `state_dict()` would synchronise), or its initial scale before
    its first step. `loss_scaler` is timm's NativeScaler."""
    scaler = getattr(loss_scaler, '_scaler', None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return float(scaler._init_scale) if scaler._scale is None else scaler._scale.clone()


def _backward_and_step(loss, optimizer, loss_scaler, clip_grad, update):
    """Backward, and on an update step clip and step. AMP's scaler exists only on CUDA."""
    # the parameter list is only needed to clip, on update steps
    params = [p for g in optimizer.param_groups for p in g['params']] \
        if update and clip_grad is not None else None
    if loss_scaler is not None:
        loss_scaler(loss, optimizer, clip_grad=clip_grad, parameters=params, need_update=update)
        return
    loss.backward()
    if update:
        if clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_grad)
        optimizer.step()


def readable_rows(samples, targets, fill):
    """(samples, targets, n) without the n rows whose image could not be read (target UNREADABLE,
    under --skip-bad-images): dropped, or with `fill` replaced by copies of the batch's readable
    rows, so that every training step sees as many samples (and mixup an even batch)."""
    bad = targets == UNREADABLE
    n = int(bad.sum())
    if n == 0:
        return samples, targets, 0
    good = (~bad).nonzero().flatten()
    if not fill:
        return samples[good], targets[good], n
    if len(good) == 0:
        raise UnreadableImageError(f'all {n} images of a training batch are unreadable')
    src = good[torch.arange(n) % len(good)]
    samples, targets = samples.clone(), targets.clone()
    samples[bad], targets[bad] = samples[src], targets[src]
    return samples, targets, n


def _to_device(samples, targets, device, mixup_fn=None):
    samples = samples.to(device, non_blocking=True)
    targets = targets.to(device, non_blocking=True)
    return mixup_fn(samples, targets) if mixup_fn is not None else (samples, targets)


def _training_batches(data_loader, device, mixup_fn, n, print_freq, header, metric_logger):
    """(i, samples, targets, unreadable) of the first `n` batches, readable and on the device."""
    for i, (samples, targets) in enumerate(metric_logger.log_every(data_loader, print_freq, header)):
        if i >= n:
            break
        samples, targets, unreadable = readable_rows(samples, targets, fill=True)
        samples, targets = _to_device(samples, targets, device, mixup_fn)
        yield i, samples, targets, unreadable


def _loss(model, criterion, samples, targets, pruner):
    """The training loss (with a teacher, `losses.DistillationLoss`); with a pruner, `model`
    returns (logits, aux) and the pruner adds its own (METHOD.md §3: the ΔΨ heads' losses, on
    the labels only: the base criterion)."""
    if pruner is None:
        return training_loss(criterion, samples, model(samples), targets)
    outputs, aux = model(samples)
    return training_loss(criterion, samples, outputs, targets) + pruner.aux_loss(aux, targets, base_of(criterion))


def train_one_epoch(model: torch.nn.Module, criterion, data_loader: Iterable,
                    optimizer: torch.optim.Optimizer, device: torch.device, epoch: int,
                    loss_scaler=None, max_norm: Optional[float] = None, model_ema=None,
                    mixup_fn=None, accum_steps: int = 1, amp=None, print_freq: int = 10,
                    writer=None, pruner=None, global_step: int = 0, set_training_mode: bool = True,
                    count_unreadable: bool = False):
    """One epoch. With a pruner, `model` returns (logits, aux) and the pruner adds the ΔΨ head
    losses and is stepped after every optimizer step (METHOD.md §3, §5, §6).
    `set_training_mode=False` trains in eval mode (DeiT's --no-train-mode; METHOD.md §8 v2):
    no drop-path or dropout, BatchNorm of the ΔΨ heads on its running statistics, not updated.

    A trailing group of fewer than `accum_steps` batches is skipped, so every optimizer step
    sees the same number of samples. Returns the epoch averages and the new global step; with
    `count_unreadable` (--skip-bad-images) also `unreadable_images`, the images of the epoch
    that could not be read, over all processes (their rows are filled with readable ones).
    `amp`: the autocast dtype (`autocast`); with a `loss_scaler` (float16) the pruner's scores
    undo its scale.
    """
    model.train(set_training_mode)
    metric_logger = MetricLogger(delimiter='  ')
    metric_logger.add_meter('lr', SmoothedValue(window_size=1, fmt='{value:.6f}'))
    n_used = len(data_loader) // accum_steps * accum_steps
    optimizer.zero_grad(set_to_none=True)
    for i, samples, targets, unreadable in _training_batches(
            data_loader, device, mixup_fn, n_used, print_freq, f'Epoch: [{epoch}]', metric_logger):
        update = (i + 1) % accum_steps == 0
        # gradients are all-reduced by DDP only on the micro-batch that completes a step
        sync = model.no_sync() if not update and hasattr(model, 'no_sync') else nullcontext()
        with sync:
            with autocast(device, amp):
                loss = _loss(model, criterion, samples, targets, pruner)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(f'loss is {loss_value} at epoch {epoch}, iteration {i}: '
                                         'stopping training')
            # the scale this step's gradients carry (the scaler updates it in the step)
            grad_scale = loss_scale(loss_scaler) if update and pruner is not None else 1.0
            _backward_and_step(loss / accum_steps, optimizer, loss_scaler, max_norm, update)
        if update:
            if pruner is not None:
                pruner.step(grad_scale=grad_scale)
            optimizer.zero_grad(set_to_none=True)
            if model_ema is not None:
                model_ema.update(model)
            global_step += 1
        metric_logger.update(loss=loss_value)
        metric_logger.update(lr=optimizer.param_groups[0]['lr'])
        if count_unreadable:
            metric_logger.update(unreadable_images=unreadable)
        if writer is not None and i % print_freq == 0:
            writer.add_scalar('train/loss_iter', loss_value, global_step)
    metric_logger.synchronize_between_processes()
    print('Averaged stats:', metric_logger)
    stats = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    if count_unreadable:  # a count, not an average (the meter's total is summed over processes)
        stats['unreadable_images'] = int(metric_logger.meters['unreadable_images'].total)
    return stats, global_step


@torch.no_grad()
def evaluate(data_loader, model, device, amp=None, print_freq: int = 10,
             count_unreadable: bool = False):
    """Top-1 / top-5 and loss on a validation loader, summed exactly over processes.

    `model` is a network, or a pruner's module (`PrunerModule`), whose auxiliary heads are
    reported too (`acc1_<name>`: the last ΔΨ heads of METHOD.md §3, WD-Prune's shallow
    classifiers). With `count_unreadable` (--skip-bad-images), metrics are over the readable
    images and `unreadable_images` counts the others.
    """
    criterion = torch.nn.CrossEntropyLoss()
    metric_logger = MetricLogger(delimiter='  ')
    with_heads = isinstance(model, PrunerModule)
    model.eval()
    unreadable = SmoothedValue()  # the share of unreadable images, whatever the processes read
    for images, target in metric_logger.log_every(data_loader, print_freq, 'Test:'):
        n_read = images.shape[0]
        images, target, n_bad = readable_rows(images, target, fill=False)
        unreadable.update(n_bad / n_read, n=n_read)
        if images.shape[0] == 0:
            continue
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast(device, amp):
            output, heads = model.forward_eval(images) if with_heads else (model(images), {})
            loss = criterion(output, target)
        k = min(5, output.shape[1])
        acc1, acc5 = accuracy(output, target, topk=(1, k))
        n = images.shape[0]
        metric_logger.update(n=n, loss=loss.item(), acc1=acc1.item(), acc5=acc5.item())
        metric_logger.update(n=n, **{f'acc1_{name}': accuracy(logits, target)[0].item()
                                     for name, logits in heads.items()})
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # one all-reduce per meter: every process holds the same ones, in the same order. A
        # process that updated none (its --dist-eval shard had no readable image) made fewer
        # all-reduces than the others, and the run hung; the heads' names come from a forward
        names = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(names, list(metric_logger.meters))
        meters = metric_logger.meters
        for name in dict.fromkeys(n for each in names for n in each):  # moved to the end, in this order
            meters[name] = meters.pop(name) if name in meters else SmoothedValue()
    metric_logger.synchronize_between_processes()
    m = metric_logger.meters
    print(f'* Acc@1 {m["acc1"].global_avg:.3f} Acc@5 {m["acc5"].global_avg:.3f} '
          f'loss {m["loss"].global_avg:.3f}')
    stats = {k: meter.global_avg for k, meter in m.items()}
    if count_unreadable:
        # every process may read the whole set (no --dist-eval) or a shard: the share is exact either way
        unreadable.synchronize_between_processes()
        stats['unreadable_images'] = round(unreadable.global_avg * len(data_loader.dataset))
    return stats


def accumulate_scores(model, criterion, data_loader, device, pruner, steps: int, amp=None,
                      mixup_fn=None, print_freq: int = 10, set_training_mode: bool = True):
    """Forward and backward on `steps` training batches without updating any weight; after
    each, a one-shot pruner's `step` reads its gates' gradients (SaViT's Taylor scores). Under
    DDP the backward runs in `no_sync`: only the gates' gradients are read, and the pruner
    averages those over processes itself, rather than DDP all-reducing every weight's."""
    model.train(set_training_mode)
    metric_logger = MetricLogger(delimiter='  ')
    # without a GradScaler, a fixed loss scale keeps float16 gradients from underflowing
    # (bfloat16 has float32's exponent range: no scale)
    scale = 2. ** 12 if amp is True or amp == torch.float16 else 1.
    for _, samples, targets, _ in _training_batches(data_loader, device, mixup_fn, steps, print_freq,
                                                    'Scores:', metric_logger):
        with model.no_sync() if hasattr(model, 'no_sync') else nullcontext():
            with autocast(device, amp):
                loss = _loss(model, criterion, samples, targets, pruner)
            (loss * scale).backward()
        pruner.step(grad_scale=scale)
        model.zero_grad(set_to_none=True)
        metric_logger.update(loss=loss.item())
    metric_logger.synchronize_between_processes()
    print('Averaged stats:', metric_logger)
