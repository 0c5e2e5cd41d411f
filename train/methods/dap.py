"""Depth Aware Pruning (`block_pr`, METHOD.md) and its budget ablations `uniform` and `global`
(docs/BASELINES.md, "Ablations"): their flags, configuration and schedule."""
from pruning import BPI_MODES, BUDGET_UNITS, TAYLOR_WINDOWS, DepthAwarePruner, PruneConfig, PruneSchedule
from train.flags import Flatten, format_gate_scale, gate_scale, numbers, real, steps_or_auto

from .registry import Family, default, register


def add_flags(group):
    schedule = lambda field: default(PruneSchedule, field)  # noqa: E731
    config = lambda field: default(PruneConfig, field)  # noqa: E731
    group.add_argument('--prune-start-epoch', default=schedule('start_epoch'), type=int,
                       help='warm-up epochs before masking starts')
    group.add_argument('--prune-sparse-epoch', default=schedule('sparse_epoch'), type=int,
                       help='epoch at which the keep-ratio ramp ends and masks start to sharpen')
    group.add_argument('--prune-steps-update-mask', default='auto', type=steps_or_auto,
                       help='optimizer steps between mask updates, or "auto" for about 3 per epoch')
    group.add_argument('--prune-taylor-window', default=config('taylor_window'), choices=TAYLOR_WINDOWS,
                       help='Taylor scores since the last mask update (METHOD.md §5 v2), or since '
                            'the prune start (ablation)')
    group.add_argument('--prune-kr-handcraft', default=config('keep_ratio_handcraft'), type=numbers,
                       nargs='+', action=Flatten,
                       help='block_pr: 2 x depth keep ratios, one per sub-block, spaces or commas '
                            'between (ablation: skips ΔΨ)')
    group.add_argument('--prune-scale-gate-imp', default=format_gate_scale(config('gate_scale')),
                       type=gate_scale, help='per-gate factors on the Taylor percentiles (others 1.0)')
    group.add_argument('--pr-gamma', default=config('gamma'), type=real,
                       help='momentum of the block importance')
    group.add_argument('--pr-tau-max', default=schedule('tau_max'), type=real,
                       help='soft-mask temperature before sharpening')
    group.add_argument('--pr-tau-min', default=schedule('tau_min'), type=real,
                       help='soft-mask temperature at finalize')
    group.add_argument('--pr-alpha', default=config('alpha'), type=real, help='weight of class vs patch ΔΨ')
    group.add_argument('--pr-block-imp-scale', default=config('block_imp_scale'), type=real,
                       help='soft-clip range s of §4')
    group.add_argument('--prune-round-to', default=config('round_to'), type=int,
                       help='kept widths (read / written dims, head_dim, hidden) multiples of this '
                            '(or whole): 8 keeps GPU tensor cores busy; 1 is the paper\'s method')
    group.add_argument('--prune-budget', default=config('budget'), choices=BUDGET_UNITS,
                       help='what --prune-ratio removes a share of: parameters (the paper\'s), FLOPs '
                            '(torch.utils.flop_counter\'s count), or latency measured on one device '
                            '(--latency-table)')
    group.add_argument('--latency-table', default=config('latency_table'), metavar='FILE',
                       help='--prune-budget latency: the table of sub-block times that '
                            'scripts/latency_table.py measured on the target device')
    group.add_argument('--prune-train-gates', action='store_true', default=config('train_gates'),
                       help='the optimizer also moves the gates between mask updates (AdamW, no weight '
                            'decay, the backbone\'s rate), as the authors\' runs did')
    group.add_argument('--lr-soft-head', default=config('head_lr'), type=real,
                       help='learning rate of the ΔΨ heads, used as given (not scaled like --lr)')
    group.add_argument('--bpi-mode', default=config('bpi_mode'), choices=BPI_MODES,
                       help='ΔΨ heads: the authors\' (faithful) or cheaper patch heads (fast)')
    group.add_argument('--bpi-fast-width', default=config('bpi_width_div'), type=int,
                       help='fast: patch heads of width D / this')
    group.add_argument('--bpi-fast-grid', default=config('bpi_grid'), type=int,
                       help='fast: patch maps average-pooled to at most this many tokens a side')
    group.add_argument('--bpi-fast-fraction', default=config('bpi_fraction'), type=real,
                       help='fast: share of each batch the patch heads see')


def config(args) -> PruneConfig:
    return PruneConfig(prune_ratio=args.prune_ratio, method=args.prune_method,
                       keep_ratio_handcraft=args.prune_kr_handcraft,
                       gate_scale=args.prune_scale_gate_imp, gamma=args.pr_gamma,
                       alpha=args.pr_alpha, block_imp_scale=args.pr_block_imp_scale,
                       block_params_only=args.prune_rate_by_block_param_only,
                       taylor_window=args.prune_taylor_window, head_lr=args.lr_soft_head,
                       bpi_mode=args.bpi_mode, bpi_width_div=args.bpi_fast_width,
                       bpi_grid=args.bpi_fast_grid, bpi_fraction=args.bpi_fast_fraction,
                       round_to=args.prune_round_to, train_gates=args.prune_train_gates,
                       budget=args.prune_budget, latency_table=args.latency_table)


def schedule(args, steps_per_epoch: int) -> PruneSchedule:
    """§6; --prune-steps-update-mask auto gives about 3 updates per epoch (the authors' advice)."""
    every = args.prune_steps_update_mask
    return PruneSchedule(
        steps_per_epoch=steps_per_epoch, start_epoch=args.prune_start_epoch,
        sparse_epoch=args.prune_sparse_epoch, finalize_epoch=args.prune_finalize_epoch,
        steps_update_mask=max(1, round(steps_per_epoch / 3)) if every == 'auto' else every,
        tau_max=args.pr_tau_max, tau_min=args.pr_tau_min)


DAP = register(Family(
    methods=('block_pr', 'uniform', 'global'), title='Depth Aware Pruning (METHOD.md) and its ablations',
    add_flags=add_flags, config=config, schedule=schedule, pruner=DepthAwarePruner,
    fields={'method': '--prune-method', 'keep_ratio_handcraft': '--prune-kr-handcraft',
            'gate_scale': '--prune-scale-gate-imp', 'gamma': '--pr-gamma', 'alpha': '--pr-alpha',
            'block_imp_scale': '--pr-block-imp-scale', 'taylor_window': '--prune-taylor-window',
            'head_lr': '--lr-soft-head', 'train_gates': '--prune-train-gates', 'round_to': '--prune-round-to',
            'budget': '--prune-budget', 'latency_table': '--latency-table', 'bpi_mode': '--bpi-mode',
            'bpi_width_div': '--bpi-fast-width', 'bpi_grid': '--bpi-fast-grid',
            'bpi_fraction': '--bpi-fast-fraction', 'start_epoch': '--prune-start-epoch',
            'sparse_epoch': '--prune-sparse-epoch', 'steps_update_mask': '--prune-steps-update-mask',
            'tau_min': '--pr-tau-min', 'tau_max': '--pr-tau-max'}))
