"""The SaViT baseline (docs/BASELINES.md): one shot, Taylor scores over a share of an epoch,
the evolutionary search, the cut; fine-tuning is the second command."""
from pruning import ConfigError, SaViTConfig, SaViTPruner
from train.flags import real

from .registry import Family, default, register


def add_flags(group):
    group.add_argument('--savit-fraction', default=default(SaViTConfig, 'score_fraction'), type=real,
                       help='SaViT: fraction of a training epoch over which Taylor scores are averaged')
    group.add_argument('--savit-budget', default=default(SaViTConfig, 'budget'), choices=['params', 'flops'],
                       help='SaViT: what --prune-ratio removes')
    group.add_argument('--need-hessian', action='store_true',
                       help='SaViT: estimate the interaction matrix of the component types')
    group.add_argument('--savit-population', default=default(SaViTConfig, 'population'), type=int)
    group.add_argument('--savit-children', default=default(SaViTConfig, 'children'), type=int)
    group.add_argument('--savit-generations', default=default(SaViTConfig, 'generations'), type=int)
    group.add_argument('--savit-min-keep', default=default(SaViTConfig, 'min_keep'), type=real,
                       help='SaViT: fraction of each layer\'s units always kept')


def config(args) -> SaViTConfig:
    if args.prune_rate_by_block_param_only:
        raise ConfigError('block_params_only', 'does not apply to --prune-method savit, which also '
                                               'prunes the embedding outside the blocks')
    return SaViTConfig(prune_ratio=args.prune_ratio, budget=args.savit_budget,
                       population=args.savit_population, children=args.savit_children,
                       generations=args.savit_generations, min_keep=args.savit_min_keep,
                       use_interaction=args.need_hessian, score_fraction=args.savit_fraction,
                       seed=args.seed)


def no_schedule(args, steps_per_epoch: int):
    """One shot: nothing is scheduled (the cut follows the scores)."""
    return None


SAVIT = register(Family(
    methods=('savit',), title='SaViT (docs/BASELINES.md)', add_flags=add_flags, config=config,
    schedule=no_schedule, pruner=SaViTPruner,
    fields={'budget': '--savit-budget', 'population': '--savit-population',
            'children': '--savit-children', 'generations': '--savit-generations',
            'min_keep': '--savit-min-keep', 'use_interaction': '--need-hessian',
            'score_fraction': '--savit-fraction'}))
