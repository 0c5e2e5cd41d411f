"""The structure that is pruned: gates and their coupled parameter count (METHOD.md §2).

Sub-blocks are numbered i = 0 … 2L−1: i = 2l is the Attention of layer l, i = 2l+1 its MLP.
Each sub-block has three gates; the parameters a gate element controls depend on how many
elements the *other* gates of the same sub-block keep, so counting is done per sub-block.
"""
from dataclasses import dataclass
from typing import List, Sequence

import torch

from models import ATTN_GATES, HEAD_GATE, MLP_GATES, binarize

# what the attention's middle gate removes (`--prune-attn-unit`): channels of every head (head_dim,
# the paper's §2) or whole heads (head, an extension: METHOD.md §9)
ATTN_UNITS = ('head_dim', 'head')


def widths_as_tensors(*widths):
    """(as_tensor, widths): each width as a float64 tensor on the device of those given as
    tensors (the kept counts of a mask update live where the gates do; a Python int beside them
    must not become a CPU tensor, which CUDA refuses to stack with them); `as_tensor` says
    whether any was a tensor."""
    device = next((w.device for w in widths if isinstance(w, torch.Tensor)), None)
    return device is not None, [torch.as_tensor(w, dtype=torch.float64, device=device) for w in widths]


def _count(n: torch.Tensor, widths, as_tensor: bool):
    """0 where a width is 0 (the cut removes a sub-block with an empty gate: only a constant
    bias would be left); an int unless a width was given as a tensor."""
    n = torch.where(torch.stack(torch.broadcast_tensors(*widths)).gt(0).all(0), n, torch.zeros_like(n))
    return n if as_tensor else int(n)


def attn_params(d_in, heads, head_dim, d_out, qkv_bias: bool = True, layer_scale: bool = False,
                qk_norm: bool = False):
    """Parameters of an attention sub-block (METHOD.md §2): its LayerNorm on the d_in dims it
    reads (2·d_in), qkv (d_in → 3·heads·head_dim, its bias with `qkv_bias`) and proj
    (heads·head_dim → d_out, with bias); with `layer_scale` LayerScale's γ on the d_out dims it
    writes, with `qk_norm` q_norm and k_norm (2·head_dim each, shared by the heads). The one
    count for every method's attention; elementwise on tensors."""
    as_tensor, (a, h, b, c) = widths_as_tensors(d_in, heads, head_dim, d_out)
    inner = h * b
    n = 2 * a + (a * 3 * inner + 3 * inner * qkv_bias) + (inner * c + c)
    if layer_scale:
        n = n + c
    if qk_norm:
        n = n + 4 * b
    return _count(n, (a, h, b, c), as_tensor)


def mlp_params(d_in, hidden, d_out, layer_scale: bool = False):
    """Parameters of an MLP sub-block (§2): LayerNorm on d_in, fc1 (d_in → hidden), fc2
    (hidden → d_out), with biases; with `layer_scale` γ on the d_out dims it writes. The one
    count for every method's MLP."""
    as_tensor, (a, b, c) = widths_as_tensors(d_in, hidden, d_out)
    n = 2 * a + (a * b + b) + (b * c + c)
    if layer_scale:
        n = n + c
    return _count(n, (a, b, c), as_tensor)


@dataclass(frozen=True)
class LayerOptions:
    """The options of a family's layer that its parameter count depends on (`models.ViTConfig`):
    qkv's bias, LayerScale (γ on the written dims) and qk_norm. DeiT's by default."""
    qkv_bias: bool = True
    layer_scale: bool = False
    qk_norm: bool = False

    @classmethod
    def of(cls, model) -> 'LayerOptions':
        c = model.config
        return cls(qkv_bias=c.qkv_bias, layer_scale=bool(c.init_values), qk_norm=c.qk_norm)

    def attn_params(self, d_in, heads, head_dim, d_out):
        return attn_params(d_in, heads, head_dim, d_out, self.qkv_bias, self.layer_scale, self.qk_norm)

    def mlp_params(self, d_in, hidden, d_out):
        return mlp_params(d_in, hidden, d_out, self.layer_scale)


@dataclass(frozen=True)
class SubBlock:
    """Shape of one dense sub-block: which gates it has and their lengths."""
    index: int          # i in 0 … 2L−1
    layer: int
    kind: str           # 'attn' or 'mlp'
    gate_names: tuple   # three gate names, in (in, middle, out) order
    gate_sizes: tuple   # their lengths
    num_heads: int      # H for attention, 1 for the MLP
    options: LayerOptions = LayerOptions()  # the family's (qkv bias, LayerScale, qk_norm)
    head_dim: int = 0   # d, for an attention whose middle gate is over whole heads

    @property
    def by_heads(self) -> bool:
        """Whether the middle gate is over whole heads (`attn_head`, `--prune-attn-unit head`)."""
        return self.gate_names[1] == HEAD_GATE

    def _attn_widths(self, b):
        """(heads, head_dim) for kept count b of the middle gate."""
        return (b, self.head_dim) if self.by_heads else (self.num_heads, b)

    def params(self, kept: Sequence):
        """Parameters kept for kept-element counts (a, b, c) of its gates (§2); the middle gate
        of attention is the head_dim mask shared by all heads, or with `--prune-attn-unit head`
        one element per head."""
        a, b, c = kept
        if self.kind == 'attn':
            return self.options.attn_params(a, *self._attn_widths(b), c)
        return self.options.mlp_params(a, b, c)

    def cost(self, kept: Sequence, cost=None):
        """What kept-element counts (a, b, c) cost in the budget's unit (`pruning.cost`; None:
        parameters, `params`)."""
        if cost is None:
            return self.params(kept)
        a, b, c = kept
        return cost.attn(a, *self._attn_widths(b), c) if self.kind == 'attn' else cost.mlp(a, b, c)

    def multiples(self, round_to: int) -> tuple:
        """What each gate's kept count is rounded down to a multiple of (`--prune-round-to`):
        widths, not head counts."""
        return (round_to, 1 if self.by_heads else round_to, round_to)

    @property
    def dense_params(self) -> int:
        return int(self.params(self.gate_sizes))

    def dense_cost(self, cost=None):
        return self.cost(self.gate_sizes, cost)

    def element_costs(self, cost=None) -> torch.Tensor:
        """What each gate element of the dense sub-block costs (in parameters: its rows /
        columns in the Linear layers and LayerNorm), concatenated over the three gates: the
        rank the global ablation divides Taylor scores by (BASELINES.md). A measured cost may
        not fall with one element less: such an element costs the smallest positive amount."""
        costs, dense = [], self.dense_cost(cost)
        for g, size in enumerate(self.gate_sizes):
            fewer = list(self.gate_sizes)
            fewer[g] -= 1
            costs.append(torch.full((size,), max(float(dense - self.cost(fewer, cost)), 1e-12)))
        return torch.cat(costs).double()

    @property
    def name(self) -> str:
        return f'{self.kind}{self.layer}'


def sub_blocks(model, attn_unit: str = 'head_dim') -> List[SubBlock]:
    """The 2L sub-blocks of a dense `models.VisionTransformer`; the attention's middle gate is
    over head_dim channels (§2) or, with `attn_unit='head'`, over whole heads."""
    d, h = model.embed_dim, model.num_heads
    hid = int(model.embed_dim * model.mlp_ratio)
    options, out = LayerOptions.of(model), []
    attn = (ATTN_GATES, (d, d // h, d)) if attn_unit == 'head_dim' else \
        (('attn_in', HEAD_GATE, 'attn_out'), (d, h, d))
    for layer in range(model.depth):
        out.append(SubBlock(2 * layer, layer, 'attn', *attn, h, options, head_dim=d // h))
        out.append(SubBlock(2 * layer + 1, layer, 'mlp', MLP_GATES, (d, hid, d), 1, options))
    return out


def gates_of(model, sb: SubBlock) -> List[torch.nn.Parameter]:
    """The three gate masks of sub-block `sb` (the model must have them attached)."""
    g = model.blocks[sb.layer].gates
    return [g[n] for n in sb.gate_names]


def kept_counts(model, sb: SubBlock) -> List[int]:
    """Elements each gate of sub-block `sb` keeps under the current hard masks."""
    return [int(binarize(m).sum()) for m in gates_of(model, sb)]


def kept_params(model, sbs: Sequence[SubBlock]) -> List[int]:
    """Parameters each sub-block keeps under the current hard masks."""
    return [int(sb.params(kept_counts(model, sb))) for sb in sbs]


def kept_costs(model, sbs: Sequence[SubBlock], cost=None) -> list:
    """What each sub-block keeps under the current hard masks, in the budget's unit."""
    return [sb.cost(kept_counts(model, sb), cost) for sb in sbs]


def non_block_params(model, sbs: Sequence[SubBlock]) -> int:
    """Patch embedding, tokens (class, distillation, registers), position embedding, norm_pre,
    final norm or fc_norm and heads: never pruned (§2)."""
    return model.num_parameters() - sum(sb.dense_params for sb in sbs)


class MaskMismatchError(RuntimeError):
    """Processes of a distributed run disagree on the masks."""


@torch.no_grad()
def check_masks_consistent(gates: Sequence[torch.Tensor]) -> None:
    """Every process must hold the same masks; a mismatch would silently fork the model.
    Compares two checksums of the gate values across processes (a no-op in one process)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    checksum = torch.stack([
        sum((g.double() * torch.arange(1, g.numel() + 1, device=g.device)).sum() for g in gates),
        sum(binarize(g).sum().double() for g in gates)])
    lo, hi = checksum.clone(), checksum.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise MaskMismatchError(f'masks differ across processes (checksums {lo.tolist()} vs {hi.tolist()})')
