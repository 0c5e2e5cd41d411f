"""The structure that is pruned: gates and their coupled parameter count (METHOD.md §2).

Sub-blocks are numbered i = 0 … 2L−1: i = 2l is the Attention of layer l, i = 2l+1 its MLP.
Each sub-block has three gates; the parameters a gate element controls depend on how many
elements the *other* gates of the same sub-block keep, so counting is done per sub-block.
"""
from dataclasses import dataclass
from typing import List, Sequence

import torch

from models import ATTN_GATES, MLP_GATES


@dataclass(frozen=True)
class SubBlock:
    """Shape of one dense sub-block: which gates it has and their lengths."""
    index: int          # i in 0 … 2L−1
    layer: int
    kind: str           # 'attn' or 'mlp'
    gate_names: tuple   # three gate names, in (in, middle, out) order
    gate_sizes: tuple   # their lengths
    num_heads: int      # H for attention, 1 for the MLP

    def params(self, kept: Sequence) -> torch.Tensor:
        """Parameters kept for kept-element counts (a, b, c) of its gates (§2).

        Works elementwise on tensors, so one call can count many candidate thresholds.
        A sub-block with an empty gate is skipped entirely and counts 0: an empty input or
        middle gate would leave only a constant bias, which the cut drops with the rest.
        """
        a, b, c = (torch.as_tensor(k, dtype=torch.float64) for k in kept)
        if self.kind == 'attn':
            h = self.num_heads
            n = (a * 3 * h * b + 3 * h * b) + (h * b * c + c) + 2 * a  # qkv, proj, norm1
        else:
            n = (a * b + b) + (b * c + c) + 2 * a                        # fc1, fc2, norm2
        return torch.where((a > 0) & (b > 0) & (c > 0), n, torch.zeros_like(n))

    @property
    def dense_params(self) -> int:
        return int(self.params(self.gate_sizes))

    @property
    def name(self) -> str:
        return f'{self.kind}{self.layer}'


def sub_blocks(model) -> List[SubBlock]:
    """The 2L sub-blocks of a dense `models.VisionTransformer`."""
    d, h = model.embed_dim, model.num_heads
    hid = int(model.embed_dim * model.mlp_ratio)
    out = []
    for layer in range(model.depth):
        out.append(SubBlock(2 * layer, layer, 'attn', ATTN_GATES, (d, d // h, d), h))
        out.append(SubBlock(2 * layer + 1, layer, 'mlp', MLP_GATES, (d, hid, d), 1))
    return out


def gates_of(model, sb: SubBlock) -> List[torch.nn.Parameter]:
    """The three gate parameters of sub-block `sb` (the model must have gates attached)."""
    g = model.blocks[sb.layer].gates
    return [g[n] for n in sb.gate_names]


def hard_masks(model, sb: SubBlock) -> List[torch.Tensor]:
    """Binary masks m ≥ 0.5 (§5) of the three gates of `sb`."""
    return [g.detach() >= 0.5 for g in gates_of(model, sb)]


def kept_params(model, sbs: Sequence[SubBlock]) -> List[int]:
    """Parameters each sub-block keeps under the current hard masks."""
    return [int(sb.params([m.sum() for m in hard_masks(model, sb)])) for sb in sbs]


def non_block_params(model, sbs: Sequence[SubBlock]) -> int:
    """Patch embedding, tokens, position embedding, final norm and head: never pruned (§2)."""
    total = sum(p.numel() for n, p in model.named_parameters() if '.gates.' not in n)
    return total - sum(sb.dense_params for sb in sbs)



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
        sum((g >= 0.5).sum().double() for g in gates)])
    lo, hi = checksum.clone(), checksum.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise MaskMismatchError(f'masks differ across processes (checksums {lo.tolist()} vs {hi.tolist()})')
