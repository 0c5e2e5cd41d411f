"""What of a checkpoint fits a model: the one listing of mismatched keys, and the fit of a
DeiT / timm checkpoint (classifier reset, pos_embed resampled) to start training from."""
from typing import Dict, List, Optional, Tuple

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
        sd = {k: v for k, v in sd.items() if not k.startswith('head.')}
        sd.update({k: v for k, v in own.items() if k.startswith('head.')})
    if 'pos_embed' in sd and sd['pos_embed'].shape != own['pos_embed'].shape \
            and sd['pos_embed'].shape[-1] == own['pos_embed'].shape[-1]:
        old = sd['pos_embed'].shape[1]
        sd['pos_embed'] = resample_abs_pos_embed(sd['pos_embed'], list(model.patch_embed.grid_size),
                                                 num_prefix_tokens=1)
        notes.append(f'pos_embed resampled from {old} to {sd["pos_embed"].shape[1]} tokens')
    problem = state_dict_mismatch(model, sd)
    if problem:
        raise ValueError(f'checkpoint does not fit the model: {problem}')
    return sd, notes
