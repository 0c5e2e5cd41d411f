"""The gates (METHOD.md §2): their names and slots, the soft mask, the rule that binarises it,
and the two ways a sub-block applies one (folded into a linear layer; a LayerNorm over the
channels the embedding gate keeps)."""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


# Names of the six gates of one layer that DAP uses, in METHOD.md §2's order.
ATTN_GATES = ('attn_in', 'attn_qkv', 'attn_out')
MLP_GATES = ('mlp_in', 'mlp_hid', 'mlp_out')
GATE_NAMES = ATTN_GATES + MLP_GATES
# The baselines (BASELINES.md) also gate whole heads, after attention·V; SaViT also gates the
# embedding channels with one gate shared by all layers (`VisionTransformer.embed_gate`).
HEAD_GATE = 'attn_head'
ALL_GATE_NAMES = GATE_NAMES + (HEAD_GATE,)
# Where each gate sits in a Block: the path of its slot.
GATE_SLOTS = {'attn_in': 'attn_in_gate', 'attn_qkv': 'attn.qkv_gate', 'attn_head': 'attn.head_gate',
              'attn_out': 'attn_out_gate', 'mlp_in': 'mlp_in_gate', 'mlp_hid': 'mlp.hid_gate',
              'mlp_out': 'mlp_out_gate'}


def binarize(mask: torch.Tensor) -> torch.Tensor:
    """The hard mask of a gate, m ≥ 0.5 (METHOD.md §5): the one rule by which every pruner,
    the cut and the masked LayerNorm decide what a gate keeps."""
    return mask.detach() >= 0.5


class Gate(nn.Module):
    """A soft mask m ∈ [0, 1]^n (METHOD.md §2) that multiplies one dimension of its input:
    the last, or the one `trailing` dimensions before the end. Its values are a parameter, so
    that they receive gradients (the Taylor scores read them), but pruners set them: no
    optimizer holds them. A model without pruner has `nn.Identity()` in every gate slot.
    The sub-blocks fold their gates into a linear layer (`mask_of`, `gated_linear`); the
    embedding gate (SaViT) is called on the residual stream."""

    def __init__(self, size: int, trailing: int = 0, device=None):
        super().__init__()
        self.mask = nn.Parameter(torch.ones(size, device=device))
        self.view = (-1,) + (1,) * trailing

    def forward(self, x):
        return x * self.mask.view(self.view)


def mask_of(slot: nn.Module) -> Optional[torch.Tensor]:
    """The mask of a gate slot, or None where no gate is attached."""
    return slot.mask if isinstance(slot, Gate) else None


def gated_linear(x, linear: nn.Linear, in_mask: Optional[torch.Tensor] = None,
                 out_mask: Optional[torch.Tensor] = None):
    """linear(x ⊙ in_mask) ⊙ out_mask, computed as x·(W ⊙ out_maskᵀ ⊙ in_mask)ᵀ + b ⊙ out_mask.

    The same function and the same gradients for any mask (the linear layer is linear in its
    input and its output is scaled per row); with 0/1 masks the same numbers, since every
    product is either kept whole or zero on both sides. Without masks: `linear(x)`.
    """
    w, b = linear.weight, linear.bias
    if in_mask is not None:
        w = w * in_mask
    if out_mask is not None:
        w = w * out_mask[:, None]
        b = b * out_mask if b is not None else None
    return F.linear(x, w, b)


def is_gate(name: str) -> bool:
    """Whether a parameter or state-dict name is a gate's: the one name filter."""
    return name == 'embed_gate.mask' or name.endswith('_gate.mask')


def masked_layer_norm(x, keep, weight, bias, eps):
    """LayerNorm over the channels where `keep` is 1 only; the others come out 0.

    With an embedding gate the pruned channels of the residual stream are 0; a cut model that
    drops them normalises over the kept ones, so the gated model must do the same (§7 exactness).
    """
    n = keep.sum().clamp_min(1)
    mean = (x * keep).sum(-1, keepdim=True) / n
    var = (((x - mean) * keep) ** 2).sum(-1, keepdim=True) / n
    return ((x - mean) * torch.rsqrt(var + eps) * weight + bias) * keep
