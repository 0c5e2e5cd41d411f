"""Depth Aware Pruning (docs/METHOD.md): one module per section of the method, and the
baselines; which module holds which section is in the code map, docs/ARCHITECTURE.md."""
from .cost import BUDGET_UNITS, LatencyTable, build_cost
from .cut import cut_model
from .gates import MaskMismatchError
from .protocol import ConfigError, Pruner, PrunerModule, Record, format_summary, setting
from .pruner import BUDGET_POLICIES, DELTA_PSI_MODES, TAYLOR_WINDOWS, DepthAwarePruner, PruneConfig
from .savit import SaViTConfig, SaViTPruner
from .schedule import PruneSchedule
from .taylor import DEFAULT_GATE_SCALE
from .wdprune import WDPruneConfig, WDPrunePruner
