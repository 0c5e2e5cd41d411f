"""From ΔΨ to block keep ratios κ (METHOD.md §4): how many parameters each sub-block keeps."""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def block_importance(mean_delta: torch.Tensor, kept_params: torch.Tensor,
                     previous: Optional[torch.Tensor], scale: float = 10.,
                     gamma: float = 0.2) -> torch.Tensor:
    """Steps 2–6 of §4 for one kind of ΔΨ (class or patch), given its window mean (step 1).

    A sub-block that keeps no parameter gets importance 0 and stays removed: its ΔΨ is
    exactly 0 (input and output are equal), and the 1e-6 guard of step 4 would otherwise
    turn the soft clip's value at 0 into an unbounded importance.
    """
    imp = mean_delta.double()
    top = imp.max()
    imp = scale * imp / (top if top > 0 else imp.abs().max().clamp_min(1e-12))  # 2. scale to max
    imp = F.softplus(1.4 * imp) - F.softplus(1.4 * imp - scale)                 # 3. soft clip [0, s]
    kept = kept_params.double()
    imp = torch.where(kept > 0, imp / (kept + 1e-6), torch.zeros_like(imp))       # 4. per parameter
    imp = imp / imp.mean().clamp_min(1e-30)                                       # 5. normalise
    if previous is not None:                                                      # 6. momentum
        imp = gamma * imp + (1 - gamma) * previous.to(imp)
    return torch.where(kept > 0, imp, torch.zeros_like(imp))  # momentum must not revive it


def block_budget(dense_params: Sequence[int], non_block_params: int, prune_ratio: float,
                 block_params_only: bool = False) -> float:
    """Parameters the sub-blocks may keep in total so that the model keeps (1 − pr) of its own."""
    blocks = float(sum(dense_params))
    if block_params_only:
        return (1 - prune_ratio) * blocks
    return (1 - prune_ratio) * (blocks + non_block_params) - non_block_params


def water_fill(importance: torch.Tensor, dense_params: torch.Tensor, budget: float) -> torch.Tensor:
    """κ_i = clip(σ·I_i, 0, 1) with Σ κ_i·P_i = budget (§4).

    Sub-blocks that reach 1 are fixed at 1, those at 0 are disabled, σ is recomputed for the
    rest, until no κ is out of bounds. Each round fixes at least one sub-block, so 2L + 1
    rounds always suffice (the authors cap at 20, which 24 sub-blocks could exceed).
    """
    imp = importance.double().clamp_min(0)
    P = dense_params.double()
    kappa = torch.zeros_like(imp)
    full = torch.zeros_like(imp, dtype=torch.bool)
    free = imp > 0
    for _ in range(len(imp) + 1):
        rest = budget - (P * full).sum()
        denom = (imp * P * free).sum()
        if denom <= 0 or rest <= 0:
            kappa = full.double()
            break
        kappa = torch.where(full, torch.ones_like(imp), (rest / denom) * imp * free)
        over = free & (kappa >= 1)
        if not over.any():
            break
        full |= over
        free &= ~over
    return kappa.clamp(0, 1)


def ramp(goal: torch.Tensor, progress: float) -> torch.Tensor:
    """Applied κ while the ramp runs: κ(step) = 1 − (1 − κ)·ρ (§4)."""
    return 1 - (1 - goal) * progress


def uniform_keep_ratio(dense_params: torch.Tensor, budget: float) -> torch.Tensor:
    """The uniform ablation (BASELINES.md): every sub-block keeps the budget's ratio."""
    P = dense_params.double()
    return torch.full_like(P, min(1.0, budget / float(P.sum())))


class KeepRatioFromDeltaPsi:
    """§4 as a whole: the window's mean ΔΨ^c and ΔΨ^p → importance with its momentum state
    (steps 2–6, blend α) → κ water-filled to the budget. One object per estimator, so that a
    second estimator can be judged by the κ it would give (scripts/compare_bpi.py)."""

    def __init__(self, dense_params: torch.Tensor, budget: float, scale: float = 10.,
                 gamma: float = 0.2, alpha: float = 0.5):
        self.dense, self.budget = dense_params.double(), budget
        self.scale, self.gamma, self.alpha = scale, gamma, alpha
        self.imp_c: Optional[torch.Tensor] = None
        self.imp_p: Optional[torch.Tensor] = None

    def __call__(self, delta_psi_cls: torch.Tensor, delta_psi_patch: torch.Tensor,
                 kept_params: torch.Tensor) -> torch.Tensor:
        self.imp_c = block_importance(delta_psi_cls, kept_params, self.imp_c, self.scale, self.gamma)
        self.imp_p = block_importance(delta_psi_patch, kept_params, self.imp_p, self.scale, self.gamma)
        return water_fill(self.alpha * self.imp_c + (1 - self.alpha) * self.imp_p, self.dense, self.budget)

    def state_dict(self):
        return {'imp_c': self.imp_c, 'imp_p': self.imp_p}

    def load_state_dict(self, sd):
        self.imp_c, self.imp_p = sd['imp_c'], sd['imp_p']
