"""The WD-Prune baseline (docs/BASELINES.md): one joint run over --epochs on DeiT's schedule,
width masks and shallow classifiers learned throughout, the cut at --prune-finalize-epoch."""
import models
from pruning import PruneSchedule, WDPruneConfig, WDPrunePruner
from train.flags import real

from .registry import Family, default, register


def add_flags(group):
    group.add_argument('--classifiers', default=[], type=int, nargs='*',
                       help='WD-Prune: attach a shallow classifier after each of these blocks')
    group.add_argument('--keep-depth', default=None, type=int,
                       help='WD-Prune: keep the first K blocks at the cut and promote classifier K')
    group.add_argument('--wdprune-lr', default=default(WDPruneConfig, 'lr'), type=real,
                       help='WD-Prune: learning rate of the saliency scores and thresholds')
    group.add_argument('--wdprune-lambda-lr', default=default(WDPruneConfig, 'lambda_lr'), type=real,
                       help='WD-Prune: gradient-ascent step of the Lagrange multipliers')
    group.add_argument('--wdprune-threshold-init', default=default(WDPruneConfig, 'threshold_init'),
                       type=real, help='WD-Prune: initial threshold t, keep ratio sigmoid(t)')
    group.add_argument('--wdprune-round', default=default(WDPruneConfig, 'mask_round'), type=int,
                       help='WD-Prune: MLP and output masks keep a multiple of this many units')


def config(args) -> WDPruneConfig:
    depth = models.CONFIGS[args.model].depth
    return WDPruneConfig(prune_ratio=args.prune_ratio, lr=args.wdprune_lr, lambda_lr=args.wdprune_lambda_lr,
                         threshold_init=args.wdprune_threshold_init, mask_round=args.wdprune_round,
                         classifiers=tuple(args.classifiers),
                         keep_depth=None if args.keep_depth == depth else args.keep_depth,
                         block_params_only=args.prune_rate_by_block_param_only)


def cut_schedule(args, steps_per_epoch: int) -> PruneSchedule:
    """Only when the cut comes (WD-Prune's cosine runs to it)."""
    return PruneSchedule(steps_per_epoch=steps_per_epoch, start_epoch=0, sparse_epoch=0,
                         finalize_epoch=args.prune_finalize_epoch)


WDPRUNE = register(Family(
    methods=('wdprune',), title='WD-Prune (docs/BASELINES.md)', add_flags=add_flags, config=config,
    schedule=cut_schedule, pruner=WDPrunePruner,
    fields={'lr': '--wdprune-lr', 'lambda_lr': '--wdprune-lambda-lr',
            'threshold_init': '--wdprune-threshold-init', 'mask_round': '--wdprune-round',
            'classifiers': '--classifiers', 'keep_depth': '--keep-depth'}))
