"""Deployment forms of a cut model: the same function, the residual reads and writes in the form
that runs fastest on the target hardware (chosen by measurement, per sub-block).

A cut sub-block reads some residual dims (`in_idx`) and writes some (`out_idx`). Exact forms of
the same computation:

- read `gather`: LayerNorm over the full width, then gather the read dims (the default);
- read `fused`: gather the read dims, normalise them with the full-width statistics (one pass
  less over the residual stream);
- read `dense`: no gather: LayerNorm over the full width with scale and shift 0 on the dims
  not read, and zero columns in qkv / fc1 for them (more multiply-adds, no gather);
- write `scatter`: add into the written dims (`index_add`, the default);
- write `dense`: zero rows (and bias) in proj / fc2 for the dims not written, a plain add.

`deploy(model, x)` times every form of every sub-block on the model's own residual stream for
input x and returns a copy that uses the fastest; its `arch` records the forms (dense forms as
full-width sub-blocks with exact zeros), so `build_from_arch` and `torch.load(weights_only=True)`
rebuild it. For inference: the dense forms add parameters (zeros), so train and count the cut
model, deploy a copy. `align_widths` is the other deployment copy: every width padded with
exact zeros to a multiple of 8 (GPU tensor cores).
"""
import copy
import time
from typing import Dict, Optional

import torch

from .vision_transformer import Block, VisionTransformer, build_from_arch

READS = ('gather', 'fused', 'dense')
WRITES = ('scatter', 'dense')
# per sub-block: its read norm, first and last linear layer, and LayerScale (where the family has it)
LAYERS = {'attn': ('norm1', 'attn.qkv', 'attn.proj', 'ls1'), 'mlp': ('norm2', 'mlp.fc1', 'mlp.fc2', 'ls2')}


def _expand(t: torch.Tensor, dim: int, idx, size: int) -> torch.Tensor:
    """t with `size` entries along `dim`: its entries at `idx`, zeros elsewhere."""
    shape = list(t.shape)
    shape[dim] = size
    out = t.new_zeros(shape)
    return out.index_copy(dim, torch.as_tensor(idx, device=t.device), t)


def with_forms(sub_arch: Dict, weights: Dict[str, torch.Tensor], kind: str, read: str, write: str, D: int):
    """The arch entry and weights of one sub-block in the given forms (names relative to the block)."""
    sub, w = copy.deepcopy(sub_arch), dict(weights)
    norm, first, last, scale = LAYERS[kind]
    sub.pop('read', None)
    if sub['in_idx'] is not None and read == 'dense':
        for k in (f'{norm}.weight', f'{norm}.bias'):
            w[k] = _expand(w[k], 0, sub['in_idx'], D)
        w[f'{first}.weight'] = _expand(w[f'{first}.weight'], 1, sub['in_idx'], D)
        sub['in_idx'] = None
    elif sub['in_idx'] is not None and read == 'fused':
        sub['read'] = 'fused'
    if sub['out_idx'] is not None and write == 'dense':
        w[f'{last}.weight'] = _expand(w[f'{last}.weight'], 0, sub['out_idx'], D)
        w[f'{last}.bias'] = _expand(w[f'{last}.bias'], 0, sub['out_idx'], D)
        if f'{scale}.gamma' in w:
            w[f'{scale}.gamma'] = _expand(w[f'{scale}.gamma'], 0, sub['out_idx'], D)
        sub['out_idx'] = None
    return sub, w


def median_seconds(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds of `iters` timed calls of fn() after `warmup` untimed ones, the device
    synchronized around each call (CUDA runs asynchronously)."""
    times = []
    for i in range(warmup + iters):
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _time_sub_block(blk: Block, kind: str, x: torch.Tensor, iters: int) -> float:
    run = blk.forward_attn if kind == 'attn' else blk.forward_mlp
    with torch.no_grad():  # a fresh copy each call: a write may add into its input in place
        return median_seconds(lambda: run(x.clone()), x.device, 1, iters)


def _candidate(model: VisionTransformer, layer: int, kind: str, read: str, write: str):
    """A one-sub-block `Block` in the given forms, with the model's weights."""
    blk, arch = model.blocks[layer], model.blocks[layer].arch
    prefix = 'attn' if kind == 'attn' else 'mlp'
    norm, scale = LAYERS[kind][0], LAYERS[kind][3]
    weights = {k: v for k, v in blk.state_dict().items() if k.startswith((prefix + '.', norm + '.', scale + '.'))}
    sub, w = with_forms(arch[kind], weights, kind, read, write, model.embed_dim)
    block_arch = {'attn': None, 'mlp': None, kind: sub}
    cand = Block(model.embed_dim, block_arch, model.attn_scale, model.qkv_bias, **model.layer_options())
    cand.load_state_dict(w)
    cand.to(**_placement(model)).eval()
    for write_part in cand.writes():
        write_part.inplace = True
    return cand


def _placement(model):
    p = next(model.parameters())
    return {'device': p.device, 'dtype': p.dtype}


def plan_forms(model: VisionTransformer, x: torch.Tensor, iters: int = 5,
               amp: bool = False) -> Dict[int, Dict[str, Dict[str, str]]]:
    """{layer: {'attn' / 'mlp': {'read': …, 'write': …}}}: per sub-block, the fastest read form
    (with the default write), then the fastest write form (with that read), each timed on the
    sub-block's own input x_i of the model's residual stream for input x."""
    model.eval()
    inplace = model.inplace_writes
    try:
        model.set_inplace_writes(False)  # the stream must keep every x_i
        with torch.no_grad(), torch.autocast(x.device.type, enabled=amp):
            _, stream = model.forward_stream(x)
    finally:
        model.set_inplace_writes(inplace)
    plan = {}
    for layer, blk in enumerate(model.blocks):
        for j, kind in enumerate(('attn', 'mlp')):
            sub = blk.arch[kind]
            if sub is None:
                continue
            xi = stream[2 * layer + j].detach()
            reads = READS if sub['in_idx'] is not None else ('gather',)
            writes = WRITES if sub['out_idx'] is not None else ('scatter',)
            with torch.autocast(x.device.type, enabled=amp):
                read = min(reads, key=lambda r: _time_sub_block(
                    _candidate(model, layer, kind, r, 'scatter'), kind, xi, iters))
                write = min(writes, key=lambda w: _time_sub_block(
                    _candidate(model, layer, kind, read, w), kind, xi, iters))
            plan.setdefault(layer, {})[kind] = {'read': read, 'write': write}
    return plan


def apply_forms(model: VisionTransformer, plan: Dict[int, Dict[str, Dict[str, str]]]) -> VisionTransformer:
    """A copy of `model` with the sub-blocks in the planned forms (same function, same names)."""
    arch = copy.deepcopy(model.arch())
    state = dict(model.state_dict())
    for layer, kinds in plan.items():
        for kind, forms in kinds.items():
            p = f'blocks.{layer}.'
            norm, scale = LAYERS[kind][0], LAYERS[kind][3]
            names = [k for k in state if k.startswith((p + kind + '.', p + norm + '.', p + scale + '.'))]
            weights = {k[len(p):]: state[k] for k in names}
            sub, w = with_forms(arch['blocks'][layer][kind], weights, kind, forms['read'],
                                forms['write'], model.embed_dim)
            arch['blocks'][layer][kind] = sub
            state.update({p + k: v for k, v in w.items()})
    out = build_from_arch(arch, drop_rate=model.pos_drop.p)
    out.load_state_dict(state)
    return out.to(**_placement(model)).eval()


def deploy(model: VisionTransformer, x: torch.Tensor, iters: int = 5, amp: bool = False,
           plan: Optional[Dict] = None):
    """(deployed copy, plan): the fastest exact form of every cut sub-block for input x (or
    the given plan), with in-place residual writes switched on."""
    plan = plan_forms(model, x, iters, amp) if plan is None else plan
    return apply_forms(model, plan).set_inplace_writes(True), plan


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_index(idx, multiple: int, D: int):
    """(idx padded with unused dims to a multiple of `multiple`, how many were added)."""
    if idx is None or len(idx) % multiple == 0:
        return idx, 0
    kept = set(idx)
    extra = [i for i in range(D) if i not in kept][:_round_up(len(idx), multiple) - len(idx)]
    return idx + extra, len(extra)


def _pad(t, dim, n):
    """t with n zeros appended along dim."""
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _pad_attn(sd, a, multiple, D, qk_norm):
    """Pads the arch entry `a` in place; the padded weights of the attention sub-block."""
    a['in_idx'], n_in = _pad_index(a['in_idx'], multiple, D)
    a['out_idx'], n_out = _pad_index(a['out_idx'], multiple, D)
    H, d = a['num_heads'], a['head_dim']
    # qk_norm normalises over head_dim: padded channels would change its statistics
    n_d = 0 if qk_norm else _round_up(d, multiple) - d
    a['head_dim'] = d + n_d
    w = _pad(sd['attn.qkv.weight'].view(3, H, d, -1), 2, n_d).reshape(3 * H * (d + n_d), -1)
    out = {'attn.qkv.weight': _pad(w, 1, n_in),
           'attn.proj.weight': _pad(_pad(sd['attn.proj.weight'].view(-1, H, d), 2, n_d).reshape(-1, H * (d + n_d)),
                                    0, n_out),
           'attn.proj.bias': _pad(sd['attn.proj.bias'], 0, n_out),
           'norm1.weight': _pad(sd['norm1.weight'], 0, n_in), 'norm1.bias': _pad(sd['norm1.bias'], 0, n_in)}
    if 'attn.qkv.bias' in sd:
        out['attn.qkv.bias'] = _pad(sd['attn.qkv.bias'].view(3, H, d), 2, n_d).reshape(-1)
    if 'ls1.gamma' in sd:
        out['ls1.gamma'] = _pad(sd['ls1.gamma'], 0, n_out)
    return out


def _pad_mlp(sd, m, multiple, D):
    """Pads the arch entry `m` in place; the padded weights of the MLP sub-block."""
    m['in_idx'], n_in = _pad_index(m['in_idx'], multiple, D)
    m['out_idx'], n_out = _pad_index(m['out_idx'], multiple, D)
    n_h = _round_up(m['hidden_features'], multiple) - m['hidden_features']
    m['hidden_features'] += n_h
    out = {'mlp.fc1.weight': _pad(_pad(sd['mlp.fc1.weight'], 0, n_h), 1, n_in),
           'mlp.fc1.bias': _pad(sd['mlp.fc1.bias'], 0, n_h),
           'mlp.fc2.weight': _pad(_pad(sd['mlp.fc2.weight'], 1, n_h), 0, n_out),
           'mlp.fc2.bias': _pad(sd['mlp.fc2.bias'], 0, n_out),
           'norm2.weight': _pad(sd['norm2.weight'], 0, n_in), 'norm2.bias': _pad(sd['norm2.bias'], 0, n_in)}
    if 'ls2.gamma' in sd:
        out['ls2.gamma'] = _pad(sd['ls2.gamma'], 0, n_out)
    return out


@torch.no_grad()
def align_widths(model: VisionTransformer, multiple: int = 8) -> VisionTransformer:
    """A copy of a cut model whose widths are multiples of `multiple`, computing the same function.

    GPU matrix kernels (tensor cores) need aligned sizes; a cut leaves arbitrary ones (325, 990…)
    and the fast kernels are lost. Each width is padded with elements that are exactly zero:
    read dims with LayerNorm scale and shift 0, written dims with zero rows and bias (and γ 0),
    hidden neurons and head channels with zero weights (GELU(0) = 0; zero channels add nothing
    to q·k; not head channels under qk_norm, whose statistics they would change).
    For deployment only: the padding adds parameters, so train and count the unpadded model.
    """
    arch = copy.deepcopy(model.arch())
    state = dict(model.state_dict())
    for l, b in enumerate(arch['blocks']):
        p = f'blocks.{l}.'
        sd = {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
        padded = {}
        if b['attn'] is not None:
            padded.update(_pad_attn(sd, b['attn'], multiple, model.embed_dim, model.config.qk_norm))
        if b['mlp'] is not None:
            padded.update(_pad_mlp(sd, b['mlp'], multiple, model.embed_dim))
        state.update({p + k: v for k, v in padded.items()})
    aligned = build_from_arch(arch)
    aligned.load_state_dict(state)
    return aligned.to(next(model.parameters()).device)
