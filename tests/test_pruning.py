"""The pruning package against METHOD.md §2–§7: κ water-filling, block importance, schedule,
soft masks, threshold search, cut exactness, Taylor scores, ΔΨ heads, gates vs optimizer,
checkpoint round trip, config checks.

Expected values are computed in the tests from the spec (own loops, `numel` of real modules),
not copied from the implementation. The repository root is on sys.path via conftest.py.
"""
import math

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2, param_groups_weight_decay

import models  # noqa: F401  (registers deit_micro_patch4_32)
from conftest import micro, o1_weights, round_trip
from models import GATE_NAMES, is_gate
from pruning import DepthAwarePruner, PruneSchedule, cut_model
from pruning.gates import gates_of, kept_params, non_block_params, sub_blocks
from pruning.keep_ratio import block_budget, block_importance, water_fill
from pruning.random_scores import fill_random_scores
from pruning.taylor import TaylorScore, soft_mask, sub_block_masks, threshold_search


def PruneConfig(**kw):
    """The method as METHOD.md has it: kept widths not rounded (the library's default rounds
    them to multiples of 8, for GPU kernels; test_round_to_* tests that)."""
    from pruning import PruneConfig
    return PruneConfig(**{'round_to': 1, **kw})

MICRO = 'deit_micro_patch4_32'  # width 64, depth 4, 4 heads, mlp 256, 32 px, patch 4
D, L, H, M, C = 64, 4, 4, 256, 10


def batch(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, C, (n,), generator=g)


# ---------------------------------------------------------------- §2 counting, written from the spec

def spec_params(kind, a, b, c, heads=H):
    """§2: Linear a->b keeps a·b + b, LayerNorm 2·|in|; an empty gate removes the sub-block."""
    if min(a, b, c) == 0:
        return 0
    if kind == 'attn':
        qkv = a * (3 * heads * b) + 3 * heads * b
        proj = (heads * b) * c + c
    else:
        qkv = a * b + b          # fc1
        proj = b * c + c         # fc2
    return qkv + proj + 2 * a


def element_cost(kind, counts, sizes):
    """The largest change of the sub-block's params from adding or removing one element of
    any gate, starting from `counts` (what one element costs under these masks)."""
    base = spec_params(kind, *counts)
    cost = 0
    for g in range(3):
        for step in (-1, 1):
            k = list(counts)
            k[g] += step
            if 0 <= k[g] <= sizes[g]:
                cost = max(cost, abs(spec_params(kind, *k) - base))
    return cost


def brute_force_threshold(kind, sizes, importance, target):
    """Drop the t lowest (ties: lower index first) for every t; the first t with the smallest
    |params − target|, its error and the per-gate kept counts (before the empty-gate rule)."""
    imp = importance.tolist()
    order = sorted(range(len(imp)), key=lambda j: (imp[j], j))
    gate = [g for g, s in enumerate(sizes) for _ in range(s)]
    counts = list(sizes)
    best = (abs(spec_params(kind, *counts) - target), 0, tuple(counts))
    for t, j in enumerate(order, start=1):
        counts[gate[j]] -= 1
        err = abs(spec_params(kind, *counts) - target)
        if err < best[0]:
            best = (err, t, tuple(counts))
    return best


def gated_with_optimizer(seed=0, schedule=None, config=None, lr=1e-3):
    """Model, pruner and an AdamW built as main.py's build_optimizer does (gates excluded)."""
    model = micro(seed)
    schedule = schedule or PruneSchedule(steps_per_epoch=2, start_epoch=1, sparse_epoch=2,
                                         finalize_epoch=4, steps_update_mask=2)
    pruner = DepthAwarePruner(model, C, config or PruneConfig(prune_ratio=0.5), schedule)
    gate_ids = {id(p) for p in model.gate_parameters()}
    groups = param_groups_weight_decay(model, 0.05, model.no_weight_decay())
    for g in groups:
        g['params'] = [p for p in g['params'] if id(p) not in gate_ids]
    opt = create_optimizer_v2(groups + pruner.param_groups(5e-4, 0.05), opt='adamw', lr=lr,
                              weight_decay=0.05)
    return model, pruner, opt


def train_step(pruner, opt, x, y):
    """One step of engine.py's loop: main + head losses, optimizer step, pruner.step, zero_grad."""
    crit = torch.nn.CrossEntropyLoss()
    logits, aux = pruner.module(x)
    loss = crit(logits, y) + pruner.aux_loss(aux, y, crit)
    loss.backward()
    opt.step()
    record = pruner.step()
    opt.zero_grad()
    return record


def gate_values(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if is_gate(n)}


# ---------------------------------------------------------------- 1. water-filling and budget

@pytest.mark.parametrize('seed', range(6))
@pytest.mark.parametrize('n', [8, 24])
def test_water_fill_hits_budget(seed, n):
    g = torch.Generator().manual_seed(seed)
    skew = 3.0 if seed % 2 else 0.5          # odd seeds: heavy tails, clipping at 1 must happen
    imp = torch.exp(skew * torch.randn(n, generator=g, dtype=torch.float64))
    P = torch.randint(1_000, 100_000, (n,), generator=g).double()
    budget = float(P.sum()) * (0.2 + 0.6 * torch.rand(1, generator=g).item())
    kappa = water_fill(imp, P, budget)
    assert kappa.shape == (n,)
    assert ((kappa >= 0) & (kappa <= 1)).all()
    assert abs(float((kappa * P).sum()) - budget) < 1e-3 * budget
    # κ = clip(σ·I, 0, 1): one σ for all unclipped entries, and σ·I ≥ 1 where clipped
    free = kappa < 1
    sigma = kappa[free] / imp[free]
    assert torch.allclose(sigma, sigma[0].expand_as(sigma), rtol=1e-9)
    assert (sigma[0] * imp[~free] >= 1 - 1e-9).all()
    if skew > 1:
        assert (~free).any(), 'the skewed case should clip some κ at 1'


def test_water_fill_zero_importance_and_full_budget():
    P = torch.tensor([100., 200., 300., 400.], dtype=torch.float64)
    imp = torch.tensor([1.0, 0.0, 2.0, 0.5], dtype=torch.float64)
    kappa = water_fill(imp, P, 300.)
    assert kappa[1] == 0
    assert abs(float((kappa * P).sum()) - 300.) < 1e-6
    # expected by hand: σ·(100·1 + 300·2 + 400·0.5) = 300
    sigma = 300. / (100 * 1 + 300 * 2 + 400 * 0.5)
    assert torch.allclose(kappa, torch.tensor([sigma, 0, 2 * sigma, 0.5 * sigma], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    for seed in range(20):
        imp = torch.rand(4, generator=g, dtype=torch.float64) + 0.1
        assert torch.equal(water_fill(imp, P, 1.5 * float(P.sum())), torch.ones(4, dtype=torch.float64))
        # exactly ΣP: all ones up to rounding (the last free κ is rest / P)
        assert torch.allclose(water_fill(imp, P, float(P.sum())), torch.ones(4, dtype=torch.float64),
                              rtol=0, atol=1e-12)


def test_block_budget_and_dense_counts_match_the_model():
    model = micro()
    sbs = sub_blocks(model)
    block_numel = sum(p.numel() for n, p in model.named_parameters() if n.startswith('blocks.'))
    other_numel = sum(p.numel() for n, p in model.named_parameters() if not n.startswith('blocks.'))
    assert sum(sb.dense_params for sb in sbs) == block_numel
    assert non_block_params(model, sbs) == other_numel
    for sb in sbs:  # each sub-block's dense count from its own modules
        blk = model.blocks[sb.layer]
        mods = (blk.norm1, blk.attn) if sb.kind == 'attn' else (blk.norm2, blk.mlp)
        assert sb.dense_params == sum(p.numel() for m in mods for p in m.parameters())
    dense = [sb.dense_params for sb in sbs]
    pr = 0.37
    assert block_budget(dense, other_numel, pr) == pytest.approx(
        (1 - pr) * (block_numel + other_numel) - other_numel)
    assert block_budget(dense, other_numel, pr, block_params_only=True) == pytest.approx(
        (1 - pr) * block_numel)


@pytest.mark.parametrize('ramp_epochs', [0, 2])
def test_handcrafted_keep_ratios_are_used(ramp_epochs):
    kr = [1.0, 0.0, 0.5, 0.7, 0.3, 1.0, 0.9, 0.6]
    model = micro()
    schedule = PruneSchedule(steps_per_epoch=1, start_epoch=0, sparse_epoch=ramp_epochs,
                             finalize_epoch=4, steps_update_mask=1)
    pruner = DepthAwarePruner(model, C, PruneConfig(prune_ratio=0.5, keep_ratio_handcraft=kr), schedule)
    record = pruner.update_masks(0, tau=0.0)
    assert record['goal_keep_ratio'] == kr
    rho = 1.0 if ramp_epochs == 0 else 1 / ramp_epochs   # (0 + 1 − 0) / (sparse − 0)
    applied = [1 - (1 - k) * rho for k in kr]
    assert record['applied_keep_ratio'] == pytest.approx(applied, abs=1e-12)
    max_cost = max(element_cost(sb.kind, sb.gate_sizes, sb.gate_sizes) for sb in pruner.sbs)
    for sb, k_applied in zip(pruner.sbs, applied):
        counts = tuple(int((g >= 0.5).sum()) for g in gates_of(model, sb))
        kept = spec_params(sb.kind, *counts)
        assert record['kept_params'][sb.index] == kept
        target = k_applied * sb.dense_params
        if k_applied == 0:
            assert kept == 0
        elif k_applied == 1:
            assert kept == sb.dense_params
        else:  # within one element of its target, plus what the previous one carried over
            assert min(counts) > 0
            assert abs(kept - target) <= 2 * max_cost
    partial = [i for i, k in enumerate(applied) if 0 < k < 1]
    # the total of the partial sub-blocks lands within one element of the total of targets
    assert abs(sum(record['kept_params'][i] for i in partial)
               - sum(applied[i] * pruner.sbs[i].dense_params for i in partial)) <= max_cost
    non_block = sum(p.numel() for n, p in model.named_parameters() if not n.startswith('blocks.'))
    assert record['total_kept_params'] == sum(record['kept_params']) + non_block


# ---------------------------------------------------------------- 2. block importance (§4 steps 2–6)

def reference_importance(mean, kept, prev=None, s=10., gamma=0.2):
    sp = lambda v: math.log1p(math.exp(v))
    top = max(mean)
    imp = [s * v / top for v in mean]                                   # 2
    imp = [sp(1.4 * v) - sp(1.4 * v - s) for v in imp]                  # 3
    imp = [v / (k + 1e-6) if k > 0 else 0.0 for v, k in zip(imp, kept)]  # 4 (0 kept -> 0)
    avg = sum(imp) / len(imp)
    imp = [v / avg for v in imp]                                        # 5
    if prev is not None:
        imp = [gamma * v + (1 - gamma) * p for v, p in zip(imp, prev)]  # 6
    return [v if k > 0 else 0.0 for v, k in zip(imp, kept)]  # a removed sub-block stays removed


@pytest.mark.parametrize('seed', range(3))
def test_block_importance_matches_spec(seed):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(8, generator=g, dtype=torch.float64) + 0.3
    mean[0] = abs(mean[0]) + 0.5  # max > 0
    kept = torch.randint(1_000, 50_000, (8,), generator=g).double()
    prev = torch.rand(8, generator=g, dtype=torch.float64) * 2
    for s, gamma in ((10., 0.2), (4., 0.5)):
        got = block_importance(mean, kept, None, s, gamma)
        assert torch.allclose(got, torch.tensor(reference_importance(mean.tolist(), kept.tolist(), None, s, gamma),
                                                dtype=torch.float64), rtol=1e-10)
        assert got.mean().item() == pytest.approx(1.0)
        got = block_importance(mean, kept, prev, s, gamma)
        assert torch.allclose(got, torch.tensor(reference_importance(mean.tolist(), kept.tolist(),
                                                                     prev.tolist(), s, gamma),
                                                dtype=torch.float64), rtol=1e-10)


def test_block_importance_zero_kept_gets_zero():
    mean = torch.tensor([0.5, 0.0, 1.2, 0.3, 0.0], dtype=torch.float64)
    kept = torch.tensor([1000., 0., 2000., 500., 0.], dtype=torch.float64)
    got = block_importance(mean, kept, None)
    assert got[1] == 0 and got[4] == 0
    assert (got[[0, 2, 3]] > 0).all()
    assert torch.allclose(got, torch.tensor(reference_importance(mean.tolist(), kept.tolist()),
                                            dtype=torch.float64), rtol=1e-10)
    # momentum with a previous non-zero importance must not revive a removed sub-block
    got = block_importance(mean, kept, torch.ones(5, dtype=torch.float64))
    assert got[1] == 0 and got[4] == 0 and (got[[0, 2, 3]] > 0).all()


# ---------------------------------------------------------------- 3. schedule (§4 ramp, §5 τ, §6)

def test_schedule_ramp_tau_and_updates():
    spe, start, sparse, final, N = 10, 1, 3, 5, 4
    tmax, tmin = 0.1, 0.02
    s = PruneSchedule(steps_per_epoch=spe, start_epoch=start, sparse_epoch=sparse,
                      finalize_epoch=final, steps_update_mask=N, tau_max=tmax, tau_min=tmin)
    assert (s.step_start, s.step_sparse, s.step_final) == (10, 30, 50)
    active_seen = 0
    updates = []
    for step in range(70):
        rho = min(max((step + 1 - 10) / (30 - 10), 0.0), 1.0)
        assert s.ramp_progress(step) == pytest.approx(rho, abs=1e-12)
        if step + 1 <= 30:
            tau = tmax
        else:
            tau = tmax + (tmin - tmax) * min((step + 1 - 30) / (50 - 30), 1.0)
        assert s.tau(step) == pytest.approx(tau, abs=1e-12)
        active = 10 <= step < 50
        assert s.is_active(step) == active
        if active:
            active_seen += 1
        fires = active and active_seen % N == 0
        assert s.is_update(step) == fires
        if fires:
            updates.append(step)
    assert updates == [13, 17, 21, 25, 29, 33, 37, 41, 45, 49]
    # hand-picked points
    assert s.ramp_progress(9) == 0 and s.ramp_progress(19) == pytest.approx(0.5) and s.ramp_progress(29) == 1
    assert s.tau(29) == tmax and s.tau(39) == pytest.approx((tmax + tmin) / 2) and s.tau(49) == pytest.approx(tmin)


@pytest.mark.parametrize('kw', [dict(start_epoch=3, sparse_epoch=2, finalize_epoch=5),
                                dict(start_epoch=1, sparse_epoch=6, finalize_epoch=5),
                                dict(start_epoch=-1, sparse_epoch=2, finalize_epoch=5),
                                dict(steps_update_mask=0),
                                dict(steps_update_mask=-3)])
def test_schedule_rejects_bad_values(kw):
    with pytest.raises(ValueError):
        PruneSchedule(steps_per_epoch=10, **kw)


# ---------------------------------------------------------------- 4. soft mask (§5 step 5)

def test_soft_mask_levels_and_hard_count():
    n, t, tau = 20, 7, 0.125       # n·τ = 2.5: boundary at 7.5, positions 5 and 10 read 0.1 / 0.9
    m = soft_mask(n, t, tau)
    assert m.shape == (n,)
    assert m[5 - 1].item() == pytest.approx(0.1, abs=1e-9)
    assert m[10 - 1].item() == pytest.approx(0.9, abs=1e-9)
    assert (m[1:] > m[:-1]).all()                          # increasing in k
    for k in (1, 8, 13, 20):                               # the formula at other positions
        expect = 1 / (1 + math.exp(-math.log(9) * (k - t - 0.5) / (n * tau)))
        assert m[k - 1].item() == pytest.approx(expect, rel=1e-9)
    for n, tau in ((20, 0.125), (37, 0.1), (144, 0.03), (10, 1.0)):
        for t in (0, 1, n // 3, n - 1, n):
            assert int((soft_mask(n, t, tau) >= 0.5).sum()) == n - t
    hard = soft_mask(12, 5, 0.0)
    assert torch.equal(hard, torch.tensor([0.] * 5 + [1.] * 7, dtype=hard.dtype))


# ---------------------------------------------------------------- 5. threshold search (§5 step 4)

@pytest.mark.parametrize('seed', range(4))
def test_threshold_search_within_one_element(seed):
    g = torch.Generator().manual_seed(seed)
    model = micro()
    for sb in sub_blocks(model)[:2]:  # one attention, one MLP
        n = sum(sb.gate_sizes)
        for trial in range(6):
            imp = torch.rand(n, generator=g, dtype=torch.float64)
            if trial == 0:  # ties, as the percentiles × gate factors produce
                imp = (imp * 8).floor()
            target = sb.dense_params * (1 - torch.rand(1, generator=g).item())  # (0, P]
            if trial == 1:
                target = sb.dense_params * 0.01    # small enough to remove the sub-block
            best_err, best_t, counts = brute_force_threshold(sb.kind, sb.gate_sizes, imp, target)
            t, order = threshold_search(sb, imp, target)
            assert t == best_t
            masks = sub_block_masks(sb, imp, target, tau=0.0)
            hard = [m >= 0.5 for m in masks]
            kept = int(sb.params([h.sum() for h in hard]))
            got_counts = tuple(int(h.sum()) for h in hard)
            assert kept == spec_params(sb.kind, *got_counts)
            assert abs(kept - target) == pytest.approx(best_err, abs=1e-6)
            assert abs(kept - target) <= element_cost(sb.kind, counts, sb.gate_sizes)
            if min(counts) == 0:
                assert got_counts == (0, 0, 0)       # empty gate: whole sub-block removed
            else:
                assert got_counts == counts
                # the dropped ones are the t lowest (ties by concatenated index)
                dropped = torch.cat([~h for h in hard]).nonzero().flatten().tolist()
                lowest = sorted(range(n), key=lambda j: (imp[j].item(), j))[:best_t]
                assert sorted(dropped) == sorted(lowest)
            # soft masks at τ > 0 harden to the same masks
            soft = sub_block_masks(sb, imp, target, tau=0.1)
            assert all(torch.equal(s >= 0.5, h) for s, h in zip(soft, hard))


# ---------------------------------------------------------------- 6. counting = the cut model, exactly

def set_random_binary_masks(model, seed, remove=(1, 4)):
    """Masks from `sub_block_masks` at random targets (sub-blocks in `remove` get target 0)."""
    g = torch.Generator().manual_seed(seed)
    chosen = {}
    for sb in sub_blocks(model):
        imp = torch.rand(sum(sb.gate_sizes), generator=g, dtype=torch.float64)
        frac = 0.0 if sb.index in remove else 0.25 + 0.6 * torch.rand(1, generator=g).item()
        chosen[sb.index] = (imp, frac * sb.dense_params)
        with torch.no_grad():
            for gate, m in zip(gates_of(model, sb), sub_block_masks(sb, imp, frac * sb.dense_params, 0.0)):
                gate.copy_(m.to(gate))
    return chosen


@pytest.mark.parametrize('seed', [0, 1])
def test_kept_params_equal_cut_model_and_logits_match(seed):
    model = micro(seed)
    o1_weights(model, seed + 10)
    model.eval()
    x, _ = batch(seed + 20)
    with torch.no_grad():
        dense_logits = model(x)
    model.add_gates()
    sbs = sub_blocks(model)
    chosen = set_random_binary_masks(model, seed)
    counts = {sb.index: tuple(int((g >= 0.5).sum()) for g in gates_of(model, sb)) for sb in sbs}
    assert counts[1] == (0, 0, 0) and counts[4] == (0, 0, 0)
    partial = [i for i, c in counts.items() if all(0 < k < s for k, s in zip(c, sbs[i].gate_sizes))]
    assert len(partial) >= 3, counts  # the index paths of the cut are exercised
    for sb in sbs:  # binary gates
        assert all(((g == 0) | (g == 1)).all() for g in gates_of(model, sb))

    kept = kept_params(model, sbs)
    assert kept == [spec_params(sb.kind, *counts[sb.index]) for sb in sbs]
    non_block = sum(p.numel() for n, p in model.named_parameters() if not n.startswith('blocks.'))
    assert non_block_params(model, sbs) == non_block

    cut = cut_model(model).eval()
    assert sum(kept) + non_block_params(model, sbs) == sum(p.numel() for p in cut.parameters())
    assert not any(is_gate(n) for n, _ in cut.named_parameters())
    # removed sub-blocks are gone, with their modules
    arch = cut.arch()['blocks']
    assert arch[0]['mlp'] is None and arch[2]['attn'] is None
    assert cut.blocks[0].mlp is None and cut.blocks[2].attn is None  # the one removed state
    for sb in sbs:
        if sb.index not in (1, 4):
            assert arch[sb.layer][sb.kind] is not None
            blk = cut.blocks[sb.layer]
            mods = (blk.norm1, blk.attn) if sb.kind == 'attn' else (blk.norm2, blk.mlp)
            numel = sum(p.numel() for m in mods for p in m.parameters())
            assert numel == kept[sb.index]
            # the cut sub-block is the best achievable fit to its target (§5 step 4)
            imp, target = chosen[sb.index]
            best_err, _, best_counts = brute_force_threshold(sb.kind, sb.gate_sizes, imp, target)
            assert abs(numel - target) == pytest.approx(best_err, abs=1e-6)
            assert abs(numel - target) <= element_cost(sb.kind, best_counts, sb.gate_sizes)

    with torch.no_grad():
        gated_logits = model(x)
        cut_logits = cut(x)
    assert gated_logits.abs().max() > 0.5                       # O(1) logits: tolerance is meaningful
    assert (gated_logits - dense_logits).abs().max() > 1e-2     # the masks do change the function
    assert (gated_logits - cut_logits).abs().max().item() < 1e-4


# ---------------------------------------------------------------- 7. Taylor scores (§5)

def test_taylor_scores_accumulate():
    model = micro()
    model.add_gates()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.gate_parameters():
            p.copy_(0.2 + 0.8 * torch.rand(p.shape, generator=g))
    gates = {f'{l}.{n}': model.blocks[l].gates[n] for l in range(L) for n in GATE_NAMES}
    score = TaylorScore(gates)
    crit = torch.nn.CrossEntropyLoss()

    def backward(seed, scale=1.0):
        model.zero_grad(set_to_none=True)
        x, y = batch(seed)
        (scale * crit(model(x), y)).backward()

    backward(0)
    first = {k: (p.detach().double() * p.grad.double()) ** 2 for k, p in gates.items()}
    assert all(v.sum() > 0 for v in first.values())
    assert bool(score.accumulate(gates)) is True
    for k in gates:
        assert torch.allclose(score.sum[k], first[k], rtol=1e-6, atol=0)
    assert score.count == 1

    backward(1, scale=64.0)  # as AMP's loss scaling; grad_scale undoes it
    second = {k: (p.detach().double() * p.grad.double() / 64.0) ** 2 for k, p in gates.items()}
    assert bool(score.accumulate(gates, grad_scale=torch.tensor(64.0))) is True  # a scaler's tensor
    for k in gates:
        assert torch.allclose(score.sum[k], first[k] + second[k], rtol=1e-6, atol=0)
        assert torch.allclose(score.mean(k), (first[k] + second[k]) / 2, rtol=1e-6, atol=0)
    assert score.count == 2

    before = {k: v.clone() for k, v in score.sum.items()}
    backward(2)
    next(iter(gates.values())).grad[3] = float('inf')
    list(gates.values())[-1].grad[0] = float('nan')
    assert bool(score.accumulate(gates)) is False  # decided on the device: nothing added
    assert score.count == 2 and all(torch.equal(score.sum[k], before[k]) for k in gates)
    model.zero_grad(set_to_none=True)
    assert score.accumulate(gates) is False and score.count == 2


def test_pruner_scores_use_each_steps_own_gradient():
    """In the training loop the gates are outside the optimizer, so its zero_grad does not
    clear their gradients; each step's score must still be (m · this step's ∂L/∂m)²."""
    model, pruner, opt = gated_with_optimizer()  # active from step 2, first update at step 3
    crit = torch.nn.CrossEntropyLoss()
    names = list(pruner.taylor.sum)
    gates = [pruner._gates()[k] for k in names]
    expected = {k: torch.zeros_like(pruner.taylor.sum[k]) for k in names}
    for step in range(3):
        x, y = batch(300 + step)
        logits, aux = pruner.module(x)
        loss = crit(logits, y) + pruner.aux_loss(aux, y, crit)
        own = torch.autograd.grad(loss, gates, retain_graph=True)  # this step's gradient only
        if step >= 2:
            for k, g, d in zip(names, gates, own):
                expected[k] += (g.detach().double() * d.double()) ** 2
        loss.backward()
        opt.step()
        pruner.step()
        opt.zero_grad(set_to_none=True)
    assert pruner.taylor.count == 1
    assert all(expected[k].sum() > 0 for k in names)
    for k in names:
        assert torch.allclose(pruner.taylor.sum[k], expected[k], rtol=1e-5, atol=1e-20), k


# ---------------------------------------------------------------- 8. ΔΨ heads (§3)

def test_heads_read_detached_features():
    model, pruner, opt = gated_with_optimizer()
    crit = torch.nn.CrossEntropyLoss()
    x, y = batch(0)
    _, aux = pruner.module(x)
    loss = pruner.aux_loss(aux, y, crit)
    loss.backward()
    head_ids = {id(p) for p in pruner.heads.parameters()}
    for name, p in model.named_parameters():  # gates included
        assert id(p) not in head_ids
        assert p.grad is None or not p.grad.any(), name
    for name, p in pruner.heads.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # a step on the head losses alone moves the heads and nothing of the backbone
    before_model = {n: p.detach().clone() for n, p in model.named_parameters()}
    before_heads = [p.detach().clone() for p in pruner.heads.parameters()]
    opt.step()
    assert all(torch.equal(p, before_model[n]) for n, p in model.named_parameters())
    assert all(not torch.equal(p, b) for p, b in zip(pruner.heads.parameters(), before_heads))


def test_delta_psi_values_and_window():
    model, pruner, opt = gated_with_optimizer()  # step_start = 2
    crit = torch.nn.CrossEntropyLoss()
    pruner.module.eval()
    x, y = batch(5)
    # steps 0, 1: warm-up, heads train but ΔΨ is not recorded
    for step in range(2):
        _, aux = pruner.module(x)
        pruner.aux_loss(aux, y, crit)
        assert pruner.performance.count.item() == 0
        pruner.step()
    _, aux = pruner.module(x)
    loss = pruner.aux_loss(aux, y, crit)
    assert pruner.performance.count.item() == 1
    # ΔΨ_i = ℓ(ψ_i(x_i)) − ℓ(ψ_i(x_{i+1})) with the same head, computed here by hand
    with torch.no_grad():
        _, stream = model.forward_stream(x)
        assert len(stream) == 2 * L + 1
        dc = [crit(pruner.heads.cls[i](stream[i][:, 0]), y) - crit(pruner.heads.cls[i](stream[i + 1][:, 0]), y)
              for i in range(2 * L)]
        dp = [crit(pruner.heads.patch[i](stream[i]), y) - crit(pruner.heads.patch[i](stream[i + 1]), y)
              for i in range(2 * L)]
        total = sum(crit(h(s[:, 0]), y) for i, h in enumerate(pruner.heads.cls) for s in stream[i:i + 2]) + \
            sum(crit(h(s), y) for i, h in enumerate(pruner.heads.patch) for s in stream[i:i + 2])
    assert torch.allclose(pruner.performance.sum_c, torch.stack(dc).double(), atol=1e-5)
    assert torch.allclose(pruner.performance.sum_p, torch.stack(dp).double(), atol=1e-5)
    assert loss.item() == pytest.approx(total.item(), rel=1e-5)  # 4·2L losses, unweighted
    pruner.step()
    _, aux = pruner.module(x)
    pruner.aux_loss(aux, y, crit)
    assert pruner.performance.count.item() == 2
    assert torch.allclose(pruner.performance.mean()[0], torch.stack(dc).double(), atol=1e-5)
    pruner.update_masks(3)
    assert pruner.performance.count.item() == 0 and not pruner.performance.sum_c.any()


# ---------------------------------------------------------------- 9. gates vs the optimizer

def test_gates_change_only_at_mask_updates():
    model, pruner, opt = gated_with_optimizer()  # updates at steps 3, 5, 7
    gate_ids = {id(p) for p in model.gate_parameters()}
    assert not any(id(p) in gate_ids for grp in opt.param_groups for p in grp['params'])
    changed_at, had_grad = [], False
    for step in range(8):
        before = gate_values(model)
        x, y = batch(100 + step)
        crit = torch.nn.CrossEntropyLoss()
        logits, aux = pruner.module(x)
        (crit(logits, y) + pruner.aux_loss(aux, y, crit)).backward()
        had_grad |= any(p.grad is not None and p.grad.any() for p in model.gate_parameters())
        opt.step()
        assert all(torch.equal(v, gate_values(model)[n]) for n, v in before.items()), step
        record = pruner.step()
        opt.zero_grad()
        after = gate_values(model)
        if any(not torch.equal(v, after[n]) for n, v in before.items()):
            changed_at.append(step)
        if record is None:
            assert step not in changed_at
    assert had_grad  # an optimizer that held the gates would have moved them
    assert changed_at and set(changed_at) <= {3, 5, 7}
    assert 3 in changed_at  # the first update prunes (ρ = 1/2 at step 3, κ < 1 somewhere)


# ---------------------------------------------------------------- 10. state_dict round trip

def same_state(a, b):
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def test_state_dict_round_trip_gives_identical_masks():
    data = [batch(200 + i) for i in range(8)]
    model_a, pruner_a, opt_a = gated_with_optimizer(seed=0)   # updates at steps 3, 5, 7
    for step in range(5):  # one update done (momentum state exists), a window half full
        train_step(pruner_a, opt_a, *data[step])
    assert pruner_a.imp_c is not None and pruner_a.performance.count.item() == 1
    ckpt = round_trip({'model': model_a.state_dict(), 'pruner': pruner_a.state_dict(),
                       'optimizer': opt_a.state_dict()})

    model_b, pruner_b, opt_b = gated_with_optimizer(seed=123)  # different initial weights
    assert not torch.equal(model_b.head.weight, model_a.head.weight)
    model_b.load_state_dict(ckpt['model'])
    pruner_b.load_state_dict(ckpt['pruner'])
    opt_b.load_state_dict(ckpt['optimizer'])
    assert same_state(pruner_b.state_dict(), pruner_a.state_dict())

    updates = 0
    for step in range(5, 8):
        rec_a = train_step(pruner_a, opt_a, *data[step])
        rec_b = train_step(pruner_b, opt_b, *data[step])
        assert (rec_a is None) == (rec_b is None)
        if rec_a is not None:
            updates += 1
            assert rec_a == rec_b
            ga, gb = gate_values(model_a), gate_values(model_b)
            assert ga.keys() == gb.keys()
            assert all(torch.equal(ga[n], gb[n]) for n in ga)
    assert updates == 2


# ---------------------------------------------------------------- 11. bad configuration

@pytest.mark.parametrize('kw', [dict(prune_ratio=0.0), dict(prune_ratio=1.0), dict(prune_ratio=-0.2),
                                dict(prune_ratio=1.5),
                                dict(prune_ratio=0.5, gate_scale={'attn_outt': 1.5}),
                                dict(prune_ratio=0.5, keep_ratio_handcraft=[0.5] * 7 + [1.2]),
                                dict(prune_ratio=0.5, keep_ratio_handcraft=[0.5] * 7 + [-0.1]),
                                dict(prune_ratio=0.5, method='taylor')])
def test_bad_config_raises(kw):
    with pytest.raises(ValueError):
        PruneConfig(**kw)


@pytest.mark.parametrize('n', [2 * L - 1, 2 * L + 1, L])
def test_handcraft_needs_two_per_layer(n):
    cfg = PruneConfig(prune_ratio=0.5, keep_ratio_handcraft=[0.5] * n)
    with pytest.raises(ValueError):
        DepthAwarePruner(micro(), C, cfg, PruneSchedule(steps_per_epoch=2, start_epoch=0,
                                                        sparse_epoch=1, finalize_epoch=2))


def test_good_config_accepted():
    cfg = PruneConfig(prune_ratio=0.5, keep_ratio_handcraft=[0.0, 1.0] * L,
                      gate_scale={n: 1.0 for n in GATE_NAMES})
    DepthAwarePruner(micro(), C, cfg, PruneSchedule(steps_per_epoch=2, start_epoch=0,
                                                    sparse_epoch=1, finalize_epoch=2))


# ---------------------------------------------------------------- distributed mask check

def _mask_check_worker(rank, world, init_file, results):
    import torch.distributed as dist
    from pruning import MaskMismatchError
    from pruning.gates import check_masks_consistent
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = timm.create_model('deit_micro_patch4_32', num_classes=10, img_size=16)
        pruner = DepthAwarePruner(model, 10, PruneConfig(prune_ratio=0.5),
                                  PruneSchedule(steps_per_epoch=4, start_epoch=0, sparse_epoch=1,
                                                finalize_epoch=2, steps_update_mask=2))
        check_masks_consistent(list(pruner._gates().values()))  # identical masks pass
        if rank == 1:
            with torch.no_grad():
                model.blocks[0].gates['mlp_hid'][3] = 0.
        try:
            check_masks_consistent(list(pruner._gates().values()))
            results[rank] = 'passed'
        except MaskMismatchError:
            results[rank] = 'mismatch'
    finally:
        dist.destroy_process_group()


def test_mask_mismatch_across_processes_stops_the_run(tmp_path):
    import torch.multiprocessing as mp
    results = mp.Manager().dict()
    mp.spawn(_mask_check_worker, args=(2, str(tmp_path / 'init'), results), nprocs=2)
    assert dict(results) == {0: 'mismatch', 1: 'mismatch'}  # every rank stops, none hangs


# ---------------------------------------------------------------- 10. budget ablations (BASELINES.md)

def pruner_with_random_scores(method, pr=0.5, seed=0, **config):
    """A pruner whose Taylor sums and ΔΨ window are random, as after some training."""
    model = micro(seed)
    schedule = PruneSchedule(steps_per_epoch=1, start_epoch=0, sparse_epoch=0, finalize_epoch=1,
                             steps_update_mask=1)
    pruner = DepthAwarePruner(model, C, PruneConfig(prune_ratio=pr, method=method, **config), schedule)
    fill_random_scores(pruner, seed, heavy_tailed=True)
    return model, pruner


@pytest.mark.parametrize('pr', [0.5, 0.75])
def test_uniform_policy_gives_every_sub_block_the_same_keep_ratio(pr):
    model, pruner = pruner_with_random_scores('uniform', pr)
    record = pruner.update_masks(step=0, tau=0.0)
    sbs = sub_blocks(model)
    kappa = pruner.budget / sum(sb.dense_params for sb in sbs)
    assert record['goal_keep_ratio'] == pytest.approx([kappa] * len(sbs))
    max_cost = max(element_cost(sb.kind, sb.gate_sizes, sb.gate_sizes) for sb in sbs)
    for sb, kept in zip(sbs, record['kept_params']):  # each near κ·P, the total within one element
        assert abs(kept - kappa * sb.dense_params) <= 2 * max_cost
    assert abs(sum(record['kept_params']) - pruner.budget) <= max_cost
    # DAP proper, same scores: κ differs between sub-blocks
    _, dap = pruner_with_random_scores('block_pr', pr)
    assert max(dap.update_masks(step=0, tau=0.0)['goal_keep_ratio']) - min(dap.goal.tolist()) > 0.1


def spec_element_costs(sb):
    """Parameters one element of each gate controls in the dense sub-block (§2, by hand)."""
    a, b, c = sb.gate_sizes
    if sb.kind == 'attn':
        per = [3 * H * b + 2, 3 * H * a + 3 * H + H * c, H * b + 1]
    else:
        per = [b + 2, a + 1 + c, b + 1]
    return [p for p, n in zip(per, sb.gate_sizes) for _ in range(n)]


@pytest.mark.parametrize('pr', [0.5, 0.75])
def test_global_policy_keeps_exactly_the_top_of_the_global_ranking(pr):
    model, pruner = pruner_with_random_scores('global', pr, seed=1)
    record = pruner.update_masks(step=0, tau=0.0)
    sbs = sub_blocks(model)
    value, kept = [], []
    for sb in sbs:
        raw = torch.cat([pruner.taylor.mean(f'{sb.index}.{n}') for n in sb.gate_names]).tolist()
        value += [r / c for r, c in zip(raw, spec_element_costs(sb))]
        kept += torch.cat([g.detach() >= 0.5 for g in gates_of(model, sb)]).tolist()
    assert all(r['goal_keep_ratio'] is not None for r in [record])
    removed = {i for i, k in enumerate(record['kept_params']) if k == 0}
    alive = [j for j, sb in enumerate(sbs) if sb.index not in removed
             for _ in range(sum(sb.gate_sizes))]
    assert len(alive) > 0.5 * len(kept)
    # among elements of sub-blocks that survive, every kept one outranks every dropped one
    offset, kept_vals, dropped_vals = 0, [], []
    for sb in sbs:
        n = sum(sb.gate_sizes)
        if sb.index not in removed:
            for v, k in zip(value[offset:offset + n], kept[offset:offset + n]):
                (kept_vals if k else dropped_vals).append(v)
        offset += n
    assert dropped_vals and min(kept_vals) >= max(dropped_vals)
    # and the budget holds: kept block params land on the target within one element's cost
    assert abs(sum(record['kept_params']) - pruner.budget) <= max(max(spec_element_costs(sb)) for sb in sbs)
    # the keep ratios differ between sub-blocks: the global ranking, not a uniform κ
    ratios = [k / sb.dense_params for k, sb in zip(record['kept_params'], sbs)]
    assert max(ratios) - min(ratios) > 0.05


# ---------------------------------------------------------------- Taylor windows (§5 v2)

def windowed_pruner(window, finalize_epoch=3):
    """Handcrafted κ: every sub-block dense except mlp0, which drops one hidden neuron's worth
    (129 params) from the first update on; soft masks at τ = 0.1 throughout, so each
    element's mask value shows its rank. No ΔΨ heads: gradients are set by hand."""
    model = micro()
    P = sub_blocks(model)[1].dense_params
    kr = [1.0] * (2 * L)
    kr[1] = 1 - (D + 1 + D) / P
    schedule = PruneSchedule(steps_per_epoch=2, start_epoch=0, sparse_epoch=0,
                             finalize_epoch=finalize_epoch, steps_update_mask=2,
                             tau_max=0.1, tau_min=0.1)
    cfg = PruneConfig(prune_ratio=0.5, keep_ratio_handcraft=kr, taylor_window=window)
    return model, DepthAwarePruner(model, C, cfg, schedule)


def step_with_grads(pruner, special, seen):
    """One pruner step with every gate gradient 0.5, except mlp0's hidden neurons in
    `special` ({index: gradient}); `seen` collects (m·∂L/∂m)² of those as the test sees them."""
    gate = pruner.model.blocks[0].gates['mlp_hid']
    for g in pruner.model.gate_parameters():
        g.grad = torch.full_like(g, 0.5)
    for j, v in special.items():
        gate.grad[j] = v
        seen.setdefault(j, []).append(float(gate[j].detach()) ** 2 * v ** 2)
    return pruner.step()


def ranks(pruner, elements):
    """The elements of mlp0's hidden gate, ordered by their mask value (lowest first)."""
    m = pruner.model.blocks[0].gates['mlp_hid'].detach()
    return sorted(elements, key=lambda j: float(m[j]))


@pytest.mark.parametrize('window', ['update', 'cumulative'])
def test_taylor_window_ranks_on_the_latest_window(window):
    """A (0) matters only in the first window, B (1) only in the second: under `update` the
    second mask update ranks A below B; summed from the start (`cumulative`) A stays above."""
    model, pruner = windowed_pruner(window)
    A, B = 0, 1
    seen = {}
    for step, special in enumerate([{A: 2.0, B: 0.1}] * 2 + [{A: 0.05, B: 0.4}] * 2):
        record = step_with_grads(pruner, special, seen)
        assert (record is not None) == (step in (1, 3))
    # the second window alone prefers B; the two windows together prefer A
    assert sum(seen[B][2:]) > sum(seen[A][2:]) and sum(seen[A]) > sum(seen[B])
    assert ranks(pruner, [A, B]) == ([A, B] if window == 'update' else [B, A])
    assert pruner.taylor.count == (0 if window == 'update' else 4)


def test_finalize_ranks_on_the_current_and_previous_window():
    """Three windows (W1, W2 and a partial W3); the last update, at finalize, ranks on W2 + W3:
    not on W3 alone, nor on all three. Mask values are monotone in rank, so their order is
    the order of the scores the update used."""
    model, pruner = windowed_pruner('update', finalize_epoch=4)
    A, B, Cc = 0, 1, 2
    grads = [{A: 2.0, B: 0.05, Cc: 1.0}] * 2 + [{A: 0.05, B: 1.0, Cc: 0.6}] * 2 + [{A: 0.3, B: 0.05, Cc: 0.6}]
    seen = {}
    for special in grads:
        step_with_grads(pruner, special, seen)
    assert pruner.taylor.count == 1 and pruner.taylor.previous_count == 2

    def order(steps):
        return sorted((A, B, Cc), key=lambda j: sum(seen[j][s] for s in steps))

    two, last, every = order([2, 3, 4]), order([4]), order(range(5))
    assert len({tuple(two), tuple(last), tuple(every)}) == 3  # the three readings disagree
    pruner.update_masks(5, final=True)  # what finalize does before binarising
    assert ranks(pruner, (A, B, Cc)) == two


def test_taylor_score_windows_sum_exactly():
    model = micro()
    model.add_gates()
    gates = {f'{l}.{n}': model.blocks[l].gates[n] for l in range(L) for n in GATE_NAMES}
    score = TaylorScore(gates)
    g = torch.Generator().manual_seed(0)
    added = []
    for w, steps in enumerate((2, 3, 1)):
        if w:
            score.next_window()
        for _ in range(steps):
            for p in gates.values():
                p.grad = torch.rand(p.shape, generator=g)
            added.append({k: (p.detach().double() * p.grad.double()) ** 2 for k, p in gates.items()})
            assert score.accumulate(gates)
    for k in gates:
        assert torch.allclose(score.mean(k), added[5][k])                          # W3 only
        assert torch.allclose(score.mean(k, with_previous=True), sum(a[k] for a in added[2:]) / 4)
    assert (score.count, score.previous_count) == (1, 3)


def test_finalize_reads_two_windows_of_delta_psi():
    """The finalize record's mean ΔΨ is that of the previous window and the current one."""
    model, pruner, opt = gated_with_optimizer()  # updates at steps 3, 5, 7
    records = []
    pruner.on_update = records.append
    for step in range(7):
        train_step(pruner, opt, *batch(400 + step))
    prev, (sum_c, sum_p, n) = records[-1], (pruner.performance.sum_c.clone(),
                                             pruner.performance.sum_p.clone(), pruner.performance.count.item())
    assert prev['window'] == 2 and n == 1
    pruner.finalize()
    final = records[-1]
    assert final['window'] == 3
    expected_c = (torch.tensor(prev['delta_psi_cls'], dtype=torch.float64) * 2 + sum_c) / 3
    expected_p = (torch.tensor(prev['delta_psi_patch'], dtype=torch.float64) * 2 + sum_p) / 3
    assert torch.allclose(torch.tensor(final['delta_psi_cls'], dtype=torch.float64), expected_c)
    assert torch.allclose(torch.tensor(final['delta_psi_patch'], dtype=torch.float64), expected_p)
    assert not torch.allclose(expected_c, sum_c)  # the current window alone reads differently


def test_handcrafted_keep_ratios_build_no_heads():
    model = micro()
    pruner = DepthAwarePruner(model, C, PruneConfig(prune_ratio=0.5, keep_ratio_handcraft=[0.5] * 2 * L),
                              PruneSchedule(steps_per_epoch=2, start_epoch=0, sparse_epoch=1, finalize_epoch=2))
    assert pruner.heads is None and pruner.param_groups(1e-3, 0.05) == []
    x, y = batch(0)
    logits, aux = pruner.module(x)
    assert aux is None and torch.equal(logits, model(x))
    assert pruner.aux_loss(aux, y, torch.nn.CrossEntropyLoss()).item() == 0


@pytest.mark.parametrize('method', ['block_pr', 'uniform', 'global'])
@pytest.mark.parametrize('round_to', [4, 8])
def test_round_to_keeps_widths_in_multiples_and_the_budget(method, round_to):
    """--prune-round-to: every gate keeps a multiple of N elements (or all of them, or the
    sub-block goes), and the model still lands within 1% of its budget."""
    model, pruner = pruner_with_random_scores(method, 0.5, seed=3, round_to=round_to)
    record = pruner.update_masks(step=0, tau=0.1)  # soft masks: m ≥ 0.5 decides
    for sb in pruner.sbs:
        for g, size in zip(gates_of(model, sb), sb.gate_sizes):
            kept = int((g >= 0.5).sum())
            assert kept % round_to == 0 or kept == size, (sb.name, kept)
    assert sum(record['kept_params']) == pytest.approx(pruner.budget, rel=0.01)
    _, plain = pruner_with_random_scores(method, 0.5, seed=3)
    assert plain.update_masks(step=0, tau=0.1)['kept_params'] != record['kept_params']


# ---------------------------------------------------------------- the authors' drifting gates (docs/METHOD.md §10)

@pytest.mark.parametrize('train_gates', [False, True])
def test_train_gates_moves_the_gates_between_updates_only_when_asked(train_gates):
    """--prune-train-gates: AdamW moves the gates at every step (the authors' runs); without it
    an optimizer step never touches them (§2). Either way the cut meets the budget."""
    schedule = PruneSchedule(steps_per_epoch=4, start_epoch=0, sparse_epoch=1, finalize_epoch=2,
                             steps_update_mask=3)
    model, pruner, opt = gated_with_optimizer(schedule=schedule,
                                              config=PruneConfig(prune_ratio=0.5, train_gates=train_gates))
    dense = model.num_parameters()
    crit = torch.nn.CrossEntropyLoss()
    moved, rewritten = [], []
    for step in range(8):
        x, y = batch(700 + step)
        logits, aux = pruner.module(x)
        (crit(logits, y) + pruner.aux_loss(aux, y, crit)).backward()
        before = [g.detach().clone() for g in model.gate_parameters()]
        opt.step()
        moved.append(any(not torch.equal(a, b) for a, b in zip(before, model.gate_parameters())))
        stepped = [g.detach().clone() for g in model.gate_parameters()]
        record = pruner.step()
        if record is not None and 'step' in record:  # a mask update writes the soft masks anew
            rewritten.append(any(not torch.equal(a, b) for a, b in zip(stepped, model.gate_parameters())))
        opt.zero_grad(set_to_none=True)
    assert moved == [train_gates] * 8
    assert rewritten and all(rewritten)
    cut, _ = pruner.finalize()
    assert cut.num_parameters() == pytest.approx(0.5 * dense, rel=0.01)
