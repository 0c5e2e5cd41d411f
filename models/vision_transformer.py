"""A Vision Transformer whose sub-blocks carry their own widths (METHOD.md §2, §7).

With full widths it is DeiT / timm's VisionTransformer, parameter for parameter and with
timm's state-dict names. After a cut, each sub-block (the Attention or the MLP of a layer)
reads only some residual dims (`in_idx`) and writes only some (`out_idx`), has its own head
size and hidden width, or is gone. Everything needed to rebuild such a model is its `arch`,
a plain dict of ints and lists that `torch.load(weights_only=True)` accepts.

The pruner attaches *gates* (soft masks) with `add_gates()`; the forward multiplies by them
where they exist. The model owns this forward: nothing is patched at run time. Every gate
of a sub-block sits on one side of a linear layer, so it is folded into that layer's weight
(`gated_linear`): the same function, with a multiply over the weight instead of over the
activations, which are ~16x larger at DeiT's batch and token count.
"""
import copy
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, PatchEmbed, trunc_normal_, use_fused_attn

from .gates import (ALL_GATE_NAMES, ATTN_GATES, GATE_NAMES, GATE_SLOTS, HEAD_GATE, MLP_GATES,
                    Gate, binarize, gated_linear, is_gate, mask_of, masked_layer_norm)  # noqa: F401


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
    """

    def __init__(self, dim_in, num_heads, head_dim, dim_out, scale, qkv_bias=True,
                 attn_drop=0., proj_drop=0.):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, scale
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim_in, 3 * num_heads * head_dim, bias=qkv_bias)
        self.qkv_gate = nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.head_gate = nn.Identity()
        self.proj = nn.Linear(num_heads * head_dim, dim_out)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, in_mask: Optional[torch.Tensor] = None, out_mask: Optional[torch.Tensor] = None):
        B, N, _ = x.shape
        # qkv rows are ordered q|k|v, then head, then channel (timm's layout)
        rows = mask_of(self.qkv_gate)
        rows = rows.repeat(3 * self.num_heads) if rows is not None else None
        qkv = gated_linear(x, self.qkv, in_mask, rows).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
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
    """fc1, GELU, fc2; gate slot `hid_gate` on the activation (§2), folded into the columns of
    fc2; `in_mask` / `out_mask` (the read and write gates) into fc1's columns and fc2's rows."""

    def __init__(self, dim_in, hidden_features, dim_out, drop=0.):
        super().__init__()
        self.fc1 = nn.Linear(dim_in, hidden_features)
        self.act = nn.GELU()
        self.hid_gate = nn.Identity()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, dim_out)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x, in_mask: Optional[torch.Tensor] = None, out_mask: Optional[torch.Tensor] = None):
        x = self.drop1(self.act(gated_linear(x, self.fc1, in_mask)))
        return self.drop2(gated_linear(x, self.fc2, mask_of(self.hid_gate), out_mask))


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
    (`attn_out_gate`, `mlp_out_gate`) and a `ResidualWrite`. Slots are `nn.Identity()` until a
    pruner attaches a `Gate` (`VisionTransformer.add_gates`). A sub-block removed by the cut
    has `attn` (or `mlp`) None, and no norm or write: it costs nothing.
    """

    def __init__(self, dim, block_arch: Dict, scale: float, qkv_bias=True, proj_drop=0.,
                 attn_drop=0., drop_path=0.):
        super().__init__()
        self.dim = dim
        self.arch = copy.deepcopy(block_arch)
        a, m = block_arch['attn'], block_arch['mlp']
        self.attn_in_gate, self.attn_out_gate = nn.Identity(), nn.Identity()
        self.mlp_in_gate, self.mlp_out_gate = nn.Identity(), nn.Identity()
        self.norm1 = self.attn = self.attn_write = None
        self.norm2 = self.mlp = self.mlp_write = None
        if a is not None:
            self.norm1 = ReadNorm(dim, a['in_idx'], fused=a.get('read') == 'fused')
            self.attn = Attention(_width(dim, a['in_idx']), a['num_heads'], a['head_dim'],
                                  _width(dim, a['out_idx']), scale, qkv_bias, attn_drop, proj_drop)
            self.attn_write = ResidualWrite(dim, a['out_idx'], drop_path)
        if m is not None:
            self.norm2 = ReadNorm(dim, m['in_idx'], fused=m.get('read') == 'fused')
            self.mlp = Mlp(_width(dim, m['in_idx']), m['hidden_features'], _width(dim, m['out_idx']),
                           proj_drop)
            self.mlp_write = ResidualWrite(dim, m['out_idx'], drop_path)

    def forward_attn(self, x):
        if self.attn is None:
            return x
        h = self.attn(self.norm1(x), mask_of(self.attn_in_gate), mask_of(self.attn_out_gate))
        return self.attn_write(x, h)

    def forward_mlp(self, x):
        if self.mlp is None:
            return x
        h = self.mlp(self.norm2(x), mask_of(self.mlp_in_gate), mask_of(self.mlp_out_gate))
        return self.mlp_write(x, h)

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


class VisionTransformer(nn.Module):
    """DeiT / ViT with a class token, absolute position embedding and per-sub-block widths.

    `blocks_arch` (one dict per layer, see `dense_block_arch`) describes a cut model; None
    builds the dense model. A cut may also narrow the shared `embed_dim` (SaViT) or keep only
    the first `depth` of the `dense_depth` layers (WD-Prune); `attn_scale` then keeps the dense
    model's head_dim ** -0.5. `embed_gate` is the slot of SaViT's shared embedding gate.
    `distilled` is DeiT's distilled family (timm's VisionTransformerDistilled): a distillation
    token after the class token and a second head `head_dist` on it; the logits are the mean of
    both heads, or both apart while training with `set_distilled_training()` (DeiT's loss).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768,
                 depth=12, num_heads=12, mlp_ratio=4., qkv_bias=True, drop_rate=0.,
                 proj_drop_rate=0., attn_drop_rate=0., drop_path_rate=0.,
                 blocks_arch: Optional[List[Dict]] = None, family: Optional[str] = None,
                 attn_scale: Optional[float] = None, dense_depth: Optional[int] = None,
                 cut: bool = False, distilled: bool = False):
        super().__init__()
        if blocks_arch is None:
            blocks_arch = [dense_block_arch(embed_dim, num_heads, mlp_ratio) for _ in range(depth)]
        if len(blocks_arch) != depth:
            raise ValueError(f'arch has {len(blocks_arch)} blocks but depth is {depth}')
        self.family = family
        self.dense_depth = depth if dense_depth is None else dense_depth
        self._cut = cut
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.depth, self.num_heads, self.mlp_ratio, self.qkv_bias = depth, num_heads, mlp_ratio, qkv_bias
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.distilled, self.distilled_training = distilled, False
        self.num_prefix_tokens = 2 if distilled else 1

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix_tokens, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self.pos_drop = nn.Dropout(drop_rate)
        self.embed_gate = nn.Identity()
        self.inplace_writes = False
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth decay rule
        scale = self.attn_scale = (embed_dim // num_heads) ** -0.5 if attn_scale is None else attn_scale
        self.blocks = nn.ModuleList([
            Block(embed_dim, blocks_arch[i], scale, qkv_bias, proj_drop_rate, attn_drop_rate, dpr[i])
            for i in range(depth)])
        self.norm = ReadNorm(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if distilled:
            self.head_dist = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self):
        trunc_normal_(self.pos_embed, std=.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.distilled:
            trunc_normal_(self.dist_token, std=.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {'pos_embed', 'cls_token', 'dist_token'} if self.distilled else {'pos_embed', 'cls_token'}

    def classifiers(self) -> List[str]:
        """The names of the classifier layers: `head`, and `head_dist` in the distilled family."""
        return ['head', 'head_dist'] if self.distilled else ['head']

    def reset_classifier(self, num_classes: int):
        self.num_classes = num_classes
        for name in self.classifiers():
            head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
            if num_classes > 0:
                trunc_normal_(head.weight, std=.02)
                nn.init.zeros_(head.bias)
            setattr(self, name, head)

    def set_distilled_training(self, enable: bool = True):
        """The distilled family in training returns (class logits, distillation logits), for
        DeiT's loss, instead of their mean (timm's switch of the same name)."""
        self.distilled_training = enable

    # ---- architecture ----------------------------------------------------------------
    def arch(self) -> Dict:
        """Everything needed to rebuild this model (`build_from_arch`), as plain Python."""
        return {
            'family': self.family, 'img_size': self.img_size, 'patch_size': self.patch_size,
            'in_chans': self.in_chans, 'num_classes': self.num_classes,
            'embed_dim': self.embed_dim, 'depth': self.depth, 'num_heads': self.num_heads,
            'mlp_ratio': self.mlp_ratio, 'qkv_bias': self.qkv_bias,
            'attn_scale': self.attn_scale, 'dense_depth': self.dense_depth, 'cut': self.is_cut,
            'distilled': self.distilled, 'blocks': [copy.deepcopy(b.arch) for b in self.blocks],
        }

    @property
    def is_cut(self) -> bool:
        dense = dense_block_arch(self.embed_dim, self.num_heads, self.mlp_ratio)
        return self._cut or self.depth != self.dense_depth or any(b.arch != dense for b in self.blocks)

    def num_parameters(self) -> int:
        """Parameters of the network itself: gates are pruning machinery, not counted."""
        return sum(p.numel() for n, p in self.named_parameters() if not is_gate(n))

    # ---- gates (METHOD.md §2, BASELINES.md) ----------------------------------------------
    def gate_sizes(self) -> Dict[str, int]:
        d, hid = self.embed_dim, int(self.embed_dim * self.mlp_ratio)
        return {'attn_in': d, 'attn_qkv': d // self.num_heads, 'attn_out': d, 'mlp_in': d,
                'mlp_hid': hid, 'mlp_out': d, HEAD_GATE: self.num_heads}

    def add_gates(self, names=GATE_NAMES, embed: bool = False) -> None:
        """Put a `Gate` (all ones) into the named slots of every layer (DAP's six by default),
        and with `embed` into the shared embedding gate slot. Only an uncut model can be gated."""
        if self.is_cut:
            raise ValueError('gates can only be added to an uncut model')
        unknown = [n for n in names if n not in ALL_GATE_NAMES]
        if unknown:
            raise ValueError(f'unknown gates {unknown}; gates are {", ".join(ALL_GATE_NAMES)}')
        sizes, dev = self.gate_sizes(), self.cls_token.device
        for b in self.blocks:
            for n in names:
                b.set_submodule(GATE_SLOTS[n], Gate(sizes[n], trailing=2 if n == HEAD_GATE else 0, device=dev))
        if embed:
            self._set_embed_gate(Gate(self.embed_dim, device=dev))

    def _set_embed_gate(self, gate: Optional[Gate]):
        self.embed_gate = nn.Identity() if gate is None else gate
        for part in [self.norm] + [p for b in self.blocks for p in b.norms() + b.writes()]:
            part.embed_gate = gate

    def remove_gates(self) -> None:
        for b in self.blocks:
            for path in GATE_SLOTS.values():
                if b._has(path):
                    b.set_submodule(path, nn.Identity())
        self._set_embed_gate(None)

    def gate_parameters(self) -> List[nn.Parameter]:
        return [p for n, p in self.named_parameters() if is_gate(n)]

    def set_inplace_writes(self, enabled: bool = True) -> 'VisionTransformer':
        """The inference switch of `ResidualWrite.inplace` (used by benchmark.py and export.py)."""
        self.inplace_writes = enabled
        for b in self.blocks:
            for w in b.writes():
                w.inplace = enabled
        return self

    # ---- forward -------------------------------------------------------------------------
    def forward_embed(self, x):
        x = self.patch_embed(x)
        prefix = [self.cls_token] + ([self.dist_token] if self.distilled else [])
        x = torch.cat([t.expand(x.shape[0], -1, -1) for t in prefix] + [x], dim=1)
        return self.embed_gate(self.pos_drop(x + self.pos_embed))

    def forward_head(self, x):
        x = self.norm(x)
        logits = self.head(self.head_drop(x[:, 0]))
        if not self.distilled:
            return logits
        dist = self.head_dist(self.head_drop(x[:, 1]))
        if self.distilled_training and self.training:
            return logits, dist
        return (logits + dist) / 2

    def forward_stream(self, x):
        """Logits and the residual stream x_0 … x_{2L} around every sub-block (METHOD.md §3)."""
        if self.inplace_writes:
            raise RuntimeError('forward_stream keeps every x_i: call set_inplace_writes(False) first')
        x = self.forward_embed(x)
        stream = [x]
        for blk in self.blocks:
            x = blk.forward_attn(x)
            stream.append(x)
            x = blk.forward_mlp(x)
            stream.append(x)
        return self.forward_head(x), stream

    def forward_features(self, x):
        x = self.forward_embed(x)
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def build_from_arch(arch: Dict, **kwargs) -> VisionTransformer:
    """Rebuild a (possibly cut) model from `model.arch()`; kwargs set dropout rates and may
    override `img_size` and `num_classes`. An `arch` read from a file is checked first
    (`check_arch`: ValueError before anything is allocated)."""
    from .checkpoint import check_arch
    check_arch(arch)
    return VisionTransformer(
        img_size=kwargs.pop('img_size', arch['img_size']), patch_size=arch['patch_size'],
        in_chans=arch['in_chans'], num_classes=kwargs.pop('num_classes', arch['num_classes']),
        embed_dim=arch['embed_dim'],
        depth=arch['depth'], num_heads=arch['num_heads'], mlp_ratio=arch['mlp_ratio'],
        qkv_bias=arch['qkv_bias'], blocks_arch=arch['blocks'], family=arch['family'],
        attn_scale=arch.get('attn_scale'), dense_depth=arch.get('dense_depth'),
        cut=arch.get('cut', True), distilled=arch.get('distilled', False), **kwargs)
