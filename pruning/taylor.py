"""Which elements a sub-block keeps: Taylor importance, threshold search, soft mask (METHOD.md §5)."""
import math
from typing import Dict, List, Sequence, Tuple

import torch

from models import binarize

from .gates import SubBlock

DEFAULT_GATE_SCALE = {'attn_out': 1.5, 'mlp_hid': 0.75, 'mlp_out': 1.5}


class TaylorScore:
    """S_j += (m_j · ∂L/∂m_j)² for every gate element, after every optimizer step
    (Molchanov et al., CVPR 2019, "Taylor FO on gates").

    The sums are a *window* (METHOD.md §5, v2): `next_window()`, called after every mask
    update, keeps the window just used as the previous one and starts an empty one, so each
    update ranks elements on the steps since the last update only; the last update at
    finalize reads both (`mean(key, with_previous=True)`). Without `next_window()` calls the
    sums are cumulative (the `--prune-taylor-window cumulative` ablation, and SaViT).
    """

    def __init__(self, gates: Dict[str, torch.nn.Parameter]):
        # one flat buffer per window, `sum[key]` a view of each gate's part: a step's scores are
        # a handful of kernels and a window's all-reduce one collective, whatever the depth
        sizes = [g.numel() for g in gates.values()]
        first = next(iter(gates.values()))
        self._flat = torch.zeros(sum(sizes), dtype=torch.float64, device=first.device)
        self._previous_flat = torch.zeros_like(self._flat)
        self.sum = dict(zip(gates, (v.view_as(g) for v, g in zip(self._flat.split(sizes), gates.values()))))
        self.previous_sum = dict(zip(gates, (v.view_as(g) for v, g in
                                             zip(self._previous_flat.split(sizes), gates.values()))))
        # the counts live beside the sums: a step adds to them without waiting for the device
        self._count = torch.zeros((), dtype=torch.long, device=first.device)
        self._previous_count = torch.zeros_like(self._count)

    @property
    def count(self) -> int:
        """Steps in the current window (a host synchronisation: not for the training step)."""
        return int(self._count)

    @count.setter
    def count(self, n: int):
        self._count.fill_(n)

    @property
    def previous_count(self) -> int:
        return int(self._previous_count)

    @torch.no_grad()
    def accumulate(self, gates: Dict[str, torch.nn.Parameter], grad_scale=1.0):
        """Add one step's scores; `grad_scale` (a number or a 0-dim tensor) undoes AMP's loss
        scaling. A step with a missing gradient adds nothing and returns False; one with a
        gradient that is not finite (AMP's skipped steps) adds nothing either, decided on the
        device: the result is then a 0-dim bool tensor, False for such a step."""
        if any(g.grad is None for g in gates.values()):
            return False
        mask = torch.cat([g.detach().flatten() for g in gates.values()])
        grad = torch.cat([g.grad.detach().flatten() for g in gates.values()])
        scores = (mask * grad / grad_scale).double() ** 2
        finite = torch.isfinite(scores).all()
        self._flat += torch.where(finite, scores, torch.zeros_like(scores))
        self._count += finite
        return finite

    def all_reduce(self):
        """Mean over processes of the current window (the gate gradients are already
        DDP-averaged; this keeps the scores identical even where they are not). The previous
        window was reduced when it was current."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self._flat)
            self._flat /= torch.distributed.get_world_size()

    def mean(self, key: str, with_previous: bool = False) -> torch.Tensor:
        """S/n of the current window, or of the current and the previous window together."""
        if with_previous:
            return (self.sum[key] + self.previous_sum[key]) / (self._count + self._previous_count).clamp(min=1)
        return self.sum[key] / self._count.clamp(min=1)

    def next_window(self):
        """After a mask update: the current window becomes the previous one; a new one starts."""
        self._previous_flat.copy_(self._flat)
        self._flat.zero_()
        self._previous_count.copy_(self._count)
        self._count.zero_()

    def state_dict(self):
        return {'sum': {k: v.clone() for k, v in self.sum.items()}, 'count': self.count,
                'previous_sum': {k: v.clone() for k, v in self.previous_sum.items()},
                'previous_count': self.previous_count}

    def load_state_dict(self, sd):
        for k, v in sd['sum'].items():
            self.sum[k].copy_(v)
        for k, v in sd['previous_sum'].items():
            self.previous_sum[k].copy_(v)
        self._count.fill_(int(sd['count']))
        self._previous_count.fill_(int(sd['previous_count']))


def rank_percentile(score: torch.Tensor) -> torch.Tensor:
    """r_j = (rank_j + 1) / n, rank ascending (1/n is the least important); ties by index."""
    order = torch.argsort(score, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(len(score), device=score.device)
    return (ranks + 1).double() / len(score)


def _remove_if_empty(masks: List[torch.Tensor]) -> List[torch.Tensor]:
    """An empty gate removes the whole sub-block (§2): all three gates go to zero."""
    if any(not binarize(m).any() for m in masks):
        return [torch.zeros_like(m) for m in masks]
    return masks


def element_importance(scores: Sequence[torch.Tensor], gate_names: Sequence[str],
                       gate_scale: Dict[str, float]) -> torch.Tensor:
    """Steps 1–2: per-gate percentiles times the per-gate factor, concatenated over the three gates."""
    return torch.cat([rank_percentile(s) * gate_scale.get(n, 1.0)
                      for s, n in zip(scores, gate_names)])


def round_kept(kept: torch.Tensor, sizes: torch.Tensor, multiple) -> torch.Tensor:
    """Kept counts rounded down to a multiple of `multiple` (`--prune-round-to`: widths that
    suit the hardware, e.g. 8 for GPU tensor cores); a gate kept whole stays whole. `multiple`
    is one int, or one per gate (the last dimension of `kept`; a head count is never rounded)."""
    if not isinstance(multiple, int):
        multiple = multiple[0] if len(set(multiple)) == 1 else \
            torch.tensor(multiple, dtype=kept.dtype, device=kept.device)
    if isinstance(multiple, int) and multiple <= 1:
        return kept
    return torch.where(kept >= sizes, sizes, torch.div(kept, multiple, rounding_mode='floor') * multiple)


def _search(sb: SubBlock, importance: torch.Tensor, target: float, round_to: int = 1, cost=None):
    """(t, order, kept): the best t on the sorted path, the order, and each gate's kept count."""
    sizes = torch.tensor(sb.gate_sizes, dtype=torch.float64)
    gate_of = torch.repeat_interleave(torch.arange(3), torch.tensor(sb.gate_sizes)).to(importance.device)
    order = torch.argsort(importance, stable=True)  # ties: lower concatenated index first
    onehot = torch.nn.functional.one_hot(gate_of[order], 3).double()
    dropped = torch.cat([torch.zeros(1, 3, dtype=torch.float64, device=onehot.device),
                         onehot.cumsum(0)])              # (n + 1, 3): dropped per gate for t = 0 … n
    kept = round_kept(sizes.to(dropped) - dropped, sizes.to(dropped), sb.multiples(round_to))
    kept_cost = sb.cost([kept[:, 0], kept[:, 1], kept[:, 2]], cost)
    t = int(torch.argmin((kept_cost - target).abs()))  # first minimum: the smaller cut on ties
    return t, order, kept[t]


def threshold_search(sb: SubBlock, importance: torch.Tensor, target: float,
                     round_to: int = 1, cost=None) -> Tuple[int, torch.Tensor]:
    """Steps 3–4: sort ascending and choose t, the number of lowest elements to drop, so that
    the sub-block keeps as close to `target` parameters as possible (or `target` in the unit
    of `cost`, `pruning.cost`: then the kept cost is evaluated the same way).

    Returns (t, order). The authors linearise the coupled cost and iterate; here the kept count
    is evaluated exactly for every t at once: the kept elements of each gate after dropping t
    are its size minus its elements among the first t, and §2's count is a closed form of those.
    Kept params never grow with t, so the best t is within one element's cost of the target.
    With `round_to`, each gate's kept count at t is rounded down to a multiple of it.
    """
    t, order, _ = _search(sb, importance, target, round_to, cost)
    return t, order


def _masks_for_counts(order: torch.Tensor, gate_of: torch.Tensor, sizes: torch.Tensor,
                      kept: torch.Tensor, tau: float) -> torch.Tensor:
    """§5 step 5 when each gate keeps `kept[g]` of its elements: the lowest-ranked others of
    each gate are dropped; the soft mask runs over the order with the dropped ones first, so
    that m ≥ 0.5 keeps exactly the kept ones (without rounding this is the sorted order)."""
    n = len(order)
    ranked_gate = gate_of[order]
    onehot = torch.nn.functional.one_hot(ranked_gate, len(sizes))
    rank_in_gate = (onehot.cumsum(0) * onehot).sum(1) - 1      # 0 for each gate's least important
    drop = rank_in_gate < (sizes.to(kept) - kept).to(order.device)[ranked_gate]
    effective = torch.cat([order[drop], order[~drop]])
    values = torch.empty(n, dtype=torch.float64, device=order.device)
    values[effective] = soft_mask(n, int(drop.sum()), tau, device=order.device)
    return values


def soft_mask(n: int, t: int, tau: float, device=None) -> torch.Tensor:
    """Step 5: the mask value of the element at sorted position k = 1 … n.

    m = sigmoid(ln 9 · (k − t − ½) / (n·τ)). The spec writes (k − t); centring on the boundary
    between the t-th (last dropped) and the (t+1)-th (first kept) element makes the hard mask
    m ≥ 0.5 keep exactly n − t elements. Positions ±n·τ from the boundary read 0.1 / 0.9;
    τ = 0 is a hard step.
    """
    k = torch.arange(1, n + 1, dtype=torch.float64, device=device)
    if tau <= 0:
        return (k > t).double()
    m = torch.sigmoid(math.log(9) * (k - t - 0.5) / (n * tau))
    # far below the threshold the sigmoid underflows to float32 denormals, which multiply
    # 10x slower on CPUs and change nothing: such elements are off
    return torch.where(m < 1e-6, torch.zeros_like(m), m)


def sub_block_masks(sb: SubBlock, importance: torch.Tensor, target: float,
                    tau: float, round_to: int = 1, cost=None) -> List[torch.Tensor]:
    """Steps 3–5 for one sub-block: the soft masks of its three gates (`target` in the unit
    of `cost`; None: parameters)."""
    t, order, kept = _search(sb, importance, target, round_to, cost)
    gate_of = torch.repeat_interleave(torch.arange(3), torch.tensor(sb.gate_sizes)).to(importance.device)
    values = _masks_for_counts(order, gate_of, torch.tensor(sb.gate_sizes, dtype=torch.float64), kept, tau)
    return _remove_if_empty(list(torch.split(values, list(sb.gate_sizes))))


def global_masks(sbs: Sequence[SubBlock], scores: Sequence[torch.Tensor], target: float,
                 tau: float, round_to: int = 1, cost=None) -> List[List[torch.Tensor]]:
    """The global ablation: one threshold over the elements of all sub-blocks at once.

    `scores[i]` are sub-block i's Taylor scores divided by `SubBlock.element_costs`, concatenated
    over its gates. Elements are ranked together and the t lowest dropped, with t the smallest
    count whose kept parameters (§2's coupled count, each gate's count rounded down to a
    multiple of `round_to`; or the kept cost in the unit of `cost`) do not exceed `target` (or
    the closer of t and t − 1); the soft mask of §5 is applied to the global ranking.
    """
    device = scores[0].device
    flat = torch.cat(list(scores))
    order = torch.argsort(flat, stable=True)
    sizes = [s for sb in sbs for s in sb.gate_sizes]
    gate_of = torch.repeat_interleave(torch.arange(len(sizes), device=device),
                                      torch.tensor(sizes, device=device))
    dense = torch.tensor(sizes, dtype=torch.float64)
    multiples = [m for sb in sbs for m in sb.multiples(round_to)]

    def kept_counts(t):
        dropped = torch.bincount(gate_of[order[:t]], minlength=len(sizes)).double().cpu()
        return round_kept(dense - dropped, dense, multiples)

    def kept_cost(t):
        kept = kept_counts(t)
        return sum(float(sb.cost(kept[3 * i:3 * i + 3], cost)) for i, sb in enumerate(sbs))

    lo, hi = 0, len(flat)  # kept_cost never grows with t: find the first t under target
    while lo < hi:
        mid = (lo + hi) // 2
        if kept_cost(mid) <= target:
            hi = mid
        else:
            lo = mid + 1
    t = lo
    if t > 0 and abs(kept_cost(t - 1) - target) < abs(kept_cost(t) - target):
        t -= 1
    values = _masks_for_counts(order, gate_of, dense, kept_counts(t), tau)
    out = []
    for sb, block_values in zip(sbs, torch.split(values, [sum(sb.gate_sizes) for sb in sbs])):
        out.append(_remove_if_empty(list(torch.split(block_values, list(sb.gate_sizes)))))
    return out
