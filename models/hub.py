"""A (cut) ViT as a timm model folder: `config.json` and `model.safetensors`.

`write_timm_folder(model, folder)` writes what timm's `local-dir:` and `hf-hub:` sources read:
`config.json` names the architecture `dap_vit`, a timm entry point registered here that takes
the model's `arch` (in `model_args`), with `num_classes` and a `pretrained_cfg` (input size,
mean, std, crop_pct, interpolation, and the class names when given). After `import models`,

    timm.create_model('local-dir:FOLDER')             # or 'hf-hub:user/repo' once uploaded

rebuilds it with its weights. `read_timm_folder` and `read_safetensors` give the folder or a
bare `.safetensors` file as a checkpoint dict for `--model-path`, through the same checks.
"""
import errno
import json
import os
from typing import Callable, Dict, Optional, Sequence

import torch
from timm.models import register_model

from .vision_transformer import build_from_arch

ARCHITECTURE = 'dap_vit'
CONFIG, WEIGHTS = 'config.json', 'model.safetensors'
# the weights of a timm / Hugging Face model folder, in the order timm looks for them
WEIGHT_FILES = (WEIGHTS, 'pytorch_model.bin')


def pretrained_cfg(model, mean, std, crop_pct: float, interpolation: str,
                   label_names: Optional[Sequence[str]] = None) -> Dict:
    cfg = {'input_size': [model.in_chans, model.img_size, model.img_size], 'mean': list(mean),
           'std': list(std), 'crop_pct': crop_pct, 'interpolation': interpolation,
           'num_classes': model.num_classes,
           'classifier': model.classifiers() if model.distilled else 'head', 'first_conv': 'patch_embed.proj'}
    if label_names is not None:
        cfg['label_names'] = list(label_names)
    return cfg


def write_timm_folder(model, folder: str, cfg: Dict) -> None:
    """config.json and model.safetensors of `model` in `folder` (made if needed), each written
    to a temporary name first and then renamed."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    config = {'architecture': ARCHITECTURE, 'num_classes': model.num_classes,
              'num_features': model.num_features, 'model_args': {'arch': model.arch()},
              'pretrained_cfg': cfg}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}

    def write_config(path):
        with open(path, 'w') as f:
            f.write(json.dumps(config, indent=1))
    for name, write in ((WEIGHTS, lambda p: save_file(state, p, metadata={'format': 'pt'})),
                        (CONFIG, write_config)):
        write_whole(os.path.join(folder, name), os.path.join(folder, name + '.tmp'), write)


def write_whole(path: str, tmp: str, write: Callable[[str], None]) -> None:
    """errors.write_whole, knowing how safetensors' Rust reports a full disk (the errno only
    in its text)."""
    from errors import write_whole as whole
    whole(path, tmp, write, tuple(f'(os error {c})' for c in (errno.ENOSPC, errno.EDQUOT)))


# what a checkpoint of this project keeps beside its weights in a .safetensors file (--save-format)
CHECKPOINT_META = ('arch', 'epoch', 'acc1', 'summary')


def write_safetensors_checkpoint(path: str, checkpoint: Dict) -> None:
    """A checkpoint's model weights as safetensors, with its `arch`, epoch, accuracy and cut
    summary as JSON metadata; written to a temporary name first, then renamed."""
    from safetensors.torch import save_file
    state = {k: v.detach().contiguous().cpu() for k, v in checkpoint['model'].items()}
    meta = {k: checkpoint[k] for k in CHECKPOINT_META if checkpoint.get(k) is not None}
    write_whole(path, f'{path}.tmp.{os.getpid()}',
                lambda tmp: save_file(state, tmp, metadata={'format': 'pt', 'dap_checkpoint': json.dumps(meta)}))


def read_safetensors_checkpoint(path: str) -> Dict:
    """{'model': tensors, and what `write_safetensors_checkpoint` kept ('arch', ...)} of a
    .safetensors file; a file from elsewhere gives its tensors only. ValueError (one line)."""
    from safetensors import SafetensorError, safe_open
    state = read_safetensors(path)
    try:
        with safe_open(path, framework='pt') as f:
            text = (f.metadata() or {}).get('dap_checkpoint')
        meta = json.loads(text) if text else {}
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise ValueError(f'{path}: its metadata is not readable: {str(e).splitlines()[0][:160]}') from None
    except RecursionError:
        raise ValueError(f'{path}: its dap_checkpoint metadata is not readable: JSON nested too deep') from None
    if not isinstance(meta, dict):
        raise ValueError(f'{path}: its dap_checkpoint metadata is not a JSON object')
    return {'model': state, **{k: meta[k] for k in CHECKPOINT_META if k in meta}}


def read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a .safetensors file (no code runs on loading); ValueError (one line)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f'{path} is not a readable safetensors file: {str(e).splitlines()[0][:160]}') from None


def weights_file(folder: str) -> Optional[str]:
    """The weights of a timm model folder: the first of `WEIGHT_FILES` it holds, or None."""
    return next((p for p in (os.path.join(folder, name) for name in WEIGHT_FILES) if os.path.isfile(p)), None)


def read_timm_folder(folder: str) -> Dict:
    """{'model': state dict, 'pretrained_cfg': …} of a timm model folder: `config.json` in timm's
    format and `model.safetensors` or else `pytorch_model.bin` (timm's order; the .bin loaded
    with weights_only=True), with the `arch` of a folder written by `write_timm_folder`.
    ValueError (one line) naming what is missing or wrong."""
    config_path = os.path.join(folder, CONFIG)
    if not os.path.isfile(config_path):
        raise ValueError(f'{folder} has no {CONFIG}: not a timm model folder '
                         '(scripts/export.py --format timm writes one)')
    weights = weights_file(folder)
    if weights is None:
        raise ValueError(f'{folder} has no {" or ".join(WEIGHT_FILES)}: not a timm model folder')
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f'{config_path} is not JSON ({e})') from None
    except RecursionError:
        raise ValueError(f'{config_path} is not a timm config (JSON nested too deep)') from None
    if not isinstance(config, dict):
        raise ValueError(f'{config_path} holds a JSON {type(config).__name__}, not a timm config (an object)')
    architecture = config.get('architecture')
    model_args = config.get('model_args')
    arch = model_args.get('arch') if isinstance(model_args, dict) else None
    if architecture == ARCHITECTURE and not isinstance(arch, dict):
        raise ValueError(f'{config_path} does not describe a {ARCHITECTURE} model with an "arch" in a '
                         f'"model_args" object (architecture {config.get("architecture")!r})')
    if not isinstance(architecture, str) or not architecture:
        raise ValueError(f'{config_path} names no "architecture": not a timm config')
    if weights.endswith('.safetensors'):
        state = read_safetensors(weights)
    else:
        from .checkpoint_io import read_checkpoint  # (it reads this module's formats too)
        state = read_checkpoint(weights, 'its weights file')
    checkpoint = {'model': state, 'pretrained_cfg': config.get('pretrained_cfg')}
    return {**checkpoint, 'arch': arch} if architecture == ARCHITECTURE else checkpoint


def _cfg_field(cfg, key):
    if cfg is None:
        return None
    return cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)


@register_model
def dap_vit(pretrained: bool = False, arch: Optional[Dict] = None, **kwargs):
    """A DAP ViT (dense or cut) rebuilt from its `arch`; with `pretrained`, its weights from the
    folder its pretrained_cfg points to (timm's `local-dir:` / `hf-hub:` sources)."""
    if arch is None:
        raise ValueError(f'{ARCHITECTURE} needs the model\'s arch (model_args of its config.json)')
    cfg = kwargs.pop('pretrained_cfg', None)
    for k in ('pretrained_cfg_overlay', 'cache_dir', 'pretrained_model_args'):
        kwargs.pop(k, None)
    model = build_from_arch(arch, **{k: v for k, v in kwargs.items() if k in ('num_classes', 'drop_rate',
                                                                             'drop_path_rate')})
    if cfg is not None:  # what timm's data config (resolve_data_config) reads
        model.pretrained_cfg = dict(cfg) if isinstance(cfg, dict) else cfg.to_dict()
        model.default_cfg = model.pretrained_cfg
    # a cut model's widths mean nothing without its weights: a local folder always gives them
    if pretrained or _cfg_field(cfg, 'source') == 'local-dir':
        from .checkpoint import state_dict_mismatch
        folder, hub_id = _cfg_field(cfg, 'file'), _cfg_field(cfg, 'hf_hub_id')
        if folder:
            path = os.path.join(folder, WEIGHTS) if os.path.isdir(folder) else folder
        elif hub_id:
            from huggingface_hub import hf_hub_download
            path = hf_hub_download(hub_id, WEIGHTS)
        else:
            raise ValueError(f'{ARCHITECTURE}: pretrained=True needs a local-dir: or hf-hub: source')
        state = read_safetensors(path)
        problem = state_dict_mismatch(model, state)
        if problem:
            raise ValueError(f'{path}: its weights do not fit its arch: {problem}')
        model.load_state_dict(state)
    return model
