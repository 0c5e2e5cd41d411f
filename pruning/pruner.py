"""DepthAwarePruner: ties ΔΨ, κ, Taylor scores, soft masks, schedule and cut together.

Usable from any training loop (`pruning/protocol.py` shows the loop every pruner shares):

    pruner = DepthAwarePruner(model, num_classes, PruneConfig(prune_ratio=0.5), schedule)
    net = pruner.module                       # forward(x) -> (logits, aux); wrap it in DDP
    optimizer = AdamW(model_params + pruner.param_groups(lr, weight_decay))
    for step ...:
        logits, aux = net(x)
        loss = criterion(logits, y) + pruner.aux_loss(aux, y, criterion)
        loss.backward(); optimizer.step()
        pruner.step()                         # after the optimizer step, before zero_grad
        optimizer.zero_grad()
    cut, rows = pruner.finalize()             # the dense, smaller ViT and its summary rows

A mask update has two decisions, each one function chosen when the pruner is built:
how many parameters each sub-block keeps (`keep_ratio`: κ from ΔΨ, §4; uniform; or
handcrafted) and which elements (`place`: a threshold per sub-block, §5; or one global
threshold, the `global` ablation).
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from models import GATE_NAMES, binarize
from .delta_psi import DeltaPsi, DeltaPsiHeads, HeadShape
from .cost import BUDGET_UNITS, build_cost
from .cut import cut_model
from .gates import (ATTN_UNITS, check_masks_consistent, gates_of, kept_costs, kept_params, non_block_params,
                    sub_blocks)
from .keep_ratio import KeepRatioFromDeltaPsi, block_budget, ramp, uniform_keep_ratio
from .protocol import ConfigError, Pruner, PrunerModule, Record, setting, summary_row
from .schedule import PruneSchedule
from .taylor import DEFAULT_GATE_SCALE, TaylorScore, element_importance, global_masks, sub_block_masks

# DAP's budget policy and the two ablations that replace it (BASELINES.md, "Ablations"):
# block_pr  κ per sub-block from ΔΨ (§4), then a threshold per sub-block (§5)
# uniform   the same κ for every sub-block, then a threshold per sub-block
# global    no κ: one threshold over all elements, ranked by Taylor score per parameter
BUDGET_POLICIES = ('block_pr', 'uniform', 'global')
# update: Taylor scores are a window, reset after every mask update (METHOD.md §5 v2, the
# authors' code); cumulative: summed from the prune start on (v1 of the spec; an ablation)
TAYLOR_WINDOWS = ('update', 'cumulative')
# faithful: the authors' ΔΨ heads (METHOD.md §3); fast: cheaper patch heads (HeadShape)
DELTA_PSI_MODES = ('faithful', 'fast')


@dataclass
class PruneConfig:
    prune_ratio: float
    method: str = 'block_pr'
    # each setting below is a flag of --prune-method block_pr / uniform / global (train/methods/dap.py)
    taylor_window: str = setting('update', flag='--prune-taylor-window', choices=TAYLOR_WINDOWS,
                                 help='Taylor scores since the last mask update (METHOD.md §5 v2), or since '
                                      'the prune start (ablation)')
    keep_ratio_handcraft: Optional[Sequence[float]] = setting(  # 2L values of κ: skips ΔΨ (ablation)
        None, flag='--prune-kr-handcraft', kind='numbers',
        help='block_pr: 2 x depth keep ratios, one per sub-block, spaces or commas between (ablation: skips ΔΨ)')
    gate_scale: Dict[str, float] = setting(default_factory=lambda: dict(DEFAULT_GATE_SCALE),
                                           flag='--prune-scale-gate-imp', kind='gate_scale',
                                           help='per-gate factors on the Taylor percentiles (others 1.0)')
    gamma: float = setting(0.2, flag='--pr-gamma', kind='real', help='momentum of the block importance')
    alpha: float = setting(0.5, flag='--pr-alpha', kind='real', help='weight of class vs patch ΔΨ')
    block_imp_scale: float = setting(10., flag='--pr-block-imp-scale', kind='real', help='soft-clip range s of §4')
    block_params_only: bool = False
    # the measurement behind 8: docs/BENCHMARKS.md, "On a GPU"
    round_to: int = setting(8, flag='--prune-round-to', kind='int',
                            help='kept widths (read / written dims, head_dim, hidden) multiples of this '
                                 '(or whole): 8 keeps GPU tensor cores busy; 1 is the paper\'s method')
    # pruning/cost.py; the latency budget reads its table of sub-block times from `latency_table`
    budget: str = setting('params', flag='--prune-budget', choices=BUDGET_UNITS,
                          help='what --prune-ratio removes a share of: parameters (the paper\'s), FLOPs '
                               '(torch.utils.flop_counter\'s count), or latency measured on one device '
                               '(--latency-table)')
    latency_table: Optional[str] = setting(None, flag='--latency-table', kind='file',
                                           help='--prune-budget latency: the table of sub-block times that '
                                                'scripts/latency_table.py measured on the target device')
    # what the attention's middle gate removes: head_dim channels of every head (§2, the paper's) or
    # whole heads (an extension, docs/METHOD.md §9: a cut attention with fewer heads, each whole)
    attn_unit: str = setting('head_dim', flag='--prune-attn-unit', choices=ATTN_UNITS,
                             help='the attention\'s middle gate: head_dim channels shared by every head (the '
                                  'paper\'s) or whole heads, so that a cut attention has fewer heads (extension)')
    # the authors' optimizer trains the gates through a flag read on the wrong object (docs/METHOD.md
    # §10); METHOD.md §2 sets them by the pruner only, the default here
    train_gates: bool = setting(False, flag='--prune-train-gates', kind='switch',
                                help='the optimizer also moves the gates between mask updates (AdamW, no weight '
                                     'decay, the backbone\'s rate), as the authors\' runs did')
    head_lr: float = setting(5e-4, flag='--lr-soft-head', kind='real',  # §3
                             help='learning rate of the ΔΨ heads, used as given (not scaled like --lr)')
    # how ΔΨ is estimated: the authors' heads, or fast ones (HeadShape): patch heads of width
    # D // delta_psi_width_div on the patch map pooled to at most delta_psi_grid², for the first
    # delta_psi_fraction of each batch
    delta_psi_mode: str = setting('faithful', flag='--bpi-mode', choices=DELTA_PSI_MODES,
                                  help='ΔΨ heads: the authors\' (faithful) or cheaper patch heads (fast)')
    delta_psi_width_div: int = setting(2, flag='--bpi-fast-width', kind='int',
                                       help='fast: patch heads of width D / this')
    delta_psi_grid: int = setting(7, flag='--bpi-fast-grid', kind='int',
                                  help='fast: patch maps average-pooled to at most this many tokens a side')
    delta_psi_fraction: float = setting(1.0, flag='--bpi-fast-fraction', kind='real',
                                        help='fast: share of each batch the patch heads see')

    def __post_init__(self):
        if not 0 < self.prune_ratio < 1:
            raise ConfigError('prune_ratio', f'must be in (0, 1), got {self.prune_ratio}')
        if self.method not in BUDGET_POLICIES:
            raise ConfigError('method', f'{self.method!r} is not one of {", ".join(BUDGET_POLICIES)}')
        if self.taylor_window not in TAYLOR_WINDOWS:
            raise ConfigError('taylor_window', f'{self.taylor_window!r} is not one of {", ".join(TAYLOR_WINDOWS)}')
        if self.delta_psi_mode not in DELTA_PSI_MODES:
            raise ConfigError('delta_psi_mode', f'{self.delta_psi_mode!r} is not one of {", ".join(DELTA_PSI_MODES)}')
        for name in ('delta_psi_width_div', 'delta_psi_grid'):
            if getattr(self, name) < 1:
                raise ConfigError(name, f'must be at least 1, got {getattr(self, name)}')
        for name in ('gamma', 'alpha'):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(name, f'must be in [0, 1], got {getattr(self, name)}')
        if self.block_imp_scale <= 0:
            raise ConfigError('block_imp_scale', f'must be above 0, got {self.block_imp_scale}')
        if self.head_lr < 0:
            raise ConfigError('head_lr', f'must not be negative, got {self.head_lr}')
        if self.round_to < 1:
            raise ConfigError('round_to', f'must be at least 1, got {self.round_to}')
        if not 0 < self.delta_psi_fraction <= 1:
            raise ConfigError('delta_psi_fraction', f'must be in (0, 1], got {self.delta_psi_fraction}')
        unknown = [n for n in self.gate_scale if n not in GATE_NAMES]
        if unknown:
            raise ConfigError('gate_scale', f'names unknown gates {unknown}; gates are {", ".join(GATE_NAMES)}')
        if not all(v > 0 for v in self.gate_scale.values()):
            raise ConfigError('gate_scale', f'factors must be above 0, got {self.gate_scale}')
        if self.attn_unit not in ATTN_UNITS:
            raise ConfigError('attn_unit', f'{self.attn_unit!r} is not one of {", ".join(ATTN_UNITS)}')
        if self.budget not in BUDGET_UNITS:
            raise ConfigError('budget', f'{self.budget!r} is not one of {", ".join(BUDGET_UNITS)}')
        if self.budget == 'latency' and self.latency_table is None:
            raise ConfigError('latency_table', 'is needed by the latency budget: a table of sub-block times '
                                               'that scripts/latency_table.py measures on the target device')
        if self.budget != 'latency' and self.latency_table is not None:
            raise ConfigError('latency_table', f'is read by the latency budget only, not by {self.budget}')
        if self.keep_ratio_handcraft is not None and self.method != 'block_pr':
            raise ConfigError('keep_ratio_handcraft', f'replaces block_pr\'s κ, not {self.method}\'s')
        if self.keep_ratio_handcraft is not None and not all(0 <= k <= 1 for k in self.keep_ratio_handcraft):
            raise ConfigError('keep_ratio_handcraft', f'values must lie in [0, 1], got {list(self.keep_ratio_handcraft)}')


@dataclass
class Window:
    """What one mask update reads (§4 step 1): the mean ΔΨ of the window and its size."""
    delta_psi_cls: torch.Tensor
    delta_psi_patch: torch.Tensor
    size: int


class DepthAwarePruner(Pruner):
    def __init__(self, model, num_classes: int, config: PruneConfig, schedule: PruneSchedule,
                 on_update=None):
        self.cfg, self.schedule, self.on_update = config, schedule, on_update
        self.sbs = sub_blocks(model, config.attn_unit)
        n_sb = len(self.sbs)
        handcraft = config.keep_ratio_handcraft
        if handcraft is not None and len(handcraft) != n_sb:
            raise ConfigError('keep_ratio_handcraft', f'needs {n_sb} values (2 × depth {model.depth}), '
                                                      f'got {len(handcraft)}')
        device = next(model.parameters()).device
        model.add_gates(tuple(dict.fromkeys(n for sb in self.sbs for n in sb.gate_names)))
        self.model = model
        # the gates stay the same Parameters until finalize: looked up once, not at every step
        self._gate_params = {f'{sb.index}.{n}': g for sb in self.sbs
                             for n, g in zip(sb.gate_names, gates_of(model, sb))}
        # handcrafted κ needs no ΔΨ: no heads are built or trained (as in the authors' code)
        shape = HeadShape(config.delta_psi_mode, config.delta_psi_width_div, config.delta_psi_grid,
                          config.delta_psi_fraction)
        self.heads = None if handcraft is not None else DeltaPsiHeads(
            n_sb, model.embed_dim, num_classes, tuple(model.patch_embed.grid_size), shape,
            (model.global_pool, model.num_prefix_tokens)).to(device)
        self.module = PrunerModule(model, self.heads)
        self.performance = DeltaPsi(n_sb, device)
        self.taylor = TaylorScore(self._gates())
        try:  # the unit of κ, the budget and every target below (METHOD.md §4 step 4)
            self.cost = build_cost(config.budget, model, config.latency_table, config.attn_unit)
        except ValueError as e:
            raise ConfigError('latency_table', str(e)) from None
        self.dense = torch.tensor([sb.dense_cost(self.cost) for sb in self.sbs], dtype=torch.float64)
        self.non_block = self.cost.non_block(model, float(self.dense.sum()))
        self.non_params = non_block_params(model, self.sbs)  # for the records, in any unit
        self.budget = block_budget(self.dense.tolist(), self.non_block, config.prune_ratio,
                                   config.block_params_only)
        if self.budget <= 0:
            raise ConfigError('prune_ratio', f'{config.prune_ratio} leaves no {self.cost.unit} for the blocks: '
                                             f'the {self.non_block:g} of the rest of the model alone exceed the budget')
        self.keep_ratio = (self._handcrafted_keep_ratio if handcraft is not None
                           else self._delta_psi_keep_ratio if config.method == 'block_pr'
                           else self._uniform_keep_ratio)
        self.place = self._place_globally if config.method == 'global' else self._place_per_sub_block
        self.importance = KeepRatioFromDeltaPsi(self.dense, self.budget, config.block_imp_scale,
                                                config.gamma, config.alpha)
        self.step_count = 0
        self.goal = torch.ones(n_sb, dtype=torch.float64)

    def _gates(self) -> Dict[str, torch.nn.Parameter]:
        return self._gate_params

    # ---- hooks for the training loop ----------------------------------------------------
    def param_groups(self, lr: float, weight_decay: float) -> List[dict]:
        """The ΔΨ heads' parameters, at their own learning rate (§3), not the backbone's; with
        `train_gates`, the gates too, at the backbone's `lr` without weight decay (the authors'
        runs; every mask update still overwrites them)."""
        groups = []
        if self.heads is not None:
            decay = [p for p in self.heads.parameters() if p.ndim > 1]
            no_decay = [p for p in self.heads.parameters() if p.ndim <= 1]
            groups += [{'params': decay, 'lr': self.cfg.head_lr, 'weight_decay': weight_decay},
                       {'params': no_decay, 'lr': self.cfg.head_lr, 'weight_decay': 0.}]
        if self.cfg.train_gates:
            groups.append({'params': list(self._gate_params.values()), 'lr': lr, 'weight_decay': 0.})
        return groups

    def aux_loss(self, aux, targets, criterion) -> torch.Tensor:
        """All 4·2L head losses, unweighted; records ΔΨ from the prune start step on (§3)."""
        if aux is None:  # no heads (handcrafted κ)
            return torch.zeros((), device=targets.device)
        lc, lp = self.performance.head_losses(aux, targets, criterion)
        if self.schedule.is_active(self.step_count):
            self.performance.add(lc, lp)
        return lc.sum() + lp.sum()

    def step(self, grad_scale=1.0) -> Optional[Record]:
        """After each optimizer step (gate gradients still present): Taylor scores, and the
        mask update when one is due; then clears the gate gradients (the optimizer does not
        hold the gates, so its zero_grad does not). Returns the update's record, if any.

        `grad_scale` is the loss scale of the step (AMP's GradScaler; a number or a 0-dim
        tensor). A GradScaler's step unscales, in place, the gradients of what the optimizer
        holds: with `train_gates` that includes the gates, whose gradients then carry no scale."""
        step, record = self.step_count, None
        gates = self._gates()
        if self.cfg.train_gates:
            grad_scale = 1.0
        if self.schedule.is_active(step):
            self.taylor.accumulate(gates, grad_scale)
            if self.schedule.is_update(step):
                record = self.update_masks(step)
        # the gates are not in the optimizer, so its zero_grad leaves their gradients alone:
        # clear them here, or every step's score would use the sum of all earlier gradients
        for g in gates.values():
            g.grad = None
        self.step_count += 1
        return record

    # ---- the mask update ---------------------------------------------------------------
    @torch.no_grad()
    def update_masks(self, step: int, tau: Optional[float] = None, final: bool = False) -> Record:
        """One mask update (§4, §5) on the current window of ΔΨ and Taylor scores; the `final`
        one, at finalize, on the current and the previous window together (§5 v2)."""
        self.performance.all_reduce()
        self.taylor.all_reduce()
        delta_c, delta_p = (m.cpu() for m in self.performance.mean(with_previous=final))
        window = Window(delta_c, delta_p, self.performance.window_size(with_previous=final))
        kept_before = torch.tensor(kept_costs(self.model, self.sbs, self.cost), dtype=torch.float64)
        self.goal = self.keep_ratio(window, kept_before)
        applied = ramp(self.goal, self.schedule.ramp_progress(step))
        tau = self.schedule.tau(step) if tau is None else tau
        for sb, masks in zip(self.sbs, self.place(applied, tau, final)):
            for g, m in zip(gates_of(self.model, sb), masks):
                g.copy_(m.to(g))
        check_masks_consistent(list(self._gates().values()))
        record = self._record(step, tau, window, applied)
        self.performance.next_window()
        if self.cfg.taylor_window == 'update':
            self.taylor.next_window()
        return self.emit(record)

    # how many parameters each sub-block keeps (§4): one of these three, chosen in __init__
    def _delta_psi_keep_ratio(self, window: Window, kept: torch.Tensor) -> torch.Tensor:
        """§4: importance from the window's mean ΔΨ, water-filled to the budget."""
        if window.size == 0:  # empty window: nothing new to judge by
            return self.goal
        return self.importance(window.delta_psi_cls, window.delta_psi_patch, kept)

    def _uniform_keep_ratio(self, window: Window, kept: torch.Tensor) -> torch.Tensor:
        """The uniform ablation; for `global` only its total Σ κ·P matters."""
        return uniform_keep_ratio(self.dense, self.budget)

    def _handcrafted_keep_ratio(self, window: Window, kept: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.cfg.keep_ratio_handcraft, dtype=torch.float64)

    # which elements (§5): one of these two, chosen in __init__
    def _scores(self, sb, final: bool) -> List[torch.Tensor]:
        return [self.taylor.mean(f'{sb.index}.{n}', with_previous=final) for n in sb.gate_names]

    def _place_per_sub_block(self, applied: torch.Tensor, tau: float, final: bool):
        """§5 per sub-block, towards κ(step)·P_i (P_i: its dense cost in the budget's unit).
        Each sub-block lands within one element of its target; the difference is carried into
        the next sub-block's target, which keeps the model's total within one element of the
        budget too (without it the micro model drifted 1.3% under at pr 0.75). With
        `round_to`, each gate keeps a multiple of it (or all of it). κ = 0 and κ = 1 stay
        exact, and the carry never decides whether a sub-block lives: where it would push a
        target below the smallest non-empty sub-block, it is passed on."""
        carry, out, r = 0., [], self.cfg.round_to
        for sb in self.sbs:
            kappa = float(applied[sb.index])
            target = kappa * float(self.dense[sb.index])
            partial = 0 < kappa < 1
            smallest = [min(m, n) for m, n in zip(sb.multiples(r), sb.gate_sizes)]  # a non-empty sub-block
            if partial and target + carry >= float(sb.cost(smallest, self.cost)):
                target, carry = target + carry, 0.
            importance = element_importance(self._scores(sb, final), sb.gate_names, self.cfg.gate_scale)
            masks = sub_block_masks(sb, importance, target, tau, r, self.cost)
            if partial:
                carry += target - float(sb.cost([int(binarize(m).sum()) for m in masks], self.cost))
            out.append(masks)
        return out

    def _place_globally(self, applied: torch.Tensor, tau: float, final: bool):
        """The global ablation: one threshold over all sub-blocks' elements, ranked by Taylor
        score per parameter the element controls (BASELINES.md; per unit of the budget's cost)."""
        scores = []
        for sb in self.sbs:
            raw = torch.cat(self._scores(sb, final))
            scores.append(raw / sb.element_costs(self.cost).to(raw.device))
        return global_masks(self.sbs, scores, float((applied * self.dense).sum()), tau, self.cfg.round_to,
                            self.cost)

    def _record(self, step: int, tau: float, window: Window, applied: torch.Tensor) -> Record:
        kept = kept_params(self.model, self.sbs)
        cost = kept_costs(self.model, self.sbs, self.cost)
        data = {
            'step': step, 'epoch': step / self.schedule.steps_per_epoch, 'tau': tau,
            'delta_psi_cls': window.delta_psi_cls.tolist(), 'delta_psi_patch': window.delta_psi_patch.tolist(),
            'importance_cls': None if self.imp_c is None else self.imp_c.tolist(),
            'importance_patch': None if self.imp_p is None else self.imp_p.tolist(),
            'goal_keep_ratio': self.goal.tolist(), 'applied_keep_ratio': applied.tolist(),
            'keep_ratio': (torch.tensor(cost, dtype=torch.float64) / self.dense).tolist(),
            'kept_params': kept, 'total_kept_params': int(sum(kept) + self.non_params),
            'window': window.size,
        }
        data.update(self.budget_report(cost))  # κ above is in its unit
        scalars = {'pruning/total_kept_params': data['total_kept_params'], 'pruning/tau': tau}
        tags = {'goal_keep_ratio': 'keep_ratio_goal', 'applied_keep_ratio': 'keep_ratio_applied',
                'kept_params': 'kept_params', 'delta_psi_cls': 'delta_psi_cls', 'delta_psi_patch': 'delta_psi_patch'}
        for sb in self.sbs:
            for key, tag in tags.items():
                scalars[f'{tag}/{sb.name}'] = data[key][sb.index]
        return Record(data, scalars)

    def budget_report(self, kept_cost: Optional[List[float]] = None) -> dict:
        """The budget's unit, and in it the sub-blocks' kept cost and the model's dense, target
        and kept totals (the rest of the model included)."""
        kept_cost = kept_costs(self.model, self.sbs, self.cost) if kept_cost is None else kept_cost
        return {'budget': self.cost.unit, 'kept_cost': list(kept_cost),
                'total_dense_cost': float(self.dense.sum()) + self.non_block,
                'target_total_cost': self.budget + self.non_block,
                'total_kept_cost': float(sum(kept_cost)) + self.non_block}

    # ---- the end ------------------------------------------------------------------------
    @torch.no_grad()
    def finalize(self):
        """§7: a last update at τ_min and the full ramp, on the current and the previous window
        of ΔΨ and Taylor scores (§5 v2), binarised masks, cut.

        Returns (cut_model, summary rows)."""
        last = max(self.step_count - 1, self.schedule.step_final - 1)
        self.update_masks(last, tau=self.schedule.tau_min, final=True)
        for g in self._gates().values():
            g.copy_(binarize(g).to(g))
        kept, cost = kept_params(self.model, self.sbs), kept_costs(self.model, self.sbs, self.cost)
        self.final_budget = self.budget_report(cost)
        rows = [summary_row(sb.name, sb.dense_params, k, float(self.goal[sb.index]),
                            self.cost.unit, float(self.dense[sb.index]), c)
                for sb, k, c in zip(self.sbs, kept, cost)]
        cut = cut_model(self.model)
        self.model.remove_gates()
        return cut, rows

    # ---- checkpointing ------------------------------------------------------------------
    @property
    def imp_c(self) -> Optional[torch.Tensor]:
        return self.importance.imp_c

    @property
    def imp_p(self) -> Optional[torch.Tensor]:
        return self.importance.imp_p

    def state_dict(self) -> dict:
        return {'step': self.step_count, 'performance': self.performance.state_dict(),
                'taylor': self.taylor.state_dict(), 'importance': self.importance.state_dict(),
                'goal': self.goal, 'heads': None if self.heads is None else self.heads.state_dict()}

    def load_state_dict(self, sd: dict):
        self.step_count = int(sd['step'])
        self.performance.load_state_dict(sd['performance'])
        self.taylor.load_state_dict(sd['taylor'])
        self.importance.load_state_dict(sd['importance'])
        self.goal = sd['goal']
        if self.heads is not None:
            self.heads.load_state_dict(sd['heads'])
