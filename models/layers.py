"""The parts of a cuttable ViT layer (METHOD.md §2, §7): how a sub-block reads the residual
stream (`ReadNorm`), writes into it (`ResidualWrite`), its `Attention` and `Mlp` with free
widths and their gate slots, timm's `LayerScale`, and the `Block` that holds two sub-blocks.
Parameter names are timm's, so that a full-width layer loads timm's state dict as it is."""
import copy
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, QuickGELU, use_fused_attn

from .gates import GATE_SLOTS, Gate, binarize, gated_linear, mask_of, masked_layer_norm

ACTIVATIONS = {'gelu': nn.GELU, 'quick_gelu': QuickGELU}

class _EmbedGateRef:
    """`embed_gate` is a reference to the model's shared embedding gate (SaViT), which the model
    owns: not a submodule here, so that it is in one state-dict entry only."""

    def __setattr__(self, name, value):
        if name == 'embed_gate':
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)


class ReadNorm(_EmbedGateRef, nn.Module):
    """How a sub-block reads the residual stream: LayerNorm over the full residual width, then
    the dims it reads (`in_idx`).

    METHOD.md §7 asks the cut model to compute exactly what the gated model computes. The
    statistics are therefore taken over all `dim` channels; only the affine parameters of the
    kept channels are stored (so a LayerNorm costs 2·|in| parameters, as §2 counts it).
    With `in_idx=None` this is exactly `nn.LayerNorm(dim)` with the same parameter names.
    `fused` (a deployment form, `models.deploy`) gathers the read dims first and normalises
    them with the full-width statistics, instead of normalising all dims and then gathering.
    While a shared embedding gate is attached (SaViT, only to an uncut model), it normalises
    over the channels that gate keeps.
    """

    def __init__(self, dim: int, in_idx: Optional[List[int]] = None, eps: float = 1e-6,
                 fused: bool = False):
        super().__init__()
        self.dim, self.eps, self.fused = dim, eps, fused
        width = dim if in_idx is None else len(in_idx)
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))
        if in_idx is None:
            self.in_idx = None
        else:
            self.register_buffer('in_idx', torch.tensor(in_idx, dtype=torch.long), persistent=False)
        self.embed_gate: Optional[Gate] = None  # a reference; the model owns the gate

    def forward(self, x):
        if self.embed_gate is not None:
            keep = binarize(self.embed_gate.mask).to(x.dtype)
            return masked_layer_norm(x, keep, self.weight, self.bias, self.eps)
        if self.in_idx is None:
            return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)
        if self.fused:
            flat = x.reshape(-1, self.dim)
            var, mean = torch.var_mean(flat, dim=1, keepdim=True, correction=0)
            kept = (flat.index_select(1, self.in_idx) - mean) * torch.rsqrt(var + self.eps)
            return torch.addcmul(self.bias, kept, self.weight).view(*x.shape[:-1], -1)
        x = F.layer_norm(x, (self.dim,), None, None, self.eps)
        # on a 2-D view the gather is ~10x faster on CPU than on the last dim of (B, N, D)
        kept = x.reshape(-1, self.dim).index_select(1, self.in_idx)
        return torch.addcmul(self.bias, kept, self.weight).view(*x.shape[:-1], -1)


class ResidualWrite(_EmbedGateRef, nn.Module):
    """How a sub-block writes into the residual stream: x[..., out_idx] += drop_path(y), or
    x + drop_path(y) when it writes every dim (`out_idx=None`).

    `inplace` (set with `VisionTransformer.set_inplace_writes`, for inference) adds into x
    itself when autograd is off: after a cut most of x passes through unchanged, and copying
    it per sub-block costs ~7% on CPU. A forward hook that keeps a block's output then sees it
    change with the next write. While a shared embedding gate is attached (SaViT), it follows
    the add.
    """

    def __init__(self, dim: int, out_idx: Optional[List[int]] = None, drop_path: float = 0.):
        super().__init__()
        self.dim = dim
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        if out_idx is None:
            self.out_idx = None
        else:
            self.register_buffer('out_idx', torch.tensor(out_idx, dtype=torch.long), persistent=False)
        self.inplace = False
        self.embed_gate: Optional[Gate] = None  # a reference; the model owns the gate

    def forward(self, x, y):
        y = self.drop_path(y)
        inplace = self.inplace and not torch.is_grad_enabled()
        if self.out_idx is None:
            x = x.add_(y) if inplace else x + y
        else:
            # on 2-D views (faster than index_add on the last of 3 dims); under autocast y is
            # half precision while the residual stream stays float32, as x + y would promote it
            y = y.reshape(-1, y.shape[-1]).to(x.dtype)
            if inplace:
                x.view(-1, self.dim).index_add_(1, self.out_idx, y)
            else:
                x = x.reshape(-1, self.dim).index_add(1, self.out_idx, y).view_as(x)
        return x if self.embed_gate is None else self.embed_gate(x)


class Attention(nn.Module):
    """Multi-head self-attention with a free head size and free input / output widths.

    `scale` stays the dense model's head_dim ** -0.5 after a cut, so that the cut model
    computes the same logits as the masked one. Gate slots: `qkv_gate` (one mask over the
    head_dim channels, shared by q, k, v and all heads, §2; folded into the rows of qkv) and
    `head_gate` (one value per head on attention·V, the baselines'; folded into the columns of
    proj). `in_mask` / `out_mask` are the sub-block's read and write gates (Block's slots).
    `qk_norm` (timm's option) normalises q and k per head over their head_dim channels; while
    a `qkv_gate` is attached it normalises over the channels the gate keeps, as the cut model,
    which has only those, does (§7 exactness).
    """

    def __init__(self, dim_in, num_heads, head_dim, dim_out, scale, qkv_bias=True,
                 attn_drop=0., proj_drop=0., qk_norm=False, eps=1e-6):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, scale
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim_in, 3 * num_heads * head_dim, bias=qkv_bias)
        self.qkv_gate = nn.Identity()
        self.q_norm = nn.LayerNorm(head_dim, eps=eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim, eps=eps) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.head_gate = nn.Identity()
        self.proj = nn.Linear(num_heads * head_dim, dim_out)
        self.proj_drop = nn.Dropout(proj_drop)

    def _qk_norm(self, t, norm, channels):
        if isinstance(norm, nn.Identity):
            return t
        if channels is None:
            return norm(t)
        return masked_layer_norm(t, binarize(channels).to(t.dtype), norm.weight, norm.bias, norm.eps)

    def forward(self, x, in_mask: Optional[torch.Tensor] = None, out_mask: Optional[torch.Tensor] = None):
        B, N, _ = x.shape
        # qkv rows are ordered q|k|v, then head, then channel (timm's layout)
        channels = mask_of(self.qkv_gate)
        rows = channels.repeat(3 * self.num_heads) if channels is not None else None
        qkv = gated_linear(x, self.qkv, in_mask, rows).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self._qk_norm(q, self.q_norm, channels), self._qk_norm(k, self.k_norm, channels)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0., scale=self.scale)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        heads = mask_of(self.head_gate)
        cols = heads.repeat_interleave(self.head_dim) if heads is not None else None
        # dropout scales elementwise, so it commutes with the write gate folded into proj
        return self.proj_drop(gated_linear(x, self.proj, cols, out_mask))


class Mlp(nn.Module):
    """fc1, GELU (or CLIP's QuickGELU, `act='quick_gelu'`), fc2; gate slot `hid_gate` on the
    activation (§2), folded into the columns of fc2; `in_mask` / `out_mask` (the read and
    write gates) into fc1's columns and fc2's rows."""

    def __init__(self, dim_in, hidden_features, dim_out, drop=0., act='gelu'):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f'act must be one of {", ".join(ACTIVATIONS)}, got {act!r}')
        self.fc1 = nn.Linear(dim_in, hidden_features)
        self.act = ACTIVATIONS[act]()
        self.hid_gate = nn.Identity()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, dim_out)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x, in_mask: Optional[torch.Tensor] = None, out_mask: Optional[torch.Tensor] = None):
        x = self.drop1(self.act(gated_linear(x, self.fc1, in_mask)))
        return self.drop2(gated_linear(x, self.fc2, mask_of(self.hid_gate), out_mask))


class LayerScale(nn.Module):
    """timm's LayerScale: a learned per-channel scale γ of what a sub-block writes (DeiT III,
    DINOv2). After a cut it has one value per written dim (γ is cut with the dims it scales)."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x):
        return x * self.gamma


def dense_block_arch(embed_dim: int, num_heads: int, mlp_ratio: float) -> Dict:
    """The `arch` entry of one uncut layer: every sub-block reads and writes all dims."""
    return {
        'attn': {'in_idx': None, 'out_idx': None, 'num_heads': num_heads,
                 'head_dim': embed_dim // num_heads},
        'mlp': {'in_idx': None, 'out_idx': None, 'hidden_features': int(embed_dim * mlp_ratio)},
    }


class Block(nn.Module):
    """One transformer layer: two sub-blocks, each x[..., out] += f(norm(x)[..., in]) (§7).

    Per sub-block: a `ReadNorm`, the gate slot on what it reads (`attn_in_gate`,
    `mlp_in_gate`), the layer with its inner gate slots, the gate slot on what it writes
    (`attn_out_gate`, `mlp_out_gate`), with `init_values` a `LayerScale` (`ls1`, `ls2`, on the
    written dims) and a `ResidualWrite`. Slots are `nn.Identity()` until a pruner attaches a
    `Gate` (`VisionTransformer.add_gates`). A sub-block removed by the cut has `attn` (or
    `mlp`) None, and no norm or write: it costs nothing. The keyword options are the
    family's (`VisionTransformer.layer_options()`).
    """

    def __init__(self, dim, block_arch: Dict, scale: float, qkv_bias=True, proj_drop=0.,
                 attn_drop=0., drop_path=0., *, init_values: Optional[float] = None,
                 qk_norm: bool = False, act: str = 'gelu', eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.arch = copy.deepcopy(block_arch)
        a, m = block_arch['attn'], block_arch['mlp']
        self.attn_in_gate, self.attn_out_gate = nn.Identity(), nn.Identity()
        self.mlp_in_gate, self.mlp_out_gate = nn.Identity(), nn.Identity()
        self.norm1 = self.attn = self.ls1 = self.attn_write = None
        self.norm2 = self.mlp = self.ls2 = self.mlp_write = None
        if a is not None:
            self.norm1 = ReadNorm(dim, a['in_idx'], eps, fused=a.get('read') == 'fused')
            self.attn = Attention(_width(dim, a['in_idx']), a['num_heads'], a['head_dim'],
                                  _width(dim, a['out_idx']), scale, qkv_bias, attn_drop, proj_drop,
                                  qk_norm, eps)
            self.ls1 = _layer_scale(_width(dim, a['out_idx']), init_values)
            self.attn_write = ResidualWrite(dim, a['out_idx'], drop_path)
        if m is not None:
            self.norm2 = ReadNorm(dim, m['in_idx'], eps, fused=m.get('read') == 'fused')
            self.mlp = Mlp(_width(dim, m['in_idx']), m['hidden_features'], _width(dim, m['out_idx']),
                           proj_drop, act)
            self.ls2 = _layer_scale(_width(dim, m['out_idx']), init_values)
            self.mlp_write = ResidualWrite(dim, m['out_idx'], drop_path)

    def forward_attn(self, x):
        if self.attn is None:
            return x
        h = self.attn(self.norm1(x), mask_of(self.attn_in_gate), mask_of(self.attn_out_gate))
        return self.attn_write(x, self.ls1(h))

    def forward_mlp(self, x):
        if self.mlp is None:
            return x
        h = self.mlp(self.norm2(x), mask_of(self.mlp_in_gate), mask_of(self.mlp_out_gate))
        return self.mlp_write(x, self.ls2(h))

    def forward(self, x):
        return self.forward_mlp(self.forward_attn(x))

    @property
    def gates(self) -> Dict[str, nn.Parameter]:
        """The masks of the gates attached to this layer, by their §2 name."""
        slots = {n: self.get_submodule(path) for n, path in GATE_SLOTS.items()
                 if self._has(path)}
        return {n: slot.mask for n, slot in slots.items() if isinstance(slot, Gate)}

    def _has(self, path):
        owner = path.split('.')[0]
        return getattr(self, owner) is not None

    def norms(self):
        return [n for n in (self.norm1, self.norm2) if n is not None]

    def writes(self):
        return [w for w in (self.attn_write, self.mlp_write) if w is not None]


def _width(dim, idx):
    return dim if idx is None else len(idx)


def _layer_scale(width: int, init_values: Optional[float]) -> nn.Module:
    """timm's rule: LayerScale where `init_values` is set and not 0."""
    return LayerScale(width, init_values) if init_values else nn.Identity()
