"""The cuttable ViT of models/: fidelity to timm, rebuild from arch, cuts, gates, checkpoint fitting."""

import pytest
import timm
import timm.layers.config
import torch
from timm.layers import set_fused_attn
from timm.models.vision_transformer import VisionTransformer as TimmViT

import models
from conftest import micro, reloaded, round_trip
from models import build_from_arch, is_gate, pretrained_state_dict

MICRO = 'deit_micro_patch4_32'  # patch 4, width 64, depth 4, 4 heads, 32 px


@pytest.fixture
def unfused_attn():
    """Both timm's and our Attention read the flag when built: compare the explicit softmax paths."""
    saved = timm.layers.config._USE_FUSED_ATTN
    set_fused_attn(False)
    yield
    timm.layers.config._USE_FUSED_ATTN = saved


def images(n=2, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- fidelity to timm

@pytest.mark.parametrize('name,embed_dim,num_heads', [('deit_small_patch16_224', 384, 6),
                                                      ('deit_tiny_patch16_224', 192, 3)])
def test_same_logits_as_timm(unfused_attn, name, embed_dim, num_heads):
    torch.manual_seed(0)
    ref = TimmViT(patch_size=16, embed_dim=embed_dim, depth=12, num_heads=num_heads).eval()
    ours = timm.create_model(name).eval()
    assert isinstance(ours, models.VisionTransformer)  # our registration replaced timm's entry
    assert not ours.blocks[0].attn.fused_attn
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_logits, our_logits = ref(x), ours(x)
    diff = (ref_logits - our_logits).abs().max().item()
    print(f'{name}: max |delta logit| vs timm = {diff:.3g} (logits up to {ref_logits.abs().max():.3g})')
    assert ref_logits.abs().max() > 0.1  # a real comparison, not of two all-zero outputs
    assert diff < 1e-5


# ---------------------------------------------------------------- arch

def test_rebuild_from_arch():
    model = micro()
    arch = model.arch()
    assert round_trip(arch) == arch  # the arch travels in checkpoints read with weights_only=True
    torch.manual_seed(123)  # a different init: only load_state_dict can make the logits agree
    rebuilt = build_from_arch(arch).eval()
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}
    assert not torch.equal(rebuilt.pos_embed, model.pos_embed)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = images()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    assert rebuilt.arch() == arch


D = 64  # width of the micro model


def cut_arch():
    model = micro()
    arch = model.arch()
    even, first_half = list(range(0, D, 2)), list(range(D // 2))
    arch['blocks'][0] = {
        'attn': {'in_idx': first_half, 'out_idx': even, 'num_heads': 2, 'head_dim': 8},
        'mlp': {'in_idx': None, 'out_idx': None, 'hidden_features': 100}}
    arch['blocks'][1] = {
        'attn': None,
        'mlp': {'in_idx': list(range(5, 15)), 'out_idx': list(range(20, 40)), 'hidden_features': 50}}
    arch['blocks'][3]['attn']['head_dim'] = 12
    arch['blocks'][3]['mlp'] = None
    return arch


def attn_params(i, heads, head_dim, o):
    """LayerNorm on the i read dims, qkv (weight + bias), proj (weight + bias) onto o dims."""
    inner = heads * head_dim
    return 2 * i + (i * 3 * inner + 3 * inner) + (inner * o + o)


def mlp_params(i, hidden, o):
    return 2 * i + (i * hidden + hidden) + (hidden * o + o)


def test_cut_model_builds_runs_and_counts():
    model = build_from_arch(cut_arch()).eval()
    assert model.is_cut
    expected = (
        (3 * 4 * 4 * D + D) + D + (8 * 8 + 1) * D       # patch embed, cls token, pos embed
        + attn_params(32, 2, 8, 32) + mlp_params(D, 100, D)   # block 0
        + mlp_params(10, 50, 20)                               # block 1, attention removed
        + attn_params(D, 4, 16, D) + mlp_params(D, 4 * D, D)  # block 2, dense
        + attn_params(D, 4, 12, D)                             # block 3, MLP removed
        + 2 * D + (D * 10 + 10))                               # final norm, head
    assert sum(p.numel() for p in model.parameters()) == expected

    x = images()
    with torch.no_grad():
        logits, stream = model.forward_stream(x)
        assert torch.equal(logits, model(x))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert len(stream) == 2 * 4 + 1
    # removed sub-blocks (block 1 attention, block 3 MLP) leave the residual stream as it is
    assert torch.equal(stream[3], stream[2])
    assert torch.equal(stream[8], stream[7])
    # a sub-block writes only its out_idx dims, and does write them
    odd = list(range(1, D, 2))
    assert torch.equal(stream[1][..., odd], stream[0][..., odd])
    assert not torch.equal(stream[1][..., ::2], stream[0][..., ::2])
    untouched = [d for d in range(D) if not 20 <= d < 40]
    assert torch.equal(stream[4][..., untouched], stream[3][..., untouched])
    assert not torch.equal(stream[4][..., 20:40], stream[3][..., 20:40])


def test_cut_model_rejects_gates():
    with pytest.raises(ValueError, match='uncut'):
        build_from_arch(cut_arch()).add_gates()


# ---------------------------------------------------------------- gates

def test_all_ones_gates_change_nothing():
    model = micro()
    x = images()
    with torch.no_grad():
        before = model(x)
        model.add_gates()
        assert len(model.gate_parameters()) == 6 * 4
        assert torch.equal(model(x), before)


@pytest.mark.parametrize('gate,sub_block', [('attn_out', 0), ('mlp_out', 1)])
def test_zero_output_gate_removes_sub_block(gate, sub_block):
    layer = 2
    model = micro()
    model.add_gates()
    with torch.no_grad():
        model.blocks[layer].gates[gate].zero_()
        x = images()
        logits, stream = model.forward_stream(x)
        i = 2 * layer + sub_block
        assert torch.equal(stream[i + 1], stream[i])
        assert not torch.equal(stream[i], stream[i - 1])  # the sub-block before still works

        # ... and it computes what the model with that sub-block cut away computes
        arch = model.arch()
        arch['blocks'][layer]['attn' if sub_block == 0 else 'mlp'] = None
        cut = build_from_arch(arch).eval()
        sd = model.state_dict()
        gone = {k for k in sd if is_gate(k) or k not in cut.state_dict()}
        names = ('attn.', 'norm1.') if sub_block == 0 else ('mlp.', 'norm2.')
        prefix = tuple(f'blocks.{layer}.{n}' for n in names)
        assert {k for k in gone if not is_gate(k)} == \
            {k for k in sd if k.startswith(prefix) and not is_gate(k)}
        cut.load_state_dict({k: v for k, v in sd.items() if k not in gone}, strict=True)
        assert torch.equal(cut(x), logits)


def activation_gated_stream(model, x):
    """The gated forward as METHOD.md §2 writes it, each gate multiplying the activations it
    sits on (the model folds them into the weights instead): the reference of the fold."""
    import torch.nn.functional as F
    from models.vision_transformer import mask_of

    def gate(slot, t, view=(-1,)):
        m = mask_of(slot)
        return t if m is None else t * m.view(view)

    x = model.forward_embed(x)
    stream = [x]
    for blk in model.blocks:
        a = blk.attn
        h = gate(blk.attn_in_gate, blk.norm1(x))
        B, N, _ = h.shape
        qkv = gate(a.qkv_gate, a.qkv(h).reshape(B, N, 3, a.num_heads, a.head_dim))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if a.fused_attn:
            h = F.scaled_dot_product_attention(q, k, v, scale=a.scale)
        else:
            h = ((q * a.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        h = gate(a.head_gate, h, (-1, 1, 1))
        h = gate(blk.attn_out_gate, a.proj(h.transpose(1, 2).reshape(B, N, -1)))
        x = x + h
        stream.append(x)
        m = blk.mlp
        h = gate(blk.mlp_in_gate, blk.norm2(x))
        h = gate(blk.mlp_out_gate, m.fc2(gate(m.hid_gate, m.act(m.fc1(h)))))
        x = x + h
        stream.append(x)
    return model.forward_head(x), stream


@pytest.mark.parametrize('masks', ['binary', 'soft'])
def test_gates_folded_into_weights_compute_the_activation_gated_model(masks):
    """Every gate of a sub-block is folded into its linear layer (models.gated_linear): the
    stream, the logits and the gate gradients the Taylor scores read are those of the gates
    multiplying the activations, bit for bit with 0/1 masks, to rounding with soft ones."""
    model = micro().eval()
    model.add_gates(models.ALL_GATE_NAMES)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.gate_parameters():
            r = torch.rand(p.shape, generator=g)
            p.copy_((r > 0.3).float() if masks == 'binary' else r)
    x = images(4)

    def run(forward):
        model.zero_grad(set_to_none=True)
        logits, stream = forward(x)
        (logits.square().sum() + sum(s.square().mean() for s in stream)).backward()
        return logits, stream, [p.grad.clone() for p in model.gate_parameters()]

    logits, stream, grads = run(model.forward_stream)
    ref_logits, ref_stream, ref_grads = run(lambda t: activation_gated_stream(model, t))
    if masks == 'binary':
        assert torch.equal(logits, ref_logits)
        assert all(torch.equal(s, r) for s, r in zip(stream, ref_stream))
    else:
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        for s, r in zip(stream, ref_stream):
            torch.testing.assert_close(s, r, rtol=1e-5, atol=1e-5)
    assert all(gr.abs().sum() > 0 for gr in grads)
    for gr, r in zip(grads, ref_grads):
        torch.testing.assert_close(gr, r, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- pretrained_state_dict

def test_pretrained_wrapped_bare_and_ddp_prefixed():
    src = micro()
    sd = src.state_dict()
    for ckpt in ({'model': sd}, sd, {'model': {f'module.{k}': v for k, v in sd.items()}}):
        torch.manual_seed(5)
        dst = timm.create_model(MICRO, num_classes=10)
        out, notes = pretrained_state_dict(dst, ckpt)
        assert notes == []
        dst.load_state_dict(out, strict=True)
        assert all(torch.equal(dst.state_dict()[k], v) for k, v in sd.items())


def test_pretrained_resets_head_for_other_class_count():
    src = micro(num_classes=1000)
    torch.manual_seed(7)  # another init, so that copied weights are seen to be copied
    dst = timm.create_model(MICRO, num_classes=10)
    own_head = dst.head.weight.clone()
    out, notes = pretrained_state_dict(dst, {'model': src.state_dict()})
    assert notes == ['classifier reset: checkpoint has 1000 classes, model has 10']
    assert torch.equal(out['head.weight'], own_head)
    assert torch.equal(out['blocks.0.attn.qkv.weight'], src.blocks[0].attn.qkv.weight)
    dst.load_state_dict(out, strict=True)


def test_pretrained_resamples_pos_embed_for_other_input_size():
    src = micro()
    with torch.no_grad():
        src.pos_embed[:, 0] = 3.0   # the class token's position
        src.pos_embed[:, 1:] = 0.5  # a constant grid stays constant when resampled
    dst = micro(img_size=48)
    out, notes = pretrained_state_dict(dst, src.state_dict())
    assert notes == ['pos_embed resampled from 65 to 145 tokens']
    assert out['pos_embed'].shape == (1, 1 + 12 * 12, D)
    assert torch.equal(out['pos_embed'][:, 0], src.pos_embed[:, 0])
    assert torch.allclose(out['pos_embed'][:, 1:], torch.full((1, 144, D), 0.5), atol=1e-5)
    dst.load_state_dict(out, strict=True)
    assert torch.isfinite(dst.eval()(images(size=48))).all()


def test_pretrained_rejects_other_architectures():
    dst = micro()
    sd = micro().state_dict()
    missing = {k: v for k, v in sd.items() if k != 'blocks.0.attn.qkv.weight'}
    with pytest.raises(ValueError, match=r'missing keys \(1\): blocks\.0\.attn\.qkv\.weight$'):
        pretrained_state_dict(dst, missing)
    with pytest.raises(ValueError, match=r'unexpected keys \(1\): dist_token$'):
        pretrained_state_dict(dst, {**sd, 'dist_token': torch.zeros(1, 1, D)})
    tiny = timm.create_model('deit_tiny_patch16_224').state_dict()
    with pytest.raises(ValueError) as info:
        pretrained_state_dict(dst, {'model': tiny})
    msg = str(info.value)
    assert 'unexpected keys (' in msg and 'blocks.4.' in msg  # tiny has 12 layers, micro 4
    assert 'mis-shaped keys (' in msg and 'pos_embed (1, 197, 192) vs (1, 65, 64)' in msg
    with pytest.raises(ValueError, match='no state dict'):
        pretrained_state_dict(dst, {'epoch': 3, 'args': {}})


def test_cut_model_runs_under_autocast():
    """AMP (CUDA's float16; here the CPU's bfloat16) gives half-precision sub-block outputs that
    are written into a float32 residual stream: the cut model must accept that."""
    model = timm.create_model('deit_micro_patch4_32', num_classes=10).eval()
    arch = model.arch()
    arch['blocks'][0]['attn']['out_idx'] = list(range(0, 64, 2))
    arch['blocks'][1]['mlp']['in_idx'] = list(range(10, 50))
    cut = models.build_from_arch(arch).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = cut(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = cut(x)
    assert low.shape == ref.shape and torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_align_widths_pads_with_exact_zeros():
    """The deployment copy with widths padded to multiples of 8 computes the same logits."""
    torch.manual_seed(0)
    model = timm.create_model('deit_micro_patch4_32', num_classes=10)
    arch = model.arch()
    arch['blocks'][0]['attn'].update(in_idx=list(range(3, 60, 2)), out_idx=list(range(1, 64, 3)),
                                     head_dim=13)
    arch['blocks'][1]['mlp'].update(in_idx=[5, 1, 9, 30, 44], hidden_features=101,
                                    out_idx=list(range(0, 61)))
    arch['blocks'][2]['attn'] = None
    cut = models.build_from_arch(arch).eval()
    for p in cut.parameters():  # non-trivial biases and norms, so that padding errors would show
        torch.nn.init.normal_(p, std=0.2)
    aligned = models.align_widths(cut, 8).eval()
    for blk in aligned.arch()['blocks']:
        for sub in blk.values():
            if sub is None:
                continue
            widths = [len(i) for i in (sub['in_idx'], sub['out_idx']) if i is not None]
            widths.append(sub.get('head_dim', sub.get('hidden_features')))
            assert all(w % 8 == 0 for w in widths), sub
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (aligned(x) - cut(x)).abs().max() < 1e-5


# ---------------------------------------------------------------- every registered model

@pytest.mark.parametrize('name', list(models.CONFIGS))
def test_registered_model_contract(name):
    """Forward, backward, a weights_only state-dict round trip and the output shape, at a
    2 x 2 patch grid so that even deit_base stays cheap."""
    cfg = models.CONFIGS[name]
    size = 2 * cfg.patch_size
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7, img_size=size)
    assert (model.embed_dim, model.depth, model.num_heads) == (cfg.embed_dim, cfg.depth, cfg.num_heads)
    assert timm.create_model(name).img_size == cfg.img_size
    x = images(n=2, size=size)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(reloaded(model).eval()(x), model.eval()(x))
