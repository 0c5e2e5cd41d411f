"""DeiT's distilled family (deit_{tiny,small,base}_distilled_patch16_224): a distillation token
after the class token and a second head, timm's names. It loads DeiT / timm weights, prunes,
cuts exactly and fine-tunes, with or without a teacher."""
import pytest
import timm
import torch
from timm.models.deit import VisionTransformerDistilled

import models
from conftest import check_ok, micro, o1_weights, run_cli
from models import build_from_arch, pretrained_state_dict
from pruning import cut_model
from pruning.cost import FlopsCost, sub_block_cost
from pruning.cost import count_flops

MICRO = 'deit_micro_distilled_patch4_32'


def timm_twin(ours):
    """timm's own VisionTransformerDistilled of the same shape, with our model's weights."""
    ref = VisionTransformerDistilled(img_size=ours.img_size, patch_size=ours.patch_size, embed_dim=ours.embed_dim,
                                     depth=ours.depth, num_heads=ours.num_heads, num_classes=ours.num_classes)
    assert list(ref.state_dict()) == list(ours.state_dict())  # timm's names, in timm's order
    ref.load_state_dict(ours.state_dict())
    return ref


@pytest.mark.parametrize('name', ['deit_tiny_distilled_patch16_224', MICRO])
def test_same_logits_as_timms_distilled_vit_in_eval_and_in_distilled_training(name):
    torch.manual_seed(0)
    ours = timm.create_model(name, num_classes=10, img_size=32)
    ref = timm_twin(ours)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours.eval(), ref.eval()
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)  # the mean of both heads
        ours.train().set_distilled_training(), ref.train().set_distilled_training()
        (c, d), (rc, rd) = ours(x), ref(x)
        torch.testing.assert_close(c, rc, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(d, rd, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(c, d)  # two heads, on two tokens
        ours.set_distilled_training(False)
        torch.testing.assert_close(ours(x), (c + d) / 2)  # without DeiT's loss: their mean


def test_an_imagenet_checkpoint_fits_with_both_heads_reset_and_two_prefix_tokens_kept():
    torch.manual_seed(0)
    official = VisionTransformerDistilled(img_size=224, patch_size=4, embed_dim=64, depth=4, num_heads=4,
                                          num_classes=1000).state_dict()
    model = timm.create_model(MICRO, num_classes=10)
    sd, notes = pretrained_state_dict(model, {'model': official})
    assert any('classifier reset' in n for n in notes) and any('pos_embed resampled' in n for n in notes)
    assert sd['head_dist.weight'].shape == (10, 64) and sd['pos_embed'].shape == (1, 2 + 64, 64)
    # the class and distillation tokens' position embeddings are kept as they are, not resampled
    assert torch.equal(sd['pos_embed'][:, :2], official['pos_embed'][:, :2])
    model.load_state_dict(sd)


def test_distilled_model_prunes_and_cuts_exactly_with_the_embedding_gate():
    model = o1_weights(micro(0, name=MICRO), 100).eval()
    model.add_gates(embed=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.gate_parameters():
            p.copy_((torch.rand(p.shape, generator=g) > 0.3).float())
        x = torch.randn(3, 3, 32, 32, generator=g)
        gated = model(x)
    cut = cut_model(model).eval()
    assert cut.distilled and cut.arch()['distilled'] and cut.embed_dim < 64
    with torch.no_grad():
        assert (cut(x) - gated).abs().max().item() < 1e-4
        rebuilt = build_from_arch(cut.arch()).eval()
        rebuilt.load_state_dict(cut.state_dict())
        assert torch.equal(rebuilt(x), cut(x))
    tokens = cut.patch_embed.num_patches + 2
    cost = FlopsCost(tokens)
    assert cost.non_block(cut) + sum(sub_block_cost(cost, cut)) == count_flops(cut, 32)


def test_arch_of_another_family_kind_is_refused():
    arch = timm.create_model(MICRO).arch()
    arch['family'] = 'deit_micro_patch4_32'
    with pytest.raises(ValueError, match='arch distilled must be False'):
        models.check_arch(arch)


def test_a_distilled_deit_prunes_and_fine_tunes_with_a_hard_teacher_on_digits(tmp_path):
    torch.save({'model': micro(7).state_dict()}, tmp_path / 'teacher.pth')
    teacher = ['--teacher-model', 'deit_micro_patch4_32', '--teacher-path', tmp_path / 'teacher.pth',
               '--distillation-type', 'hard']
    prune = check_ok(run_cli(['--model', MICRO, *teacher, '--prune-method', 'block_pr', '--prune-ratio', '0.5',
                              '--epochs', '2', '--prune-start-epoch', '0', '--prune-sparse-epoch', '1',
                              '--output_dir', tmp_path / 'prune'], tmp_path))
    assert 'hard distillation' in prune.stdout
    ckpt = torch.load(tmp_path / 'prune' / 'first_sparse_checkpoint.pth', weights_only=True)
    assert ckpt['arch']['distilled'] and 'head_dist.weight' in ckpt['model'] and 'dist_token' in ckpt['model']
    check_ok(run_cli(['--model', MICRO, '--epochs', '1', '--resize-model-by-checkpoint', '--model-path',
                      tmp_path / 'prune' / 'first_sparse_checkpoint.pth', '--output_dir', tmp_path / 'tune'],
                     tmp_path))
