"""Cut the gated model into a dense, smaller ViT (METHOD.md §7).

Each Linear and LayerNorm keeps only its kept rows / columns; each sub-block records which
residual dims it reads (`in_idx`) and writes (`out_idx`); sub-blocks with an empty gate are
dropped (DAP then zeroes all three of its gates, §2, so the gated model drops it too; the
baselines never empty a gate). With binary gates, the cut model computes the same function
as the gated one.

The same cut serves the baselines (BASELINES.md): whole heads (`attn_head`), a narrower shared
embedding (the model's `embed_gate`) and a truncated depth whose last layer feeds a promoted
shallow classifier (WD-Prune).
"""
import copy
from typing import Dict, Optional

import torch

from models import HEAD_GATE, Gate, is_gate, VisionTransformer, binarize, load_model


def _index(mask: Optional[torch.Tensor]) -> Optional[list]:
    """Kept positions of a binary gate as a list; None when all are kept (the fast path)."""
    if mask is None:
        return None
    idx = torch.nonzero(mask).flatten().tolist()
    return None if len(idx) == mask.numel() else idx


def _take(t, dim, idx):
    return t if idx is None else t.index_select(dim, torch.as_tensor(idx, device=t.device))


def _residual_index(gate_idx, embed_idx, D):
    """A sub-block's read / write dims: the original dims it keeps (`sel`, indexing the dense
    weights) and their positions in the cut residual stream (`pos`, None = all of them)."""
    keep = set(range(D) if embed_idx is None else embed_idx)
    sel = [i for i in (range(D) if gate_idx is None else gate_idx) if i in keep]
    if gate_idx is None:
        return (None if embed_idx is None else sel), None
    where = {c: p for p, c in enumerate(sorted(keep))}
    pos = [where[i] for i in sel]
    return sel, (None if len(pos) == len(keep) else pos)


def _cut_attn(blk, g, embed_idx, D, H, hd):
    """The arch entry and weights of one Attention sub-block, or (None, {}) if it is removed."""
    i_in, r_in = _residual_index(_index(g.get('attn_in')), embed_idx, D)
    i_out, r_out = _residual_index(_index(g.get('attn_out')), embed_idx, D)
    i_q, i_h = _index(g.get('attn_qkv')), _index(g.get(HEAD_GATE))
    heads = H if i_h is None else len(i_h)
    nq = hd if i_q is None else len(i_q)
    if min(heads, nq, D if i_in is None else len(i_in), D if i_out is None else len(i_out)) == 0:
        return None, {}
    w = blk.attn.qkv.weight.view(3, H, hd, D)
    w = _take(_take(_take(w, 1, i_h), 2, i_q).reshape(3 * heads * nq, D), 1, i_in)
    qkv_bias = blk.attn.qkv.bias  # None in a family without (qkv_bias=False)
    b = None if qkv_bias is None else _take(_take(qkv_bias.view(3, H, hd), 1, i_h), 2, i_q).reshape(-1)
    pw = blk.attn.proj.weight.view(D, H, hd)
    pw = _take(_take(_take(pw, 1, i_h), 2, i_q).reshape(D, heads * nq), 0, i_out)
    arch = {'in_idx': r_in, 'out_idx': r_out, 'num_heads': heads, 'head_dim': nq}
    weights = {'attn.qkv.weight': w, **({} if b is None else {'attn.qkv.bias': b}), 'attn.proj.weight': pw,
               'attn.proj.bias': _take(blk.attn.proj.bias, 0, i_out),
               'norm1.weight': _take(blk.norm1.weight, 0, i_in),
               'norm1.bias': _take(blk.norm1.bias, 0, i_in)}
    for norm in ('q_norm', 'k_norm'):  # qk_norm: per head_dim channel, shared by the heads
        if isinstance(getattr(blk.attn, norm), torch.nn.LayerNorm):
            weights.update({f'attn.{norm}.{p}': _take(getattr(getattr(blk.attn, norm), p), 0, i_q)
                            for p in ('weight', 'bias')})
    return arch, {**weights, **_layer_scale(blk.ls1, 'ls1', i_out)}


def _cut_mlp(blk, g, embed_idx, D):
    i_in, r_in = _residual_index(_index(g.get('mlp_in')), embed_idx, D)
    i_out, r_out = _residual_index(_index(g.get('mlp_out')), embed_idx, D)
    i_h = _index(g.get('mlp_hid'))
    hid = blk.mlp.fc1.out_features if i_h is None else len(i_h)
    if min(hid, D if i_in is None else len(i_in), D if i_out is None else len(i_out)) == 0:
        return None, {}
    arch = {'in_idx': r_in, 'out_idx': r_out, 'hidden_features': hid}
    return arch, {'mlp.fc1.weight': _take(_take(blk.mlp.fc1.weight, 0, i_h), 1, i_in),
                  'mlp.fc1.bias': _take(blk.mlp.fc1.bias, 0, i_h),
                  'mlp.fc2.weight': _take(_take(blk.mlp.fc2.weight, 0, i_out), 1, i_h),
                  'mlp.fc2.bias': _take(blk.mlp.fc2.bias, 0, i_out),
                  'norm2.weight': _take(blk.norm2.weight, 0, i_in),
                  'norm2.bias': _take(blk.norm2.bias, 0, i_in),
                  **_layer_scale(blk.ls2, 'ls2', i_out)}


def _layer_scale(ls, name, i_out):
    """LayerScale's γ, cut with the written dims it scales (none where the family has no LayerScale)."""
    return {f'{name}.gamma': _take(ls.gamma, 0, i_out)} if hasattr(ls, 'gamma') else {}


@torch.no_grad()
def cut_model(model: VisionTransformer, depth: Optional[int] = None,
              classifier: Optional[Dict[str, torch.Tensor]] = None) -> VisionTransformer:
    """A new model without gates, built from `model`'s binarised gates (≥ 0.5) and weights.

    `depth` keeps only the first layers; `classifier` (keys `norm.weight`, `norm.bias`,
    `head.weight`, `head.bias`) then replaces the final norm and head: the shallow classifier
    that read the last kept layer is promoted to be the model's head.
    """
    if model.is_cut or not model.gate_parameters():
        raise ValueError('cut_model needs an uncut model with gates attached')
    embed_gate = model.embed_gate.mask if isinstance(model.embed_gate, Gate) else None
    depth = model.depth if depth is None else depth
    if not 1 <= depth <= model.depth:
        raise ValueError(f'depth {depth} is outside 1 … {model.depth}')
    D, H = model.embed_dim, model.num_heads
    embed_idx = None if embed_gate is None else _index(binarize(embed_gate))
    if embed_idx is not None and not embed_idx:
        raise ValueError('the embedding gate keeps no channel')
    blocks_arch, weights = [], {}
    for l, blk in enumerate(model.blocks[:depth]):
        g = {k: binarize(v) for k, v in blk.gates.items()}
        a, wa = _cut_attn(blk, g, embed_idx, D, H, D // H)
        m, wm = _cut_mlp(blk, g, embed_idx, D)
        blocks_arch.append({'attn': a, 'mlp': m})
        weights.update({f'blocks.{l}.{k}': v for k, v in {**wa, **wm}.items()})

    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith('blocks.') and not is_gate(k)}
    if classifier is not None:
        state.update(classifier)
    if embed_idx is not None:  # a narrower residual stream: every tensor that touches it
        for k in ('cls_token', 'dist_token', 'reg_token', 'pos_embed'):
            if k in state:
                state[k] = _take(state[k], 2, embed_idx)
        for k in ('patch_embed.proj.weight', 'patch_embed.proj.bias') + tuple(
                f'{norm}.{p}' for norm in ('norm_pre', 'norm', 'fc_norm') for p in ('weight', 'bias')):
            if k in state:
                state[k] = _take(state[k], 0, embed_idx)
        for k in ('head.weight', 'head_dist.weight'):
            if k in state:
                state[k] = _take(state[k], 1, embed_idx)
    state.update(weights)

    arch = model.arch()
    arch.update(blocks=blocks_arch, depth=depth, cut=True, attn_scale=model.attn_scale,
                embed_dim=D if embed_idx is None else len(embed_idx))
    # the source's dropout rates (drop-path is copied below, per block)
    blk = model.blocks[0]
    cut = load_model({'arch': arch, 'model': state}, drop_rate=model.pos_drop.p,
                     attn_drop_rate=blk.attn.attn_drop.p, proj_drop_rate=blk.attn.proj_drop.p)
    # carry the drop-path modules of the source, so training can continue as configured
    for src, dst in zip(model.blocks, cut.blocks):
        for s_write, d_write in ((src.attn_write, dst.attn_write), (src.mlp_write, dst.mlp_write)):
            if d_write is not None:
                d_write.drop_path = copy.deepcopy(s_write.drop_path)
    p = next(model.parameters())
    return cut.to(device=p.device, dtype=p.dtype)
