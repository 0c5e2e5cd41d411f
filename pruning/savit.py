"""SaViT baseline (Zheng et al., NeurIPS 2022), one-shot, as BASELINES.md "SaViT" specifies.

    pruner = SaViTPruner(model, num_classes, SaViTConfig(prune_ratio=0.5))
    net = pruner.module                          # forward(x) -> (logits, None); wrap it in DDP
    for images, targets in pruner.score_batches(len(loader)) batches:   # no weight updates
        logits, _ = net(images)
        criterion(logits, targets).backward()
        pruner.step()                            # Taylor FO (g·∂L/∂g)² of every gate
        model.zero_grad()
    pruner.calibrate(batches, criterion)         # with use_interaction: the 3 × 3 matrix C
    cut, rows = pruner.finalize()                # search, global thresholds, cut

Three component types are pruned: attention heads (gate after attention·V), MLP hidden neurons
(gate after fc1) and embedding channels (one gate shared by all layers: the whole model becomes
uniformly narrower). An evolutionary search picks the pruned fractions (x_head, x_embed), the
MLP's the smallest that meets the budget; each type is thresholded globally by its Taylor score.

Departures from the official code (BASELINES.md):
- a candidate that cannot meet the budget, even with the MLP at its minimum, is rejected, never
  kept (the official code's likely overshoot: a 0.5 FLOPs target removed 91% of FLOPs);
- the budget is parameters by default (the paper's table is in parameters); FLOPs on request;
- kept parameters / FLOPs are computed exactly in closed form from the kept counts (they equal
  the cut model's own count), not estimated;
- the fitness adds the first-order cost (pruned share of each type's Taylor importance) to xᵀCx:
  without C (`use_interaction=False`) it is the first-order search;
- min_keep keeps each layer's best units (at least one), which the cut needs to stay exact.

Parameters and FLOPs of a candidate come from the one cost model, `pruning.cost.ViTShape`
(the same formulas as DAP's budget and `count_flops`, distillation token and head included, and
each family's registers, position rows, norm_pre / fc_norm, LayerScale, qk_norm and qkv bias).
"""
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from models import HEAD_GATE
from .cost import ViTShape
from .cut import cut_model
from .gates import check_masks_consistent
from .protocol import ConfigError, Pruner, PrunerModule, Record, setting, summary_row
from .taylor import TaylorScore

SAVIT_GATES = (HEAD_GATE, 'mlp_hid')
BUDGETS = ('params', 'flops')
COMPONENTS = ('head', 'mlp', 'embed')  # the order of x and of the rows / columns of C


@dataclass
class SaViTConfig:
    prune_ratio: float
    score_fraction: float = setting(0.1, flag='--savit-fraction', kind='real', help='SaViT: fraction of a '
                                    'training epoch over which Taylor scores are averaged')
    # the paper's table is in parameters; the official code uses FLOPs
    budget: str = setting('params', flag='--savit-budget', choices=BUDGETS, help='SaViT: what --prune-ratio removes')
    use_interaction: bool = setting(False, flag='--need-hessian', kind='switch',
                                    help='SaViT: estimate the interaction matrix of the component types')
    population: int = setting(100, flag='--savit-population', kind='int')  # the official search's sizes
    children: int = setting(50, flag='--savit-children', kind='int')
    generations: int = setting(100, flag='--savit-generations', kind='int')
    # at least this share of each layer's units of each type (≥ 1)
    min_keep: float = setting(0.05, flag='--savit-min-keep', kind='real',
                              help='SaViT: fraction of each layer\'s units always kept')
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.prune_ratio < 1:
            raise ConfigError('prune_ratio', f'must be in (0, 1), got {self.prune_ratio}')
        if self.budget not in BUDGETS:
            raise ConfigError('budget', f'{self.budget!r} is not one of {", ".join(BUDGETS)}')
        for name, least in (('population', 1), ('children', 0), ('generations', 0)):
            if getattr(self, name) < least:
                raise ConfigError(name, f'must be at least {least}, got {getattr(self, name)}')
        if not 0 <= self.min_keep < 1:
            raise ConfigError('min_keep', f'must be in [0, 1), got {self.min_keep}')
        if not 0 < self.score_fraction <= 1:
            raise ConfigError('score_fraction', f'must be in (0, 1], got {self.score_fraction}')


# ---- global thresholds ----------------------------------------------------------------------
def min_keep_count(min_keep: float, n: int) -> int:
    """Units of one layer that are always kept: min_keep of n, rounded up, at least 1 (a layer
    with no head would leave only proj's bias, which the gated model adds and the cut drops)."""
    return max(1, math.ceil(min_keep * n - 1e-9))  # 0.05·60 is 3.0000000000000004 in floats


class GlobalThreshold:
    """One component type, thresholded globally across layers by its Taylor score.

    Dropping t units drops the t lowest-scored units of the whole model among those not
    protected by min_keep (each layer's min_keep best units). Tables indexed by t give, for
    every t at once, the dropped count per layer and the dropped share of the type's score.
    The embedding channels are one shared set: one "layer".
    """

    def __init__(self, scores: torch.Tensor, min_keep: float):
        scores = scores.detach().double().cpu()
        L, n = scores.shape
        self.scores, self.layers, self.per_layer, self.total = scores, L, n, L * n
        self.keep_min = min(n, min_keep_count(min_keep, n))
        best_first = torch.argsort(scores, dim=1, descending=True, stable=True)
        protected = torch.zeros(L, n, dtype=torch.bool)
        protected.scatter_(1, best_first[:, :self.keep_min], True)
        flat = scores.flatten()
        free = torch.nonzero(~protected.flatten()).flatten()
        self.drop_order = free[torch.argsort(flat[free], stable=True)]  # ties: lower index first
        self.max_drop = len(self.drop_order)
        per_layer = torch.nn.functional.one_hot(self.drop_order // n, L).double()
        self.dropped_per_layer = torch.cat([torch.zeros(1, L, dtype=torch.float64), per_layer.cumsum(0)])
        share = torch.cat([torch.zeros(1, dtype=torch.float64), flat[self.drop_order].cumsum(0)])
        total = flat.sum()
        self.dropped_share = share / total if total > 0 else torch.zeros_like(share)

    def drops(self, fraction: torch.Tensor) -> torch.Tensor:
        """The number of units a pruned fraction drops (of all units of the type), capped by min_keep."""
        return torch.round(fraction.double() * self.total).long().clamp(0, self.max_drop)

    def kept_per_layer(self, t: torch.Tensor) -> torch.Tensor:
        return self.per_layer - self.dropped_per_layer[t]

    def keep_mask(self, t: int) -> torch.Tensor:
        keep = torch.ones(self.total, dtype=torch.bool)
        keep[self.drop_order[:t]] = False
        return keep.view(self.layers, self.per_layer)


class SaViTSpace:
    """The search space: the three component types, the model's shape and the budget."""

    def __init__(self, shape: ViTShape, head_scores, mlp_scores, embed_scores, budget_kind: str,
                 prune_ratio: float, min_keep: float):
        self.shape, self.kind = shape, budget_kind
        self.head = GlobalThreshold(head_scores, min_keep)
        self.mlp = GlobalThreshold(mlp_scores, min_keep)
        self.embed = GlobalThreshold(embed_scores.reshape(1, -1), min_keep)
        self.dense = float(shape.cost(budget_kind, *shape.dense_counts()))
        self.budget = (1 - prune_ratio) * self.dense

    def counts(self, t_head, t_mlp, t_embed):
        """Kept heads (..., L), hidden neurons (..., L) and embedding channels (...) for drop counts."""
        return (self.head.kept_per_layer(t_head), self.mlp.kept_per_layer(t_mlp),
                self.embed.kept_per_layer(t_embed)[..., 0])

    def cost(self, t_head, t_mlp, t_embed, kind: Optional[str] = None) -> torch.Tensor:
        return self.shape.cost(kind or self.kind, *self.counts(t_head, t_mlp, t_embed))

    def mlp_drops_for_budget(self, t_head, t_embed) -> Tuple[torch.Tensor, torch.Tensor]:
        """The fewest MLP units to drop so that the cost meets the budget, by binary search
        (the cost never grows with more drops); and whether the budget can be met at all."""
        lo = torch.zeros_like(t_head)
        hi = torch.full_like(t_head, self.mlp.max_drop)
        feasible = self.cost(t_head, hi, t_embed) <= self.budget
        while bool((lo < hi).any()):
            mid = (lo + hi) // 2
            ok = self.cost(t_head, mid, t_embed) <= self.budget
            hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid + 1)
        return hi, feasible

    def fractions(self, t_head, t_mlp, t_embed) -> torch.Tensor:
        """x = (x_head, x_mlp, x_embed), the realised pruned fractions, (..., 3)."""
        return torch.stack([t_head / self.head.total, t_mlp / self.mlp.total,
                            t_embed / self.embed.total], -1).double()

    def first_order_cost(self, t_head, t_mlp, t_embed) -> torch.Tensor:
        """Σ over types of the pruned share of the type's Taylor importance."""
        return (self.head.dropped_share[t_head] + self.mlp.dropped_share[t_mlp]
                + self.embed.dropped_share[t_embed])


# ---- evolutionary search ---------------------------------------------------------------------
def interaction_cost(x: torch.Tensor, interaction: Optional[torch.Tensor]) -> torch.Tensor:
    if interaction is None:
        return torch.zeros(x.shape[:-1], dtype=torch.float64)
    return ((x @ interaction.double().cpu()) * x).sum(-1)


def evaluate(space: SaViTSpace, genome: torch.Tensor, interaction: Optional[torch.Tensor]) -> Dict:
    """Candidates (..., 2) of pruned fractions (x_head, x_embed): realised drops, fitness
    −(first-order cost + xᵀCx), and −inf where the budget cannot be met."""
    t_head, t_embed = space.head.drops(genome[..., 0]), space.embed.drops(genome[..., 1])
    t_mlp, feasible = space.mlp_drops_for_budget(t_head, t_embed)
    x = space.fractions(t_head, t_mlp, t_embed)
    first = space.first_order_cost(t_head, t_mlp, t_embed)
    inter = interaction_cost(x, interaction)
    fitness = torch.where(feasible, -(first + inter), -math.inf)
    return {'t_head': t_head, 't_mlp': t_mlp, 't_embed': t_embed, 'x': x, 'first_order': first,
            'interaction': inter, 'fitness': fitness, 'feasible': feasible}


def _push_to_feasible(space, genome, top, interaction, steps: int = 30):
    """Move infeasible candidates towards the most-pruned corner until they meet the budget
    (bisection on the segment; the corner itself is feasible, checked by the pruner)."""
    lo, hi = torch.zeros(len(genome), dtype=torch.float64), torch.ones(len(genome), dtype=torch.float64)
    for _ in range(steps):
        mid = (lo + hi) / 2
        ok = evaluate(space, genome + mid[:, None] * (top - genome), interaction)['feasible']
        hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid)
    return genome + hi[:, None] * (top - genome)


def _initial_population(space, size, top, gen, interaction, rounds: int = 20):
    """Uniform draws in the box, infeasible ones rejected; if the feasible region is too small
    to fill the population that way, the rest are pushed onto it."""
    kept, draws = [], None
    for _ in range(rounds):
        draws = torch.rand(max(4 * size, 64), 2, generator=gen, dtype=torch.float64) * top
        kept.append(draws[evaluate(space, draws, interaction)['feasible']])
        if sum(len(k) for k in kept) >= size:
            break
    pop = torch.cat(kept)[:size]
    if len(pop) < size:
        pop = torch.cat([pop, _push_to_feasible(space, draws[:size - len(pop)], top, interaction)])
    return pop


def _children(pop, n, top, gen, sigma: float = 0.1):
    """Half by Gaussian mutation of one parent (σ = 0.1 of each fraction's range), half by
    uniform crossover of two parents; clipped to the box."""
    n_mut = n // 2
    parents = pop[torch.randint(len(pop), (n_mut,), generator=gen)]
    mutants = parents + torch.randn(n_mut, 2, generator=gen, dtype=torch.float64) * sigma * top
    a = pop[torch.randint(len(pop), (n - n_mut,), generator=gen)]
    b = pop[torch.randint(len(pop), (n - n_mut,), generator=gen)]
    crossed = torch.where(torch.rand(n - n_mut, 2, generator=gen) < 0.5, a, b)
    return torch.minimum(torch.cat([mutants, crossed]).clamp_min(0), top)


def _select(space, genome, size, interaction):
    """The best `size` feasible candidates, one per realised (t_head, t_embed)."""
    ev = evaluate(space, genome, interaction)
    order = torch.argsort(ev['fitness'], descending=True, stable=True)
    order = order[ev['feasible'][order]]
    key = ev['t_head'][order] * (space.embed.max_drop + 1) + ev['t_embed'][order]
    _, inverse = torch.unique(key, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1 if len(inverse) else 0,), len(order), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(order)), reduce='amin')
    return genome[order[torch.sort(first).values[:size]]], int((~ev['feasible']).sum())


def evolutionary_search(space: SaViTSpace, cfg: SaViTConfig,
                        interaction: Optional[torch.Tensor] = None) -> Dict:
    """BASELINES.md SaViT: population, children by mutation / crossover, keep the best, for
    `generations` rounds. On the CPU in float64 from a seeded generator, so every process of
    a distributed run (holding the same all-reduced scores) finds the same result."""
    gen = torch.Generator().manual_seed(cfg.seed)
    top = torch.tensor([space.head.max_drop / space.head.total,
                        space.embed.max_drop / space.embed.total], dtype=torch.float64)
    pop = _initial_population(space, cfg.population, top, gen, interaction)
    evaluated, rejected = len(pop), 0
    pop, _ = _select(space, pop, cfg.population, interaction)
    for _ in range(cfg.generations):
        kids = _children(pop, cfg.children, top, gen)
        pop, bad = _select(space, torch.cat([pop, kids]), cfg.population, interaction)
        evaluated, rejected = evaluated + len(kids), rejected + bad
    ev = evaluate(space, pop[:1], interaction)
    t = (ev['t_head'][0], ev['t_mlp'][0], ev['t_embed'][0])
    heads, hidden, embed = space.counts(*t)
    return {
        'x': ev['x'][0].tolist(), 'components': list(COMPONENTS), 'fitness': float(ev['fitness'][0]),
        'first_order_cost': float(ev['first_order'][0]), 'interaction_cost': float(ev['interaction'][0]),
        'dropped': [int(v) for v in t],
        'kept_heads': heads.long().tolist(), 'kept_hidden': hidden.long().tolist(),
        'kept_embed': int(embed),
        'kept_params': int(space.cost(*t, kind='params')), 'kept_flops': int(space.cost(*t, kind='flops')),
        'dense': int(space.dense), 'budget': space.budget, 'budget_kind': space.kind,
        'evaluated': evaluated, 'rejected_children': rejected,
    }


# ---- the pruner -------------------------------------------------------------------------------
class SaViTPruner(Pruner):
    one_shot = True  # Taylor scores without weight updates, the search, the cut

    def __init__(self, model, num_classes: int, config: SaViTConfig, schedule=None,
                 on_update: Optional[Callable[[Record], None]] = None):
        self.cfg, self.schedule, self.on_update = config, schedule, on_update
        self.num_classes = num_classes
        self.shape = ViTShape.from_model(model)
        model.add_gates(names=SAVIT_GATES, embed=True)
        self.model, self.module = model, PrunerModule(model)
        self.taylor = TaylorScore(self._gates())
        self.interaction: Optional[torch.Tensor] = None
        self.search_result: Optional[dict] = None
        self._check_budget_reachable()

    def _gates(self) -> Dict[str, torch.nn.Parameter]:
        gates = {f'{l}.{n}': b.gates[n] for l, b in enumerate(self.model.blocks) for n in SAVIT_GATES}
        gates['embed'] = self.model.embed_gate.mask
        return gates

    def _groups(self) -> List[List[torch.nn.Parameter]]:
        """The gates of each component type, in COMPONENTS order."""
        blocks = self.model.blocks
        return [[b.gates[HEAD_GATE] for b in blocks], [b.gates['mlp_hid'] for b in blocks],
                [self.model.embed_gate.mask]]

    def _check_budget_reachable(self):
        """Fail before any scoring if even the most pruned model (min_keep of every type)
        exceeds the budget."""
        s, cfg = self.shape, self.cfg
        k = [min(n, min_keep_count(cfg.min_keep, n)) for n in (s.num_heads, s.mlp_hidden, s.embed_dim)]
        least = float(s.cost(cfg.budget, torch.full((s.depth,), k[0]), torch.full((s.depth,), k[1]),
                             torch.tensor(k[2])))
        dense = float(s.cost(cfg.budget, *s.dense_counts()))
        if least > (1 - cfg.prune_ratio) * dense:
            raise ConfigError('prune_ratio', f'{cfg.prune_ratio} is out of reach for SaViT: keeping '
                                             f'{cfg.min_keep:.0%} of each layer still leaves '
                                             f'{least / dense:.3f} of the {cfg.budget}')

    # ---- scores ------------------------------------------------------------------------------
    def score_batches(self, batches_per_epoch: int) -> int:
        return max(1, math.ceil(self.cfg.score_fraction * batches_per_epoch))

    def step(self, grad_scale: float = 1.0) -> None:
        """After a backward pass: add (g·∂L/∂g)² of every gate (Taylor FO), then clear the
        gate gradients (no optimizer holds the gates, so nothing else would). In a distributed
        run the gate gradients are first averaged over processes, as DDP averages gradients
        (the scoring pass runs outside DDP's all-reduce: engine.accumulate_scores)."""
        gates = self._gates()
        _average_over_processes([g.grad for g in gates.values()])
        self.taylor.accumulate(gates, grad_scale)
        for g in gates.values():
            g.grad = None

    def calibrate(self, batches, criterion, max_batches: int = 4) -> None:
        """With `use_interaction`: the interaction matrix C on the first `max_batches` batches."""
        if self.cfg.use_interaction:
            taken = []
            for batch in batches:
                taken.append(batch)
                if len(taken) == max_batches:
                    break
            C = self.estimate_interaction(taken, criterion)
            print('SaViT interaction matrix (heads, mlp, embed):', C.tolist())

    def scores(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean Taylor scores: heads (L, H), hidden neurons (L, M), embedding channels (D,)."""
        L = self.shape.depth
        return (torch.stack([self.taylor.mean(f'{l}.{HEAD_GATE}') for l in range(L)]).cpu(),
                torch.stack([self.taylor.mean(f'{l}.mlp_hid') for l in range(L)]).cpu(),
                self.taylor.mean('embed').cpu())

    def estimate_interaction(self, batches: Sequence, criterion) -> torch.Tensor:
        """C[i, j] = 1ᵀ H_ij 1 / (n_i · n_j), the Hessian of the loss in the gates summed over
        the units of types i and j and normalised by their sizes (BASELINES.md SaViT), averaged
        over `batches` and processes. H_ij 1 comes from a Hessian-vector product: the gradient
        of (1ᵀ ∂L/∂g_j) with respect to the gates. Runs on the unwrapped model (DDP does not
        support double backward) with unfused attention (the fused kernels have none either).
        Runs in eval mode (drop-path would make C random) and restores the mode after."""
        groups = self._groups()
        gates = [g for grp in groups for g in grp]
        bounds = torch.tensor([0] + [len(grp) for grp in groups]).cumsum(0).tolist()
        sizes = [sum(g.numel() for g in grp) for grp in groups]
        fused = {m: m.fused_attn for m in self.model.modules() if hasattr(m, 'fused_attn')}
        C = torch.zeros(3, 3, dtype=torch.float64)
        was_training = self.model.training
        try:
            self.model.eval()
            for m in fused:
                m.fused_attn = False
            for images, targets in batches:
                loss = criterion(self.model(images), targets)
                grads = torch.autograd.grad(loss, gates, create_graph=True)
                for j in range(3):
                    g_sum = sum(g.sum() for g in grads[bounds[j]:bounds[j + 1]])
                    hv = torch.autograd.grad(g_sum, gates, retain_graph=j < 2, allow_unused=True)
                    for i in range(3):
                        s = sum(h.detach().double().sum() for h in hv[bounds[i]:bounds[i + 1]]
                                if h is not None)
                        C[i, j] += float(s) / (sizes[i] * sizes[j])
        finally:
            self.model.train(was_training)
            for m, f in fused.items():
                m.fused_attn = f
        C /= max(len(batches), 1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            dev = self.model.pos_embed.device  # every family has it; not every one a class token
            C_dev = C.to(dev)
            torch.distributed.all_reduce(C_dev)
            C = C_dev.cpu() / torch.distributed.get_world_size()
        self.interaction = C
        return C

    # ---- search and cut ------------------------------------------------------------------
    def space(self) -> SaViTSpace:
        return SaViTSpace(self.shape, *self.scores(), self.cfg.budget, self.cfg.prune_ratio,
                          self.cfg.min_keep)

    def search(self) -> dict:
        """The evolutionary search on the current (local) scores; changes nothing."""
        if self.taylor.count == 0:
            raise RuntimeError('SaViT has no Taylor scores: call step() after backward passes')
        C = self.interaction if self.cfg.use_interaction else None
        if self.cfg.use_interaction and C is None:
            raise RuntimeError('use_interaction is set but estimate_interaction() was not run')
        return evolutionary_search(self.space(), self.cfg, C)

    @torch.no_grad()
    def finalize(self):
        """All-reduce the scores, search, threshold each type globally, binarise, cut.

        Returns (cut_model, rows): one row per sub-block ('attn0', 'mlp0', …) and one 'embed'
        row for the parameters outside the blocks (patch embedding, tokens, final norm, head)."""
        self.taylor.all_reduce()
        space = self.space()
        result = self.search()
        t_head, t_mlp, t_embed = result['dropped']
        masks = [space.head.keep_mask(t_head), space.mlp.keep_mask(t_mlp), space.embed.keep_mask(t_embed)[0]]
        for grp, mask in zip(self._groups()[:2], masks[:2]):
            for g, m in zip(grp, mask):
                g.copy_(m.to(g))
        self.model.embed_gate.mask.copy_(masks[2].to(self.model.embed_gate.mask))
        check_masks_consistent(list(self._gates().values()))
        rows = self._rows(result)
        cut = cut_model(self.model)
        self.model.remove_gates()
        counted = sum(p.numel() for p in cut.parameters())
        if counted != result['kept_params']:  # the closed form and the cut must agree exactly
            raise RuntimeError(f'SaViT: cut model has {counted} parameters, closed form {result["kept_params"]}')
        self.search_result = result
        self.emit(Record(result, {f'pruning/{k}': v for k, v in result.items()
                                  if isinstance(v, (int, float)) and not isinstance(v, bool)}))
        return cut, rows

    def _rows(self, result: dict) -> List[dict]:
        s = self.shape
        attn_d, mlp_d, rest_d = s.parts('params', *s.dense_counts())
        attn_k, mlp_k, rest_k = s.parts('params', torch.tensor(result['kept_heads']),
                                         torch.tensor(result['kept_hidden']),
                                         torch.tensor(result['kept_embed']))
        rows = []
        for l in range(s.depth):
            for name, dense, kept in (('attn', attn_d[l], attn_k[l]), ('mlp', mlp_d[l], mlp_k[l])):
                rows.append(summary_row(f'{name}{l}', int(dense), int(kept)))
        rows.append(summary_row('embed', int(rest_d), int(rest_k)))
        return rows

    # ---- checkpointing ------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {'taylor': self.taylor.state_dict(), 'interaction': self.interaction,
                'search_result': self.search_result}

    def load_state_dict(self, sd: dict):
        self.taylor.load_state_dict(sd['taylor'])
        self.interaction = sd.get('interaction')
        self.search_result = sd.get('search_result')


@torch.no_grad()
def _average_over_processes(grads: List[Optional[torch.Tensor]]):
    """The mean of `grads` over processes, in place and in one all-reduce, computed as DDP does
    (each scaled by 1 / world, then summed), so that the scores equal those of gradients that
    DDP averaged. Nothing when one is missing (TaylorScore.accumulate skips that step)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
            any(g is None for g in grads):
        return
    flat = torch.cat([g.flatten() for g in grads]).mul_(1 / torch.distributed.get_world_size())
    torch.distributed.all_reduce(flat)
    for g, v in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(v.view_as(g))
