"""Any timm VisionTransformer as this project's cuttable ViT: its `ViTConfig` read from timm's
own model for the name (built on the meta device: no memory, no download), or a one-line
refusal naming the option outside the supported set; the model built from it; the list.

The supported set (`ViTConfig`): a class token or none, register tokens, `no_embed_class`,
`global_pool` 'token' or 'avg' (with `fc_norm` or not), `pre_norm`, LayerScale, `qk_norm`,
GELU or QuickGELU, LayerNorm of any eps, any depth, width, heads, `mlp_ratio`, patch and
image size. Outside it, among others: SwiGLU / GLU MLPs, RoPE and EVA blocks, attention
pooling (`map`), parallel or post-norm blocks, RMSNorm, a norm inside attention or the MLP.
"""
import difflib
import fnmatch
import functools
import warnings
from typing import Dict, List, Tuple

import timm
import torch
import torch.nn as nn
from timm.models import split_model_name_tag

from .config import GLOBAL_POOLS, ViTConfig
from .vision_transformer import VisionTransformer


class UnknownModel(ValueError):
    """A name that is neither registered here nor a timm model."""


class UnsupportedModel(ValueError):
    """A timm model with an option outside `ViTConfig`'s set; the message names the option."""


def arch_name(name: str) -> str:
    """The architecture of a timm name: without its pretrained tag ('vit_small_patch14_dinov2.lvd142m')."""
    return split_model_name_tag(name)[0]


def _norm_eps(norm: nn.Module, where: str) -> float:
    if not isinstance(norm, nn.LayerNorm) or not norm.elementwise_affine or norm.bias is None:
        raise UnsupportedModel(f'norm_layer {type(norm).__name__} ({where}): only LayerNorm with weight and bias')
    return norm.eps


def _act(act: nn.Module) -> str:
    from timm.layers import GELU, QuickGELU
    if type(act) is GELU or (type(act) is nn.GELU and act.approximate == 'none'):
        return 'gelu'
    if type(act) is QuickGELU:
        return 'quick_gelu'
    raise UnsupportedModel(f'act_layer {type(act).__name__}: only GELU and QuickGELU')


def _layer(block, D: int) -> Tuple:
    """The options of one timm Block, or UnsupportedModel naming what is outside the set."""
    from timm.layers import Attention, LayerScale, Mlp
    from timm.models.vision_transformer import Block
    if type(block) is not Block:
        raise UnsupportedModel(f'block_fn {type(block).__name__}: only the pre-norm Block')
    a, m = block.attn, block.mlp
    if type(a) is not Attention:
        raise UnsupportedModel(f'attn_layer {type(a).__name__}: only timm\'s Attention')
    if not isinstance(getattr(a, 'norm', nn.Identity()), nn.Identity):
        raise UnsupportedModel('scale_attn_norm (a norm inside attention)')
    if getattr(a, 'gate', None) is not None:
        raise UnsupportedModel('gated attention')
    if a.num_heads * a.head_dim != D:
        raise UnsupportedModel(f'attn_head_dim {a.head_dim} with {a.num_heads} heads at width {D}')
    if type(m) is not Mlp:
        raise UnsupportedModel(f'mlp_layer {type(m).__name__}: only the GELU Mlp (fc1, act, fc2)')
    if not isinstance(m.norm, nn.Identity):
        raise UnsupportedModel('scale_mlp_norm (a norm inside the MLP)')
    if any(layer.bias is None for layer in (a.proj, m.fc1, m.fc2)):
        raise UnsupportedModel('proj_bias=False')
    qk_norm = not isinstance(a.q_norm, nn.Identity)
    norms = [block.norm1, block.norm2] + ([a.q_norm, a.k_norm] if qk_norm else [])
    eps = {_norm_eps(n, 'blocks') for n in norms}
    scales = []
    for ls in (block.ls1, block.ls2):
        if not isinstance(ls, (nn.Identity, LayerScale)):
            raise UnsupportedModel(f'layer scale {type(ls).__name__}')
        scales.append(getattr(ls, 'init_values', None))
    if scales[0] != scales[1]:
        raise UnsupportedModel('LayerScale on one sub-block only')
    return (a.num_heads, m.fc1.out_features, a.qkv.bias is not None, qk_norm, _act(m.act), scales[0],
            tuple(sorted(eps)))


def config_of(model: nn.Module) -> ViTConfig:
    """The `ViTConfig` of a timm VisionTransformer (built on any device, meta included), or
    UnsupportedModel naming the first option outside the supported set."""
    from timm.layers import PatchEmbed
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    if type(model) not in (TimmViT, VisionTransformerDistilled):
        raise UnsupportedModel(f'it is a {type(model).__name__} (timm.models.{type(model).__module__.split(".")[-1]}), '
                               'not a VisionTransformer')
    if getattr(model, 'attn_pool', None) is not None:
        raise UnsupportedModel(f"global_pool '{model.global_pool}' (attention pooling)")
    include_prefix = getattr(model, 'pool_include_prefix', False)
    if model.global_pool not in GLOBAL_POOLS or include_prefix:
        raise UnsupportedModel(f"global_pool '{model.global_pool}'"
                               f'{" with the prefix tokens" if include_prefix else ""}: only token or avg')
    if model.pos_embed is None:
        raise UnsupportedModel("pos_embed 'none'")
    pe = model.patch_embed
    if type(pe) is not PatchEmbed or not isinstance(pe.norm, nn.Identity):
        raise UnsupportedModel('embed_norm_layer (a norm in the patch embedding)' if type(pe) is PatchEmbed
                               else f'embed_layer {type(pe).__name__}')
    if pe.patch_size[0] != pe.patch_size[1] or pe.img_size is None or pe.img_size[0] != pe.img_size[1]:
        raise UnsupportedModel(f'a non-square patch {pe.patch_size} or image {pe.img_size}')
    if not isinstance(getattr(model, 'patch_drop', nn.Identity()), nn.Identity):
        raise UnsupportedModel('patch_drop_rate')
    D = model.embed_dim
    layers = {_layer(b, D) for b in model.blocks}
    if len(layers) != 1:
        raise UnsupportedModel('layers of different shapes')
    heads, hidden, qkv_bias, qk_norm, act, init_values, eps = layers.pop()
    pre_norm = not isinstance(model.norm_pre, nn.Identity)
    if (pe.proj.bias is None) != pre_norm:
        raise UnsupportedModel('a patch embedding bias with pre_norm (or none without)')
    outer = [(n, w) for n, w in ((model.norm_pre, 'norm_pre'), (model.norm, 'norm'), (model.fc_norm, 'fc_norm'))
             if not isinstance(n, nn.Identity)]
    eps = set(eps) | {_norm_eps(n, w) for n, w in outer}
    if len(eps) != 1:
        raise UnsupportedModel(f'LayerNorms with different eps {sorted(eps)}')
    fc_norm = not isinstance(model.fc_norm, nn.Identity)
    mlp_ratio = hidden / D
    if int(D * mlp_ratio) != hidden:
        raise UnsupportedModel(f'an MLP width {hidden} that is no whole ratio of {D}')
    return ViTConfig(pe.patch_size[0], D, len(model.blocks), heads, pe.img_size[0],
                     distilled=type(model) is VisionTransformerDistilled, mlp_ratio=mlp_ratio,
                     qkv_bias=qkv_bias, class_token=model.cls_token is not None,
                     reg_tokens=model.num_reg_tokens, no_embed_class=model.no_embed_class,
                     global_pool=model.global_pool, fc_norm=fc_norm,
                     final_norm=fc_norm or not isinstance(model.norm, nn.Identity), pre_norm=pre_norm,
                     init_values=init_values, qk_norm=qk_norm, act=act, norm_eps=eps.pop())


# the timm modules that register VisionTransformer names (DeiT III's are in deit)
TIMM_VIT_MODULES = ('vision_transformer', 'deit')


def _timm_vit_names(pattern: str = '*') -> List[str]:
    return sorted({n for m in TIMM_VIT_MODULES for n in timm.list_models(pattern, module=m)})


@functools.lru_cache(maxsize=None)
def vit_config(name: str) -> ViTConfig:
    """The family `name` (a timm name, with or without its pretrained tag): registered here
    (models.CONFIGS), or read from timm's own model for it. UnknownModel or UnsupportedModel
    (ValueError, one line) otherwise."""
    from . import CONFIGS
    arch = arch_name(name)
    if arch in CONFIGS:
        return CONFIGS[arch]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, list(CONFIGS) + _timm_vit_names(), n=3, cutoff=0.6)
        raise UnknownModel(f'unknown model {name!r}' + (f' (did you mean {", ".join(close)}?)' if close else '')
                           + ': list the supported names with `python main.py --list-models PATTERN`')
    try:
        with warnings.catch_warnings(), torch.device('meta'):
            warnings.simplefilter('ignore')
            model = timm.create_model(arch, pretrained=False)
    except Exception as e:  # timm's own refusal of its default arguments
        raise UnsupportedModel(f'{name}: timm cannot build it ({str(e).splitlines()[0][:160]})') from None
    try:
        return config_of(model)
    except UnsupportedModel as e:
        raise UnsupportedModel(f'{name} is not supported: {e}') from None


def is_supported(name: str) -> bool:
    """Whether `vit_config(name)` gives a family (a --model this code prunes)."""
    try:
        vit_config(name)
        return True
    except ValueError:
        return False


def create_model(name: str, **kwargs) -> VisionTransformer:
    """The dense cuttable ViT of family `name` (any name `vit_config` takes); kwargs as timm's
    (num_classes, img_size, in_chans, drop_rate, drop_path_rate, ...)."""
    cfg = vit_config(name)
    for k in ('pretrained', 'pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir'):
        kwargs.pop(k, None)
    kwargs.setdefault('img_size', cfg.img_size)
    return VisionTransformer(patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
                             num_heads=cfg.num_heads, family=arch_name(name), **{**cfg.options(), **kwargs})


def from_timm(model: nn.Module, name: str) -> VisionTransformer:
    """timm's VisionTransformer `model` of family `name` as the cuttable ViT, with its weights
    (strictly: every name and shape is timm's)."""
    cfg = config_of(model)
    if cfg != vit_config(name):
        raise ValueError(f'the model is not a {name}: {cfg.describe()} vs {vit_config(name).describe()}')
    ours = create_model(name, num_classes=model.num_classes, in_chans=model.patch_embed.proj.in_channels)
    ours.load_state_dict(model.state_dict())
    return ours


def supported_models(pattern: str = '*') -> Tuple[Dict[str, ViTConfig], Dict[str, str]]:
    """The names matching `pattern` (fnmatch, as timm.list_models): {name: config} of those
    that can be pruned here, and {name: why not} of the other timm VisionTransformers."""
    from . import CONFIGS
    ok, refused = {}, {}
    for name in sorted(set(fnmatch.filter(CONFIGS, pattern)) | set(_timm_vit_names(pattern))):
        try:
            ok[name] = vit_config(name)
        except UnsupportedModel as e:
            refused[name] = str(e).split(': ', 1)[-1] if ' is not supported: ' in str(e) else str(e)
    return ok, refused
