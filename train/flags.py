"""The command line's own parts: the one-line-error parser, argparse types and DeiT's flags.

The pruning flags are declared by their methods (train/methods/); `main.get_args_parser` puts
both together. Every flag keeps DeiT's name and default, so DeiT command lines keep working.
"""
import argparse
import math

import torch

import models
from datasets import DATA_SETS, INAT_CATEGORIES

AMP_DTYPES = ('float16', 'bfloat16')


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, like every other bad input."""

    def error(self, message):
        self.exit(2, f'error: {message}\n')


# ---- argparse types: each flag is parsed once, here ---------------------------------------------
def real(text):
    """A finite float: nan and inf pass float() but train nothing sensible."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'takes a number, got {text!r}')
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f'takes a finite number, got {text!r}')
    return value


def steps_or_auto(text):
    if text == 'auto':
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'takes a whole number or "auto", got {text!r}')
    if n < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {n}')
    return n


def numbers(text):
    """'0.5,0.7' -> [0.5, 0.7] (with nargs='+' and Flatten, '0.5 0.7' gives the same)."""
    return [real(v) for v in text.replace(',', ' ').split()]


class Flatten(argparse.Action):
    """nargs='+' of list-valued types: one flat list."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [v for chunk in values for v in chunk])


def gate_scale(text):
    """'attn_out:1.5,mlp_hid:0.75' -> {'attn_out': 1.5, 'mlp_hid': 0.75}."""
    scale = {}
    for item in filter(None, (t.strip() for t in text.split(','))):
        name, sep, value = item.partition(':')
        if not sep:
            raise argparse.ArgumentTypeError(f'takes gate:number pairs, got {item!r}')
        scale[name.strip()] = real(value)
    unknown = [n for n in scale if n not in models.GATE_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f'unknown gate {unknown[0]!r}; gates are {", ".join(models.GATE_NAMES)}')
    return scale


def format_gate_scale(scale):
    return ','.join(f'{k}:{v:g}' for k, v in scale.items())


def on_off(parser, name, default, on_help=None, off_help=None):
    """DeiT's on/off pair: --name / --no-name, with set_defaults."""
    dest = name.replace('-', '_')
    parser.add_argument(f'--{name}', action='store_true', dest=dest, help=on_help)
    parser.add_argument(f'--no-{name}', action='store_false', dest=dest, help=off_help)
    parser.set_defaults(**{dest: default})


def add_deit_flags(parser):
    """DeiT's flags, grouped and named as in its main.py (float flags finite)."""
    parser.add_argument('--batch-size', default=64, type=int)
    parser.add_argument('--epochs', default=300, type=int)
    parser.add_argument('--grad-accum-steps', default=1, type=int,
                        help='micro-batches per optimizer step')
    parser.add_argument('--unscale-lr', action='store_true',
                        help='do not scale --lr by batch * world * accum / 512')
    parser.add_argument('--bce-loss', action='store_true',
                        help='binary cross-entropy on the targets thresholded at 0, as DeiT (III): '
                             'with mixup, every class mixed in is a positive; needs --smoothing 0')

    # Model parameters
    parser.add_argument('--model', default='deit_base_patch16_224', type=str, metavar='MODEL',
                        help='name of the model to train: a DeiT name or any supported timm '
                             'VisionTransformer, with or without its pretrained tag (--list-models)')
    parser.add_argument('--list-models', nargs='?', const='*', default=None, metavar='PATTERN',
                        help='print the --model names that can be pruned (those matching PATTERN, '
                             'as timm.list_models matches it), the timm ViTs that cannot and why, and exit')
    parser.add_argument('--input-size', default=None, type=int,
                        help='images input size (default: the model\'s own, 224 for deit_*)')
    parser.add_argument('--drop', type=real, default=0.0, metavar='PCT', help='dropout rate')
    parser.add_argument('--drop-path', type=real, default=0.1, metavar='PCT',
                        help='drop path rate')
    on_off(parser, 'model-ema', True)
    parser.add_argument('--model-ema-decay', type=real, default=0.99996, help='')
    parser.add_argument('--model-ema-force-cpu', action='store_true', default=False, help='')

    # Optimizer parameters
    parser.add_argument('--opt', default='adamw', type=str, metavar='OPTIMIZER')
    parser.add_argument('--opt-eps', default=1e-8, type=real, metavar='EPSILON')
    parser.add_argument('--opt-betas', default=None, type=real, nargs='+', metavar='BETA')
    parser.add_argument('--clip-grad', type=real, default=None, metavar='NORM')
    parser.add_argument('--momentum', type=real, default=0.9, metavar='M')
    parser.add_argument('--weight-decay', type=real, default=0.05)

    # Learning rate schedule parameters
    parser.add_argument('--sched', default='cosine', type=str, metavar='SCHEDULER')
    parser.add_argument('--lr', type=real, default=5e-4, metavar='LR')
    parser.add_argument('--lr-noise', type=real, nargs='+', default=None, metavar='pct, pct')
    parser.add_argument('--lr-noise-pct', type=real, default=0.67, metavar='PERCENT')
    parser.add_argument('--lr-noise-std', type=real, default=1.0, metavar='STDDEV')
    parser.add_argument('--warmup-lr', type=real, default=1e-6, metavar='LR')
    parser.add_argument('--min-lr', type=real, default=1e-5, metavar='LR')
    parser.add_argument('--decay-epochs', type=real, default=30, metavar='N')
    parser.add_argument('--warmup-epochs', type=int, default=5, metavar='N')
    parser.add_argument('--cooldown-epochs', type=int, default=10, metavar='N')
    parser.add_argument('--patience-epochs', type=int, default=10, metavar='N')
    parser.add_argument('--decay-rate', '--dr', type=real, default=0.1, metavar='RATE')

    # Augmentation parameters
    parser.add_argument('--color-jitter', type=real, default=0.3, metavar='PCT')
    parser.add_argument('--aa', type=str, default='rand-m9-mstd0.5-inc1', metavar='NAME')
    parser.add_argument('--smoothing', type=real, default=0.1, help='Label smoothing')
    parser.add_argument('--train-interpolation', type=str, default='bicubic')
    on_off(parser, 'train-mode', True,
           'model in train mode while training (drop-path, dropout, BatchNorm statistics); the '
           'default, as in DeiT',
           'model and ΔΨ heads in eval mode while training, as the authors\' runs were (METHOD.md §8 v2)')
    on_off(parser, 'repeated-aug', True)
    parser.add_argument('--ThreeAugment', action='store_true',
                        help='DeiT III\'s 3-Augment: a random crop and flip, then one of grayscale, '
                             'solarization or Gaussian blur, and color jitter (replaces --aa and --reprob)')
    parser.add_argument('--src', action='store_true',
                        help='with --ThreeAugment: simple random crop (resize, pad 4, crop) instead of '
                             'RandomResizedCrop')

    # Distillation parameters (DeiT's names and defaults; losses.py)
    parser.add_argument('--teacher-model', default='regnety_160', type=str, metavar='MODEL',
                        help='a timm model name for --teacher-path\'s weights (ignored when that '
                             'checkpoint holds a cut model of this project: its arch builds it)')
    parser.add_argument('--teacher-path', type=str, default='',
                        help='the teacher\'s weights: a file, file:// or URL, or a checkpoint of this project')
    parser.add_argument('--distillation-type', default='none', choices=['none', 'soft', 'hard'], type=str)
    parser.add_argument('--distillation-alpha', default=0.5, type=real)
    parser.add_argument('--distillation-tau', default=1.0, type=real)
    parser.add_argument('--cosub', action='store_true',
                        help='DeiT III\'s co-training of two sub-models: refused (one forward per '
                             'batch is what the ΔΨ heads and the Taylor scores read)')

    # * Random Erase params
    parser.add_argument('--reprob', type=real, default=0.25, metavar='PCT')
    parser.add_argument('--remode', type=str, default='pixel')
    parser.add_argument('--recount', type=int, default=1)
    parser.add_argument('--resplit', action='store_true', default=False,
                        help='DeiT\'s flag for timm\'s augmentation splits, which neither DeiT nor '
                             'this project makes: refused')

    # * Mixup params
    parser.add_argument('--mixup', type=real, default=0.8)
    parser.add_argument('--cutmix', type=real, default=1.0)
    parser.add_argument('--cutmix-minmax', type=real, nargs='+', default=None)
    parser.add_argument('--mixup-prob', type=real, default=1.0)
    parser.add_argument('--mixup-switch-prob', type=real, default=0.5)
    parser.add_argument('--mixup-mode', type=str, default='batch', choices=('batch', 'pair', 'elem'))

    # * Finetuning params
    parser.add_argument('--model-path', '--finetune', dest='model_path', default='',
                        help='checkpoint to start from: a path or URL (DeiT {"model": ...} or a bare state '
                             'dict; .pth, .bin, .safetensors), local-dir:FOLDER or hf-hub:ORG/NAME[@REV] (a timm '
                             'model, from the Hugging Face cache when offline)')
    parser.add_argument('--pretrained', action='store_true', default=False,
                        help='Start with pretrained version of specified network (if avail): the weights '
                             'timm.create_model(--model, pretrained=True) loads, fitted to --input-size')
    parser.add_argument('--resize-model-by-checkpoint', '--model-resize-by-checkpoint',
                        action='store_true', dest='resize_model_by_checkpoint',
                        help='build the cut architecture stored in --model-path (first_sparse_checkpoint.pth)')
    parser.add_argument('--attn-only', action='store_true',
                        help='train the attention layers, the head and the position embedding only, '
                             'as DeiT (the pruner\'s gates are scored as usual)')

    # Dataset parameters
    parser.add_argument('--data-path', default=None, type=str, help='dataset path')
    parser.add_argument('--data-set', default='IMNET', type=str.upper, choices=DATA_SETS,
                        help='dataset')
    parser.add_argument('--inat-category', default='name', type=str, choices=INAT_CATEGORIES,
                        help='semantic granularity of the iNaturalist labels')
    parser.add_argument('--skip-bad-images', action='store_true',
                        help='skip images that cannot be read (each named on stderr, counted as '
                             'train_ / test_unreadable_images in log.txt) instead of stopping')
    parser.add_argument('--output_dir', default='', help='path where to save, empty for no saving')
    parser.add_argument('--save-format', default='pth', choices=('pth', 'safetensors'),
                        help='safetensors: every checkpoint\'s model also as NAME.safetensors, with its arch '
                             '(for --model-path, export, the hub); the .pth keeps what --resume needs')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace the run in --output_dir: its checkpoints, logs and TensorBoard '
                             'files are deleted first (without it, a folder holding a run is refused '
                             'unless --resume continues it)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='device to use for training / testing')
    parser.add_argument('--no-amp', action='store_false', dest='amp',
                        help='disable mixed precision (on CUDA; on the CPU only with --amp-dtype bfloat16)')
    parser.set_defaults(amp=True)
    parser.add_argument('--amp-dtype', default='float16', choices=AMP_DTYPES,
                        help='autocast precision (timm\'s train.py flag): float16 with a gradient scaler, '
                             'or bfloat16 without one; on the CPU, bfloat16 turns autocast on')
    parser.add_argument('--seed', default=0, type=int)
    parser.add_argument('--resume', default='', help='resume from checkpoint (path or URL)')
    parser.add_argument('--start_epoch', default=0, type=int, metavar='N')
    parser.add_argument('--eval', action='store_true', help='perform evaluation only')
    parser.add_argument('--eval-crop-ratio', '--crop-pct', dest='eval_crop_ratio', type=real, default=None,
                        help='evaluation: resize to input-size / ratio, then center-crop (DeiT\'s flag, '
                             'the authors\' --crop-pct, timm\'s crop_pct; default 0.875, 1 at 32 px and below)')
    parser.add_argument('--dist-eval', action='store_true', default=False,
                        help='enable distributed evaluation')
    parser.add_argument('--num_workers', default=10, type=int)
    on_off(parser, 'pin-mem', True)
    parser.add_argument('--print-freq', default=10, type=int, help='iterations between log lines')

    # distributed training parameters
    parser.add_argument('--distributed', action='store_true', default=False,
                        help='accepted as in DeiT, where the launcher\'s environment decides too')
    parser.add_argument('--world_size', default=1, type=int, help='number of distributed processes')
    parser.add_argument('--dist_url', default='env://', help='url used to set up distributed training')
    parser.add_argument('--dist-timeout', default=600, type=real, metavar='SECONDS',
                        help='longest wait of the rendezvous and of every collective operation')
