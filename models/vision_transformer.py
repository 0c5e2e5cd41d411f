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
from timm.layers import PatchEmbed, trunc_normal_

from .config import ViTConfig
from .gates import (ALL_GATE_NAMES, ATTN_GATES, GATE_NAMES, GATE_SLOTS, HEAD_GATE, MLP_GATES,  # noqa: F401
                    Gate, binarize, is_gate, mask_of, masked_layer_norm)
from .layers import Block, ReadNorm, dense_block_arch  # noqa: F401


class VisionTransformer(nn.Module):
    """timm's VisionTransformer with per-sub-block widths: DeiT, DeiT III, DINOv2, CLIP's image
    tower, the AugReg and average-pooled ViTs (the options of `ViTConfig`, with timm's names).

    `blocks_arch` (one dict per layer, see `dense_block_arch`) describes a cut model; None
    builds the dense model. A cut may also narrow the shared `embed_dim` (SaViT) or keep only
    the first `depth` of the `dense_depth` layers (WD-Prune); `attn_scale` then keeps the dense
    model's head_dim ** -0.5. `embed_gate` is the slot of SaViT's shared embedding gate.
    `distilled` is DeiT's distilled family (timm's VisionTransformerDistilled): a distillation
    token after the class token and a second head `head_dist` on it; the logits are the mean of
    both heads, or both apart while training with `set_distilled_training()` (DeiT's loss).
    The sequence is [class token, distillation token, registers, patches], as timm's.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768,
                 depth=12, num_heads=12, mlp_ratio=4., qkv_bias=True, drop_rate=0.,
                 proj_drop_rate=0., attn_drop_rate=0., drop_path_rate=0.,
                 blocks_arch: Optional[List[Dict]] = None, family: Optional[str] = None,
                 attn_scale: Optional[float] = None, dense_depth: Optional[int] = None,
                 cut: bool = False, distilled: bool = False, class_token: bool = True,
                 reg_tokens: int = 0, no_embed_class: bool = False, global_pool: str = 'token',
                 fc_norm: bool = False, final_norm: bool = True, pre_norm: bool = False,
                 init_values: Optional[float] = None, qk_norm: bool = False, act: str = 'gelu',
                 norm_eps: float = 1e-6):
        super().__init__()
        self.config = ViTConfig(patch_size, embed_dim, depth, num_heads, img_size, distilled=distilled,
                                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, class_token=class_token,
                                reg_tokens=reg_tokens, no_embed_class=no_embed_class,
                                global_pool=global_pool, fc_norm=fc_norm, final_norm=final_norm,
                                pre_norm=pre_norm, init_values=init_values, qk_norm=qk_norm, act=act,
                                norm_eps=norm_eps)  # checks the options
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
        self.has_class_token, self.num_reg_tokens = class_token, reg_tokens
        self.no_embed_class, self.global_pool = no_embed_class, global_pool
        self.num_prefix_tokens = self.config.num_prefix_tokens

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, bias=not pre_norm)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self.pos_drop = nn.Dropout(drop_rate)
        self.norm_pre = ReadNorm(embed_dim, eps=norm_eps) if pre_norm else nn.Identity()
        self.embed_gate = nn.Identity()
        self.inplace_writes = False
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth decay rule
        scale = self.attn_scale = (embed_dim // num_heads) ** -0.5 if attn_scale is None else attn_scale
        self.blocks = nn.ModuleList([
            Block(embed_dim, blocks_arch[i], scale, qkv_bias, proj_drop_rate, attn_drop_rate, dpr[i],
                  **self.layer_options())
            for i in range(depth)])
        self.norm = ReadNorm(embed_dim, eps=norm_eps) if final_norm and not fc_norm else nn.Identity()
        self.fc_norm = ReadNorm(embed_dim, eps=norm_eps) if final_norm and fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if distilled:
            self.head_dist = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def layer_options(self) -> Dict:
        """The family's options that a `Block` takes."""
        c = self.config
        return {'init_values': c.init_values, 'qk_norm': c.qk_norm, 'act': c.act, 'eps': c.norm_eps}

    def _init_weights(self):
        trunc_normal_(self.pos_embed, std=.02)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        if self.distilled:
            trunc_normal_(self.dist_token, std=.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {'pos_embed', 'cls_token', 'dist_token', 'reg_token'}

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
            **self.config.options(),
            'attn_scale': self.attn_scale, 'dense_depth': self.dense_depth, 'cut': self.is_cut,
            'blocks': [copy.deepcopy(b.arch) for b in self.blocks],
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
        sizes, dev = self.gate_sizes(), self.pos_embed.device
        for b in self.blocks:
            for n in names:
                b.set_submodule(GATE_SLOTS[n], Gate(sizes[n], trailing=2 if n == HEAD_GATE else 0, device=dev))
        if embed:
            self._set_embed_gate(Gate(self.embed_dim, device=dev))

    def _set_embed_gate(self, gate: Optional[Gate]):
        self.embed_gate = nn.Identity() if gate is None else gate
        for part in self.final_norms() + [p for b in self.blocks for p in b.norms() + b.writes()]:
            part.embed_gate = gate

    def final_norms(self) -> List[nn.Module]:
        """The LayerNorms outside the blocks: `norm_pre`, `norm`, `fc_norm` where the family has them."""
        return [n for n in (self.norm_pre, self.norm, self.fc_norm) if isinstance(n, ReadNorm)]

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
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.dist_token, self.reg_token)
                  if t is not None]
        if self.no_embed_class:  # DeiT III, DINOv2: the position embedding is on the patches only
            x = torch.cat(prefix + [x + self.pos_embed], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + self.pos_embed
        return self.norm_pre(self.embed_gate(self.pos_drop(x)))

    def pool(self, x):
        """The features the classifier reads (timm's `pool`): the class token's, or with
        `global_pool='avg'` the mean of the patch tokens (never the registers)."""
        return pool_tokens(x, self.global_pool, self.num_prefix_tokens)

    def patch_tokens(self, x):
        """The patch tokens of the sequence x: without the class, distillation and register tokens."""
        return x[:, self.num_prefix_tokens:]

    def forward_head(self, x):
        x = self.norm(x)
        logits = self.head(self.head_drop(self.fc_norm(self.pool(x))))
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


def pool_tokens(x, global_pool: str, num_prefix_tokens: int):
    """The one pooling rule (timm's): the first token, or the mean of the tokens after the prefix."""
    return x[:, 0] if global_pool == 'token' else x[:, num_prefix_tokens:].mean(dim=1)


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
        cut=arch.get('cut', True),
        **{k: arch.get(k, v) for k, v in ViTConfig.option_defaults().items() if k not in ('mlp_ratio', 'qkv_bias')},
        **kwargs)
