"""The WD-Prune baseline (docs/BASELINES.md): one joint run over --epochs on DeiT's schedule,
width masks and shallow classifiers learned throughout, the cut at --prune-finalize-epoch."""
import models
from pruning import PruneSchedule, WDPruneConfig, WDPrunePruner

from .registry import Family, from_args, register


def config(args) -> WDPruneConfig:
    depth = models.vit_config(args.model).depth
    return from_args(WDPruneConfig, args, keep_depth=None if args.keep_depth == depth else args.keep_depth)


def cut_schedule(args, steps_per_epoch: int) -> PruneSchedule:
    """Only when the cut comes (WD-Prune's cosine runs to it)."""
    return PruneSchedule(steps_per_epoch=steps_per_epoch, start_epoch=0, sparse_epoch=0,
                         finalize_epoch=args.prune_finalize_epoch)


WDPRUNE = register(Family(
    methods=('wdprune',), title='WD-Prune (docs/BASELINES.md)', settings=(WDPruneConfig,), config=config,
    schedule=cut_schedule, pruner=WDPrunePruner))
