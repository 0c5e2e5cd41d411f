"""The one validation of a command line, before anything is read or written."""
import copy
import difflib

import torch

import models
from train import methods
from train.recipe import check_optimizer_and_scheduler
from utils import UsageError


def validate(args):
    """A checked copy of `args` with the defaults that depend on other flags filled in
    (--input-size, --prune-finalize-epoch); UsageError names the flag of the first problem."""
    args = copy.copy(args)
    if args.model not in models.CONFIGS:
        close = difflib.get_close_matches(args.model, list(models.CONFIGS), n=3, cutoff=0.5)
        hint = f'; did you mean {" or ".join(close)}?' if close else ''
        raise UsageError(f'unknown --model {args.model!r}{hint} (available: {", ".join(models.CONFIGS)})')
    config = models.CONFIGS[args.model]
    if args.input_size is None:
        args.input_size = config.img_size
    check_ranges(args)
    check_device(args.device)
    check_optimizer_and_scheduler(args)
    if args.input_size % config.patch_size:
        raise UsageError(f'--input-size {args.input_size} is not a multiple of the patch size '
                         f'{config.patch_size} of {args.model}')
    methods.check_flags(args)
    if args.prune_method is not None:
        if args.prune_finalize_epoch is None:
            args.prune_finalize_epoch = args.epochs
        if args.prune_finalize_epoch > args.epochs:
            raise UsageError(f'--prune-finalize-epoch {args.prune_finalize_epoch} is after --epochs {args.epochs}')
        methods.check_config(args)
    return args


def check_ranges(args):
    """DeiT's numbers in their ranges (the pruning flags are checked by their configurations)."""
    for flag, value in (('--batch-size', args.batch_size), ('--epochs', args.epochs),
                        ('--grad-accum-steps', args.grad_accum_steps),
                        ('--print-freq', args.print_freq), ('--input-size', args.input_size)):
        if value < 1:
            raise UsageError(f'{flag} must be at least 1, got {value}')
    for flag, value in (('--num_workers', args.num_workers), ('--lr', args.lr),
                        ('--warmup-lr', args.warmup_lr), ('--min-lr', args.min_lr),
                        ('--weight-decay', args.weight_decay), ('--start_epoch', args.start_epoch)):
        if value < 0:
            raise UsageError(f'{flag} must not be negative, got {value}')
    for flag, value in (('--drop', args.drop), ('--drop-path', args.drop_path)):
        if not 0 <= value < 1:
            raise UsageError(f'{flag} is a rate in [0, 1), got {value}')
    if not args.eval and not args.resume and args.start_epoch >= args.epochs:
        raise UsageError(f'--start_epoch {args.start_epoch} is not before --epochs {args.epochs}: '
                         'nothing would be trained')


def check_device(text):
    """--device names a device this machine has (without creating a CUDA context: every
    process of a run checks before it picks its own GPU)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f'--device {text!r} is not a device: cpu, cuda, cuda:N, …') from None
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise UsageError(f'--device {text}: no CUDA GPU is available here (use --device cpu)')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f'--device {text}: this machine has {torch.cuda.device_count()} CUDA GPU(s)')
    elif device.type != 'cpu':
        backend = getattr(torch, device.type, None)  # torch.mps, torch.xpu, ...
        if not getattr(backend, 'is_available', lambda: False)():
            raise UsageError(f'--device {text}: no {device.type} device is available here')
