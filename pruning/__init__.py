"""Depth Aware Pruning (METHOD.md): one module per concept.

gates.py              §2  gates and their coupled parameter count
block_performance.py  §3  ΔΨ heads and their accumulation
keep_ratio.py         §4  block importance, water-filling to the budget, ramp
taylor.py             §5  Taylor scores, threshold search, soft masks
schedule.py           §6  when scores accumulate, masks update, τ sharpens
cut.py                §7  the physical cut into a dense, smaller ViT
pruner.py                 DepthAwarePruner, which ties them together (and the uniform /
                          global budget ablations)
wdprune.py                the WD-Prune baseline (BASELINES.md)
savit.py                  the SaViT baseline (BASELINES.md)
"""
from .cut import cut_model
from .pruner import BUDGET_POLICIES, DepthAwarePruner, MaskMismatchError, PruneConfig, format_summary

# DAP and its ablations share DepthAwarePruner; the baselines have their own modules
# (wdprune.py, savit.py), imported where they are used.
PRUNE_METHODS = BUDGET_POLICIES + ('wdprune', 'savit')
from .schedule import PruneSchedule
from .taylor import DEFAULT_GATE_SCALE
