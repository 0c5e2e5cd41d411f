"""Cut the gated model into a dense, smaller ViT (METHOD.md §7).

Each Linear and LayerNorm keeps only its kept rows / columns; each sub-block records which
residual dims it reads (`in_idx`) and writes (`out_idx`); sub-blocks with an empty gate are
dropped. With binary gates, the cut model computes the same function as the gated one.
"""
import copy
from typing import Optional

import torch

from models import VisionTransformer, build_from_arch


def _index(mask: torch.Tensor) -> Optional[list]:
    """Kept positions of a binary gate as a list; None when all are kept (the fast path)."""
    idx = torch.nonzero(mask >= 0.5).flatten().tolist()
    return None if len(idx) == mask.numel() else idx


def _rows(t, idx):
    return t if idx is None else t[idx]


def _cols(t, idx):
    return t if idx is None else t[:, idx]


@torch.no_grad()
def cut_model(model: VisionTransformer) -> VisionTransformer:
    """A new model without gates, built from `model`'s binarised gates and weights."""
    if model.is_cut or any(b.gates is None for b in model.blocks):
        raise ValueError('cut_model needs a dense model with gates attached')
    d, H = model.embed_dim, model.num_heads
    hd = d // H
    blocks_arch, weights = [], {}
    for l, blk in enumerate(model.blocks):
        g = {k: (v.detach() >= 0.5) for k, v in blk.gates.items()}
        arch = {'attn': None, 'mlp': None}
        p = f'blocks.{l}.'
        if all(g[k].any() for k in ('attn_in', 'attn_qkv', 'attn_out')):
            i_in, i_q, i_out = _index(g['attn_in']), _index(g['attn_qkv']), _index(g['attn_out'])
            nq = hd if i_q is None else len(i_q)
            arch['attn'] = {'in_idx': i_in, 'out_idx': i_out, 'num_heads': H, 'head_dim': nq}
            w = blk.attn.qkv.weight.view(3, H, hd, d)
            w = w if i_q is None else w[:, :, i_q]
            weights[p + 'attn.qkv.weight'] = _cols(w.reshape(3 * H * nq, d), i_in)
            b = blk.attn.qkv.bias.view(3, H, hd)
            weights[p + 'attn.qkv.bias'] = (b if i_q is None else b[:, :, i_q]).reshape(-1)
            w = blk.attn.proj.weight.view(d, H, hd)
            w = w if i_q is None else w[:, :, i_q]
            weights[p + 'attn.proj.weight'] = _rows(w.reshape(d, H * nq), i_out)
            weights[p + 'attn.proj.bias'] = _rows(blk.attn.proj.bias, i_out)
            weights[p + 'norm1.weight'] = _rows(blk.norm1.weight, i_in)
            weights[p + 'norm1.bias'] = _rows(blk.norm1.bias, i_in)
        if all(g[k].any() for k in ('mlp_in', 'mlp_hid', 'mlp_out')):
            i_in, i_h, i_out = _index(g['mlp_in']), _index(g['mlp_hid']), _index(g['mlp_out'])
            hid = blk.mlp.fc1.out_features if i_h is None else len(i_h)
            arch['mlp'] = {'in_idx': i_in, 'out_idx': i_out, 'hidden_features': hid}
            weights[p + 'mlp.fc1.weight'] = _cols(_rows(blk.mlp.fc1.weight, i_h), i_in)
            weights[p + 'mlp.fc1.bias'] = _rows(blk.mlp.fc1.bias, i_h)
            weights[p + 'mlp.fc2.weight'] = _cols(_rows(blk.mlp.fc2.weight, i_out), i_h)
            weights[p + 'mlp.fc2.bias'] = _rows(blk.mlp.fc2.bias, i_out)
            weights[p + 'norm2.weight'] = _rows(blk.norm2.weight, i_in)
            weights[p + 'norm2.bias'] = _rows(blk.norm2.bias, i_in)
        blocks_arch.append(arch)

    arch = model.arch()
    arch['blocks'] = blocks_arch
    cut = build_from_arch(arch)
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith('blocks.')}  # embeddings, final norm, head: unchanged
    state.update(weights)
    cut.load_state_dict(state)
    # carry the dropout / drop-path modules of the source, so training can continue as configured
    for src, dst in zip(model.blocks, cut.blocks):
        dst.drop_path = copy.deepcopy(src.drop_path)
    cut.to(next(model.parameters()).device)
    return cut
