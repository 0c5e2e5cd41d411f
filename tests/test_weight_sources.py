"""--model-path reads what timm users hold for a ViT (issue 29, item 3): .safetensors, .pth,
.bin, a timm / Hugging Face folder (local-dir:), a Hugging Face Hub model through its local
cache (hf-hub:, offline); foreign key layouts are converted and pos_embed resampled as timm does,
registers kept; --pretrained takes timm's own weights. timm's VisionTransformer at a tiny size
stands in for the model (same attributes and state-dict keys); nothing is downloaded."""
import argparse
import json

import pytest
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from errors import UsageError
from models.checkpoint import pretrained_state_dict, timm_pretrained_checkpoint
from models.checkpoint_io import CheckpointError, read_checkpoint

COMMIT = '0123456789abcdef0123456789abcdef01234567'


def dinov2_like(seed, img_size=32, no_embed_class=True):
    """DINOv2 with registers in miniature: 4 registers outside pos_embed, LayerScale."""
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=img_size, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                              num_classes=10, reg_tokens=4, no_embed_class=no_embed_class, init_values=1e-5)
    with torch.no_grad():  # LayerScale's 1e-5 everywhere would let a copy of the wrong block pass
        for p in model.parameters():
            p.normal_()
    return model


def fitted(model, source):
    state, notes = pretrained_state_dict(model, read_checkpoint(source, '--model-path'))
    model.load_state_dict(state)
    return notes


def assert_same_weights(model, expected):
    own = model.state_dict()
    assert own.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(own[k], v), k


def timm_folder(folder, state, weights='model.safetensors'):
    folder.mkdir()
    (folder / 'config.json').write_text(json.dumps({
        'architecture': 'vit_small_patch14_reg4_dinov2', 'num_classes': 10,
        'pretrained_cfg': {'input_size': [3, 32, 32], 'mean': [0.5] * 3, 'std': [0.5] * 3}}))
    if weights.endswith('.safetensors'):
        save_file(state, str(folder / weights))
    else:
        torch.save(state, folder / weights)
    return folder


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline huggingface_hub cache under tmp_path (its layout: models--ORG--NAME/refs/main
    holds the commit, snapshots/COMMIT/ the files)."""
    from huggingface_hub import constants
    cache = tmp_path / 'hf-cache'
    for name, value in (('HF_HUB_CACHE', str(cache)), ('HF_HUB_OFFLINE', True)):
        monkeypatch.setenv(name, str(value) if name == 'HF_HUB_CACHE' else '1')
        monkeypatch.setattr(constants, name, value)  # (read when huggingface_hub is imported)

    def publish(repo_id, files):
        repo = cache / f'models--{repo_id.replace("/", "--")}'
        (repo / 'refs').mkdir(parents=True)
        (repo / 'refs' / 'main').write_text(COMMIT)
        snapshot = repo / 'snapshots' / COMMIT
        snapshot.mkdir(parents=True)
        for name, write in files.items():
            write(snapshot / name)
    return publish


def test_each_weight_source_gives_the_weights_it_holds(tmp_path, hub_cache):
    state = dinov2_like(seed=1).state_dict()
    save_file(state, str(tmp_path / 'w.safetensors'))
    torch.save({'model': state}, tmp_path / 'w.pth')
    torch.save(state, tmp_path / 'pytorch_model.bin')
    timm_folder(tmp_path / 'st', state)
    timm_folder(tmp_path / 'bin', state, 'pytorch_model.bin')
    config = (tmp_path / 'st' / 'config.json').read_text()
    hub_cache('org/tiny-vit', {'config.json': lambda p: p.write_text(config),
                               'model.safetensors': lambda p: save_file(state, str(p))})
    hub_cache('org/bin-only', {'pytorch_model.bin': lambda p: torch.save(state, p)})
    for source in (tmp_path / 'w.safetensors', tmp_path / 'w.pth', tmp_path / 'pytorch_model.bin',
                   f'local-dir:{tmp_path / "st"}', f'local-dir:{tmp_path / "bin"}', 'hf-hub:org/tiny-vit',
                   f'hf-hub:org/tiny-vit@{COMMIT}', 'hf-hub:org/bin-only'):
        model = dinov2_like(seed=2)
        assert fitted(model, str(source)) == [], source
        assert_same_weights(model, state)


def test_dinov2_registers_are_kept_and_patch_positions_resampled_as_timm_does(tmp_path):
    """no_embed_class: pos_embed holds the 16x16 patch positions only (no prefix rows), so it is
    resampled whole to 8x8; the class token and the 4 registers are copied."""
    big = dinov2_like(seed=3, img_size=64)
    save_file(big.state_dict(), str(tmp_path / 'big.safetensors'))
    model = dinov2_like(seed=4)
    notes = fitted(model, str(tmp_path / 'big.safetensors'))
    assert notes == ['pos_embed resampled from 256 to 64 tokens']
    torch.testing.assert_close(model.pos_embed, resample_abs_pos_embed(big.pos_embed, [8, 8], num_prefix_tokens=0))
    assert model.reg_token.shape == (1, 4, 32) and torch.equal(model.reg_token, big.reg_token)
    assert torch.equal(model.cls_token, big.cls_token)
    assert torch.equal(model.blocks[1].ls2.gamma, big.blocks[1].ls2.gamma)


def test_prefix_rows_are_kept_when_pos_embed_covers_the_class_token():
    """A class token and registers inside pos_embed (timm's default, no_embed_class=False):
    its 5 prefix rows are kept and only the grid is resampled."""
    big, model = dinov2_like(seed=5, img_size=64, no_embed_class=False), dinov2_like(seed=6, no_embed_class=False)
    state, notes = pretrained_state_dict(model, big.state_dict())
    assert notes == ['pos_embed resampled from 261 to 69 tokens']
    assert torch.equal(state['pos_embed'][:, :5], big.pos_embed[:, :5])
    torch.testing.assert_close(state['pos_embed'], resample_abs_pos_embed(big.pos_embed, [8, 8], num_prefix_tokens=5))


def test_an_original_dinov2_checkpoint_is_converted_as_timm_converts_it(tmp_path):
    """facebookresearch/dinov2's keys: a mask_token, register_tokens, and pos_embed with the
    class token's row (which timm folds into cls_token); at 64x64 into a 32x32 model."""
    timm_big = dinov2_like(seed=7, img_size=64).state_dict()
    first_row = torch.randn(1, 1, 32)
    original = {k: v for k, v in timm_big.items() if k not in ('reg_token', 'cls_token', 'pos_embed')}
    original.update({'mask_token': torch.randn(1, 32), 'register_tokens': timm_big['reg_token'],
                     'cls_token': timm_big['cls_token'] - first_row,
                     'pos_embed': torch.cat([first_row, timm_big['pos_embed']], dim=1)})
    torch.save({'model': original}, tmp_path / 'dinov2_original.pth')
    model = dinov2_like(seed=8)
    notes = fitted(model, str(tmp_path / 'dinov2_original.pth'))
    assert notes == ["keys converted to timm's layout (timm's checkpoint_filter_fn); "
                     'pos_embed of 257 tokens in the checkpoint, 64 in the model']
    torch.testing.assert_close(model.cls_token, timm_big['cls_token'])
    assert torch.equal(model.reg_token, timm_big['reg_token'])
    torch.testing.assert_close(model.pos_embed, resample_abs_pos_embed(timm_big['pos_embed'], [8, 8],
                                                                       num_prefix_tokens=0))
    assert torch.equal(model.blocks[0].attn.qkv.weight, timm_big['blocks.0.attn.qkv.weight'])


def test_features_only_weights_keep_the_models_classifier():
    """DINOv2 and CLIP towers come without a classifier (timm's num_classes=0)."""
    features = dinov2_like(seed=9)
    features.reset_classifier(0)
    model = dinov2_like(seed=10)
    head = model.head.weight.clone()
    state, notes = pretrained_state_dict(model, features.state_dict())
    assert notes == ['classifier initialized: the checkpoint has none']
    assert torch.equal(state['head.weight'], head) and torch.equal(state['norm.weight'], features.norm.weight)


def one_line_error(source, pattern):
    with pytest.raises(CheckpointError, match=pattern) as info:
        read_checkpoint(source, '--model-path')
    assert '\n' not in str(info.value)


def test_an_uncached_hub_model_or_a_bad_folder_is_one_line(tmp_path, hub_cache):
    one_line_error('hf-hub:org/not-cached', r'^--model-path hf-hub:org/not-cached: neither model.safetensors nor '
                                            r'pytorch_model.bin is in the repo or in the local Hugging Face cache')
    hub_cache('org/no-weights', {'config.json': lambda p: p.write_text('{}')})
    one_line_error('hf-hub:org/no-weights', r'^--model-path hf-hub:org/no-weights: neither model.safetensors')
    state = dinov2_like(seed=11).state_dict()
    folder = timm_folder(tmp_path / 'f', state)
    (folder / 'model.safetensors').unlink()
    one_line_error(f'local-dir:{folder}', r'has no model.safetensors or pytorch_model.bin: not a timm model folder$')
    folder = timm_folder(tmp_path / 'g', state)
    (folder / 'config.json').write_text(json.dumps({'num_classes': 10}))
    one_line_error(f'local-dir:{folder}', r'config.json names no "architecture": not a timm config$')
    folder = timm_folder(tmp_path / 'h', state, 'pytorch_model.bin')
    (folder / 'pytorch_model.bin').write_bytes(b'not a pickle')
    one_line_error(f'local-dir:{folder}', r'pytorch_model.bin is not a readable PyTorch checkpoint')


@pytest.fixture
def no_network(monkeypatch):
    """Any connection fails the test: these read local files only (CI has no network)."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError('the test tried to reach the network')
    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket, 'create_connection', refuse)


def test_timm_pretrained_checkpoint_gives_the_weights_timm_loads(tmp_path, no_network):
    """vit_tiny_patch16_384 (timm's own; vit_tiny_patch16_224 is this project's) from a local
    file through timm's pretrained_cfg, as create_model(..., pretrained=True) reads it."""
    torch.manual_seed(12)
    state = {k: torch.randn_like(v) for k, v in
             VisionTransformer(img_size=384, patch_size=16, embed_dim=192, depth=12, num_heads=3).state_dict().items()}
    save_file(state, str(tmp_path / 'vit_tiny_384.safetensors'))
    got = timm_pretrained_checkpoint('vit_tiny_patch16_384.augreg_in21k_ft_in1k',
                                     pretrained_cfg_overlay=dict(file=str(tmp_path / 'vit_tiny_384.safetensors')))
    assert got['model'].keys() == state.keys()
    assert all(torch.equal(got['model'][k], v) for k, v in state.items())
    with pytest.raises(ValueError, match=r'^timm has no pretrained weights tagged \'nope\' for vit_tiny_patch16_384'):
        timm_pretrained_checkpoint('vit_tiny_patch16_384.nope')
    with pytest.raises(ValueError, match=r'^timm has no pretrained weights for deit_micro_patch4_32: not one of'):
        timm_pretrained_checkpoint('deit_micro_patch4_32')


def test_pretrained_is_a_flag_and_with_model_path_is_refused_in_one_line(no_network):
    import main
    from train.recipe import pretrained_checkpoint
    parser = argparse.ArgumentParser('t', parents=[main.get_args_parser()])
    assert parser.parse_args(['--pretrained']).pretrained and not parser.parse_args([]).pretrained
    with pytest.raises(UsageError, match=r'^--pretrained and --model-path w.pth both name the starting weights: give one$'):
        pretrained_checkpoint(argparse.Namespace(pretrained=True, model_path='w.pth', model='vit_tiny_patch16_384'))
    with pytest.raises(UsageError, match=r'^--pretrained: timm has no pretrained weights for deit_micro_patch4_32'):
        pretrained_checkpoint(argparse.Namespace(pretrained=True, model_path='', model='deit_micro_patch4_32'))
