"""What DAP's budget counts (METHOD.md §4 step 4): the cost of one sub-block as a function of
the element counts its three gates keep, in one of three units (`--prune-budget`).

params   §2's coupled parameter count (`gates.attn_params`, `gates.mlp_params`): the paper's;
         with the family's qkv bias, LayerScale γ and qk_norm (`gates.LayerOptions`)
flops    FLOPs of one image's forward as torch.utils.flop_counter counts them: a multiply-add
         is 2; qkv, q·kᵀ, attn·v and proj, fc1 and fc2 count, over every token (registers
         too); norms, LayerScale, softmax, GELU, pooling, gathers and adds do not (`count_flops`)
latency  milliseconds of one batch's forward on one device, interpolated in a table measured
         there by `scripts/latency_table.py` (`LatencyTable`)

Each cost is elementwise on tensors of kept counts (the threshold search evaluates every cut
of a sub-block at once) and 0 where a width is 0: the cut removes such a sub-block. The
`non_block` cost (patch embedding, tokens, norm_pre, final norm or fc_norm, heads) is never
pruned; the budget is
(1 − pr) of the dense model's total in the unit.
"""
import json
import math
import os
import stat
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence

import torch

from .gates import LayerOptions, _count, widths_as_tensors

BUDGET_UNITS = ('params', 'flops', 'latency')
TABLE_FORMAT = 'dap-latency-table/1'


class Cost:
    """The cost of the sub-blocks of one dense model, in `unit`."""
    unit = ''

    def attn(self, d_in, heads, head_dim, d_out):
        raise NotImplementedError

    def mlp(self, d_in, hidden, d_out):
        raise NotImplementedError

    def non_block(self, model, dense_sub_blocks: float) -> float:
        """Cost of what is never pruned, given the dense sub-blocks' total in this unit."""
        raise NotImplementedError


class ParamsCost(Cost):
    """§2's count with the family's `options` (`LayerOptions.of(model)`; DeiT's by default)."""
    unit = 'params'

    def __init__(self, options: LayerOptions = LayerOptions()):
        self.options = options

    def attn(self, d_in, heads, head_dim, d_out):
        return self.options.attn_params(d_in, heads, head_dim, d_out)

    def mlp(self, d_in, hidden, d_out):
        return self.options.mlp_params(d_in, hidden, d_out)

    def non_block(self, model, dense_sub_blocks):
        return model.num_parameters() - dense_sub_blocks


@dataclass(frozen=True)
class ViTShape:
    """The sizes of a dense `models.VisionTransformer` that its cost depends on, and the cost of
    a model of its family with per-layer kept heads and hidden neurons and a kept residual
    width (SaViT's candidates; the dense model with every count whole). Built from the same
    sub-block formulas as DAP's budget, with the family's qkv bias, LayerScale and qk_norm; the
    rest of the model counts every prefix token (the class token, the distillation token of
    DeiT's distilled family, the registers), the position embedding's rows (the patches only
    with `no_embed_class`), the LayerNorms outside the blocks (norm_pre, norm or fc_norm) and
    every classifier."""
    depth: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    embed_dim: int
    num_patches: int
    num_classes: int
    patch_in: int        # c·p², the inputs of one patch-embedding channel
    patch_bias: bool
    num_prefix_tokens: int = 1
    num_classifiers: int = 1
    pos_embed_rows: Optional[int] = None  # None: one per token
    outer_norms: int = 1                  # LayerNorms outside the blocks
    options: LayerOptions = LayerOptions()  # the layers' qkv bias, LayerScale and qk_norm

    @classmethod
    def from_model(cls, model) -> 'ViTShape':
        proj = model.patch_embed.proj
        return cls(depth=model.depth, num_heads=model.num_heads,
                   head_dim=model.embed_dim // model.num_heads,
                   mlp_hidden=int(model.embed_dim * model.mlp_ratio), embed_dim=model.embed_dim,
                   num_patches=model.patch_embed.num_patches, num_classes=model.num_classes,
                   patch_in=proj.weight[0].numel(), patch_bias=proj.bias is not None,
                   num_prefix_tokens=model.num_prefix_tokens, num_classifiers=len(model.classifiers()),
                   pos_embed_rows=model.pos_embed.shape[1], outer_norms=len(model.final_norms()),
                   options=LayerOptions.of(model))

    @property
    def tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    def rest_params(self, embed):
        """Parameters outside the blocks at residual width `embed`: patch embedding, prefix
        tokens, position embedding, LayerNorms outside the blocks, classifiers."""
        C = self.num_classes
        head = self.num_classifiers * (embed * C + C) if C > 0 else 0 * embed
        rows = self.tokens if self.pos_embed_rows is None else self.pos_embed_rows
        return (embed * (self.patch_in + self.patch_bias)
                + (self.num_prefix_tokens + rows + 2 * self.outer_norms) * embed + head)

    def rest_flops(self, embed):
        """FLOPs outside the blocks: the patch convolution and each classifier on its token."""
        return 2 * self.num_patches * embed * self.patch_in + 2 * self.num_classifiers * embed * self.num_classes

    def parts(self, unit: str, heads, hidden, embed):
        """(attention (..., L), MLP (..., L), the rest (...)) in `unit` ('params' or 'flops') for
        kept heads and hidden neurons per layer (..., L) and a kept width `embed` (...). A
        layer with no head (no hidden neuron) loses its sub-block, as `cut_model` drops it."""
        h, m, e = heads.double(), hidden.double(), embed.double()
        E = e.unsqueeze(-1).expand_as(h)
        d = torch.full_like(h, self.head_dim)
        if unit == 'params':
            return self.options.attn_params(E, h, d, E), self.options.mlp_params(E, m, E), self.rest_params(e)
        flops = FlopsCost(self.tokens)
        return flops.attn(E, h, d, E), flops.mlp(E, m, E), self.rest_flops(e)

    def cost(self, unit: str, heads, hidden, embed) -> torch.Tensor:
        attn, mlp, rest = self.parts(unit, heads, hidden, embed)
        return attn.sum(-1) + mlp.sum(-1) + rest

    def dense_counts(self):
        L = self.depth
        return (torch.full((L,), self.num_heads), torch.full((L,), self.mlp_hidden),
                torch.tensor(self.embed_dim))


class FlopsCost(Cost):
    """FLOPs of one image through a sub-block that sees `tokens` tokens (patches + class)."""
    unit = 'flops'

    def __init__(self, tokens: int):
        self.tokens = tokens

    def attn(self, d_in, heads, head_dim, d_out):
        as_tensor, (a, h, b, c) = widths_as_tensors(d_in, heads, head_dim, d_out)
        n, inner = self.tokens, h * b
        flops = 2 * n * (3 * a * inner + inner * c) + 4 * n * n * inner  # qkv, proj; q·kᵀ, attn·v
        return _count(flops, (a, h, b, c), as_tensor)

    def mlp(self, d_in, hidden, d_out):
        as_tensor, (a, b, c) = widths_as_tensors(d_in, hidden, d_out)
        return _count(2 * self.tokens * (a * b + b * c), (a, b, c), as_tensor)

    def non_block(self, model, dense_sub_blocks=None):
        """The patch embedding's convolution and the head on the class token (and the
        distillation head on its token)."""
        return float(ViTShape.from_model(model).rest_flops(model.embed_dim))


def _interpolate(axes: Sequence[torch.Tensor], values: torch.Tensor, points: Sequence[torch.Tensor]):
    """Multilinear interpolation of `values` (a grid over `axes`) at `points` (broadcast
    tensors), each point clamped into the grid; on the points' device."""
    device = points[0].device
    axes, values = [ax.to(device) for ax in axes], values.to(device)
    idx, frac = [], []
    for ax, p in zip(axes, points):
        p = torch.maximum(torch.minimum(p, ax[-1]), ax[0])
        i = (torch.searchsorted(ax, p.contiguous(), right=True) - 1).clamp(0, len(ax) - 2)
        idx.append(i)
        frac.append((p - ax[i]) / (ax[i + 1] - ax[i]))
    out = torch.zeros_like(points[0])
    for corner in range(2 ** len(axes)):
        w, at = torch.ones_like(out), []
        for k in range(len(axes)):
            up = (corner >> k) & 1
            w = w * (frac[k] if up else 1 - frac[k])
            at.append(idx[k] + up)
        out = out + w * values[tuple(at)]
    return out


# what besides the widths changes a sub-block's time; DeiT's values
DEIT_LAYER_OPTIONS = {**asdict(LayerOptions()), 'act': 'gelu'}


def timed_layer_options(model) -> Dict:
    """The options of `model`'s layers that a latency table is measured with: those its
    parameter count depends on (`LayerOptions`) and the MLP's activation."""
    return {**asdict(LayerOptions.of(model)), 'act': model.config.act}


class LatencyTable(Cost):
    """Milliseconds of one batch through a sub-block, interpolated multilinearly in the grid
    that `scripts/latency_table.py` measured (read, attention or MLP, write; all heads kept,
    as DAP keeps them), and the measured time of the rest of the model (`other_ms`)."""
    unit = 'latency'
    # the attention grid's middle axis: head_dim widths with all heads (DAP's §2 cut), or head
    # counts at the full head_dim (`--prune-attn-unit head`; scripts/latency_table.py --attn-unit)
    ATTN_MIDDLE = {'head_dim': 'head_dim', 'head': 'heads'}
    KEYS = ('format', 'model', 'embed_dim', 'num_heads', 'head_dim', 'mlp_hidden', 'tokens',
            'batch_size', 'input_size', 'device', 'torch', 'threads', 'other_ms', 'attn', 'mlp')

    def __init__(self, table: Dict, source: str = 'the latency table'):
        self.table = self.check(table, source)
        self.source = source
        self.attn_unit = self.attn_unit_of(table)
        self.attn_axes = [torch.tensor(table['attn']['axes'][k], dtype=torch.float64)
                          for k in ('d_in', self.ATTN_MIDDLE[self.attn_unit], 'd_out')]
        self.attn_ms = torch.tensor(table['attn']['ms'], dtype=torch.float64)
        self.mlp_axes = [torch.tensor(table['mlp']['axes'][k], dtype=torch.float64)
                         for k in ('d_in', 'hidden', 'd_out')]
        self.mlp_ms = torch.tensor(table['mlp']['ms'], dtype=torch.float64)

    @classmethod
    def load(cls, path: str) -> 'LatencyTable':
        """The table in `path`; ValueError (one line) naming the problem."""
        try:
            # a FIFO or a device would block the open or the read: only a regular file is a table
            if not stat.S_ISREG(os.stat(path).st_mode):
                raise ValueError(f'the latency table {path} is not a regular file')
            with open(path) as f:
                table = json.load(f)
        except OSError as e:
            raise ValueError(f'cannot read the latency table {path}: {e.strerror or e}') from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f'the latency table {path} is not JSON ({e})') from None
        except RecursionError:
            raise ValueError(f'the latency table {path} is not a latency table (JSON nested too deep)') from None
        return cls(table, path)

    @classmethod
    def attn_unit_of(cls, table) -> str:
        """'head' for a table whose attention grid runs over head counts, else 'head_dim'."""
        axes = table.get('attn', {}).get('axes') if isinstance(table.get('attn'), dict) else None
        return 'head' if isinstance(axes, dict) and 'heads' in axes else 'head_dim'

    @classmethod
    def check(cls, table, source):
        """The table's shape: every key, the model's sizes whole numbers, axes of whole widths
        ascending from at least 1, a positive finite grid of the axes' size; ValueError naming
        the first problem. Every reader of a table goes through it (`load`, the constructor)."""
        if not isinstance(table, dict):
            raise ValueError(f'{source} is not a latency table (a JSON object)')
        missing = [k for k in cls.KEYS if k not in table]
        if missing or table.get('format') != TABLE_FORMAT:
            raise ValueError(f'{source} is not a {TABLE_FORMAT} file (missing {", ".join(missing) or "format"}): '
                             'make one with scripts/latency_table.py')
        for k in ('embed_dim', 'num_heads', 'head_dim', 'mlp_hidden', 'tokens'):
            if type(table[k]) is not int or table[k] < 1:
                raise ValueError(f'{source}: {k} must be a whole number of at least 1, got {table[k]!r}')
        middle = cls.ATTN_MIDDLE[cls.attn_unit_of(table)]
        for kind, names in (('attn', ('d_in', middle, 'd_out')), ('mlp', ('d_in', 'hidden', 'd_out'))):
            part = table[kind]
            try:
                axes = [[float(v) for v in part['axes'][n]] for n in names]
                grid = torch.tensor(part['ms'], dtype=torch.float64)
            except (KeyError, TypeError, ValueError, OverflowError) as e:
                raise ValueError(f'{source}: "{kind}" needs axes {", ".join(names)} and a grid "ms" ({e})') from None
            for n, ax in zip(names, axes):
                # NaN compares False with everything: `ax[0] < 1` and `b <= a` would let it through
                if not all(math.isfinite(v) and v == int(v) for v in ax):
                    raise ValueError(f'{source}: {kind} axis {n} must hold whole widths, got {ax}')
                if len(ax) < 2 or ax[0] < 1 or any(b <= a for a, b in zip(ax, ax[1:])):
                    raise ValueError(f'{source}: {kind} axis {n} must rise from at least 1 in 2 or more steps, got {ax}')
            if tuple(grid.shape) != tuple(len(ax) for ax in axes):
                raise ValueError(f'{source}: {kind} grid has shape {tuple(grid.shape)}, its axes '
                                 f'{tuple(len(ax) for ax in axes)}')
            if not (torch.isfinite(grid).all() and (grid > 0).all()):
                raise ValueError(f'{source}: {kind} times must be positive and finite')
        other = table['other_ms']
        if not isinstance(other, (int, float)) or not math.isfinite(other) or other < 0:
            raise ValueError(f'{source}: other_ms must be a finite time of at least 0, got {other!r}')
        return table

    def check_model(self, model, error=ValueError) -> None:
        """`error` (one line) unless the table was measured for `model`'s dense shape: its
        widths, its token count (which the input size, the patch and the prefix tokens decide)
        and the layer options that change a sub-block's time (`timed_layer_options`; a table
        written before they were recorded was measured with DeiT's). Every reader that uses a
        table for a model calls it (build_cost, scripts/benchmark.py)."""
        want = {'embed_dim': model.embed_dim, 'num_heads': model.num_heads,
                'head_dim': model.embed_dim // model.num_heads,
                'mlp_hidden': int(model.embed_dim * model.mlp_ratio),
                'tokens': model.patch_embed.num_patches + model.num_prefix_tokens}
        have = {**self.table, **self.table.get('layer_options', DEIT_LAYER_OPTIONS)}
        want.update(timed_layer_options(model))
        wrong = [f'{k} {have[k]} (the model: {v})' for k, v in want.items() if have[k] != v]
        if wrong:
            raise error(f'{self.source} was measured for another model ({self.table["model"]}, '
                        f'{self.table["input_size"]} px): ' + '; '.join(wrong))

    def attn(self, d_in, heads, head_dim, d_out):
        as_tensor, (a, h, b, c) = widths_as_tensors(d_in, heads, head_dim, d_out)
        a, h, b, c = torch.broadcast_tensors(a, h, b, c)
        if self.attn_unit == 'head':  # measured per head count at the full head_dim
            ms = _interpolate(self.attn_axes, self.attn_ms, (a, h, c)) * b / self.table['head_dim']
        else:  # measured with all heads (DAP's cut); fewer heads scale the time by their share
            ms = _interpolate(self.attn_axes, self.attn_ms, (a, b, c)) * h / self.table['num_heads']
        ms = _count(ms, (a, h, b, c), True)
        return ms if as_tensor else float(ms)

    def mlp(self, d_in, hidden, d_out):
        as_tensor, (a, b, c) = widths_as_tensors(d_in, hidden, d_out)
        a, b, c = torch.broadcast_tensors(a, b, c)
        ms = _count(_interpolate(self.mlp_axes, self.mlp_ms, (a, b, c)), (a, b, c), True)
        return ms if as_tensor else float(ms)

    def non_block(self, model, dense_sub_blocks=None):
        return float(self.table['other_ms'])

    def predict_ms(self, model) -> float:
        """The predicted milliseconds per batch of a dense or cut `models.VisionTransformer`:
        the rest of the model and each sub-block it has, at the widths of its `arch`."""
        return self.non_block(model) + sum(sub_block_cost(self, model))


def sub_block_cost(cost: Cost, model):
    """The cost of each sub-block a dense or cut model has, in layer order (attention, MLP),
    read from its `arch`: what the cut model really keeps, whatever pruned it."""
    out, D = [], model.embed_dim
    width = lambda idx: D if idx is None else len(idx)  # noqa: E731
    for blk in model.arch()['blocks']:
        a, m = blk['attn'], blk['mlp']
        if a is not None:
            out.append(float(cost.attn(width(a['in_idx']), a['num_heads'], a['head_dim'], width(a['out_idx']))))
        if m is not None:
            out.append(float(cost.mlp(width(m['in_idx']), m['hidden_features'], width(m['out_idx']))))
    return out


def build_cost(unit: str, model, latency_table: Optional[str] = None, attn_unit: str = 'head_dim') -> Cost:
    """The cost model of `unit` for the dense `model`; `latency_table` is the file for
    `latency`, timed over what `attn_unit` removes (head_dim widths or head counts).
    ValueError (one line) for an unknown unit or a table that does not fit."""
    if unit == 'params':
        return ParamsCost(LayerOptions.of(model))
    if unit == 'flops':
        return FlopsCost(model.patch_embed.num_patches + model.num_prefix_tokens)
    if unit == 'latency':
        if latency_table is None:
            raise ValueError('the latency budget needs a table (--latency-table FILE, made by '
                             'scripts/latency_table.py)')
        table = LatencyTable.load(latency_table)
        table.check_model(model)
        if table.attn_unit != attn_unit:
            raise ValueError(f'{latency_table} times attention by {table.attn_unit} '
                             f'(scripts/latency_table.py --attn-unit {table.attn_unit}); --prune-attn-unit '
                             f'{attn_unit} needs a table made with --attn-unit {attn_unit}')
        return table
    raise ValueError(f'unknown budget unit {unit!r}; units are {", ".join(BUDGET_UNITS)}')


@torch.no_grad()
def count_flops(model: torch.nn.Module, img_size: int, device='cpu') -> int:
    """FLOPs of one image's forward, counted by torch.utils.flop_counter (matmuls and
    convolutions, a multiply-add counted as 2; norms, softmax and GELU are not counted): the
    measurement that `FlopsCost` and `ViTShape` must equal.

    Attention runs unfused while counting: the counter has no formula for the CPU kernel of
    scaled_dot_product_attention and would leave out q·kᵀ and attn·v.
    """
    from torch.utils.flop_counter import FlopCounterMode
    was_training = model.training
    fused = {m: m.fused_attn for m in model.modules() if hasattr(m, 'fused_attn')}
    model.eval()
    for m in fused:
        m.fused_attn = False
    x = torch.zeros(1, 3, img_size, img_size, device=device)
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for m, f in fused.items():
            m.fused_attn = f
        model.train(was_training)
    return counter.get_total_flops()
