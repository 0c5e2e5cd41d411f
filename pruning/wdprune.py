"""WD-Prune (Yu et al., AAAI 2022), re-implemented in this framework (BASELINES.md, "WD-Prune").

Width: every block masks its heads, proj outputs, fc1 neurons and fc2 outputs. Each masked
layer learns scores S and a threshold t; it keeps the top-k of S with k = ⌈σ(t)·n⌉, binary in
every forward, trained straight-through. A Lagrangian term holds the expected kept fraction
s at or below the target T. Depth: shallow classifiers on the class token after chosen blocks,
trained jointly; at the end the model is truncated and one of them becomes its head.

    pruner = WDPrunePruner(model, num_classes, WDPruneConfig(prune_ratio=0.5), schedule)
    net = pruner.module                       # forward(x) -> (logits, aux); wrap it in DDP
    optimizer = AdamW(model_params + pruner.param_groups(lr, weight_decay))
    loss = criterion(logits, y) + pruner.aux_loss(aux, y, criterion)
    loss.backward(); optimizer.step(); pruner.step(); optimizer.zero_grad()
    cut, rows = pruner.finalize()
"""
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from models import pool_tokens
from .cut import cut_model
from .gates import LayerOptions, check_masks_consistent
from .keep_ratio import block_budget
from .protocol import ConfigError, Pruner, PrunerModule, Record, setting, summary_row
from .schedule import PruneSchedule

# The masked layers of one block, in the column order of the thresholds tensor (L, 4).
MASKED = ('attn_head', 'attn_out', 'mlp_hid', 'mlp_out')


@dataclass
class WDPruneConfig:
    prune_ratio: float
    classifiers: Tuple[int, ...] = setting((), flag='--classifiers', kind='ints',
                                           help='WD-Prune: attach a shallow classifier after each of these blocks')
    keep_depth: Optional[int] = setting(None, flag='--keep-depth', kind='int',
                                        help='WD-Prune: keep the first K blocks at the cut and promote classifier K')
    # official, cosine decayed
    lr: float = setting(2.5e-3, flag='--wdprune-lr', kind='real',
                        help='WD-Prune: learning rate of the saliency scores and thresholds')
    # λ ascent: λ1 += lambda_lr·(s − T). With s − T ≈ 0.3–0.5 at the start, λ1 reaches O(1) in a
    # few hundred steps (well inside one ImageNet epoch), when the budget's pull on t
    # (λ·∂s/∂r ≈ λ/(3L) per layer) outweighs typical task gradients Σ ∂L/∂M·M. A larger value
    # only stiffens the wall: Adam bounds t's move per step by `lr` whatever λ is.
    lambda_lr: float = setting(1e-2, flag='--wdprune-lambda-lr', kind='real',
                               help='WD-Prune: gradient-ascent step of the Lagrange multipliers')
    # σ(10) ≈ 1: start from the dense model
    threshold_init: float = setting(10.0, flag='--wdprune-threshold-init', kind='real',
                                    help='WD-Prune: initial threshold t, keep ratio sigmoid(t)')
    mask_round: int = setting(16, flag='--wdprune-round', kind='int',  # heads: 1
                              help='WD-Prune: MLP and output masks keep a multiple of this many units')
    block_params_only: bool = False
    record_every: int = 100         # steps between two records (on_update)

    def __post_init__(self):
        self.classifiers = tuple(sorted(set(int(k) for k in self.classifiers)))
        if not 0 < self.prune_ratio < 1:
            raise ConfigError('prune_ratio', f'must be in (0, 1), got {self.prune_ratio}')
        for name in ('mask_round', 'record_every'):
            if getattr(self, name) < 1:
                raise ConfigError(name, f'must be at least 1, got {getattr(self, name)}')
        for name in ('lr', 'lambda_lr'):
            if getattr(self, name) < 0:
                raise ConfigError(name, f'must not be negative, got {getattr(self, name)}')
        if self.keep_depth is not None and self.keep_depth not in self.classifiers:
            raise ConfigError('keep_depth', f'{self.keep_depth} needs a classifier there: add it to the '
                                            f'shallow classifiers {list(self.classifiers)}')


def kept_count(ratio: float, n: int, round_to: int = 1) -> int:
    """k = ⌈r·n⌉ rounded up to a multiple of `round_to`, at least `round_to`, at most n.
    The 1e-9 keeps float noise (0.7·10 = 7.000000000000001) from adding a unit."""
    k = math.ceil(ratio * n - 1e-9)
    return min(n, max(round_to, -(-k // round_to) * round_to))


def topk_mask(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Rows of `scores` (..., n) → binary masks keeping each row's k largest; ties by index."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device)
                                            .expand_as(order).contiguous())
    return (rank < k.to(rank.device).unsqueeze(-1)).to(scores.dtype)


def block_keep_fraction(r: torch.Tensor, D: int, hid: int) -> torch.Tensor:
    """Kept weight fraction of each block from keep ratios r (..., 4) = (a, o, f1, f2):
    qkv 3D²a, proj D²·a·o, fc1 D·hid·f1, fc2 D·hid·f1·f2 (BASELINES.md, sizes from the model)."""
    a, o, f1, f2 = r.unbind(-1)
    return (3 * D * D * a + D * D * a * o + D * hid * f1 + D * hid * f1 * f2) / (4 * D * D + 2 * D * hid)


def block_params(D: int, hd: int, heads, o, f1, f2, options: LayerOptions = LayerOptions()) -> Tuple[int, int]:
    """Exact parameters of a block's attention and MLP under kept counts, as `cut_model` builds
    them (every block reads all D dims), with the family's `options` (qkv bias, LayerScale on
    the o / f2 written dims, qk_norm); a sub-block with an empty gate is removed, costs 0."""
    return int(options.attn_params(D, heads, hd, o)), int(options.mlp_params(D, f1, f2))


class ShallowClassifier(nn.Module):
    """The model's classifier in miniature: its final LayerNorm, pooling and a Linear, named like
    the model's (`norm` before pooling or `fc_norm` after, `head`), so that its state dict is
    what `cut_model(classifier=...)` promotes."""

    def __init__(self, dim: int, num_classes: int, model):
        super().__init__()
        self.pool_args = (model.global_pool, model.num_prefix_tokens)
        self.norm_name = 'fc_norm' if not isinstance(model.fc_norm, nn.Identity) else \
            'norm' if not isinstance(model.norm, nn.Identity) else None
        if self.norm_name is not None:
            setattr(self, self.norm_name, nn.LayerNorm(dim, eps=model.config.norm_eps))
        self.head = nn.Linear(dim, num_classes)
        trunc_normal_(self.head.weight, std=.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        if self.norm_name == 'norm' and self.pool_args[0] != 'token':  # normalise, then average
            return self.head(pool_tokens(self.norm(x), *self.pool_args))
        # pool first: LayerNorm is per token, so the class token alone normalises the same
        x = pool_tokens(x, *self.pool_args)
        return self.head(x if self.norm_name is None else getattr(self, self.norm_name)(x))


class ShallowClassifiers(nn.ModuleDict):
    """`classifierK` after block K; forward(residual stream) -> their logits, in K order. No
    detach: the classifiers' losses train the backbone."""

    def __init__(self, depths: Sequence[int], dim: int, num_classes: int, model):
        super().__init__({f'classifier{k}': ShallowClassifier(dim, num_classes, model) for k in depths})
        self.depths = tuple(depths)

    def forward(self, stream):
        return tuple(clf(stream[2 * k]) for k, clf in zip(self.depths, self.values()))

    def forward_eval(self, stream) -> Dict[str, torch.Tensor]:
        return dict(zip(self.keys(), self(stream)))


class WDPrunePruner(Pruner):
    follows_lr_schedule = True  # one joint run on DeiT's schedule (BASELINES.md)

    def __init__(self, model, num_classes: int, config: WDPruneConfig, schedule: PruneSchedule,
                 on_update: Optional[Callable[[Record], None]] = None):
        cfg = self.cfg = config
        self.schedule = schedule
        self.on_update, self.total_steps = on_update, max(schedule.step_final, 1)
        L, D, H = model.depth, model.embed_dim, model.num_heads
        bad = [k for k in cfg.classifiers if not 1 <= k < L]
        if bad:
            raise ConfigError('classifiers', f'{bad} outside 1 … {L - 1}: shallow classifiers sit after a block')
        dev = next(model.parameters()).device
        model.add_gates(names=MASKED)  # before DDP wraps the module
        self.gates = {n: [blk.gates[n] for blk in model.blocks] for n in MASKED}  # per layer
        self.model, self.L, self.D, self.hd = model, L, D, D // H
        self.hid = int(D * model.mlp_ratio)
        self.sizes = dict(zip(MASKED, (H, D, self.hid, D)))
        self.options = LayerOptions.of(model)
        self.classifiers = ShallowClassifiers(cfg.classifiers, D, num_classes, model).to(dev)
        self.module = PrunerModule(model, self.classifiers)

        self.scores = {n: torch.zeros(L, s, device=dev, requires_grad=True) for n, s in self.sizes.items()}
        self.threshold = torch.full((L, 4), cfg.threshold_init, device=dev, requires_grad=True)
        self.optimizer = torch.optim.AdamW([*self.scores.values(), self.threshold], lr=cfg.lr,
                                           weight_decay=0.)
        self.lambda1 = self.lambda2 = 0.
        self.step_count, self.shrink_factor = 0, 1.

        dense = sum(block_params(D, self.hd, H, D, self.hid, D, self.options)) * L
        non_block = model.num_parameters() - dense
        self.dense_block, self.non_block = dense, non_block
        self.budget = block_budget([dense], non_block, cfg.prune_ratio, cfg.block_params_only)
        self.target = self.budget / dense  # T of BASELINES.md
        smallest = self._kept_block_params(self._counts(torch.zeros(L, 4, dtype=torch.float64)))
        if self.budget < smallest:
            raise ConfigError('prune_ratio', f'{cfg.prune_ratio} leaves {self.budget:.0f} block params, fewer '
                                             f'than the smallest masks (1 head, {cfg.mask_round} units) keep: {smallest}')
        self.apply_masks()

    # ---- masks -----------------------------------------------------------------------------
    def _counts(self, ratios: torch.Tensor) -> torch.Tensor:
        """Kept counts (L, 4) for keep ratios (L, 4) (CPU float64): heads round to 1."""
        return torch.tensor([[kept_count(float(ratios[l, j]), self.sizes[n],
                                         1 if n == 'attn_head' else self.cfg.mask_round)
                              for j, n in enumerate(MASKED)] for l in range(self.L)])

    @torch.no_grad()
    def apply_masks(self, counts: Optional[torch.Tensor] = None):
        """Top-k of S into the gates, k from σ(t) (or the given counts)."""
        if counts is None:
            counts = self._counts(self.threshold.detach().double().sigmoid().cpu())
        self.counts = counts
        for j, n in enumerate(MASKED):
            masks = topk_mask(self.scores[n].detach(), counts[:, j])
            for gate, m in zip(self.gates[n], masks):
                gate.copy_(m)

    def _hard_ratios(self) -> torch.Tensor:
        return self.counts.double() / torch.tensor([self.sizes[n] for n in MASKED], dtype=torch.float64)

    def _kept_block_params(self, counts) -> int:
        return sum(sum(block_params(self.D, self.hd, *map(int, c), self.options)) for c in counts)

    def hard_keep(self) -> float:
        """s of the masks actually applied (rounded k/n), on the CPU: no device sync."""
        return float(block_keep_fraction(self._hard_ratios(), self.D, self.hid).mean())

    def expected_keep(self) -> torch.Tensor:
        """s: its value from the masks applied (rounded k/n), its gradient from r = σ(t). Like
        the mask term, the gradient treats ∂r/∂t as 1 (BASELINES.md: σ' ignored); with σ'
        at t = 10 (4.5e-5) the budget could not move t until λ reached ~10⁴."""
        r = self.threshold.detach().sigmoid() + self.threshold - self.threshold.detach()
        soft = block_keep_fraction(r, self.D, self.hid).mean()
        return soft - soft.detach() + self.hard_keep()

    # ---- hooks for the training loop -----------------------------------------------------
    def param_groups(self, lr: float, weight_decay: float) -> List[dict]:
        """The shallow classifiers' parameters, for the main optimizer."""
        params = list(self.classifiers.parameters())
        return [{'params': [p for p in params if p.ndim > 1], 'lr': lr, 'weight_decay': weight_decay},
                {'params': [p for p in params if p.ndim <= 1], 'lr': lr, 'weight_decay': 0.}]

    def aux_loss(self, aux, targets, criterion) -> torch.Tensor:
        """Shallow classifiers' losses (equal weights) + λ1(s − T) + λ2(s − T)² when s > T."""
        loss = sum((criterion(o, targets) for o in aux or ()), torch.zeros((), device=self.threshold.device))
        if self.hard_keep() > self.target:
            gap = self.expected_keep() - self.target
            loss = loss + self.lambda1 * gap + self.lambda2 * gap ** 2
        return loss

    def _set_grads(self, grad_scale: float = 1.0) -> bool:
        """Straight-through: ∂L/∂S = ∂L/∂M, ∂L/∂t = Σ ∂L/∂M·M (+ the budget's part, already in
        t.grad from aux_loss). False, and no gradient, when one is missing or not finite
        (an AMP step the scaler skips)."""
        grads = {n: [g.grad for g in self.gates[n]] for n in MASKED}
        if any(g is None for gs in grads.values() for g in gs):
            return False
        grads = {n: torch.stack(gs) for n, gs in grads.items()}
        if not bool(torch.stack([torch.isfinite(g).all() for g in grads.values()]).all()):
            return False
        t_grad = torch.zeros_like(self.threshold) if self.threshold.grad is None else self.threshold.grad
        for j, n in enumerate(MASKED):
            mask = torch.stack([g.detach() for g in self.gates[n]])
            self.scores[n].grad = grads[n] / grad_scale
            t_grad[:, j] += (grads[n] * mask).sum(1)
        self.threshold.grad = t_grad / grad_scale
        return True

    def step(self, grad_scale: float = 1.0) -> Optional[Record]:
        """After each optimizer step: λ ascent, S and t update, new masks into the gates, gate
        gradients cleared (the main optimizer does not hold them). Returns a record every
        `record_every` steps."""
        step, cfg = self.step_count, self.cfg
        gap = self.hard_keep() - self.target
        if gap > 0:  # gradient ascent on the multipliers; they never fall below 0
            self.lambda1 += cfg.lambda_lr * gap
            self.lambda2 += cfg.lambda_lr * gap ** 2
        if self._set_grads(grad_scale):
            for g in self.optimizer.param_groups:  # cosine decay over total_steps
                g['lr'] = cfg.lr * 0.5 * (1 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))
            self.optimizer.step()
            self.apply_masks()
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.model.gate_parameters():
            p.grad = None
        self.step_count += 1
        if step % cfg.record_every:
            return None
        check_masks_consistent(self.model.gate_parameters())
        return self._record(step, gap)

    def _record(self, step: int, gap: float) -> Record:
        ratios, soft = self._hard_ratios(), self.threshold.detach().sigmoid().cpu()
        data = {'step': step, 's': gap + self.target, 'target': self.target,
                'lambda1': self.lambda1, 'lambda2': self.lambda2,
                'total_kept_params': int(self._kept_block_params(self.counts) + self.non_block),
                'keep_ratio': {n: ratios[:, j].tolist() for j, n in enumerate(MASKED)},
                'threshold_ratio': {n: soft[:, j].tolist() for j, n in enumerate(MASKED)}}
        scalars = {f'pruning/{k}': data[k] for k in ('s', 'target', 'lambda1', 'lambda2', 'total_kept_params')}
        return self.emit(Record(data, scalars))

    # ---- the end ---------------------------------------------------------------------------
    @torch.no_grad()
    def fit_budget(self) -> float:
        """Departure from the official code, which cuts whatever the masks keep: if the
        Lagrangian has not converged and the masks keep more than the budget, scale all hard
        keep ratios by one common factor c (bisection, largest c that fits). Returns c."""
        ratios = self._hard_ratios()
        if self._kept_block_params(self.counts) <= self.budget:
            return 1.
        lo, hi = 0., 1.  # c = 0 gives the smallest masks, which __init__ checked fit
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self._kept_block_params(self._counts(mid * ratios)) <= self.budget else (lo, mid)
        counts = self._fill(self._counts(lo * ratios))
        self.apply_masks(counts)
        self.shrink_factor = lo
        return lo

    def _fill(self, counts: torch.Tensor) -> torch.Tensor:
        """After the common factor, grow single masks by one step (a head, or `mask_round`
        units) while the budget holds, lowest keep ratio first: with all masks scaled alike
        they jump together, and a small model landed 10% under the budget."""
        counts = counts.clone()
        sizes = torch.tensor([self.sizes[n] for n in MASKED])
        steps = torch.tensor([1 if n == 'attn_head' else self.cfg.mask_round for n in MASKED])
        while True:
            order = torch.argsort((counts.double() / sizes).flatten(), stable=True).tolist()
            for flat in order:
                l, j = divmod(flat, len(MASKED))
                before = int(counts[l, j])
                if before >= sizes[j]:
                    continue
                counts[l, j] = min(before + int(steps[j]), int(sizes[j]))
                if self._kept_block_params(counts) <= self.budget:
                    break
                counts[l, j] = before
            else:
                return counts

    @torch.no_grad()
    def finalize(self):
        """Binary masks within the budget, cut, truncated to keep_depth with its shallow
        classifier promoted to head; removes the gates. Returns (cut_model, summary rows).
        The budget is on the widths of all blocks (BASELINES.md: the depth is chosen
        afterwards): truncating removes more, so a keep_depth model keeps less than (1 − pr)."""
        s_learned = self.hard_keep()
        factor = self.fit_budget()
        self.emit(Record({'event': 'wdprune_fit_budget', 's_learned': s_learned, 'target': self.target,
                          'shrink_factor': factor, 's_cut': self.hard_keep()}))
        check_masks_consistent(self.model.gate_parameters())
        depth = self.cfg.keep_depth or self.L
        rows = []
        for l, c in enumerate(self.counts.tolist()):
            dense = block_params(self.D, self.hd, *(self.sizes[n] for n in MASKED), self.options)
            kept = block_params(self.D, self.hd, *c, self.options) if l < depth else (0, 0)
            rows += [summary_row(f'{kind}{l}', d, k) for kind, d, k in zip(('attn', 'mlp'), dense, kept)]
        clf = None if self.cfg.keep_depth is None else \
            self.classifiers[f'classifier{depth}'].state_dict()
        cut = cut_model(self.model, depth=depth, classifier=clf)
        self.model.remove_gates()
        return cut, rows

    # ---- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The cosine schedule is a function of the step count, so that is its whole state."""
        return {'step': self.step_count, 'scores': {n: s.detach().clone() for n, s in self.scores.items()},
                'threshold': self.threshold.detach().clone(), 'lambda1': self.lambda1,
                'lambda2': self.lambda2, 'optimizer': self.optimizer.state_dict(),
                'classifiers': self.classifiers.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, sd: dict):
        self.step_count = int(sd['step'])
        for n, s in self.scores.items():
            s.copy_(sd['scores'][n])
        self.threshold.copy_(sd['threshold'])
        self.lambda1, self.lambda2 = float(sd['lambda1']), float(sd['lambda2'])
        self.optimizer.load_state_dict(sd['optimizer'])
        self.classifiers.load_state_dict(sd['classifiers'])
        self.apply_masks()
