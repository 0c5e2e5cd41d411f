"""Any supported timm VisionTransformer in, the same family out (issue 29): the architecture of a
name is timm's own, the conversion is exact, DAP's cut of every family computes what its gated
model computes, and the cut travels as a timm folder and as ONNX with the same logits."""
import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import RmsNorm, SwiGLUPacked
from timm.models.vision_transformer import ParallelScalingBlock, ResPostBlock
from timm.models.vision_transformer import VisionTransformer as TimmViT

import models
from families import FAMILIES, SIZES, ours, register, timm_model
from models.families import UnknownModel, UnsupportedModel, config_of
from pruning import cut_model
from pruning.random_scores import random_cut

X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def logits(model, x=X):
    with torch.no_grad():
        return model.eval()(x)


# ---------------------------------------------------------------- exact conversion

@pytest.mark.parametrize('family', FAMILIES)
def test_a_timm_model_converts_exactly(family):
    ref = timm_model(family, seed=1)
    ours_model = models.from_timm(ref, register(family))
    assert list(ours_model.state_dict()) == list(ref.state_dict())  # timm's names, in timm's order
    expect = logits(ref)
    assert expect.abs().max() > 0.3  # a real comparison, not of two near-zero outputs
    diff = (logits(ours_model) - expect).abs().max().item()
    print(f'{family}: max |Δlogit| vs timm = {diff:.2e}')
    assert diff < 1e-5


def test_the_options_change_the_function():
    """Each family's options matter: the same weights read as DeiT give other logits."""
    for family in ('deit3', 'dinov2_reg4', 'clip', 'gap', 'qk_norm'):
        ref = timm_model(family)
        shared = {k: v for k, v in ref.state_dict().items()}
        deit = TimmViT(**SIZES, num_classes=10, class_token='cls_token' in shared,
                       global_pool='token' if 'cls_token' in shared else 'avg', fc_norm=False,
                       reg_tokens=FAMILIES[family].get('reg_tokens', 0),
                       no_embed_class=FAMILIES[family].get('no_embed_class', False)).eval()
        fit = {k: v for k, v in shared.items() if k in deit.state_dict()
               and v.shape == deit.state_dict()[k].shape}
        deit.load_state_dict(fit, strict=False)
        assert (logits(deit) - logits(ref)).abs().max() > 1e-3, family


# ---------------------------------------------------------------- names: timm's own configuration

def test_timm_names_resolve_to_timm_configurations_without_download():
    dino = models.vit_config('vit_small_patch14_reg4_dinov2.lvd142m')  # with its pretrained tag
    assert (dino.patch_size, dino.img_size, dino.embed_dim, dino.depth, dino.num_heads) == (14, 518, 384, 12, 6)
    assert dino.reg_tokens == 4 and dino.no_embed_class and dino.init_values == 1e-5
    assert models.vit_config('vit_small_patch14_dinov2').reg_tokens == 0
    deit3 = models.vit_config('deit3_small_patch16_224')
    assert deit3.no_embed_class and deit3.init_values == 1e-6 and deit3.class_token
    clip = models.vit_config('vit_base_patch16_clip_quickgelu_224')
    assert clip.pre_norm and clip.act == 'quick_gelu' and clip.norm_eps == 1e-5
    gap = models.vit_config('vit_medium_patch16_gap_256')
    assert not gap.class_token and gap.global_pool == 'avg' and gap.img_size == 256
    assert models.vit_config('vit_base_patch16_384').img_size == 384
    assert models.vit_config('vit_huge_patch14_224').depth == 32
    # our own registrations (DeiT's, the micro models) are families too
    assert models.vit_config('deit_small_patch16_224') == models.CONFIGS['deit_small_patch16_224']


@pytest.mark.parametrize('name,option', [
    ('vit_so400m_patch14_siglip_224', "global_pool 'map'"),
    ('vit_giant_patch14_dinov2', 'mlp_layer GluMlp'),
    ('eva02_small_patch14_224', 'it is a Eva'),
    ('resnet18', 'it is a ResNet'),
])
def test_a_name_outside_the_set_is_refused_naming_why(name, option):
    with pytest.raises(UnsupportedModel) as e:
        models.vit_config(name)
    assert option in str(e.value) and '\n' not in str(e.value)


def test_an_unknown_name_is_refused_with_close_names():
    with pytest.raises(UnknownModel, match=r"unknown model 'vit_smal_patch16_224' \(did you mean vit_small_patch16_224"):
        models.vit_config('vit_smal_patch16_224')


@pytest.mark.parametrize('kwargs,option', [
    (dict(mlp_layer=SwiGLUPacked), 'mlp_layer GluMlp'),  # timm's SwiGLUPacked is a GluMlp
    (dict(block_fn=ParallelScalingBlock), 'block_fn ParallelScalingBlock'),
    (dict(block_fn=ResPostBlock), 'block_fn ResPostBlock'),
    (dict(norm_layer=RmsNorm), 'norm_layer RmsNorm'),
    (dict(global_pool='map'), "global_pool 'map'"),
    (dict(global_pool='max'), "global_pool 'max'"),
    (dict(act_layer='gelu_tanh'), 'act_layer GELUTanh'),
    (dict(scale_mlp_norm=True), 'scale_mlp_norm'),
    (dict(proj_bias=False), 'proj_bias=False'),
    (dict(pos_embed='none'), "pos_embed 'none'"),
])
def test_an_option_outside_the_set_is_named(kwargs, option):
    model = TimmViT(**SIZES, num_classes=10, **kwargs)
    with pytest.raises(UnsupportedModel, match=option.replace('(', r'\(')):
        config_of(model)


def test_list_models_shows_supported_names_and_why_others_are_not(tmp_path):
    from conftest import REPO
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, 'main.py', '--list-models', '*dinov2*'], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(l.startswith('vit_small_patch14_reg4_dinov2 ') and 'reg_tokens=4' in l for l in lines)
    assert any(l.startswith('vit_micro_patch4_reg4_dinov2 ') for l in lines)
    refused = lines[lines.index(next(l for l in lines if l.startswith('not supported'))):]
    assert any(l.startswith('vit_giant_patch14_dinov2 ') and 'GluMlp' in l for l in refused)


# ---------------------------------------------------------------- the cut of every family

def random_binary(n, keep, g):
    m = torch.zeros(n)
    m[torch.randperm(n, generator=g)[:keep]] = 1
    return m


@pytest.mark.parametrize('family', FAMILIES)
def test_the_cut_of_every_family_computes_what_its_gated_model_computes(family):
    model = ours(family, seed=2)
    dense = logits(model)
    model.add_gates()
    g = torch.Generator().manual_seed(3)
    keep = {'attn_in': 40, 'attn_qkv': 11, 'attn_out': 50, 'mlp_in': 56, 'mlp_hid': 150, 'mlp_out': 30}
    with torch.no_grad():
        for l, blk in enumerate(model.blocks):
            for name, k in keep.items():
                # whole sub-blocks go: DAP then zeroes all three of their gates (METHOD.md §2)
                removed = (l, name[:3]) in ((1, 'att'), (2, 'mlp'))
                blk.gates[name].copy_(random_binary(blk.gates[name].numel(), 0 if removed else k, g))
    gated = logits(model)
    assert (gated - dense).abs().max() > 1e-2  # the gates change the function
    cut = cut_model(model).eval()
    assert cut.blocks[1].attn is None and cut.blocks[2].mlp is None
    assert (logits(cut) - gated).abs().max().item() < 1e-4
    if FAMILIES[family].get('init_values'):  # γ is cut with the dims it scales
        assert cut.blocks[0].ls1.gamma.numel() == 50 and cut.blocks[0].ls2.gamma.numel() == 30
    if FAMILIES[family].get('qk_norm'):
        assert cut.blocks[0].attn.q_norm.weight.numel() == 11
    rebuilt = models.build_from_arch(cut.arch())
    rebuilt.load_state_dict(cut.state_dict())
    assert torch.equal(logits(rebuilt), logits(cut))


@pytest.mark.parametrize('method', ['block_pr', 'uniform', 'global'])
@pytest.mark.parametrize('family', FAMILIES)
def test_dap_prunes_every_family_to_its_budget(family, method):
    dense, cut = random_cut(register(family), 0.5, 10, 32, seed=1, method=method)
    assert cut.config == dense.config.__class__(**{**dense.config.__dict__, 'embed_dim': cut.embed_dim})
    assert cut.num_parameters() == pytest.approx(0.5 * dense.num_parameters(), rel=0.05)
    assert logits(cut).shape == (3, 10)


# ---------------------------------------------------------------- the same family out

@pytest.mark.parametrize('family', FAMILIES)
def test_the_cut_exports_as_a_timm_folder_and_onnx_with_the_same_logits(family, tmp_path):
    from conftest import REPO
    import sys
    _, cut = random_cut(register(family), 0.5, 10, 32, seed=1)
    cut.eval()
    models.write_timm_folder(cut, str(tmp_path / 'folder'), {'input_size': [3, 32, 32], 'num_classes': 10})
    again = timm.create_model(f'local-dir:{tmp_path / "folder"}').eval()
    assert again.arch() == cut.arch()
    assert torch.equal(logits(again), logits(cut))
    pytest.importorskip('onnxruntime')
    sys.path.insert(0, f'{REPO}/scripts')
    import export
    export.export_onnx(cut, str(tmp_path / 'cut.onnx'))
    assert export.max_difference(cut, str(tmp_path / 'cut.onnx'), X) < 1e-4


# ---------------------------------------------------------------- end to end

# scripts/demo.sh's recipe: what a few DIGITS epochs learn from
DEMO_RECIPE = ['--aa', 'none', '--mixup', '0', '--cutmix', '0', '--reprob', '0', '--no-model-ema',
               '--unscale-lr', '--lr', '2e-3', '--warmup-epochs', '0']


def test_a_dinov2_shaped_model_goes_through_prune_cut_fine_tune_and_export(tmp_path):
    """DIGITS with vit_micro_patch4_reg4_dinov2 (patch 4, 4 registers, LayerScale): its dense
    weights from a .safetensors file of timm's own layout, DAP to half its parameters, the cut
    fine-tuned, exported as a timm folder that timm loads with the same logits."""
    import json
    import subprocess
    import sys
    from safetensors.torch import save_file
    from conftest import REPO, check_ok, cli_env, run_cli
    name = 'vit_micro_patch4_reg4_dinov2'
    dense = models.create_model(name, num_classes=10)
    with torch.no_grad():  # γ as a trained DINOv2 has them (~0.1-1), not at their init 1e-5
        for blk in dense.blocks:
            blk.ls1.gamma.fill_(0.3)
            blk.ls2.gamma.fill_(0.3)
    save_file(dense.state_dict(), str(tmp_path / 'dense.safetensors'))  # keys as timm writes them
    common = ['--model', name, '--input-size', '32', '--batch-size', '32', *DEMO_RECIPE]
    out = tmp_path / 'prune'
    check_ok(run_cli([*common, '--model-path', tmp_path / 'dense.safetensors', '--epochs', '2',
                      '--prune-method', 'block_pr', '--prune-ratio', '0.5', '--prune-start-epoch', '0',
                      '--prune-sparse-epoch', '1', '--prune-steps-update-mask', '4', '--output_dir', out],
                     tmp_path))
    ckpt = torch.load(out / 'first_sparse_checkpoint.pth', map_location='cpu', weights_only=True)
    arch = ckpt['arch']
    assert arch['family'] == name and arch['reg_tokens'] == 4 and arch['no_embed_class'] and arch['init_values']
    assert ckpt['model']['reg_token'].shape == (1, 4, 64)
    cut = models.load_model(ckpt)
    assert cut.num_parameters() == pytest.approx(0.5 * dense.num_parameters(), rel=0.05)
    # γ is cut with the dims each sub-block writes
    for blk, b in zip(cut.blocks, arch['blocks']):
        if b['attn'] is not None:
            assert blk.ls1.gamma.numel() == (64 if b['attn']['out_idx'] is None else len(b['attn']['out_idx']))
    tuned = tmp_path / 'tune'
    proc = check_ok(run_cli([*common, '--epochs', '2', '--model-path', out / 'first_sparse_checkpoint.pth',
                             '--resize-model-by-checkpoint', '--output_dir', tuned], tmp_path))
    log = [json.loads(l) for l in (tuned / 'log.txt').read_text().splitlines()]
    assert log[-1]['train_loss'] < log[0]['train_loss']  # the cut model trains
    folder = tmp_path / 'exported'
    proc = subprocess.run([sys.executable, 'scripts/export.py', str(tuned / 'checkpoint.pth'), '--format', 'timm',
                           '--out', str(folder)], cwd=REPO, env=cli_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    check_ok(proc)
    assert 'max |Δlogit| = 0.00e+00' in proc.stdout
    again = timm.create_model(f'local-dir:{folder}').eval()
    assert again.num_reg_tokens == 4 and again.arch()['family'] == name


@pytest.mark.parametrize('family', FAMILIES)
def test_the_deployment_forms_of_every_family_compute_the_cut_models_function(family):
    """models.deploy's copies (dense reads and writes, widths padded to multiples of 8) carry
    LayerScale's γ, qk_norm and a missing qkv bias along."""
    _, cut = random_cut(register(family), 0.5, 10, 32, seed=2)
    ref = logits(cut)
    plan = {l: {k: {'read': 'dense', 'write': 'dense'} for k in ('attn', 'mlp')} for l in range(len(cut.blocks))}
    torch.testing.assert_close(logits(models.apply_forms(cut, plan)), ref, atol=1e-5, rtol=0)
    aligned = models.align_widths(cut, 8)
    assert all(b['mlp'] is None or b['mlp']['hidden_features'] % 8 == 0 for b in aligned.arch()['blocks'])
    torch.testing.assert_close(logits(aligned), ref, atol=1e-5, rtol=0)
