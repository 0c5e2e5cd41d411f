"""Depth Aware Pruning (METHOD.md): one module per concept, and the baselines.

protocol.py           the pruner protocol every method follows; records; the summary table
gates.py              §2  gates and their coupled parameter count
block_performance.py  §3  ΔΨ heads and their accumulation
keep_ratio.py         §4  block importance, water-filling to the budget, ramp
cost.py               §4  what the budget counts: parameters, FLOPs or measured latency
taylor.py             §5  Taylor scores, threshold search, soft masks
schedule.py           §6  when scores accumulate, masks update, τ sharpens
cut.py                §7  the physical cut into a dense, smaller ViT
pruner.py                 DepthAwarePruner, which ties them together (and the uniform /
                          global budget ablations)
wdprune.py                the WD-Prune baseline (BASELINES.md)
savit.py                  the SaViT baseline (BASELINES.md)
"""
from .cost import BUDGET_UNITS, LatencyTable, build_cost
from .cut import cut_model
from .gates import MaskMismatchError
from .protocol import ConfigError, Pruner, PrunerModule, Record, format_summary
from .pruner import BPI_MODES, BUDGET_POLICIES, TAYLOR_WINDOWS, DepthAwarePruner, PruneConfig
from .savit import SaViTConfig, SaViTPruner
from .schedule import PruneSchedule
from .taylor import DEFAULT_GATE_SCALE
from .wdprune import WDPruneConfig, WDPrunePruner
