"""Depth Aware Pruning (`block_pr`, METHOD.md) and its budget ablations `uniform` and `global`
(docs/BASELINES.md, "Ablations"): their flags, configuration and schedule."""
from pruning import DepthAwarePruner, PruneConfig, PruneSchedule

from .registry import Family, from_args, register


def config(args) -> PruneConfig:
    return from_args(PruneConfig, args)


def schedule(args, steps_per_epoch: int) -> PruneSchedule:
    """§6; --prune-steps-update-mask auto gives about 3 updates per epoch (the authors' advice)."""
    every = args.prune_steps_update_mask
    return from_args(PruneSchedule, args, steps_per_epoch=steps_per_epoch,
                     steps_update_mask=max(1, round(steps_per_epoch / 3)) if every == 'auto' else every)


# the flags: PruneSchedule's settings, then PruneConfig's
DAP = register(Family(
    methods=('block_pr', 'uniform', 'global'), title='Depth Aware Pruning (METHOD.md) and its ablations',
    settings=(PruneSchedule, PruneConfig), config=config, schedule=schedule, pruner=DepthAwarePruner))
