"""What of a checkpoint fits a model: the one listing of mismatched keys, and the fit of a
DeiT / timm checkpoint (classifier reset, pos_embed resampled) to start training from."""
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


def pretrained_state_dict(model: torch.nn.Module, checkpoint: Dict) -> Tuple[Dict, List[str]]:
    """Fit a DeiT / timm checkpoint (`{'model': ...}` or a bare state dict) to `model`.

    Resets the classifier when the class count differs and resamples `pos_embed` when the
    input size differs (both reported in the returned notes); any other difference raises
    ValueError naming the missing, unexpected and mis-shaped keys.
    """
    sd = checkpoint.get('model', checkpoint.get('state_dict', checkpoint))
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError('checkpoint holds no state dict (expected {"model": state_dict} or a bare state dict)')
    sd = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in sd.items()}
    own = model.state_dict()
    notes = []
    if 'head.weight' in sd and 'head.weight' in own and sd['head.weight'].shape != own['head.weight'].shape:
        notes.append(f'classifier reset: checkpoint has {sd["head.weight"].shape[0]} classes, '
                     f'model has {own["head.weight"].shape[0]}')
        heads = tuple(f'{name}.' for name in getattr(model, 'classifiers', lambda: ['head'])())
        sd = {k: v for k, v in sd.items() if not k.startswith(heads)}
        sd.update({k: v for k, v in own.items() if k.startswith(heads)})
    if 'pos_embed' in sd and sd['pos_embed'].shape != own['pos_embed'].shape \
            and sd['pos_embed'].shape[-1] == own['pos_embed'].shape[-1]:
        old = sd['pos_embed'].shape[1]
        sd['pos_embed'] = resample_abs_pos_embed(sd['pos_embed'], list(model.patch_embed.grid_size),
                                                 num_prefix_tokens=getattr(model, 'num_prefix_tokens', 1))
        notes.append(f'pos_embed resampled from {old} to {sd["pos_embed"].shape[1]} tokens')
    problem = state_dict_mismatch(model, sd)
    if problem:
        raise ValueError(f'checkpoint does not fit the model: {problem}')
    return sd, notes


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
    from . import CONFIGS  # the registered families (models/__init__.py)
    if not isinstance(arch, dict):
        raise ValueError(f'arch is a {type(arch).__name__}, not a dict')
    family = arch.get('family')
    if family not in CONFIGS:
        raise ValueError(f'arch names the family {family!r}, which is not a registered model')
    cfg = CONFIGS[family]
    hidden = 8 * cfg.embed_dim  # twice the dense MLP (mlp_ratio 4 in every family): room for padding
    checks = (('patch_size', cfg.patch_size, cfg.patch_size), ('in_chans', 1, 4),
              ('img_size', cfg.patch_size, 16 * cfg.img_size), ('num_classes', 0, 100_000),
              ('embed_dim', 1, cfg.embed_dim), ('depth', 1, cfg.depth), ('num_heads', 1, cfg.num_heads))
    for key, low, high in checks:
        if not whole_number(arch.get(key), low, high):
            raise ValueError(f'arch {key} must be a whole number in {low} … {high} for {family}, '
                             f'got {arch.get(key)!r}')
    if arch.get('dense_depth', cfg.depth) != cfg.depth:
        raise ValueError(f'arch dense_depth must be {cfg.depth} for {family}, got {arch.get("dense_depth")!r}')
    if arch.get('distilled', False) is not cfg.distilled:
        raise ValueError(f'arch distilled must be {cfg.distilled} for {family}, got {arch.get("distilled")!r}')
    if arch.get('mlp_ratio') != 4 or not isinstance(arch.get('qkv_bias'), bool):
        raise ValueError(f'arch mlp_ratio must be 4 and qkv_bias true or false, got '
                         f'{arch.get("mlp_ratio")!r} and {arch.get("qkv_bias")!r}')
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
    (any timm name; the classes from the weights' head unless `num_classes` is given); with its
    weights (`checkpoint['model']`, or a bare state dict), loaded strictly, unless `weights` is
    False. `kwargs` go to the constructor (num_classes, img_size, drop_rate, drop_path_rate).
    `checkpoint` is what `checkpoint_io.read_checkpoint` returns for any format it reads
    (torch.save, .safetensors, a timm folder). ValueError (one line) naming the problem."""
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
            model = timm.create_model(name, **kwargs)
        except RuntimeError as e:  # timm's "Unknown model (...)"
            raise ValueError(str(e).splitlines()[0]) from None
    if state is not None:
        problem = state_dict_mismatch(model, state)
        if problem:
            raise ValueError(f'its weights do not fit {"its arch" if arch is not None else name}: {problem}')
        model.load_state_dict(state)
    return model
