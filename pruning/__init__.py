"""Depth Aware Pruning (METHOD.md): one module per concept.

gates.py              §2  gates and their coupled parameter count
block_performance.py  §3  ΔΨ heads and their accumulation
keep_ratio.py         §4  block importance, water-filling to the budget, ramp
taylor.py             §5  Taylor scores, threshold search, soft masks
schedule.py           §6  when scores accumulate, masks update, τ sharpens
cut.py                §7  the physical cut into a dense, smaller ViT
pruner.py                 DepthAwarePruner, which ties them together
"""
from .cut import cut_model
from .pruner import PRUNE_METHODS, DepthAwarePruner, MaskMismatchError, PruneConfig, format_summary
from .schedule import PruneSchedule
from .taylor import DEFAULT_GATE_SCALE
