"""The cut beyond DAP's gates (BASELINES.md): whole heads, a narrower shared embedding, a
truncated depth with a promoted classifier. Each cut model must compute what the gated model
with binary gates computes, and be a plain model of the kept size.
"""

import pytest
import timm
import torch

import models  # noqa: F401  (registers deit_micro_patch4_32)
from conftest import micro, o1_weights, reloaded
from models import HEAD_GATE
from pruning import cut_model

D, L, H, M, C = 64, 4, 4, 256, 10


def micro_o1(seed):
    """The micro model with O(1) activations, so that a 1e-4 tolerance means something."""
    return o1_weights(micro(seed), seed + 100).eval()


def random_binary(n, keep, g):
    m = torch.zeros(n)
    m[torch.randperm(n, generator=g)[:keep]] = 1
    return m


def params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('seed', [0, 1])
def test_heads_hidden_and_embedding_cut_exactly(seed):
    model = micro_o1(seed)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    model.add_gates(names=(HEAD_GATE, 'mlp_hid'), embed=True)
    g = torch.Generator().manual_seed(seed)
    heads_kept = [1, 3, 2, 4]
    hid_kept = [200, 17, 90, 256]
    with torch.no_grad():
        for blk, h, f in zip(model.blocks, heads_kept, hid_kept):
            blk.gates[HEAD_GATE].copy_(random_binary(H, h, g))
            blk.gates['mlp_hid'].copy_(random_binary(M, f, g))
        model.embed_gate.mask.copy_(random_binary(D, 40, g))
        gated = model(x)
        dense_model = micro_o1(seed)
        assert (gated - dense_model(x)).abs().max() > 1e-2  # the gates do change the function
    cut = cut_model(model).eval()
    with torch.no_grad():
        assert (cut(x) - gated).abs().max().item() < 1e-4
    assert cut.embed_dim == 40 and cut.is_cut
    arch = cut.arch()
    assert [b['attn']['num_heads'] for b in arch['blocks']] == heads_kept
    assert [b['mlp']['hidden_features'] for b in arch['blocks']] == hid_kept
    assert all(b['attn']['in_idx'] is None and b['attn']['head_dim'] == D // H for b in arch['blocks'])
    # the count of a narrower ViT, written out: embed, tokens, blocks, final norm, head
    E, P = 40, 64  # kept channels, patches
    expect = (3 * 4 * 4 * E + E) + E + (P + 1) * E + 2 * E + (E * C + C)
    for h, f in zip(heads_kept, hid_kept):
        expect += 2 * E + E * 3 * h * 16 + 3 * h * 16 + h * 16 * E + E
        expect += 2 * E + E * f + f + f * E + E
    assert params(cut) == expect
    # the rebuilt model from arch loads the cut's weights (the resize path of main.py)
    rebuilt = models.build_from_arch(arch).eval()
    rebuilt.load_state_dict(cut.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(x), cut(x))


def test_truncated_depth_promotes_the_classifier():
    model = micro_o1(3)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    model.add_gates(names=(HEAD_GATE, 'attn_out', 'mlp_hid', 'mlp_out'))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for blk in model.blocks:
            blk.gates[HEAD_GATE].copy_(random_binary(H, 2, g))
            blk.gates['attn_out'].copy_(random_binary(D, 48, g))
            blk.gates['mlp_hid'].copy_(random_binary(M, 128, g))
            blk.gates['mlp_out'].copy_(random_binary(D, 32, g))
    norm, head = torch.nn.LayerNorm(D, eps=1e-6), torch.nn.Linear(D, C)
    with torch.no_grad():
        for p in (*norm.parameters(), *head.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
        _, stream = model.forward_stream(x)
        shallow = head(norm(stream[2 * 2])[:, 0])  # the classifier after block 2
    classifier = {'norm.weight': norm.weight, 'norm.bias': norm.bias,
                  'head.weight': head.weight, 'head.bias': head.bias}
    cut = cut_model(model, depth=2, classifier=classifier).eval()
    assert cut.depth == 2 and cut.dense_depth == L and len(cut.blocks) == 2
    with torch.no_grad():
        assert (cut(x) - shallow).abs().max().item() < 1e-4
    arch = cut.arch()
    assert arch['depth'] == 2 and arch['dense_depth'] == L
    assert all(b['attn']['num_heads'] == 2 and len(b['attn']['out_idx']) == 48 for b in arch['blocks'])


def test_cut_refuses_bad_depth_and_empty_embedding():
    model = micro_o1(0)
    model.add_gates(names=('mlp_hid',), embed=True)
    with pytest.raises(ValueError, match='depth'):
        cut_model(model, depth=L + 1)
    with torch.no_grad():
        model.embed_gate.mask.zero_()
    with pytest.raises(ValueError, match='embedding gate keeps no channel'):
        cut_model(model)


def test_cut_keeps_the_dropout_rates_and_dtype():
    torch.manual_seed(0)
    model = timm.create_model('deit_micro_patch4_32', num_classes=C, drop_rate=0.1,
                              proj_drop_rate=0.2, attn_drop_rate=0.3).double()
    model.add_gates(names=(HEAD_GATE,))
    cut = cut_model(model)
    assert cut.pos_drop.p == 0.1 and cut.head_drop.p == 0.1
    assert cut.blocks[0].attn.proj_drop.p == 0.2 and cut.blocks[0].attn.attn_drop.p == 0.3
    assert cut.blocks[0].mlp.drop2.p == 0.2
    assert all(p.dtype == torch.float64 for p in cut.parameters())


def test_inference_writes_in_place_only_when_switched_on():
    """By default the residual writes copy, so a forward hook that keeps the blocks' outputs
    sees each block's own output; `set_inplace_writes` (benchmark, export) adds in place under
    no_grad, with the same logits, and forward_stream refuses to run then."""
    model = micro_o1(5)
    model.add_gates(names=('attn_out', 'mlp_out'))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for blk in model.blocks:
            blk.gates['attn_out'].copy_(random_binary(D, 40, g))
            blk.gates['mlp_out'].copy_(random_binary(D, 24, g))
    cut = cut_model(model).eval()
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.enable_grad():  # the reference: no in-place writes
        _, stream = cut.forward_stream(x)
    expect = [stream[2 * (i + 1)].detach() for i in range(L)]
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o)) for b in cut.blocks]
    with torch.no_grad():
        logits = cut(x)
    for h in hooks:
        h.remove()
    assert len(seen) == L
    for s, e in zip(seen, expect):
        torch.testing.assert_close(s, e, atol=1e-5, rtol=0)
    cut.set_inplace_writes(True)
    assert all(w.inplace for b in cut.blocks for w in b.writes())
    seen.clear()
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o)) for b in cut.blocks]
    with torch.no_grad():  # one residual stream, written in place, and the same logits
        torch.testing.assert_close(cut(x), logits, atol=1e-5, rtol=0)
        assert all(s is seen[0] for s in seen)
        with pytest.raises(RuntimeError, match='set_inplace_writes'):
            cut.forward_stream(x)
    for h in hooks:
        h.remove()


# ---------------------------------------------------------------- deployment forms (models/deploy.py)

def deploy_cut(seed=7):
    """A cut micro model whose sub-blocks read and write parts of the residual stream."""
    model = micro_o1(seed)
    model.add_gates()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in model.blocks:
            for name, keep in (('attn_in', 40), ('attn_out', 56), ('mlp_in', 60), ('mlp_out', 24),
                               ('attn_qkv', 12), ('mlp_hid', 200)):
                blk.gates[name].copy_(random_binary(blk.gates[name].numel(), keep, g))
    return cut_model(model).eval()


@pytest.mark.parametrize('read', ['gather', 'fused', 'dense'])
@pytest.mark.parametrize('write', ['scatter', 'dense'])
def test_every_deployment_form_computes_the_cut_models_function(read, write):
    cut = deploy_cut()
    plan = {l: {k: {'read': read, 'write': write} for k in ('attn', 'mlp')} for l in range(L)}
    deployed = models.apply_forms(cut, plan)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = cut(x)
        torch.testing.assert_close(deployed(x), ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(deployed.set_inplace_writes(True)(x), ref, atol=1e-4, rtol=0)
    blocks = deployed.arch()['blocks']
    if read == 'dense':
        assert all(b[k]['in_idx'] is None for b in blocks for k in ('attn', 'mlp'))
    if read == 'fused':
        assert all(b[k]['read'] == 'fused' for b in blocks for k in ('attn', 'mlp'))
    if write == 'dense':
        assert all(b[k]['out_idx'] is None for b in blocks for k in ('attn', 'mlp'))
    # the deployed model travels as arch + weights and rebuilds under weights_only
    with torch.no_grad():
        torch.testing.assert_close(reloaded(deployed).eval()(x), ref, atol=1e-4, rtol=0)


def test_deploy_measures_a_plan_for_every_cut_sub_block():
    cut = deploy_cut(8)
    x = torch.randn(4, 3, 32, 32)
    deployed, plan = models.deploy(cut, x, iters=2)
    assert set(plan) == set(range(L)) and all(set(p) == {'attn', 'mlp'} for p in plan.values())
    assert all(f['read'] in ('gather', 'fused', 'dense') and f['write'] in ('scatter', 'dense')
               for p in plan.values() for f in p.values())
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), cut(x), atol=1e-4, rtol=0)
