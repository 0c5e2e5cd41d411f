"""What of a checkpoint fits a model: the one listing of mismatched keys, and the fit of a
DeiT / timm checkpoint (foreign layouts converted, classifier reset, pos_embed resampled) to
start training from, timm's pretrained weights among them."""
import math
from typing import Dict, List, Optional, Tuple

import timm
import torch
from timm.layers import resample_abs_pos_embed


def state_dict_mismatch(model: torch.nn.Module, state_dict: Dict) -> Optional[str]:
    """None if `state_dict` loads strictly into `model`; else its missing, unexpected and
    mis-shaped keys (counts and the first few of each), where load_state_dict lists every key."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    misshaped = [f'{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}'
                 for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    parts = [f'{name} keys ({len(ks)}): {", ".join(ks[:4])}{" ..." if len(ks) > 4 else ""}'
             for name, ks in (('missing', missing), ('unexpected', unexpected), ('mis-shaped', misshaped))
             if ks]
    return '; '.join(parts) or None


def _classifier_keys(model: torch.nn.Module, keys) -> List[str]:
    heads = tuple(f'{name}.' for name in getattr(model, 'classifiers', lambda: ['head'])())
    return [k for k in keys if k.startswith(heads)]


def _fits_but_classifier(model: torch.nn.Module, sd: Dict, own: Dict) -> bool:
    """The keys of `sd` are the model's, save perhaps its classifier (a features-only checkpoint)."""
    return set(sd) <= set(own) and set(own) - set(sd) <= set(_classifier_keys(model, own))


def timm_layout(model: torch.nn.Module, sd: Dict) -> Tuple[Dict, List[str]]:
    """`sd` converted as timm converts foreign ViT checkpoints (its `checkpoint_filter_fn`:
    original DINOv2 with `mask_token` and `register_tokens`, OpenAI CLIP and open_clip, DeiT
    III's `gamma_1`, ...), when that makes its keys the model's; else `sd` unchanged, so that a
    checkpoint that does not fit is reported by its own keys. timm resamples `pos_embed` to the
    model's grid on the way (its prefix rows as the model's `no_embed_class` says)."""
    from timm.models.vision_transformer import checkpoint_filter_fn
    if _fits_but_classifier(model, sd, model.state_dict()):
        return sd, []
    try:
        with torch.no_grad():
            converted = checkpoint_filter_fn(dict(sd), model, adapt_layer_scale=True)
    except Exception:  # (a layout it does not know, which the mismatch below names)
        return sd, []
    if not _fits_but_classifier(model, converted, model.state_dict()):
        return sd, []
    old = next((v.shape[-2] for k, v in sd.items() if k.endswith(('pos_embed', 'positional_embedding'))), None)
    new = converted['pos_embed'].shape[1] if 'pos_embed' in converted else None
    return converted, ['keys converted to timm\'s layout (timm\'s checkpoint_filter_fn)'
                       + (f'; pos_embed of {old} tokens in the checkpoint, {new} in the model' if old != new else '')]


def resample_pos_embed(model: torch.nn.Module, pos_embed: torch.Tensor) -> torch.Tensor:
    """`pos_embed` resampled to the model's patch grid as timm does (checkpoint_filter_fn): its
    prefix rows (class, distillation token) kept, none when the model's `pos_embed` covers the
    patches only (`no_embed_class`: DINOv2 with registers, whose registers have no position).
    ValueError if the checkpoint's rows are not those prefix rows and a square grid."""
    prefix = 0 if getattr(model, 'no_embed_class', False) else getattr(model, 'num_prefix_tokens', 1)
    side = math.isqrt(max(pos_embed.shape[1] - prefix, 0))
    if side == 0 or side * side != pos_embed.shape[1] - prefix:
        raise ValueError(f'pos_embed has {pos_embed.shape[1]} tokens: not {prefix} prefix tokens and a square '
                         'grid of patches, which the model\'s are')
    return resample_abs_pos_embed(pos_embed, list(model.patch_embed.grid_size), num_prefix_tokens=prefix)


def pretrained_state_dict(model: torch.nn.Module, checkpoint: Dict) -> Tuple[Dict, List[str]]:
    """Fit a DeiT / timm checkpoint (`{'model': ...}` or a bare state dict) to `model`.

    Converts a foreign key layout as timm does (`timm_layout`), resets the classifier when the
    class count differs or the checkpoint has none (features-only weights, DINOv2's), and
    resamples `pos_embed` when the input size differs (`resample_pos_embed`), each reported in
    the returned notes; any other difference raises ValueError naming the missing, unexpected
    and mis-shaped keys.
    """
    sd = checkpoint.get('model', checkpoint.get('state_dict', checkpoint))
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError('checkpoint holds no state dict (expected {"model": state_dict} or a bare state dict)')
    sd = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in sd.items()}
    own = model.state_dict()
    sd, notes = timm_layout(model, sd)
    heads, reset = _classifier_keys(model, own), None
    if heads and not _classifier_keys(model, sd):
        reset = 'classifier initialized: the checkpoint has none'
    elif 'head.weight' in sd and 'head.weight' in own and sd['head.weight'].shape != own['head.weight'].shape:
        reset = f'classifier reset: checkpoint has {sd["head.weight"].shape[0]} classes, ' \
                f'model has {own["head.weight"].shape[0]}'
    if reset:
        notes.append(reset)
        sd = {**{k: v for k, v in sd.items() if k not in _classifier_keys(model, sd)}, **{k: own[k] for k in heads}}
    if 'pos_embed' in sd and 'pos_embed' in own and sd['pos_embed'].shape != own['pos_embed'].shape \
            and sd['pos_embed'].shape[-1] == own['pos_embed'].shape[-1]:
        old = sd['pos_embed'].shape[1]
        sd['pos_embed'] = resample_pos_embed(model, sd['pos_embed'])
        notes.append(f'pos_embed resampled from {old} to {sd["pos_embed"].shape[1]} tokens')
    problem = state_dict_mismatch(model, sd)
    if problem:
        raise ValueError(f'checkpoint does not fit the model: {problem}')
    return sd, notes


def timm_pretrained_checkpoint(name: str, pretrained_cfg_overlay: Optional[Dict] = None) -> Dict:
    """{'model': the weights that `timm.create_model(name, pretrained=True)` loads} (`name`
    with or without a pretrained tag: `vit_small_patch14_dinov2.lvd142m`), for
    `pretrained_state_dict` to fit to a model: timm's own architecture is built on the CPU and
    loads them through timm's machinery (the Hugging Face Hub or a URL, into their caches; or
    the `file` of `pretrained_cfg_overlay`). Read from timm's modules, not its registry, where
    this project replaces some names (models/__init__.py). ValueError (one line) for a name
    that timm has no weights for."""
    import dataclasses
    import importlib
    from timm.models import split_model_name_tag
    from .families import TIMM_VIT_MODULES
    arch, tag = split_model_name_tag(name)
    for module in (importlib.import_module(f'timm.models.{m}') for m in TIMM_VIT_MODULES):
        create, defaults = getattr(module, arch, None), getattr(module, 'default_cfgs', {}).get(arch)
        if create is not None and defaults is not None:
            break
    else:
        raise ValueError(f'timm has no pretrained weights for {name}: not one of its VisionTransformer models')
    tag = tag or defaults.tags[0]
    if tag not in defaults.cfgs:
        raise ValueError(f'timm has no pretrained weights tagged {tag!r} for {arch} '
                         f'(its tags: {", ".join(defaults.tags)})')
    cfg, overlay = defaults.cfgs[tag], dict(pretrained_cfg_overlay or {})
    # as timm's registry completes it (register_model): its name, and 'timm/' to 'timm/NAME.TAG'
    cfg = dataclasses.replace(cfg, architecture=arch, tag=tag or None, hf_hub_id=(
        f'timm/{arch}.{tag}' if tag else f'timm/{arch}') if cfg.hf_hub_id == 'timm/' else cfg.hf_hub_id)
    if not dataclasses.replace(cfg, **overlay).has_weights:
        raise ValueError(f'timm has no pretrained weights for {arch}.{tag} (its pretrained_cfg names no file, '
                         'URL or Hugging Face Hub id)')
    # (the overlay through timm, which knows that a new source resets the format, custom_load)
    model = create(pretrained=True, pretrained_cfg=cfg, pretrained_cfg_overlay=overlay)
    return {'model': model.state_dict()}


def whole_number(value, low, high=None) -> bool:
    """An int (not a bool) in [low, high]: what a width, a count or an epoch read from a file must be."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low \
        and (high is None or value <= high)


def _indices(value, dim):
    """A kept-dims list: None (all) or distinct ints in [0, dim)."""
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(whole_number(i, 0, dim - 1) for i in value):
        return f'a list of dims in 0 … {dim - 1}'
    return 'dims listed twice' if len(set(value)) != len(value) else None


def _sub_block_problem(kind, sub, D, E, H, hidden):
    """What is wrong with one sub-block's entry of a cut model's `arch`, or None: dims index the
    model's residual width D; widths are bounded by the family's (width E, H heads, MLP hidden):
    SaViT narrows D and keeps head_dim, align_widths pads widths up."""
    if sub is None:
        return None
    if not isinstance(sub, dict):
        return f'is a {type(sub).__name__}, not a dict or None'
    for key in ('in_idx', 'out_idx'):
        problem = _indices(sub.get(key), D)
        if problem:
            return f'{key} must be None or {problem}'
    widths = {'attn': (('num_heads', H), ('head_dim', E)), 'mlp': (('hidden_features', hidden),)}[kind]
    for key, most in widths:
        if not whole_number(sub.get(key), 1, most):
            return f'{key} must be a whole number in 1 … {most}, got {sub.get(key)!r}'
    return None


def check_arch(arch) -> None:
    """ValueError naming what makes `arch` (a cut model's description, read from a file) unfit
    to build: its types, and widths and depth beyond its dense family's, so that nothing absurd
    is allocated. Deployment copies (`deploy`, `align_widths`) stay within these bounds."""
    from .config import ViTConfig
    from .families import vit_config
    if not isinstance(arch, dict):
        raise ValueError(f'arch is a {type(arch).__name__}, not a dict')
    family = arch.get('family')
    try:
        cfg = vit_config(family) if isinstance(family, str) else None
    except ValueError:
        cfg = None
    if cfg is None:
        raise ValueError(f'arch names the family {family!r}, which is not a model this code builds')
    hidden = 2 * int(cfg.embed_dim * cfg.mlp_ratio)  # twice the dense MLP: room for padding
    checks = (('patch_size', cfg.patch_size, cfg.patch_size), ('in_chans', 1, 4),
              ('img_size', cfg.patch_size, 16 * cfg.img_size), ('num_classes', 0, 100_000),
              ('embed_dim', 1, cfg.embed_dim), ('depth', 1, cfg.depth), ('num_heads', 1, cfg.num_heads))
    for key, low, high in checks:
        if not whole_number(arch.get(key), low, high):
            raise ValueError(f'arch {key} must be a whole number in {low} … {high} for {family}, '
                             f'got {arch.get(key)!r}')
    if arch.get('dense_depth', cfg.depth) != cfg.depth:
        raise ValueError(f'arch dense_depth must be {cfg.depth} for {family}, got {arch.get("dense_depth")!r}')
    # the family's options (an arch written before an option existed has DeiT's value)
    for key, default in ViTConfig.option_defaults().items():
        value, want = arch.get(key, default), getattr(cfg, key)
        if type(value) is not type(want) or value != want:
            raise ValueError(f'arch {key} must be {want!r} for {family}, got {value!r}')
    scale = arch.get('attn_scale')
    if scale is not None and not (isinstance(scale, float) and 0 < scale <= 1):
        raise ValueError(f'arch attn_scale must be None or in (0, 1], got {scale!r}')
    blocks = arch.get('blocks')
    if not isinstance(blocks, list) or len(blocks) != arch['depth']:
        raise ValueError(f'arch blocks must be a list of depth {arch["depth"]} entries')
    for i, block in enumerate(blocks):
        if not isinstance(block, dict):
            raise ValueError(f'arch blocks[{i}] is a {type(block).__name__}, not a dict')
        for kind in ('attn', 'mlp'):
            problem = _sub_block_problem(kind, block.get(kind), arch['embed_dim'], cfg.embed_dim,
                                         cfg.num_heads, hidden)
            if problem:
                raise ValueError(f'arch blocks[{i}].{kind} {problem}')


def load_model(checkpoint: Optional[Dict] = None, name: Optional[str] = None, weights: bool = True,
               **kwargs) -> torch.nn.Module:
    """The one way from a checkpoint to a model: the dense or cut model that its `arch`
    describes (checked first: it is read from a file), or, without an `arch`, the model `name`
    (any name `models.vit_config` takes; the classes from the weights' head unless `num_classes` is given); with its
    weights (`checkpoint['model']`, or a bare state dict), loaded strictly, unless `weights` is
    False. `kwargs` go to the constructor (num_classes, img_size, drop_rate, drop_path_rate).
    `checkpoint` is what `checkpoint_io.read_checkpoint` returns for any format it reads
    (torch.save, .safetensors, a timm folder). ValueError (one line) naming the problem."""
    from .families import UnsupportedModel, create_model
    from .vision_transformer import build_from_arch
    checkpoint = {} if checkpoint is None else checkpoint
    arch = checkpoint.get('arch')
    state = checkpoint.get('model', checkpoint if arch is None else None) if weights else None
    if weights and not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise ValueError('holds no weights (expected {"model": state_dict} or a bare state dict)')
    if arch is not None:
        model = build_from_arch(arch, **kwargs)
    elif name is None:
        raise ValueError('has no "arch": name its model')
    else:
        if 'num_classes' not in kwargs and state is not None and 'head.weight' in state:
            kwargs['num_classes'] = state['head.weight'].shape[0]
        try:
            model = create_model(name, **kwargs)  # ValueError naming an unknown or unsupported name
        except UnsupportedModel:  # another timm model (a distillation teacher)
            model = timm.create_model(name, **kwargs)
    if state is not None:
        problem = state_dict_mismatch(model, state)
        if problem:
            raise ValueError(f'its weights do not fit {"its arch" if arch is not None else name}: {problem}')
        model.load_state_dict(state)
    return model
