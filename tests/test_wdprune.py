"""WD-Prune (pruning/wdprune.py, BASELINES.md): masks, straight-through gradients, the
Lagrangian, the budget at the cut, exactness of the cut and of a resume. CPU, micro model."""
import math

import pytest
import torch
import torch.nn.functional as F

import models  # noqa: F401  (registers deit_micro_patch4_32)
from conftest import micro, round_trip
from families import FAMILIES, ours
from models import is_gate
from pruning import PruneSchedule
from pruning.wdprune import (MASKED, WDPruneConfig, WDPrunePruner, block_keep_fraction,
                             kept_count, topk_mask)

CE = F.cross_entropy


def count(m):
    return sum(p.numel() for n, p in m.named_parameters() if not is_gate(n))


def make(pr=0.5, total_steps=100, seed=0, family=None, **kw):
    """Model (the micro model, or the miniature of a timm family) and pruner, its cosine over
    `total_steps` (one epoch of that many steps)."""
    model = micro(seed) if family is None else ours(family, seed)
    schedule = PruneSchedule(steps_per_epoch=total_steps, start_epoch=0, sparse_epoch=0, finalize_epoch=1)
    return model, WDPrunePruner(model, 10, WDPruneConfig(pr, **kw), schedule)


def batch(seed=1, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def masks(model, name):
    return torch.stack([blk.gates[name].detach() for blk in model.blocks])


def set_thresholds(pruner, values):
    with torch.no_grad():
        pruner.threshold.copy_(torch.as_tensor(values, dtype=torch.float32))
    pruner.apply_masks()


def random_state(pruner, seed=3):
    """Random scores and per-layer thresholds, so that masks are partial and differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in pruner.scores.values():
            s.copy_(torch.randn(s.shape, generator=g))
    set_thresholds(pruner, torch.randn(pruner.L, 4, generator=g))


# ---- (1) one masked layer: k = ⌈σ(t)·n⌉ rounded, the largest scores kept --------------------
@pytest.mark.parametrize('ratio,n,round_to,k', [
    (0.5, 256, 16, 128), (0.5, 100, 16, 64), (0.3, 256, 16, 80), (1e-4, 256, 16, 16),
    (0.99995, 100, 16, 100), (0.7, 10, 1, 7), (0.26, 4, 1, 2), (1e-4, 4, 1, 1), (1.0, 64, 16, 64)])
def test_kept_count(ratio, n, round_to, k):
    assert kept_count(ratio, n, round_to) == k


def test_masked_layer_keeps_top_scores_for_several_thresholds():
    model, pruner = make()
    n, hid = pruner.hid, pruner.sizes['attn_head']
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for s in pruner.scores.values():
            s.copy_(torch.randn(s.shape, generator=g))
    for t in (-6., -1., 0., 0.4, 1.5, 3., 10.):
        set_thresholds(pruner, torch.full((pruner.L, 4), t))
        r = 1 / (1 + math.exp(-t))
        for name, size, round_to in (('mlp_hid', n, 16), ('attn_out', 64, 16), ('attn_head', hid, 1)):
            k = min(size, max(round_to, math.ceil(math.ceil(r * size) / round_to) * round_to))
            m = masks(model, name)
            assert set(m.unique().tolist()) <= {0., 1.}
            assert m.sum(1).tolist() == [k] * pruner.L, (t, name)
            for row, s in zip(m, pruner.scores[name].detach()):
                assert set(row.nonzero().flatten().tolist()) == set(s.topk(k).indices.tolist())


def test_topk_ties_broken_by_index():
    m = topk_mask(torch.tensor([[0., 1., 0., 1., 0.]]), torch.tensor([3]))
    assert m.tolist() == [[1., 1., 0., 1., 0.]]
    scores = torch.zeros(2, 256)
    scores[:, ::3] = 1.  # 86 ones, then ties among the zeros: the lowest indices win
    m = topk_mask(scores, torch.tensor([96, 16]))
    expected = scores.clone()
    expected[0, [i for i in range(256) if i % 3][:10]] = 1.
    assert torch.equal(m[0], expected[0])
    assert m[1].nonzero().flatten().tolist() == list(range(0, 48, 3))


# ---- (2) straight-through gradients ---------------------------------------------------------
def backward(model, pruner, seed=1):
    x, y = batch(seed)
    logits, aux = pruner.module(x)
    (CE(logits, y) + pruner.aux_loss(aux, y, CE)).backward()


def test_straight_through_gradients():
    model, pruner = make(classifiers=(2,))
    random_state(pruner)
    assert pruner.lambda1 == pruner.lambda2 == 0  # budget term has no gradient yet
    backward(model, pruner)
    grads = {n: torch.stack([b.gates[n].grad.clone() for b in model.blocks]) for n in MASKED}
    assert all(g.abs().sum() > 0 for g in grads.values())
    assert pruner._set_grads(grad_scale=4.)
    for j, n in enumerate(MASKED):
        torch.testing.assert_close(pruner.scores[n].grad, grads[n] / 4)
        torch.testing.assert_close(pruner.threshold.grad[:, j], (grads[n] * masks(model, n)).sum(1) / 4)


def test_budget_gradient_on_thresholds():
    """With λ1 = 1 the budget adds ∂s/∂r to t's gradient (σ' ignored, like the mask term)."""
    model, pruner = make(pr=0.75)
    random_state(pruner)
    assert pruner.hard_keep() > pruner.target
    pruner.lambda1 = 1.
    backward(model, pruner)
    mask_part = torch.stack([(torch.stack([b.gates[n].grad for b in model.blocks]) * masks(model, n)).sum(1)
                             for n in MASKED], 1)
    pruner._set_grads()
    r = pruner.threshold.detach().sigmoid().double().requires_grad_()
    block_keep_fraction(r, pruner.D, pruner.hid).mean().backward()
    torch.testing.assert_close(pruner.threshold.grad - mask_part, r.grad.float())


def test_step_updates_masks_and_clears_gate_grads():
    model, pruner = make(lr=1.)
    backward(model, pruner)
    t0 = pruner.threshold.detach().clone()
    pruner.step()
    assert not torch.equal(pruner.threshold.detach(), t0)
    assert all(p.grad is None for p in model.gate_parameters())
    assert pruner.threshold.grad is None


# ---- (3) Lagrange multipliers ---------------------------------------------------------------
def test_lambdas_rise_while_over_budget_and_stay_below_it():
    model, pruner = make(pr=0.5, lr=0., lambda_lr=0.1)
    gap = pruner.hard_keep() - pruner.target
    assert gap > 0.4
    for i in range(1, 4):
        backward(model, pruner)
        pruner.step()
        assert pruner.lambda1 == pytest.approx(0.1 * gap * i)
        assert pruner.lambda2 == pytest.approx(0.1 * gap ** 2 * i)
    l1, l2 = pruner.lambda1, pruner.lambda2
    set_thresholds(pruner, torch.full((pruner.L, 4), -5.))  # the smallest masks: s < T
    assert pruner.hard_keep() < pruner.target
    x, y = batch()
    logits, aux = pruner.module(x)
    assert pruner.aux_loss(aux, y, CE).item() == 0  # no classifier, budget met
    for _ in range(2):
        backward(model, pruner)
        pruner.step()
    assert (pruner.lambda1, pruner.lambda2) == (l1, l2)


# ---- (4) optimisation drives s towards T ----------------------------------------------------
def test_training_moves_s_to_target():
    """A large pruner lr from σ(t0) = 0.73: s falls to T. Adam's momentum carries t on for
    ~10 steps after s ≤ T (~10·lr in t: 0.025 at the default lr), so s may end a little below."""
    model, pruner = make(pr=0.5, lr=0.05, lambda_lr=1., threshold_init=1., total_steps=1000,
                         classifiers=(2,), record_every=1)
    optimizer = torch.optim.AdamW([p for n, p in model.named_parameters() if not is_gate(n)]
                                  + [q for g in pruner.param_groups(1e-3, 0.05) for q in g['params']], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    data, labels = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
    s, records = [pruner.hard_keep()], []
    pruner.on_update = records.append
    for i in range(40):
        idx = torch.arange(8) + 8 * (i % 4)
        logits, aux = pruner.module(data[idx])
        loss = CE(logits, labels[idx]) + pruner.aux_loss(aux, labels[idx], CE)
        loss.backward()
        optimizer.step()
        pruner.step()
        optimizer.zero_grad()
        s.append(pruner.hard_keep())
    assert s[0] > pruner.target + 0.15
    assert min(s) <= pruner.target + 0.01, s
    assert s[-1] >= pruner.target - 0.2, s
    assert len(records) == 40 and records[-1]['lambda1'] > 0


# ---- (5) finalize: budget and exactness -----------------------------------------------------
@pytest.mark.parametrize('pr,keep_depth,family', [
    (0.5, None, None), (0.75, None, None), (0.5, 2, None), (0.75, 3, None),
    *[(0.5, k, f) for f in FAMILIES for k in (None, 2)]])
def test_finalize_meets_budget_and_cut_is_exact(pr, keep_depth, family):
    """On the micro model and on each family, whole or with a promoted shallow classifier: the
    rows count LayerScale's γ with the written dims, qk_norm, a qkv without bias."""
    model, pruner = make(pr=pr, classifiers=(2, 3), keep_depth=keep_depth, family=family)
    dense = count(model)
    random_state(pruner)
    with torch.no_grad():  # non-trivial shallow classifier norms
        for p in pruner.classifiers.parameters():
            p.add_(0.1 * torch.randn_like(p))
    set_thresholds(pruner, torch.full((pruner.L, 4), 10.))  # not converged: keeps everything
    c = pruner.fit_budget()
    assert 0 < c < 1
    pruner.module.eval()
    x, _ = batch(n=4)
    with torch.no_grad():
        logits, aux = pruner.module(x)
    with torch.no_grad():
        shallow = pruner.module.forward_eval(x)[1]
    expected = logits if keep_depth is None else shallow[f'classifier{keep_depth}']
    cut, rows = pruner.finalize()
    assert pruner.shrink_factor == c  # fit_budget already done: finalize keeps those masks
    n = count(cut)
    assert n <= (1 - pr) * dense * 1.01
    assert n == sum(r['kept_params'] for r in rows) + pruner.non_block
    assert len(rows) == 2 * pruner.L and all(r['skipped'] == (r['kept_params'] == 0) for r in rows)
    assert cut.depth == (keep_depth or pruner.L)
    assert model.gate_parameters() == []
    cut.eval()
    with torch.no_grad():
        torch.testing.assert_close(cut(x), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize('pr', [0.5, 0.75])
def test_finalize_alone_meets_budget(pr):
    """Straight from a run whose Lagrangian did not converge (t = 10: everything kept)."""
    model, pruner = make(pr=pr)
    dense = count(model)
    cut, rows = pruner.finalize()
    assert 0 < pruner.shrink_factor < 1
    assert count(cut) <= (1 - pr) * dense * 1.01
    assert count(cut) == sum(r['kept_params'] for r in rows) + pruner.non_block
    # and not far under: no single mask could grow by one more step within the budget
    counts = pruner.counts
    for l in range(pruner.L):
        for j, n in enumerate(MASKED):
            step = 1 if n == 'attn_head' else pruner.cfg.mask_round
            if counts[l, j] + step <= pruner.sizes[n]:
                grown = counts.clone()
                grown[l, j] += step
                assert pruner._kept_block_params(grown) > pruner.budget


def test_finalize_keeps_masks_within_budget():
    model, pruner = make(pr=0.5)
    random_state(pruner)
    set_thresholds(pruner, torch.full((pruner.L, 4), -1.))  # σ = 0.27: already within budget
    before = {n: masks(model, n).clone() for n in MASKED}
    assert pruner.fit_budget() == 1.
    assert all(torch.equal(masks(model, n), before[n]) for n in MASKED)


# ---- (6) checkpoint round trip --------------------------------------------------------------
def train_steps(model, pruner, optimizer, steps, start):
    for i in range(start, start + steps):
        x, y = batch(seed=10 + i)
        logits, aux = pruner.module(x)
        (CE(logits, y) + pruner.aux_loss(aux, y, CE)).backward()
        optimizer.step()
        pruner.step()
        optimizer.zero_grad()


def setup_run(seed=0):
    model, pruner = make(pr=0.5, lr=0.5, lambda_lr=1., total_steps=8, classifiers=(1, 3), seed=seed)
    params = [p for n, p in model.named_parameters() if not is_gate(n)]
    optimizer = torch.optim.SGD(params + [q for g in pruner.param_groups(0.01, 0.) for q in g['params']], lr=0.01)
    return model, pruner, optimizer


def test_state_dict_round_trip_resumes_identically():
    a_model, a, a_opt = setup_run()
    train_steps(a_model, a, a_opt, 3, 0)
    ckpt = round_trip({'model': a_model.state_dict(), 'pruner': a.state_dict()})

    b_model, b, b_opt = setup_run(seed=5)  # different initial weights: all must come from ckpt
    b_model.load_state_dict(ckpt['model'])
    b.load_state_dict(ckpt['pruner'])
    train_steps(a_model, a, a_opt, 3, 3)
    train_steps(b_model, b, b_opt, 3, 3)
    assert a.step_count == b.step_count == 6
    assert (a.lambda1, a.lambda2) == (b.lambda1, b.lambda2) and a.lambda1 > 0
    assert torch.equal(a.threshold, b.threshold)
    assert all(torch.equal(a.scores[n], b.scores[n]) for n in MASKED)
    for (k, va), vb in zip(a_model.state_dict().items(), b_model.state_dict().values()):
        assert torch.equal(va, vb), k
    for va, vb in zip(a.classifiers.state_dict().values(), b.classifiers.state_dict().values()):
        assert torch.equal(va, vb)


# ---- the shallow classifiers and the configuration -------------------------------------------
def test_shallow_classifiers_train_the_backbone():
    model, pruner = make(classifiers=(2,))
    x, y = batch()
    _, aux = pruner.module(x)
    assert list(pruner.module.forward_eval(x)[1]) == ['classifier2']
    loss = pruner.aux_loss(aux, y, CE)
    assert loss.item() == pytest.approx(CE(aux[0], y).item())  # λ = 0: no budget term
    loss.backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.blocks[2].attn.qkv.weight.grad is None  # after block 2: unread


def test_config_validation():
    with pytest.raises(ValueError):
        WDPruneConfig(1.0)
    with pytest.raises(ValueError):
        WDPruneConfig(0.5, classifiers=(2,), keep_depth=3)
    with pytest.raises(ValueError):
        make(classifiers=(4,))  # after the last block: that is the model's own head
    with pytest.raises(ValueError):
        make(pr=0.99)  # the smallest masks exceed the budget
