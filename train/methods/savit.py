"""The SaViT baseline (docs/BASELINES.md): one shot, Taylor scores over a share of an epoch,
the evolutionary search, the cut; fine-tuning is the second command."""
from pruning import ConfigError, SaViTConfig, SaViTPruner

from .registry import Family, from_args, register


def config(args) -> SaViTConfig:
    if args.prune_rate_by_block_param_only:
        raise ConfigError('block_params_only', 'does not apply to --prune-method savit, which also '
                                               'prunes the embedding outside the blocks')
    return from_args(SaViTConfig, args, seed=args.seed)


def no_schedule(args, steps_per_epoch: int):
    """One shot: nothing is scheduled (the cut follows the scores)."""
    return None


SAVIT = register(Family(
    methods=('savit',), title='SaViT (docs/BASELINES.md)', settings=(SaViTConfig,), config=config,
    schedule=no_schedule, pruner=SaViTPruner))
