"""DepthAwarePruner: ties ΔΨ, κ, Taylor scores, soft masks, schedule and cut together.

Usable from any training loop:

    pruner = DepthAwarePruner(model, num_classes, PruneConfig(prune_ratio=0.5), schedule)
    net = pruner.module                       # forward(x) -> (logits, aux); wrap it in DDP
    optimizer = AdamW(model_params + pruner.param_groups(lr, weight_decay))
    for step ...:
        logits, aux = net(x)
        loss = criterion(logits, y) + pruner.aux_loss(aux, y, criterion)
        loss.backward(); optimizer.step()
        pruner.step()                         # after the optimizer step, before zero_grad
        optimizer.zero_grad()
    cut = pruner.finalize()                   # the dense, smaller ViT
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .block_performance import BlockPerformance, BlockPerformanceHeads, PrunableViT
from .cut import cut_model
from .gates import (MaskMismatchError, check_masks_consistent, gates_of, kept_params,
                    non_block_params, sub_blocks)
from .keep_ratio import block_budget, block_importance, ramp, uniform_keep_ratio, water_fill
from .schedule import PruneSchedule
from .taylor import (DEFAULT_GATE_SCALE, TaylorScore, element_costs, element_importance,
                     global_masks, sub_block_masks)

# DAP's budget policy and the two ablations that replace it (BASELINES.md, "Ablations"):
# block_pr  κ per sub-block from ΔΨ (§4), then a threshold per sub-block (§5)
# uniform   the same κ for every sub-block, then a threshold per sub-block
# global    no κ: one threshold over all elements, ranked by Taylor score per parameter
BUDGET_POLICIES = ('block_pr', 'uniform', 'global')
# update: Taylor scores are a window, reset after every mask update (METHOD.md §5 v2, the
# authors' code); cumulative: summed from the prune start on (v1 of the spec; an ablation)
TAYLOR_WINDOWS = ('update', 'cumulative')


@dataclass
class PruneConfig:
    prune_ratio: float
    method: str = 'block_pr'
    keep_ratio_handcraft: Optional[Sequence[float]] = None  # 2L values of κ: skips ΔΨ (ablation)
    gate_scale: Dict[str, float] = field(default_factory=lambda: dict(DEFAULT_GATE_SCALE))
    gamma: float = 0.2
    alpha: float = 0.5
    block_imp_scale: float = 10.
    block_params_only: bool = False
    taylor_window: str = 'update'

    def __post_init__(self):
        if not 0 < self.prune_ratio < 1:
            raise ValueError(f'--prune-ratio must be in (0, 1), got {self.prune_ratio}')
        if self.method not in BUDGET_POLICIES:
            raise ValueError(f'unknown --prune-method {self.method!r}; choose from {", ".join(BUDGET_POLICIES)}')
        if self.taylor_window not in TAYLOR_WINDOWS:
            raise ValueError(f'unknown Taylor window {self.taylor_window!r}; choose from {", ".join(TAYLOR_WINDOWS)}')
        from models import GATE_NAMES
        for name in self.gate_scale:
            if name not in GATE_NAMES:
                raise ValueError(f'unknown gate {name!r} in --prune-scale-gate-imp; gates are {", ".join(GATE_NAMES)}')
        if self.keep_ratio_handcraft is not None and not all(0 <= k <= 1 for k in self.keep_ratio_handcraft):
            raise ValueError(f'--prune-kr-handcraft values must lie in [0, 1], got {list(self.keep_ratio_handcraft)}')


class DepthAwarePruner:
    def __init__(self, model, num_classes: int, config: PruneConfig, schedule: PruneSchedule,
                 on_update: Optional[Callable[[dict], None]] = None):
        self.cfg, self.schedule, self.on_update = config, schedule, on_update
        self.sbs = sub_blocks(model)
        n_sb = len(self.sbs)
        if config.keep_ratio_handcraft is not None and len(config.keep_ratio_handcraft) != n_sb:
            raise ValueError(f'--prune-kr-handcraft needs {n_sb} values (2 × depth {model.depth}), '
                             f'got {len(config.keep_ratio_handcraft)}')
        device = next(model.parameters()).device
        model.add_gates()
        self.model = model
        # handcrafted κ needs no ΔΨ: no heads are built or trained (as in the authors' code)
        self.heads = None if config.keep_ratio_handcraft is not None else BlockPerformanceHeads(
            n_sb, model.embed_dim, num_classes, tuple(model.patch_embed.grid_size)).to(device)
        self.module = PrunableViT(model, self.heads)
        self.performance = BlockPerformance(n_sb, device)
        self.taylor = TaylorScore(self._gates())
        self.dense = torch.tensor([sb.dense_params for sb in self.sbs], dtype=torch.float64)
        self.non_block = non_block_params(model, self.sbs)
        self.budget = block_budget(self.dense.tolist(), self.non_block, config.prune_ratio,
                                   config.block_params_only)
        if self.budget <= 0:
            raise ValueError(f'--prune-ratio {config.prune_ratio} leaves no parameters for the blocks: '
                             f'the {self.non_block} non-block parameters alone exceed the budget')
        self.step_count = 0
        self.imp_c: Optional[torch.Tensor] = None
        self.imp_p: Optional[torch.Tensor] = None
        self.goal = torch.ones(n_sb, dtype=torch.float64)
        self.applied = torch.ones(n_sb, dtype=torch.float64)
        self.records: List[dict] = []

    def _gates(self) -> Dict[str, torch.nn.Parameter]:
        return {f'{sb.index}.{n}': g for sb in self.sbs
                for n, g in zip(sb.gate_names, gates_of(self.model, sb))}

    # ---- hooks for the training loop ----------------------------------------------------
    def param_groups(self, lr: float, weight_decay: float) -> List[dict]:
        """The ΔΨ heads' parameters, with their own learning rate (§3)."""
        if self.heads is None:
            return []
        decay = [p for p in self.heads.parameters() if p.ndim > 1]
        no_decay = [p for p in self.heads.parameters() if p.ndim <= 1]
        return [{'params': decay, 'lr': lr, 'weight_decay': weight_decay},
                {'params': no_decay, 'lr': lr, 'weight_decay': 0.}]

    def aux_loss(self, aux, targets, criterion) -> torch.Tensor:
        """All 4·2L head losses, unweighted; records ΔΨ from the prune start step on (§3)."""
        if aux is None:  # no heads (handcrafted κ)
            return torch.zeros((), device=targets.device)
        lc, lp = self.performance.head_losses(aux, targets, criterion)
        if self.schedule.is_active(self.step_count):
            self.performance.add(lc, lp)
        return lc.sum() + lp.sum()

    @staticmethod
    def eval_heads(aux):
        """Logits of the last class head and last patch head on the final features."""
        cls, patch = aux
        return {'cls_head': cls[-1, 1], 'patch_head': patch[-1, 1]}

    def step(self, grad_scale: float = 1.0) -> Optional[dict]:
        """After each optimizer step (gate gradients still present): Taylor scores, and the
        mask update when one is due; then clears the gate gradients (the optimizer does not
        hold the gates, so its zero_grad does not). Returns the update's record, if any."""
        step, record = self.step_count, None
        gates = self._gates()
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
    def _goal_keep_ratio(self, mean_c: torch.Tensor, mean_p: torch.Tensor,
                         kept: torch.Tensor, window: int) -> torch.Tensor:
        """§4: goal κ from the window's mean ΔΨ (or handcrafted)."""
        cfg = self.cfg
        if cfg.keep_ratio_handcraft is not None:
            return torch.tensor(cfg.keep_ratio_handcraft, dtype=torch.float64)
        if cfg.method in ('uniform', 'global'):  # global: only the total of κ·P matters
            return uniform_keep_ratio(self.dense, self.budget)
        if window == 0:  # empty window: nothing new to judge by
            return self.goal
        self.imp_c = block_importance(mean_c, kept, self.imp_c, cfg.block_imp_scale, cfg.gamma)
        self.imp_p = block_importance(mean_p, kept, self.imp_p, cfg.block_imp_scale, cfg.gamma)
        importance = cfg.alpha * self.imp_c + (1 - cfg.alpha) * self.imp_p
        return water_fill(importance, self.dense, self.budget)

    @torch.no_grad()
    def update_masks(self, step: int, tau: Optional[float] = None, final: bool = False) -> dict:
        """One mask update (§4, §5) on the current window of ΔΨ and Taylor scores; the `final`
        one, at finalize, on the current and the previous window together (§5 v2)."""
        self.performance.all_reduce()
        self.taylor.all_reduce()
        kept_before = torch.tensor(kept_params(self.model, self.sbs), dtype=torch.float64)
        mean_c, mean_p = (m.cpu() for m in self.performance.mean(with_previous=final))
        window = self.performance.window_size(with_previous=final)
        self.goal = self._goal_keep_ratio(mean_c, mean_p, kept_before, window)
        self.applied = ramp(self.goal, self.schedule.ramp_progress(step))
        tau = self.schedule.tau(step) if tau is None else tau
        if self.cfg.method == 'global':
            self._global_update(tau, final)
        else:
            carry = 0.
            for sb in self.sbs:
                scores = [self.taylor.mean(f'{sb.index}.{n}', final) for n in sb.gate_names]
                importance = element_importance(scores, sb.gate_names, self.cfg.gate_scale)
                # each sub-block lands within one element of its target; carrying the
                # difference into the next target keeps the model's total within one element
                # of the budget too (without it the micro model drifted 1.3% under at pr 0.75)
                # (κ = 0 and κ = 1 stay exact, and the carry never decides whether a sub-block
                # lives: where it would push the target below the smallest non-empty sub-block,
                # it is passed on)
                kappa = float(self.applied[sb.index])
                base = kappa * float(self.dense[sb.index])
                target = base + carry if 0 < kappa < 1 and base + carry >= float(sb.params((1, 1, 1))) else base
                masks = sub_block_masks(sb, importance, target, tau)
                for g, m in zip(gates_of(self.model, sb), masks):
                    g.copy_(m.to(g))
                if 0 < kappa < 1:
                    carry = base + carry - float(sb.params([(m >= 0.5).sum() for m in masks]))
        check_masks_consistent(list(self._gates().values()))
        kept = kept_params(self.model, self.sbs)
        if self.cfg.method == 'global':  # the κ the global threshold arrived at, for the logs
            self.goal = self.applied = torch.tensor(kept, dtype=torch.float64) / self.dense
        record = {
            'step': step, 'epoch': step / self.schedule.steps_per_epoch, 'tau': tau,
            'delta_psi_cls': mean_c.tolist(), 'delta_psi_patch': mean_p.tolist(),
            'importance_cls': None if self.imp_c is None else self.imp_c.tolist(),
            'importance_patch': None if self.imp_p is None else self.imp_p.tolist(),
            'goal_keep_ratio': self.goal.tolist(), 'applied_keep_ratio': self.applied.tolist(),
            'kept_params': kept, 'total_kept_params': int(sum(kept) + self.non_block),
            'window': window,
        }
        self.performance.next_window()
        if self.cfg.taylor_window == 'update':
            self.taylor.next_window()
        self.records.append(record)
        if self.on_update is not None:
            self.on_update(record)
        return record

    def _global_update(self, tau: float, final: bool):
        """The global ablation: one threshold over all sub-blocks' elements (BASELINES.md)."""
        scores = []
        for sb in self.sbs:
            raw = torch.cat([self.taylor.mean(f'{sb.index}.{n}', final) for n in sb.gate_names])
            scores.append(raw / element_costs(sb).to(raw.device))
        target = float((self.applied * self.dense).sum())
        for sb, masks in zip(self.sbs, global_masks(self.sbs, scores, target, tau)):
            for g, m in zip(gates_of(self.model, sb), masks):
                g.copy_(m.to(g))

    # ---- the end ------------------------------------------------------------------------
    @torch.no_grad()
    def finalize(self):
        """§7: a last update at τ_min and the full ramp, on the current and the previous window
        of ΔΨ and Taylor scores (§5 v2), binarised masks, cut.

        Returns (cut_model, summary rows)."""
        last = max(self.step_count - 1, self.schedule.step_final - 1)
        self.update_masks(last, tau=self.schedule.tau_min, final=True)
        for g in self._gates().values():
            g.copy_((g >= 0.5).to(g))
        kept = kept_params(self.model, self.sbs)
        rows = [{'sub_block': sb.name, 'dense_params': sb.dense_params, 'kept_params': k,
                 'goal_keep_ratio': float(self.goal[sb.index]),
                 'keep_ratio': k / sb.dense_params, 'skipped': k == 0}
                for sb, k in zip(self.sbs, kept)]
        cut = cut_model(self.model)
        self.model.remove_gates()
        return cut, rows

    # ---- checkpointing ------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {'step': self.step_count, 'performance': self.performance.state_dict(),
                'taylor': self.taylor.state_dict(), 'imp_c': self.imp_c, 'imp_p': self.imp_p,
                'goal': self.goal, 'applied': self.applied,
                'heads': None if self.heads is None else self.heads.state_dict()}

    def load_state_dict(self, sd: dict):
        self.step_count = int(sd['step'])
        self.performance.load_state_dict(sd['performance'])
        self.taylor.load_state_dict(sd['taylor'])
        self.imp_c, self.imp_p = sd['imp_c'], sd['imp_p']
        self.goal, self.applied = sd['goal'], sd['applied']
        if self.heads is not None:
            self.heads.load_state_dict(sd['heads'])


def format_summary(rows: Sequence[dict], flops_before: float, flops_after: float,
                   params_before: int, params_after: int) -> str:
    """The table printed at finalize: per sub-block (any pruner's rows), then totals."""
    lines = [f'{"sub-block":<10}{"dense":>12}{"kept":>12}{"goal κ":>9}{"κ":>8}  skipped']
    for r in rows:
        goal = f'{r["goal_keep_ratio"]:>9.3f}' if r.get('goal_keep_ratio') is not None else f'{"–":>9}'
        lines.append(f'{r["sub_block"]:<10}{r["dense_params"]:>12,}{r["kept_params"]:>12,}'
                     f'{goal}{r["keep_ratio"]:>8.3f}  {"yes" if r["skipped"] else ""}')
    lines.append(f'params: {params_before:,} -> {params_after:,} ({params_after / params_before:.3f}); '
                 f'FLOPs: {flops_before / 1e6:,.1f}M -> {flops_after / 1e6:,.1f}M '
                 f'({flops_after / flops_before:.3f})')
    return '\n'.join(lines)
