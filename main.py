"""Fine-tune, prune (Depth Aware Pruning) and evaluate Vision Transformers, DeiT style.

Runs as a single process, under `torchrun` and under `python -m torch.distributed.launch --use_env`.
Only this file reads `args`; everything below it takes explicit values. Every pruning method
follows one protocol (pruning/protocol.py); `PRUNERS` maps --prune-method to the function that
builds its configuration from the flags and to its class: adding a method touches pruning/ and
that table only.
"""
import argparse
import copy
import datetime
import difflib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import timm
import torch.backends.cudnn as cudnn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, NativeScaler

import models
import utils
from datasets import DATA_SETS, INAT_CATEGORIES, UnreadableImageError, build_dataset
from engine import accumulate_scores, evaluate, train_one_epoch
from pruning import (BPI_MODES, DEFAULT_GATE_SCALE, TAYLOR_WINDOWS, ConfigError, DepthAwarePruner, PruneConfig,
                     PruneSchedule, SaViTConfig, SaViTPruner, WDPruneConfig, WDPrunePruner,
                     format_summary)
from utils import UsageError


# ---- the pruning methods: --prune-method -> (configuration from the flags, pruner class) ------
def dap_config(args) -> PruneConfig:
    """DAP (block_pr) and its budget ablations (uniform, global)."""
    return PruneConfig(prune_ratio=args.prune_ratio, method=args.prune_method,
                       keep_ratio_handcraft=args.prune_kr_handcraft,
                       gate_scale=args.prune_scale_gate_imp, gamma=args.pr_gamma,
                       alpha=args.pr_alpha, block_imp_scale=args.pr_block_imp_scale,
                       block_params_only=args.prune_rate_by_block_param_only,
                       taylor_window=args.prune_taylor_window, head_lr=args.lr_soft_head,
                       bpi_mode=args.bpi_mode, bpi_width_div=args.bpi_fast_width,
                       bpi_grid=args.bpi_fast_grid, bpi_fraction=args.bpi_fast_fraction,
                       round_to=args.prune_round_to)


def wdprune_config(args) -> WDPruneConfig:
    depth = models.CONFIGS[args.model].depth
    bad = [k for k in args.classifiers if not 1 <= k < depth]
    if bad:
        raise UsageError(f'--classifiers {bad} outside 1 … {depth - 1} (blocks of {args.model})')
    extra = {} if args.wdprune_lambda_lr is None else {'lambda_lr': args.wdprune_lambda_lr}
    return WDPruneConfig(prune_ratio=args.prune_ratio, lr=args.wdprune_lr,
                         threshold_init=args.wdprune_threshold_init, mask_round=args.wdprune_round,
                         classifiers=tuple(args.classifiers),
                         keep_depth=None if args.keep_depth == depth else args.keep_depth,
                         block_params_only=args.prune_rate_by_block_param_only, **extra)


def savit_config(args) -> SaViTConfig:
    if args.prune_rate_by_block_param_only:
        raise UsageError('--prune-rate-by-block-param-only does not apply to --prune-method savit, '
                         'which also prunes the embedding outside the blocks')
    return SaViTConfig(prune_ratio=args.prune_ratio, budget=args.savit_budget,
                       population=args.savit_population, children=args.savit_children,
                       generations=args.savit_generations, min_keep=args.savit_min_keep,
                       use_interaction=args.need_hessian, score_fraction=args.savit_fraction,
                       seed=args.seed)


def dap_schedule(args, steps_per_epoch: int) -> PruneSchedule:
    """§6; --prune-steps-update-mask auto gives about 3 updates per epoch (the authors' advice)."""
    every = args.prune_steps_update_mask
    return PruneSchedule(
        steps_per_epoch=steps_per_epoch, start_epoch=args.prune_start_epoch,
        sparse_epoch=args.prune_sparse_epoch, finalize_epoch=args.prune_finalize_epoch,
        steps_update_mask=max(1, round(steps_per_epoch / 3)) if every == 'auto' else every,
        tau_max=args.pr_tau_max, tau_min=args.pr_tau_min)


def cut_schedule(args, steps_per_epoch: int) -> PruneSchedule:
    """Methods that only need to know when the cut comes (WD-Prune's cosine; SaViT: unused)."""
    return PruneSchedule(steps_per_epoch=steps_per_epoch, start_epoch=0, sparse_epoch=0,
                         finalize_epoch=args.prune_finalize_epoch)


class Method(NamedTuple):
    config: Callable     # args -> the pruner's configuration
    pruner: type         # (model, num_classes, config, schedule) -> a pruning.Pruner
    schedule: Callable   # (args, steps_per_epoch) -> PruneSchedule


PRUNERS = {
    'block_pr': Method(dap_config, DepthAwarePruner, dap_schedule),
    'uniform': Method(dap_config, DepthAwarePruner, dap_schedule),
    'global': Method(dap_config, DepthAwarePruner, dap_schedule),
    'wdprune': Method(wdprune_config, WDPrunePruner, cut_schedule),
    'savit': Method(savit_config, SaViTPruner, cut_schedule),
}
ROUND_TO = 8  # --prune-round-to's default (README, "Benchmarks": aligned widths on the GPU)
# flags that only some methods read: given under another method they are an error
METHOD_FLAGS = {
    '--classifiers': (lambda a: bool(a.classifiers), ('wdprune',)),
    '--keep-depth': (lambda a: a.keep_depth is not None, ('wdprune',)),
    '--need-hessian': (lambda a: a.need_hessian, ('savit',)),
    '--prune-taylor-window': (lambda a: a.prune_taylor_window != 'update', ('block_pr', 'uniform', 'global')),
    '--prune-kr-handcraft': (lambda a: a.prune_kr_handcraft is not None, ('block_pr',)),
    '--bpi-mode': (lambda a: a.bpi_mode != 'faithful', ('block_pr', 'uniform', 'global')),
    '--prune-round-to': (lambda a: a.prune_round_to != ROUND_TO, ('block_pr', 'uniform', 'global')),
}
# the flag of each configuration field, for the library's errors (pruning.ConfigError)
CONFIG_FLAGS = {
    'prune_ratio': '--prune-ratio', 'keep_ratio_handcraft': '--prune-kr-handcraft',
    'gate_scale': '--prune-scale-gate-imp', 'gamma': '--pr-gamma', 'alpha': '--pr-alpha',
    'block_imp_scale': '--pr-block-imp-scale', 'taylor_window': '--prune-taylor-window',
    'head_lr': '--lr-soft-head', 'round_to': '--prune-round-to', 'bpi_mode': '--bpi-mode',
    'bpi_width_div': '--bpi-fast-width', 'bpi_grid': '--bpi-fast-grid',
    'bpi_fraction': '--bpi-fast-fraction', 'start_epoch': '--prune-start-epoch',
    'sparse_epoch': '--prune-sparse-epoch', 'finalize_epoch': '--prune-finalize-epoch',
    'steps_update_mask': '--prune-steps-update-mask', 'tau_min': '--pr-tau-min',
    'tau_max': '--pr-tau-max', 'lr': '--wdprune-lr', 'lambda_lr': '--wdprune-lambda-lr',
    'threshold_init': '--wdprune-threshold-init', 'mask_round': '--wdprune-round',
    'classifiers': '--classifiers', 'keep_depth': '--keep-depth', 'budget': '--savit-budget',
    'population': '--savit-population', 'children': '--savit-children',
    'generations': '--savit-generations', 'min_keep': '--savit-min-keep',
    'score_fraction': '--savit-fraction',
}


def usage_error(e: ConfigError) -> UsageError:
    return UsageError(f'{CONFIG_FLAGS.get(e.field, e.field)} {e.reason}')


# ---- argparse types: each flag is parsed once, here ---------------------------------------------
def prune_method(text):
    if text.lower() == 'none':
        return None
    if text not in PRUNERS:
        raise argparse.ArgumentTypeError(f'unknown method {text!r}; choose from {", ".join(PRUNERS)} or none')
    return text


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
    try:
        return [float(v) for v in text.replace(',', ' ').split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f'takes numbers, got {text!r}')


class Flatten(argparse.Action):
    """nargs='+' of list-valued types: one flat list."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [v for chunk in values for v in chunk])


def gate_scale(text):
    """'attn_out:1.5,mlp_hid:0.75' -> {'attn_out': 1.5, 'mlp_hid': 0.75}."""
    scale = {}
    for item in filter(None, (t.strip() for t in text.split(','))):
        name, sep, value = item.partition(':')
        try:
            if not sep:
                raise ValueError
            scale[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f'takes gate:number pairs, got {item!r}')
    unknown = [n for n in scale if n not in models.GATE_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f'unknown gate {unknown[0]!r}; gates are {", ".join(models.GATE_NAMES)}')
    return scale


def format_gate_scale(scale):
    return ','.join(f'{k}:{v:g}' for k, v in scale.items())


def get_args_parser():
    parser = argparse.ArgumentParser('DeiT training, Depth Aware Pruning and evaluation script',
                                     add_help=False)
    parser.add_argument('--batch-size', default=64, type=int)
    parser.add_argument('--epochs', default=300, type=int)
    parser.add_argument('--grad-accum-steps', default=1, type=int,
                        help='micro-batches per optimizer step')
    parser.add_argument('--unscale-lr', action='store_true',
                        help='do not scale --lr by batch * world * accum / 512')

    # Model parameters
    parser.add_argument('--model', default='deit_base_patch16_224', type=str, metavar='MODEL',
                        help='name of the model to train')
    parser.add_argument('--input-size', default=None, type=int,
                        help='images input size (default: the model\'s own, 224 for deit_*)')
    parser.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout rate')
    parser.add_argument('--drop-path', type=float, default=0.1, metavar='PCT',
                        help='drop path rate')
    parser.add_argument('--model-ema', action='store_true')
    parser.add_argument('--no-model-ema', action='store_false', dest='model_ema')
    parser.set_defaults(model_ema=True)
    parser.add_argument('--model-ema-decay', type=float, default=0.99996, help='')
    parser.add_argument('--model-ema-force-cpu', action='store_true', default=False, help='')

    # Optimizer parameters
    parser.add_argument('--opt', default='adamw', type=str, metavar='OPTIMIZER')
    parser.add_argument('--opt-eps', default=1e-8, type=float, metavar='EPSILON')
    parser.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA')
    parser.add_argument('--clip-grad', type=float, default=None, metavar='NORM')
    parser.add_argument('--momentum', type=float, default=0.9, metavar='M')
    parser.add_argument('--weight-decay', type=float, default=0.05)

    # Learning rate schedule parameters
    parser.add_argument('--sched', default='cosine', type=str, metavar='SCHEDULER')
    parser.add_argument('--lr', type=float, default=5e-4, metavar='LR')
    parser.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct')
    parser.add_argument('--lr-noise-pct', type=float, default=0.67, metavar='PERCENT')
    parser.add_argument('--lr-noise-std', type=float, default=1.0, metavar='STDDEV')
    parser.add_argument('--warmup-lr', type=float, default=1e-6, metavar='LR')
    parser.add_argument('--min-lr', type=float, default=1e-5, metavar='LR')
    parser.add_argument('--decay-epochs', type=float, default=30, metavar='N')
    parser.add_argument('--warmup-epochs', type=int, default=5, metavar='N')
    parser.add_argument('--cooldown-epochs', type=int, default=10, metavar='N')
    parser.add_argument('--patience-epochs', type=int, default=10, metavar='N')
    parser.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE')

    # Augmentation parameters
    parser.add_argument('--color-jitter', type=float, default=0.3, metavar='PCT')
    parser.add_argument('--aa', type=str, default='rand-m9-mstd0.5-inc1', metavar='NAME')
    parser.add_argument('--smoothing', type=float, default=0.1, help='Label smoothing')
    parser.add_argument('--train-interpolation', type=str, default='bicubic')
    parser.add_argument('--train-mode', action='store_true',
                        help='model in train mode while training (drop-path, dropout, BatchNorm '
                             'statistics); the default, as in DeiT')
    parser.add_argument('--no-train-mode', action='store_false', dest='train_mode',
                        help='model and ΔΨ heads in eval mode while training, as the authors\' '
                             'runs were (METHOD.md §8 v2)')
    parser.set_defaults(train_mode=True)
    parser.add_argument('--repeated-aug', action='store_true')
    parser.add_argument('--no-repeated-aug', action='store_false', dest='repeated_aug')
    parser.set_defaults(repeated_aug=True)

    # * Random Erase params
    parser.add_argument('--reprob', type=float, default=0.25, metavar='PCT')
    parser.add_argument('--remode', type=str, default='pixel')
    parser.add_argument('--recount', type=int, default=1)

    # * Mixup params
    parser.add_argument('--mixup', type=float, default=0.8)
    parser.add_argument('--cutmix', type=float, default=1.0)
    parser.add_argument('--cutmix-minmax', type=float, nargs='+', default=None)
    parser.add_argument('--mixup-prob', type=float, default=1.0)
    parser.add_argument('--mixup-switch-prob', type=float, default=0.5)
    parser.add_argument('--mixup-mode', type=str, default='batch')

    # * Finetuning params
    parser.add_argument('--model-path', '--finetune', dest='model_path', default='',
                        help='checkpoint (path or URL) to start from: DeiT {"model": ...} or a '
                             'bare state dict')

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
    parser.add_argument('--overwrite', action='store_true',
                        help='replace the run in --output_dir: its checkpoints, logs and TensorBoard '
                             'files are deleted first (without it, a folder holding a run is refused '
                             'unless --resume continues it)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='device to use for training / testing')
    parser.add_argument('--no-amp', action='store_false', dest='amp',
                        help='disable mixed precision (it is only ever used on CUDA)')
    parser.set_defaults(amp=True)
    parser.add_argument('--seed', default=0, type=int)
    parser.add_argument('--resume', default='', help='resume from checkpoint (path or URL)')
    parser.add_argument('--start_epoch', default=0, type=int, metavar='N')
    parser.add_argument('--eval', action='store_true', help='perform evaluation only')
    parser.add_argument('--dist-eval', action='store_true', default=False,
                        help='enable distributed evaluation')
    parser.add_argument('--num_workers', default=10, type=int)
    parser.add_argument('--pin-mem', action='store_true')
    parser.add_argument('--no-pin-mem', action='store_false', dest='pin_mem')
    parser.set_defaults(pin_mem=True)
    parser.add_argument('--print-freq', default=10, type=int, help='iterations between log lines')

    # * Depth Aware Pruning parameters (METHOD.md)
    parser.add_argument('--prune-method', default=None, type=prune_method,
                        help='block_pr (Depth Aware Pruning), its ablations uniform and global, '
                             'the baselines wdprune and savit (docs/BASELINES.md); none to fine-tune')
    parser.add_argument('--prune-ratio', default=0.5, type=float,
                        help='fraction of the parameters to remove')
    parser.add_argument('--prune-start-epoch', default=5, type=int,
                        help='warm-up epochs before masking starts')
    parser.add_argument('--prune-sparse-epoch', default=25, type=int,
                        help='epoch at which the keep-ratio ramp ends and masks start to sharpen')
    parser.add_argument('--prune-finalize-epoch', default=None, type=int,
                        help='epoch after which masks are binarised and the model cut (default: --epochs)')
    parser.add_argument('--prune-steps-update-mask', default='auto', type=steps_or_auto,
                        help='optimizer steps between mask updates, or "auto" for about 3 per epoch')
    parser.add_argument('--prune-taylor-window', default='update', choices=TAYLOR_WINDOWS,
                        help='Taylor scores since the last mask update (METHOD.md §5 v2), or since '
                             'the prune start (ablation)')
    parser.add_argument('--prune-kr-handcraft', default=None, type=numbers, nargs='+',
                        action=Flatten,
                        help='2 x depth keep ratios, one per sub-block, spaces or commas between '
                             '(ablation: skips ΔΨ)')
    parser.add_argument('--prune-scale-gate-imp', default=format_gate_scale(DEFAULT_GATE_SCALE),
                        type=gate_scale, help='per-gate factors on the Taylor percentiles (others 1.0)')
    parser.add_argument('--pr-gamma', default=0.2, type=float, help='momentum of the block importance')
    parser.add_argument('--pr-tau-max', default=0.1, type=float, help='soft-mask temperature before sharpening')
    parser.add_argument('--pr-tau-min', default=0.0, type=float, help='soft-mask temperature at finalize')
    parser.add_argument('--pr-alpha', default=0.5, type=float, help='weight of class vs patch ΔΨ')
    parser.add_argument('--pr-block-imp-scale', default=10., type=float, help='soft-clip range s of §4')
    parser.add_argument('--prune-round-to', default=ROUND_TO, type=int,
                        help='kept widths (read / written dims, head_dim, hidden) multiples of this '
                             '(or whole): 8 keeps GPU tensor cores busy; 1 is the paper\'s method')
    parser.add_argument('--prune-rate-by-block-param-only', action='store_true',
                        help='the prune ratio counts block parameters only')
    parser.add_argument('--lr-soft-head', default=5e-4, type=float,
                        help='learning rate of the ΔΨ heads, used as given (not scaled like --lr)')
    parser.add_argument('--bpi-mode', default='faithful', choices=BPI_MODES,
                        help='ΔΨ heads: the authors\' (faithful) or cheaper patch heads (fast)')
    parser.add_argument('--bpi-fast-width', default=2, type=int,
                        help='fast: patch heads of width D / this')
    parser.add_argument('--bpi-fast-grid', default=7, type=int,
                        help='fast: patch maps average-pooled to at most this many tokens a side')
    parser.add_argument('--bpi-fast-fraction', default=1.0, type=float,
                        help='fast: share of each batch the patch heads see')

    # * WD-Prune parameters (BASELINES.md; a joint run over --epochs, masks learned throughout)
    parser.add_argument('--classifiers', default=[], type=int, nargs='*',
                        help='WD-Prune: attach a shallow classifier after each of these blocks')
    parser.add_argument('--keep-depth', default=None, type=int,
                        help='WD-Prune: keep the first K blocks at the cut and promote classifier K')
    parser.add_argument('--wdprune-lr', default=2.5e-3, type=float,
                        help='WD-Prune: learning rate of the saliency scores and thresholds')
    parser.add_argument('--wdprune-lambda-lr', default=None, type=float,
                        help='WD-Prune: gradient-ascent step of the Lagrange multipliers (default: the module\'s)')
    parser.add_argument('--wdprune-threshold-init', default=10., type=float,
                        help='WD-Prune: initial threshold t, keep ratio sigmoid(t)')
    parser.add_argument('--wdprune-round', default=16, type=int,
                        help='WD-Prune: MLP and output masks keep a multiple of this many units')

    # * SaViT parameters (BASELINES.md; one shot: score, search, cut)
    parser.add_argument('--savit-fraction', default=0.1, type=float,
                        help='SaViT: fraction of a training epoch over which Taylor scores are averaged')
    parser.add_argument('--savit-budget', default='params', choices=['params', 'flops'],
                        help='SaViT: what --prune-ratio removes')
    parser.add_argument('--need-hessian', action='store_true',
                        help='SaViT: estimate the interaction matrix of the component types')
    parser.add_argument('--savit-population', default=100, type=int)
    parser.add_argument('--savit-children', default=50, type=int)
    parser.add_argument('--savit-generations', default=100, type=int)
    parser.add_argument('--savit-min-keep', default=0.05, type=float,
                        help='SaViT: fraction of each layer\'s units always kept')

    parser.add_argument('--resize-model-by-checkpoint', '--model-resize-by-checkpoint',
                        action='store_true', dest='resize_model_by_checkpoint',
                        help='build the cut architecture stored in --model-path (first_sparse_checkpoint.pth)')

    # distributed training parameters
    parser.add_argument('--world_size', default=1, type=int, help='number of distributed processes')
    parser.add_argument('--dist_url', default='env://', help='url used to set up distributed training')
    return parser


# ---- one validation of the command line, before anything is written ---------------------------
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
    for flag, value in (('--batch-size', args.batch_size), ('--epochs', args.epochs),
                        ('--grad-accum-steps', args.grad_accum_steps),
                        ('--print-freq', args.print_freq), ('--input-size', args.input_size)):
        if value < 1:
            raise UsageError(f'{flag} must be at least 1, got {value}')
    for flag, value in (('--num_workers', args.num_workers), ('--lr', args.lr),
                        ('--warmup-lr', args.warmup_lr), ('--min-lr', args.min_lr),
                        ('--weight-decay', args.weight_decay)):
        if value < 0:
            raise UsageError(f'{flag} must not be negative, got {value}')
    for flag, value in (('--drop', args.drop), ('--drop-path', args.drop_path)):
        if not 0 <= value < 1:
            raise UsageError(f'{flag} is a rate in [0, 1), got {value}')
    check_device(args.device)
    if args.input_size % config.patch_size:
        raise UsageError(f'--input-size {args.input_size} is not a multiple of the patch size '
                         f'{config.patch_size} of {args.model}')
    for flag, (given, methods) in METHOD_FLAGS.items():
        if given(args) and args.prune_method not in methods:
            raise UsageError(f'{flag} belongs to --prune-method {" / ".join(methods)}, '
                             f'not {args.prune_method or "none"}')
    if args.prune_method is not None:
        if args.prune_finalize_epoch is None:
            args.prune_finalize_epoch = args.epochs
        if args.prune_finalize_epoch > args.epochs:
            raise UsageError(f'--prune-finalize-epoch {args.prune_finalize_epoch} is after --epochs {args.epochs}')
        handcraft = args.prune_kr_handcraft
        if handcraft is not None and len(handcraft) != 2 * config.depth:
            raise UsageError(f'--prune-kr-handcraft needs {2 * config.depth} values (2 × depth '
                             f'{config.depth}), got {len(handcraft)}')
        method = PRUNERS[args.prune_method]
        try:  # every range a configuration checks, with no model or data yet
            method.config(args)
            method.schedule(args, 1)
        except ConfigError as e:
            raise usage_error(e)
    return args


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


def build_pruner(args, model, nb_classes, steps_per_epoch):
    method = PRUNERS[args.prune_method]
    try:
        return method.pruner(model, nb_classes, method.config(args), method.schedule(args, steps_per_epoch))
    except ConfigError as e:
        raise usage_error(e)


# what a run writes into --output_dir: a folder holding any of them holds a run
RUN_FILES = ('checkpoint.pth', 'best_checkpoint.pth', 'first_sparse_checkpoint.pth', 'log.txt',
             'pruning_log.jsonl', 'args.json', 'tensorboard')
LOGS = ('log.txt', 'pruning_log.jsonl')


def continues_run(args) -> bool:
    """--resume names a checkpoint inside --output_dir: the run there goes on."""
    return bool(args.resume and args.output_dir) and not utils.is_url(args.resume) and \
        Path(args.resume).resolve().parent == Path(args.output_dir).resolve()


def check_run_dir(args):
    """A run is never mixed into another one's folder: its checkpoints would be replaced (a worse
    best_checkpoint.pth over a better one) and its logs appended to. Reads only; called by every
    process before they meet in init_distributed_mode, so none writes before all have checked."""
    if args.eval or not args.output_dir:
        return
    if args.overwrite and continues_run(args):
        raise UsageError(f'--overwrite would delete --resume {args.resume}: leave out one of them')
    out = Path(args.output_dir)
    found = [name for name in RUN_FILES if (out / name).exists()]
    if not found or args.overwrite or continues_run(args):
        return
    how = f'--resume {out / "checkpoint.pth"} continues it, ' if 'checkpoint.pth' in found else ''
    raise UsageError(f'--output_dir {out} holds a run ({", ".join(found[:3])}{", …" if len(found) > 3 else ""}): '
                     f'{how}--overwrite replaces it')


def check_output_dir(output_dir):
    """Fail early, and before writing anything there, if output_dir cannot be written."""
    if not output_dir:
        return
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as e:
        raise UsageError(f'--output_dir {output_dir} is not writable: {e.strerror or e}')


def build_datasets(args):
    try:
        dataset_train, nb_classes = build_dataset(is_train=True, args=args)
        dataset_val, _ = build_dataset(is_train=False, args=args)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e))
    return dataset_train, dataset_val, nb_classes


def build_model(args, nb_classes, resume_checkpoint=None):
    """The model to train: dense, or the cut architecture stored in a checkpoint (§7).

    A checkpoint with `arch` holds a cut model; it is rebuilt from `--model-path` only with
    --resize-model-by-checkpoint, and always from a `--resume` checkpoint.
    """
    kwargs = dict(num_classes=nb_classes, img_size=args.input_size, drop_rate=args.drop,
                  drop_path_rate=args.drop_path)
    checkpoint = utils.load_checkpoint_file(args.model_path, '--model-path') if args.model_path else None
    arch = None
    if resume_checkpoint is not None and resume_checkpoint.get('arch') is not None:
        arch = resume_checkpoint['arch']
    elif checkpoint is not None and checkpoint.get('arch') is not None:
        if not args.resize_model_by_checkpoint:
            raise UsageError(f'--model-path {args.model_path} holds a cut model (it has "arch"): '
                             'add --resize-model-by-checkpoint to rebuild it')
        arch = checkpoint['arch']
    elif args.resize_model_by_checkpoint:
        raise UsageError('--resize-model-by-checkpoint needs a --model-path with "arch" '
                         f'(a first_sparse_checkpoint.pth); {args.model_path or "no --model-path"} has none')
    if arch is not None:
        dense_depth = arch.get('dense_depth', arch.get('depth'))  # a cut may keep fewer layers
        if arch.get('family') != args.model or dense_depth != models.CONFIGS[args.model].depth:
            raise UsageError(f'the checkpoint holds a cut {arch.get("family")} of depth '
                             f'{dense_depth}, but --model is {args.model}')
        model = models.build_from_arch(arch, **kwargs)
    else:
        model = timm.create_model(args.model, **kwargs)
    if checkpoint is not None:
        try:
            state_dict, notes = models.pretrained_state_dict(model, checkpoint)
        except ValueError as e:
            raise UsageError(f'--model-path {args.model_path}: {e}')
        model.load_state_dict(state_dict)
        print(f'Loaded weights from {args.model_path}' + ''.join(f'; {n}' for n in notes))
    return model


def load_resume_checkpoint(args):
    checkpoint = utils.load_checkpoint_file(args.resume, '--resume')
    if 'model' not in checkpoint:
        raise UsageError(f'--resume {args.resume} has no "model" entry: not a checkpoint of this script')
    return checkpoint


def check_resume_kind(args, checkpoint, pruning):
    """A --resume checkpoint of another kind of run than this command line's."""
    saved = checkpoint.get('args') or {}
    if checkpoint.get('pruner') is not None and not pruning:
        raise UsageError(f'--resume {args.resume} was written while pruning: repeat the pruning flags')
    if pruning and checkpoint.get('pruner') is None:
        raise UsageError(f'--resume {args.resume} is not from a pruning run (it holds no pruner state): '
                         'to prune its weights, pass it as --model-path')
    if pruning and saved.get('prune_method') not in (None, args.prune_method):
        raise UsageError(f'--resume {args.resume} was written by --prune-method {saved["prune_method"]}, '
                         f'not {args.prune_method}')


def check_resume_steps(args, checkpoint, steps_per_epoch):
    """The pruning schedule counts optimizer steps (§6), and steps per epoch follow from the
    processes, --batch-size and --grad-accum-steps: resumed with others, the schedule would be
    off by the difference. Refused rather than re-derived (the masks could not match an
    uninterrupted run anyway: the batches differ)."""
    saved = checkpoint.get('args') or {}
    then = (saved.get('world_size', 1), saved.get('batch_size'), saved.get('grad_accum_steps'),
            checkpoint.get('steps_per_epoch', steps_per_epoch))
    now = (utils.get_world_size(), args.batch_size, args.grad_accum_steps, steps_per_epoch)
    if then != now:
        raise UsageError(f'--resume {args.resume} is a pruning run of {then[0]} process(es) × --batch-size '
                         f'{then[1]} × --grad-accum-steps {then[2]} ({then[3]} steps per epoch), this run '
                         f'{now[0]} × {now[1]} × {now[2]} ({now[3]}): resume with the same ones')


def build_loaders(args, dataset_train, dataset_val):
    world, rank = utils.get_world_size(), utils.get_rank()
    if args.distributed and args.repeated_aug:
        from timm.data.distributed_sampler import RepeatAugSampler
        sampler_train = RepeatAugSampler(dataset_train, num_replicas=world, rank=rank, shuffle=True)
    else:
        # also in a single process, so that the order of an epoch depends on (seed, epoch) only
        sampler_train = torch.utils.data.DistributedSampler(
            dataset_train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    if args.distributed and args.dist_eval:
        sampler_val = utils.ShardSampler(dataset_val, num_replicas=world, rank=rank)
    else:
        sampler_val = torch.utils.data.SequentialSampler(dataset_val)
    pin = args.pin_mem and str(args.device).startswith('cuda')
    loader_train = torch.utils.data.DataLoader(
        dataset_train, sampler=sampler_train, batch_size=args.batch_size,
        num_workers=args.num_workers, pin_memory=pin, drop_last=True,
        # not persistent: workers seed from the torch RNG, just reseeded for this epoch, when
        # the epoch's iterator starts; persistent ones keep the RNG of this process's first
        # epoch, and a resumed run would augment differently from the uninterrupted one
        persistent_workers=False)
    loader_val = torch.utils.data.DataLoader(
        dataset_val, sampler=sampler_val, batch_size=int(1.5 * args.batch_size),
        num_workers=args.num_workers, pin_memory=pin, drop_last=False)
    if not args.eval and len(loader_train) < args.grad_accum_steps:
        raise UsageError(f'the training set gives {len(loader_train)} batches of {args.batch_size} '
                         f'per process, fewer than --grad-accum-steps {args.grad_accum_steps}')
    return loader_train, loader_val


def scaled_lr(args) -> float:
    """DeiT's linear scaling, lr · batch · world · accum / 512 (--lr-soft-head is used as given,
    as the authors do)."""
    if args.unscale_lr:
        return args.lr
    return args.lr * args.batch_size * utils.get_world_size() * args.grad_accum_steps / 512.0


def build_optimizer(args, model, lr, extra_param_groups=()):
    # gates (METHOD.md §2) receive gradients but are set by the pruner only
    gates = {id(p) for p in model.gate_parameters()}
    groups = param_groups_weight_decay(model, args.weight_decay, model.no_weight_decay())
    for g in groups:
        g['params'] = [p for p in g['params'] if id(p) not in gates]
    kwargs = {'eps': args.opt_eps} if args.opt_eps is not None else {}
    if args.opt_betas is not None:
        kwargs['betas'] = args.opt_betas
    return create_optimizer_v2(groups + list(extra_param_groups), opt=args.opt, lr=lr,
                               weight_decay=args.weight_decay, momentum=args.momentum, **kwargs)


def build_scheduler(args, optimizer):
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        cooldown_epochs=args.cooldown_epochs, patience_epochs=args.patience_epochs,
        decay_rate=args.decay_rate, min_lr=args.min_lr, warmup_lr=args.warmup_lr,
        warmup_epochs=args.warmup_epochs, noise=args.lr_noise, noise_pct=args.lr_noise_pct,
        noise_std=args.lr_noise_std)
    return scheduler


def build_criterion(args):
    """DeiT's loss and mixup: (criterion, mixup_fn or None)."""
    if not (args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None):
        if args.smoothing > 0.:
            return LabelSmoothingCrossEntropy(smoothing=args.smoothing), None
        return torch.nn.CrossEntropyLoss(), None
    mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                     prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                     label_smoothing=args.smoothing, num_classes=args.nb_classes)
    return SoftTargetCrossEntropy(), mixup_fn  # smoothing is folded into the mixup targets


class Run:
    """Where a run writes: checkpoints, log.txt and TensorBoard, on the master process only.

    `overwrite` deletes the files of an earlier run first. `continued` is the --resume
    checkpoint when it continues the run in this folder: the logs are cut back to the lines
    they held when it was saved (`log_lines`), so the records of an epoch that was killed and
    is now repeated appear once, and TensorBoard hides its events from the repeated steps on
    (`purge_step`)."""

    def __init__(self, output_dir, overwrite=False, continued=None, purge_step=None):
        self.dir = Path(output_dir) if output_dir else None
        self.writer = None
        self.lines = dict.fromkeys(LOGS, 0)  # lines in each log, saved with every checkpoint
        if self.dir is None or not utils.is_main_process():
            return
        if overwrite:
            self.remove_run()
        if continued is not None:
            self.cut_logs(continued.get('log_lines'))
        for name in LOGS:
            if (self.dir / name).exists():
                self.lines[name] = len((self.dir / name).read_text().splitlines())
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(self.dir / 'tensorboard'), purge_step=purge_step)

    def remove_run(self):
        removed = [p for p in [self.dir / name for name in RUN_FILES] + list(self.dir.glob('*.pth.tmp.*'))
                   if p.exists()]
        for p in removed:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if removed:
            print(f'--overwrite: removed {", ".join(p.name for p in removed)} from {self.dir}')

    def cut_logs(self, log_lines):
        if log_lines is None:  # saved before checkpoints recorded them
            print('note: the --resume checkpoint does not record its log lines: log.txt and '
                  'pruning_log.jsonl are appended to as they are')
            return
        for name, n in log_lines.items():
            path = self.dir / name
            lines = path.read_text().splitlines(keepends=True) if path.exists() else []
            if len(lines) > n:
                tmp = path.with_name(f'{name}.tmp.{os.getpid()}')
                tmp.write_text(''.join(lines[:n]))
                os.replace(tmp, path)
                print(f'{name}: removed {len(lines) - n} line(s) written after the --resume checkpoint')

    def save(self, name, obj):
        if self.dir is not None:
            utils.save_on_master(obj, self.dir / name)

    def log(self, stats, epoch):
        if self.dir is None or not utils.is_main_process():
            return
        with (self.dir / 'log.txt').open('a') as f:
            f.write(json.dumps(stats) + '\n')
        self.lines['log.txt'] += 1
        for k, v in stats.items():
            if k not in ('epoch', 'n_parameters') and isinstance(v, (int, float)):
                self.writer.add_scalar(k.replace('_', '/', 1), v, epoch)
        self.writer.flush()

    def log_pruning(self, record):
        """One JSON line per pruner record in pruning_log.jsonl; its scalars to TensorBoard."""
        if self.dir is None or not utils.is_main_process():
            return
        with (self.dir / 'pruning_log.jsonl').open('a') as f:
            f.write(json.dumps(record) + '\n')
        self.lines['pruning_log.jsonl'] += 1
        for tag, value in getattr(record, 'scalars', {}).items():
            self.writer.add_scalar(tag, value, record.get('step', 0))

    def write_args(self, args):
        if self.dir is not None and utils.is_main_process():
            (self.dir / 'args.json').write_text(json.dumps(vars(args), indent=2))

    def close(self):
        if self.writer is not None:
            self.writer.close()


def setup_device(args):
    """(device, amp): AMP only on CUDA; seeds; flush float32 denormals on the CPU."""
    device = torch.device(args.device)
    utils.seed_everything(args.seed + utils.get_rank())
    if device.type == 'cuda':
        cudnn.benchmark = True
    else:
        # masked paths and AdamW's decaying second moments underflow into float32 denormals,
        # which CPUs multiply about 10x slower (a pruning epoch went from 5 s to 50 s)
        torch.set_flush_denormal(True)
    return device, args.amp and device.type == 'cuda'


def main(args):
    stats = run_main(args)
    utils.leave_distributed()
    return stats


def run_main(args):
    args = validate(args)
    check_run_dir(args)
    utils.init_distributed_mode(args)
    print(args)
    device, amp = setup_device(args)
    # everything that can fail on bad input happens before output_dir is touched
    dataset_train, dataset_val, args.nb_classes = build_datasets(args)
    checkpoint = load_resume_checkpoint(args) if args.resume else None
    model = build_model(args, args.nb_classes, checkpoint)
    pruning = args.prune_method is not None and not (checkpoint and checkpoint.get('arch'))
    if checkpoint is not None:
        check_resume_kind(args, checkpoint, pruning)
    loader_train, loader_val = build_loaders(args, dataset_train, dataset_val)
    steps_per_epoch = len(loader_train) // args.grad_accum_steps
    if checkpoint is not None and pruning and not args.eval:
        check_resume_steps(args, checkpoint, steps_per_epoch)
    model.to(device)
    pruner = build_pruner(args, model, args.nb_classes, steps_per_epoch) if pruning else None
    if checkpoint is not None:
        restore_weights(args, checkpoint, model, pruner)
    if not args.eval:
        check_output_dir(args.output_dir)
    continued = checkpoint if continues_run(args) else None
    resumed_step = (checkpoint['epoch'] + 1) * steps_per_epoch \
        if continued is not None and 'optimizer' in checkpoint else None
    run = Run(args.output_dir if not args.eval else '', overwrite=args.overwrite, continued=continued,
              purge_step=resumed_step)
    if pruner is not None:
        pruner.on_update = run.log_pruning
    if args.eval:
        print('number of params:', model.num_parameters())
        net = wrap(args, device, pruner.module if pruner is not None else model)
        test_stats = evaluate(loader_val, net, device, amp=amp, pruner=pruner, print_freq=args.print_freq,
                              count_unreadable=args.skip_bad_images)
        print(f'Accuracy of the network on the {len(dataset_val)} test images: {test_stats["acc1"]:.1f}%')
        return test_stats
    trainer = Trainer(args, model, pruner, device, amp, run)
    if pruner is not None and pruner.one_shot:
        return trainer.prune_one_shot(loader_train, loader_val)
    return trainer.fit(loader_train, loader_val, checkpoint)


def wrap(args, device, net):
    if not args.distributed:
        return net
    return torch.nn.parallel.DistributedDataParallel(
        net, device_ids=[args.gpu] if device.type == 'cuda' else None)


def restore_weights(args, checkpoint, model, pruner):
    state = checkpoint['model']
    problem = utils.state_dict_mismatch(model, state)
    if problem:
        saved_model = (checkpoint.get('args') or {}).get('model')
        head = state.get('head.weight')
        if saved_model not in (None, args.model):
            problem = f'it was written for --model {saved_model}'
        elif head is not None and head.shape[0] != args.nb_classes:
            problem = f'its classifier has {head.shape[0]} classes, --data-set {args.data_set} has {args.nb_classes}'
        raise UsageError(f'--resume {args.resume} does not fit --model {args.model}: {problem}')
    model.load_state_dict(state)
    if pruner is not None and checkpoint.get('pruner') is not None:
        try:
            pruner.load_state_dict(checkpoint['pruner'])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
            raise UsageError(f'--resume {args.resume}: its pruner state does not fit --prune-method '
                             f'{args.prune_method}: {reason}')


class Trainer:
    """The epoch loop of one run: the network (gated and with a pruner's modules while pruning,
    the cut model after), its optimizer, schedule, EMA and checkpoints."""

    def __init__(self, args, model, pruner, device, amp, run):
        self.args, self.device, self.amp, self.run = args, device, amp, run
        self.criterion, self.mixup_fn = build_criterion(args)
        self.lr = scaled_lr(args)
        self.max_accuracy = 0.0
        self.loss_scaler = NativeScaler(device='cuda') if amp else None
        self.use(model, pruner)

    def use(self, model, pruner):
        """Train `model` from now on: a new optimizer (DeiT's schedule unless a pruner keeps the
        learning rate constant, METHOD.md §6), DDP wrapper and EMA (EMA of a gated model would
        average masks as well as weights: it starts after the cut)."""
        args = self.args
        self.model, self.pruner = model, pruner
        self.net = wrap(args, self.device, pruner.module if pruner is not None else model)
        self.n_parameters = model.num_parameters()
        print('number of params:', self.n_parameters)
        self.optimizer = build_optimizer(args, model, self.lr, pruner.param_groups(self.lr, args.weight_decay)
                                         if pruner is not None else ())
        constant_lr = pruner is not None and not pruner.follows_lr_schedule
        self.lr_scheduler = None if constant_lr else build_scheduler(args, self.optimizer)
        self.model_ema = None
        if args.model_ema and pruner is None:
            self.model_ema = ModelEmaV3(model, decay=args.model_ema_decay,
                                        device='cpu' if args.model_ema_force_cpu else None)

    def resume(self, checkpoint) -> int:
        """The optimizer, schedule, EMA and scaler states of a --resume checkpoint; the next epoch."""
        if checkpoint is None or 'optimizer' not in checkpoint:
            return self.args.start_epoch
        self.optimizer.load_state_dict(checkpoint['optimizer'])
        if self.lr_scheduler is not None and checkpoint.get('lr_scheduler') is not None:
            self.lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])
        if self.model_ema is not None and checkpoint.get('model_ema') is not None:
            self.model_ema.module.load_state_dict(checkpoint['model_ema'])
        if self.loss_scaler is not None and checkpoint.get('scaler'):
            self.loss_scaler.load_state_dict(checkpoint['scaler'])
        self.max_accuracy = checkpoint.get('max_accuracy', 0.0)
        print(f'Resumed from {self.args.resume} at epoch {checkpoint["epoch"] + 1}')
        return checkpoint['epoch'] + 1

    def fit(self, loader_train, loader_val, checkpoint=None):
        args = self.args
        start_epoch = self.resume(checkpoint)
        self.run.write_args(args)
        self.steps_per_epoch = steps_per_epoch = len(loader_train) // args.grad_accum_steps
        global_step = start_epoch * steps_per_epoch
        print(f'Start training for {args.epochs} epochs')
        start_time = time.time()
        for epoch in range(start_epoch, args.epochs):
            # an epoch's randomness depends on (seed, epoch, rank) only: resuming repeats it exactly
            utils.seed_everything(args.seed + 1000 * epoch + utils.get_rank())
            loader_train.sampler.set_epoch(epoch)
            train_stats, global_step = train_one_epoch(
                self.net, self.criterion, loader_train, self.optimizer, self.device, epoch,
                self.loss_scaler, max_norm=args.clip_grad, model_ema=self.model_ema,
                mixup_fn=self.mixup_fn, accum_steps=args.grad_accum_steps, amp=self.amp,
                print_freq=args.print_freq, writer=self.run.writer, pruner=self.pruner,
                global_step=global_step, set_training_mode=args.train_mode,
                count_unreadable=args.skip_bad_images)
            if self.lr_scheduler is not None:
                self.lr_scheduler.step(epoch + 1)
            if self.pruner is not None and epoch + 1 == args.prune_finalize_epoch:
                test_stats = self.cut(loader_val, epoch)
            else:
                test_stats = evaluate(loader_val, self.net, self.device, amp=self.amp, pruner=self.pruner,
                                      print_freq=args.print_freq, count_unreadable=args.skip_bad_images)
            print(f'Accuracy of the network on the {len(loader_val.dataset)} test images: {test_stats["acc1"]:.1f}%')
            self.end_epoch(epoch, train_stats, test_stats)
        print(f'Training time {datetime.timedelta(seconds=int(time.time() - start_time))}')
        print(f'[rank {utils.get_rank()}] parameter digest {utils.parameter_digest(self.model)}',
              flush=True, **({'force': True} if args.distributed else {}))
        self.run.close()
        return {'max_accuracy': self.max_accuracy}

    def cut(self, loader_val, epoch):
        """The end of the pruning run (§7), after which training goes on with the cut model;
        a schedule that the pruning run followed (WD-Prune) carries on into it."""
        cut, test_stats = finalize_pruning(self.pruner, self.model, self.args, loader_val, self.device,
                                           self.amp, epoch, self.run)
        followed = self.lr_scheduler is not None
        self.use(cut, None)
        if followed:
            self.lr_scheduler.step(epoch + 1)
        else:  # DAP keeps the learning rate constant after the cut too (§6)
            self.lr_scheduler = None
        return test_stats

    def end_epoch(self, epoch, train_stats, test_stats):
        """DeiT's log.txt line, checkpoint.pth (with the pruner's state while pruning) and
        best_checkpoint.pth. The log line comes first: a checkpoint records how many lines each
        log had when it was saved, and a run that continues from it cuts them back to that."""
        self.run.log({**{f'train_{k}': v for k, v in train_stats.items()},
                      **{f'test_{k}': v for k, v in test_stats.items()},
                      'epoch': epoch, 'n_parameters': self.n_parameters}, epoch)
        ckpt = {
            'model': self.model.state_dict(),
            'optimizer': self.optimizer.state_dict(),
            'lr_scheduler': self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            'epoch': epoch,
            'scaler': self.loss_scaler.state_dict() if self.loss_scaler is not None else None,
            'args': vars(self.args),
            'max_accuracy': max(self.max_accuracy, test_stats['acc1']),
            'steps_per_epoch': self.steps_per_epoch,
            'log_lines': dict(self.run.lines),
        }
        if self.model_ema is not None:
            ckpt['model_ema'] = self.model_ema.module.state_dict()
        if self.model.is_cut:
            ckpt['arch'] = self.model.arch()
        if self.pruner is not None:
            ckpt['pruner'] = self.pruner.state_dict()
        self.run.save('checkpoint.pth', ckpt)
        if test_stats['acc1'] > self.max_accuracy:
            self.max_accuracy = test_stats['acc1']
            self.run.save('best_checkpoint.pth', ckpt)
        print(f'Max accuracy: {self.max_accuracy:.2f}%')

    def prune_one_shot(self, loader_train, loader_val):
        """A one-shot pruner (SaViT, docs/BASELINES.md): scores over a share of an epoch without
        weight updates, its calibration, the cut. Fine-tuning is the second command."""
        args, pruner = self.args, self.pruner
        steps = pruner.score_batches(len(loader_train))
        print(f'{args.prune_method}: scores over {steps} of {len(loader_train)} training batches')
        loader_train.sampler.set_epoch(0)
        accumulate_scores(self.net, self.criterion, loader_train, self.device, pruner, steps, amp=self.amp,
                          mixup_fn=self.mixup_fn, print_freq=args.print_freq,
                          set_training_mode=args.train_mode)
        batches = ((x.to(self.device), y.to(self.device)) for x, y in loader_train)
        pruner.calibrate(batches, torch.nn.CrossEntropyLoss())
        cut, test_stats = finalize_pruning(pruner, self.model, args, loader_val, self.device, self.amp, 0,
                                           self.run)
        self.run.log({**{f'test_{k}': v for k, v in test_stats.items()}, 'epoch': 0,
                      'n_parameters': cut.num_parameters()}, 0)
        self.run.close()
        return {'max_accuracy': test_stats['acc1']}


def finalize_pruning(pruner, model, args, loader_val, device, amp, epoch, run):
    """METHOD.md §7: binarise, cut, report, measure the cut model, write first_sparse_checkpoint.pth."""
    params_before = model.num_parameters()
    flops_before = utils.count_flops(model, args.input_size, device)
    cut, rows = pruner.finalize()
    params_after = cut.num_parameters()
    flops_after = utils.count_flops(cut, args.input_size, device)
    print(format_summary(rows, flops_before, flops_after, params_before, params_after))
    summary = {'event': 'finalize', 'method': args.prune_method, 'epoch': epoch, 'sub_blocks': rows,
               'params_dense': params_before, 'params_cut': params_after,
               'flops_dense': flops_before, 'flops_cut': flops_after,
               'depth': cut.depth, 'embed_dim': cut.embed_dim}
    run.log_pruning(summary)
    print('Accuracy of the cut model:')
    test_stats = evaluate(loader_val, cut, device, amp=amp, print_freq=args.print_freq,
                          count_unreadable=args.skip_bad_images)
    run.save('first_sparse_checkpoint.pth', {
        'model': cut.state_dict(), 'arch': cut.arch(), 'args': vars(args), 'epoch': epoch,
        'acc1': test_stats['acc1'], 'summary': summary})
    return cut, test_stats


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, like every other bad input."""

    def error(self, message):
        self.exit(2, f'error: {message}\n')


def cli(argv=None):
    parser = ArgumentParser('DeiT training, Depth Aware Pruning and evaluation script',
                            parents=[get_args_parser()])
    args = parser.parse_args(argv)
    try:
        main(args)
    except UsageError as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        sys.exit(2)
    except (utils.NonFiniteLossError, UnreadableImageError) as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == '__main__':
    cli()
