"""The one check of a command line, before anything is read or written (timm's validate.py
evaluates a model: this module checks arguments)."""
import copy

import torch

import models
from train import methods
from train.recipe import check_recipe
from errors import UsageError


def check_args(args):
    """A checked copy of `args` with the defaults that depend on other flags filled in
    (--input-size, --prune-finalize-epoch); UsageError names the flag of the first problem."""
    args = copy.copy(args)
    config = model_config(args.model)
    if args.input_size is None:
        args.input_size = config.img_size
    check_ranges(args)
    check_deit_flags(args)
    check_device(args.device)
    check_recipe(args)
    if args.input_size % config.patch_size:
        raise UsageError(f'--input-size {args.input_size} is not a multiple of the patch size '
                         f'{config.patch_size} of {args.model}')
    methods.check_flags(args)
    if args.prune_method is not None and args.resize_model_by_checkpoint:
        raise UsageError(f'--prune-method {args.prune_method} needs an uncut model (its gates are sized by the '
                         'dense ViT), and --resize-model-by-checkpoint rebuilds a cut one: prune the dense '
                         'weights, or fine-tune the cut model without --prune-method')
    if args.prune_method is not None:
        if args.prune_finalize_epoch is None:
            args.prune_finalize_epoch = args.epochs
        if args.prune_finalize_epoch > args.epochs:
            raise UsageError(f'--prune-finalize-epoch {args.prune_finalize_epoch} is after --epochs {args.epochs}')
        methods.check_config(args)
    return args


def model_config(name: str, flag: str = '--model') -> 'models.ViTConfig':
    """The family of a --model name (any timm VisionTransformer name `models.vit_config` takes);
    UsageError naming the flag if it is unknown or has an option outside the supported set."""
    try:
        return models.vit_config(name)
    except ValueError as e:
        raise UsageError(f'{flag}: {e}') from None


# DeiT's numbers and their ranges (the pruning flags' ranges are their configurations' own)
AT_LEAST_1 = (lambda v: v >= 1, 'must be at least 1')
NOT_NEGATIVE = (lambda v: v >= 0, 'must not be negative')
RATE = (lambda v: 0 <= v < 1, 'is a rate in [0, 1)')
SHARE = (lambda v: 0 <= v <= 1, 'is a share in [0, 1]')
POSITIVE = (lambda v: v > 0, 'must be above 0')
RANGES = {
    '--batch-size': AT_LEAST_1, '--epochs': AT_LEAST_1, '--grad-accum-steps': AT_LEAST_1,
    '--print-freq': AT_LEAST_1, '--input-size': AT_LEAST_1, '--recount': AT_LEAST_1,
    '--world_size': AT_LEAST_1, '--num_workers': NOT_NEGATIVE, '--lr': NOT_NEGATIVE,
    '--warmup-lr': NOT_NEGATIVE, '--min-lr': NOT_NEGATIVE, '--weight-decay': NOT_NEGATIVE,
    '--start_epoch': NOT_NEGATIVE, '--opt-eps': NOT_NEGATIVE, '--momentum': NOT_NEGATIVE,
    '--warmup-epochs': NOT_NEGATIVE, '--cooldown-epochs': NOT_NEGATIVE,
    '--patience-epochs': NOT_NEGATIVE, '--lr-noise': NOT_NEGATIVE, '--lr-noise-pct': NOT_NEGATIVE,
    '--lr-noise-std': NOT_NEGATIVE, '--color-jitter': NOT_NEGATIVE, '--mixup': NOT_NEGATIVE,
    '--cutmix': NOT_NEGATIVE, '--drop': RATE, '--drop-path': RATE, '--smoothing': RATE,
    '--opt-betas': RATE, '--model-ema-decay': SHARE, '--reprob': SHARE, '--mixup-prob': SHARE,
    '--mixup-switch-prob': SHARE, '--cutmix-minmax': SHARE, '--clip-grad': POSITIVE,
    '--decay-epochs': POSITIVE, '--decay-rate': POSITIVE, '--dist-timeout': POSITIVE,
    '--distillation-alpha': SHARE, '--distillation-tau': POSITIVE,
    '--eval-crop-ratio': (lambda v: 0 < v <= 1, 'is a share in (0, 1]'),
}

# DeiT flags that this project accepts and refuses, each with the reason
REFUSED = {
    'resplit': '--resplit keeps the first of timm\'s augmentation splits clean of random erasing; '
               'neither DeiT nor this project makes such splits, so it would change nothing',
    'cosub': '--cosub (DeiT III\'s co-training of two sub-models on halves of each batch) is not '
             'supported: the ΔΨ heads and the Taylor scores read one forward of the whole batch',
}


def check_deit_flags(args):
    """The DeiT flags that make no sense here, or not together, refused in one line."""
    for name, why in REFUSED.items():
        if getattr(args, name):
            raise UsageError(why)
    if args.src and not args.ThreeAugment:
        raise UsageError('--src changes the crop of --ThreeAugment (as in DeiT) and does nothing '
                         'without it: add --ThreeAugment')
    if args.teacher_path and args.distillation_type == 'none':
        raise UsageError(f'--teacher-path {args.teacher_path} is read only with --distillation-type soft or hard '
                         '(DeiT would train without the teacher and say nothing): add one, or leave out --teacher-path')
    if args.bce_loss and args.smoothing > 0:
        raise UsageError(f'--bce-loss thresholds every target at 0 (DeiT), so --smoothing {args.smoothing:g} '
                         'would make every class a positive: use --smoothing 0, as DeiT III does')


def check_ranges(args):
    for flag, (ok, rule) in RANGES.items():
        value = getattr(args, flag.lstrip('-').replace('-', '_'))
        for v in value if isinstance(value, list) else [value]:  # nargs flags: each value
            if v is not None and not ok(v):
                raise UsageError(f'{flag} {rule}, got {v}')
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
