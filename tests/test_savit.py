"""SaViT baseline (BASELINES.md "SaViT", pruning/savit.py): exact kept params / FLOPs, budget,
search against a brute-force grid, global thresholds, cut exactness, interaction matrix.

Expected values are computed here from the spec (own loops over layers, `numel` of real
modules, torch's FLOP counter), not taken from the implementation. Scores are random or come
from a few backward passes on random tensors; the model is the micro ViT (width 64, depth 4,
4 heads, MLP 256, 32 px, patch 4, 10 classes).
"""
import math
import time

import pytest
import torch
import torch.nn.functional as F

import models  # noqa: F401  (registers deit_micro_patch4_32)
from conftest import micro
from families import FAMILIES, ours
import pruning.savit as savit
from models import HEAD_GATE
from pruning import cut_model
from pruning.cost import ViTShape, count_flops
from pruning.random_scores import fill_random_scores
from pruning.savit import (SaViTConfig, SaViTPruner, SaViTSpace, evaluate,
                           evolutionary_search, min_keep_count)

MICRO = 'deit_micro_patch4_32'
D, L, H, M, C, IMG = 64, 4, 4, 256, 10, 32
SMALL_SEARCH = dict(population=16, children=12, generations=12)


def n_params(m):
    return m.num_parameters()


def batch(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, IMG, IMG, generator=g), torch.randint(0, C, (n,), generator=g)


def set_random_scores(pruner, seed=0):
    """Positive, heavy-tailed scores, as Taylor scores are."""
    fill_random_scores(pruner, seed, heavy_tailed=True)


def pruner_for(prune_ratio=0.5, seed=0, model=None, **kw):
    cfg = SaViTConfig(prune_ratio=prune_ratio, **{**SMALL_SEARCH, **kw})
    p = SaViTPruner(micro() if model is None else model, C, cfg)
    set_random_scores(p, seed)
    return p


# ---------------------------------------------------------------- counting, written from the spec

def spec_params(heads, hidden, E, d=D // H, N=(IMG // 4) ** 2 + 1, patch_in=3 * 4 * 4, classes=C):
    """Parameters of a cut micro ViT with kept heads / hidden neurons per layer and E channels."""
    n = E * patch_in + E + E + N * E + 2 * E + E * classes + classes  # patch, cls, pos, norm, head
    for h, m in zip(heads, hidden):
        if h:
            n += E * 3 * h * d + 3 * h * d + h * d * E + E + 2 * E     # qkv, proj, norm1
        if m:
            n += E * m + m + m * E + E + 2 * E                         # fc1, fc2, norm2
    return n


def random_pattern(g, allow_empty=False):
    lo = 0 if allow_empty else 1
    heads = [int(torch.randint(lo, H + 1, (1,), generator=g)) for _ in range(L)]
    hidden = [int(torch.randint(lo, M + 1, (1,), generator=g)) for _ in range(L)]
    return heads, hidden, int(torch.randint(1, D + 1, (1,), generator=g))


def gate_pattern(model, heads, hidden, E, g):
    """Random kept sets of the given sizes on the model's SaViT gates."""
    with torch.no_grad():
        for blk, h, m in zip(model.blocks, heads, hidden):
            blk.gates[HEAD_GATE].zero_()[torch.randperm(H, generator=g)[:h]] = 1
            blk.gates['mlp_hid'].zero_()[torch.randperm(M, generator=g)[:m]] = 1
        model.embed_gate.mask.zero_()[torch.randperm(D, generator=g)[:E]] = 1


def test_closed_form_counts_equal_the_real_cut_model():
    shape = ViTShape.from_model(micro())
    dense = shape.dense_counts()
    assert int(shape.cost('params', *dense)) == n_params(micro()) == spec_params([H] * L, [M] * L, D)
    assert int(shape.cost('flops', *dense)) == count_flops(micro(), IMG)
    g = torch.Generator().manual_seed(0)
    for trial in range(6):
        model = micro(trial)
        model.add_gates(names=(HEAD_GATE, 'mlp_hid'), embed=True)
        heads, hidden, E = random_pattern(g, allow_empty=trial >= 4)  # whole sub-blocks removed too
        gate_pattern(model, heads, hidden, E, g)
        cut = cut_model(model)
        counts = (torch.tensor(heads), torch.tensor(hidden), torch.tensor(E))
        assert int(shape.cost('params', *counts)) == n_params(cut) == spec_params(heads, hidden, E)
        assert int(shape.cost('flops', *counts)) == count_flops(cut, IMG)


@pytest.mark.parametrize('family', FAMILIES)
def test_closed_form_counts_equal_the_real_cut_model_on_every_family(family):
    """ViTShape knows each family: registers, the position rows of no_embed_class, norm_pre,
    norm or fc_norm, LayerScale's γ (narrowed with the embedding), qk_norm, qkv without bias."""
    shape = ViTShape.from_model(ours(family))
    assert int(shape.cost('params', *shape.dense_counts())) == n_params(ours(family))
    assert int(shape.cost('flops', *shape.dense_counts())) == count_flops(ours(family), IMG)
    g = torch.Generator().manual_seed(1)
    for trial in range(3):
        model = ours(family, seed=trial)
        model.add_gates(names=(HEAD_GATE, 'mlp_hid'), embed=True)
        heads, hidden, E = random_pattern(g, allow_empty=trial == 2)
        gate_pattern(model, heads, hidden, E, g)
        cut = cut_model(model)
        counts = (torch.tensor(heads), torch.tensor(hidden), torch.tensor(E))
        assert int(shape.cost('params', *counts)) == n_params(cut), (heads, hidden, E)
        assert int(shape.cost('flops', *counts)) == count_flops(cut, IMG)


# ---------------------------------------------------------------- budget

@pytest.mark.parametrize('budget', ['params', 'flops'])
@pytest.mark.parametrize('pr', [0.3, 0.5, 0.75, 0.9])
def test_search_never_returns_a_candidate_over_budget(budget, pr):
    p = pruner_for(pr, seed=int(pr * 10), budget=budget)
    r = p.search()
    dense = n_params(micro()) if budget == 'params' else count_flops(micro(), IMG)
    assert r['dense'] == dense and r['budget'] == pytest.approx((1 - pr) * dense)
    kept = spec_params(r['kept_heads'], r['kept_hidden'], r['kept_embed'])
    assert kept == r['kept_params']
    assert r[f'kept_{budget}'] <= (1 - pr) * dense
    assert min(r['kept_heads']) >= 1 and min(r['kept_hidden']) >= min_keep_count(0.05, M)
    assert all(0 <= x < 1 for x in r['x'])


def test_infeasible_candidates_are_rejected():
    """Candidates that keep every head and channel cannot meet a 0.9 budget: fitness −inf,
    and the search still returns a feasible one."""
    p = pruner_for(0.9)
    space = p.space()
    ev = evaluate(space, torch.zeros(3, 2, dtype=torch.float64), None)
    assert not ev['feasible'].any() and torch.isinf(ev['fitness']).all()
    r = evolutionary_search(space, p.cfg)
    assert r['kept_params'] <= r['budget']


def test_initial_population_is_feasible_at_the_edge_of_reach():
    """A budget just above the most pruned model: random draws almost never meet it, the
    population is filled anyway and every member meets the budget."""
    k_hid, k_emb = min_keep_count(0.05, M), min_keep_count(0.05, D)
    least = spec_params([1] * L, [k_hid] * L, k_emb)
    pr = 1 - 1.001 * least / spec_params([H] * L, [M] * L, D)
    p = pruner_for(pr)
    space = p.space()
    top = torch.tensor([space.head.max_drop / space.head.total, space.embed.max_drop / space.embed.total],
                       dtype=torch.float64)
    pop = savit._initial_population(space, 16, top, torch.Generator().manual_seed(0), None)
    assert len(pop) == 16 and evaluate(space, pop, None)['feasible'].all()
    r = p.search()
    assert least <= r['kept_params'] <= r['budget']


@pytest.mark.parametrize('pr', [0.5, 0.75])
def test_cut_model_meets_the_params_budget(pr):
    p = pruner_for(pr)
    dense = n_params(p.model)
    cut, rows = p.finalize()
    kept = n_params(cut)
    assert 0.99 * (1 - pr) * dense <= kept <= (1 - pr) * dense
    assert sum(r['kept_params'] for r in rows) == kept == p.search_result['kept_params']
    assert sum(r['dense_params'] for r in rows) == dense
    assert [r['sub_block'] for r in rows] == [f'{k}{l}' for l in range(L) for k in ('attn', 'mlp')] + ['embed']
    assert cut.embed_dim == p.search_result['kept_embed']
    assert [b.attn.num_heads for b in cut.blocks] == p.search_result['kept_heads']
    assert [b.mlp.fc1.out_features for b in cut.blocks] == p.search_result['kept_hidden']


def test_unreachable_budget_and_bad_config_raise():
    with pytest.raises(ValueError, match='out of reach'):
        SaViTPruner(micro(), C, SaViTConfig(prune_ratio=0.99, min_keep=0.5))
    for bad in (dict(prune_ratio=0), dict(prune_ratio=1), dict(prune_ratio=0.5, budget='macs'),
                dict(prune_ratio=0.5, population=0), dict(prune_ratio=0.5, min_keep=1)):
        with pytest.raises(ValueError):
            SaViTConfig(**bad)


# ---------------------------------------------------------------- search against a brute-force grid

def spec_drop_order(scores, min_keep):
    """Global order in which units are dropped: each layer's best ceil(min_keep·n) (≥ 1) are
    protected, the rest go lowest score first (ties: lower layer, then lower index)."""
    layers, n = len(scores), len(scores[0])
    k = max(1, math.ceil(round(min_keep * n, 9)))
    protected = set()
    for l in range(layers):
        best = sorted(range(n), key=lambda j: (-scores[l][j], j))[:k]
        protected |= {(l, j) for j in best}
    free = [(l, j) for l in range(layers) for j in range(n) if (l, j) not in protected]
    return sorted(free, key=lambda u: (scores[u[0]][u[1]], u[0], u[1]))


def spec_prefix(order, scores, layers):
    """For t = 0 … len(order): dropped count per layer and dropped share of the total score."""
    total = sum(sum(r) for r in scores)
    counts, share = [[0] * layers], [0.0]
    for l, j in order:
        c = list(counts[-1])
        c[l] += 1
        counts.append(c)
        share.append(share[-1] + scores[l][j] / total)
    return counts, share


def grid_best_first_order(p):
    """min over every realisable (heads dropped, channels dropped) of the first-order cost,
    the MLP dropping the fewest units that meet the budget; own loops throughout."""
    hs, ms, es = p.scores()
    hs, ms, es = hs.tolist(), ms.tolist(), [es.tolist()]
    (hc, hsh), (mc, msh), (ec, esh) = (spec_prefix(spec_drop_order(s, 0.05), s, len(s)) for s in (hs, ms, es))
    budget = (1 - p.cfg.prune_ratio) * spec_params([H] * L, [M] * L, D)
    best = math.inf
    for th in range(len(hc)):
        heads = [H - c for c in hc[th]]
        for te in range(len(ec)):
            E = D - ec[te][0]

            def params(tm):
                return spec_params(heads, [M - c for c in mc[tm]], E)
            if params(len(mc) - 1) > budget:
                continue  # infeasible even with the MLP at its minimum
            lo, hi = 0, len(mc) - 1
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if params(mid) <= budget else (mid + 1, hi)
            best = min(best, hsh[th] + msh[lo] + esh[te])
    return best


@pytest.mark.parametrize('pr,seed', [(0.5, 1), (0.75, 2)])
def test_first_order_search_matches_brute_force_grid(pr, seed):
    p = pruner_for(pr, seed=seed, population=20, children=16, generations=20)
    r = p.search()
    assert r['fitness'] == pytest.approx(-r['first_order_cost']) and r['interaction_cost'] == 0
    assert r['first_order_cost'] <= grid_best_first_order(p) + 1e-9


def test_search_is_deterministic_given_the_seed():
    a, b = pruner_for(0.5).search(), pruner_for(0.5).search()
    assert a == b


# ---------------------------------------------------------------- global thresholds

def test_thresholds_are_global_with_min_keep():
    p = pruner_for(0.6, seed=3)
    with torch.no_grad():  # layer 0's hidden neurons all score low: only min_keep saves some
        p.taylor.sum['0.mlp_hid'] *= 1e-6
    r = p.search()
    space = p.space()
    k_min = min_keep_count(0.05, M)
    for comp, scores, t in ((space.head, p.scores()[0], r['dropped'][0]),
                            (space.mlp, p.scores()[1], r['dropped'][1]),
                            (space.embed, p.scores()[2].view(1, -1), r['dropped'][2])):
        keep = comp.keep_mask(t)
        assert int((~keep).sum()) == t
        n = scores.shape[1]
        forced = torch.zeros_like(keep)
        for l in range(scores.shape[0]):
            k = max(1, math.ceil(round(0.05 * n, 9)))
            assert int(keep[l].sum()) >= k
            top = torch.argsort(scores[l], descending=True, stable=True)[:k]
            forced[l, top] = True
        if t:  # every kept unit not forced in by min_keep scores at least as high as every dropped one
            assert scores[keep & ~forced].min() >= scores[~keep].max()
    assert r['kept_hidden'][0] == k_min


# ---------------------------------------------------------------- the cut is exact

@pytest.mark.parametrize('family', [None, *FAMILIES])
def test_cut_logits_equal_binarised_gated_logits(monkeypatch, family):
    """The micro model, and each family (the embedding gate through registers, norm_pre,
    fc_norm, LayerScale and qk_norm)."""
    model = micro(5) if family is None else ours(family, seed=5)
    p = SaViTPruner(model, C, SaViTConfig(prune_ratio=0.5, **SMALL_SEARCH))
    for s in range(2):  # real scores from a few backward passes
        x, y = batch(s)
        logits, aux = p.module(x)  # the protocol's (logits, aux); SaViT has no aux
        F.cross_entropy(logits, y).backward()
        p.step()
        model.zero_grad()
    assert all(g.grad is None for g in model.gate_parameters())
    x, _ = batch(9, n=3)
    seen = {}

    def recording_cut(gated):
        gated.eval()
        assert all(bool(((g == 0) | (g == 1)).all()) for g in gated.gate_parameters())
        with torch.no_grad():
            seen['gated'] = gated(x)
        return cut_model(gated)

    monkeypatch.setattr(savit, 'cut_model', recording_cut)
    cut, _ = p.finalize()
    cut.eval()
    with torch.no_grad():
        logits = cut(x)
    assert p.search_result['kept_embed'] < D  # the embedding really is narrower
    torch.testing.assert_close(logits, seen['gated'], atol=1e-4, rtol=0)
    assert isinstance(model.embed_gate, torch.nn.Identity) and model.blocks[0].gates == {}


# ---------------------------------------------------------------- interaction matrix

def test_estimate_interaction_and_its_effect_on_fitness():
    model = micro(7)
    p = SaViTPruner(model, C, SaViTConfig(prune_ratio=0.5, use_interaction=True, **SMALL_SEARCH))
    set_random_scores(p, 7)
    Cm = p.estimate_interaction([batch(0), batch(1)], F.cross_entropy)
    assert Cm.shape == (3, 3) and torch.isfinite(Cm).all() and Cm.abs().max() > 0
    assert (Cm - Cm.T).abs().max() <= 1e-3 * Cm.abs().max() + 1e-9
    assert p.interaction is Cm and all(g.grad is None for g in model.gate_parameters())

    r = p.search()
    x = torch.tensor(r['x'], dtype=torch.float64)
    assert r['interaction_cost'] == pytest.approx(float(x @ Cm @ x))
    assert r['fitness'] == pytest.approx(-(r['first_order_cost'] + r['interaction_cost']))

    first_only = pruner_for(0.5, seed=7).search()
    assert first_only['x'][2] > 0  # the first-order search prunes some channels here
    p.interaction = torch.diag(torch.tensor([0., 0., 1e3], dtype=torch.float64))
    steered = p.search()  # a huge cost on pruning channels: the search keeps them
    assert steered['x'][2] < first_only['x'][2]
    assert steered['kept_params'] <= steered['budget']


def test_use_interaction_needs_the_matrix():
    p = pruner_for(0.5, use_interaction=True)
    with pytest.raises(RuntimeError, match='estimate_interaction'):
        p.search()


# ---------------------------------------------------------------- checkpointing and speed

def test_state_dict_round_trip():
    p = pruner_for(0.5, seed=4)
    p.interaction = torch.eye(3, dtype=torch.float64)
    q = pruner_for(0.5, seed=5)
    q.load_state_dict(p.state_dict())
    assert q.taylor.count == p.taylor.count and torch.equal(q.interaction, p.interaction)
    assert all(torch.equal(q.taylor.sum[k], v) for k, v in p.taylor.sum.items())


def test_default_search_is_fast_on_deit_small_sizes():
    """12 layers × 6 heads, 1536 hidden, 384 channels, the official 100 / 50 / 100 search."""
    shape = ViTShape(depth=12, num_heads=6, head_dim=64, mlp_hidden=1536, embed_dim=384,
                     num_patches=196, num_classes=1000, patch_in=768, patch_bias=True,
                     num_prefix_tokens=1, num_classifiers=1)
    g = torch.Generator().manual_seed(0)
    cfg = SaViTConfig(prune_ratio=0.5)
    space = SaViTSpace(shape, torch.rand(12, 6, generator=g), torch.rand(12, 1536, generator=g),
                       torch.rand(384, generator=g), 'params', 0.5, 0.05)
    start = time.perf_counter()
    r = evolutionary_search(space, cfg)
    assert time.perf_counter() - start < 10
    assert 0.99 * r['budget'] <= r['kept_params'] <= r['budget']
    assert int(space.dense) == 22_050_664  # deit_small_patch16_224's parameter count
