"""DeiT's late flags (--bce-loss, --ThreeAugment, --src, --attn-only, --eval-crop-ratio and the
authors' --crop-pct, --distributed), and the DeiT flags refused in one line (--resplit, --cosub)."""
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.loss import BinaryCrossEntropy
from torchvision import transforms

import main
from conftest import check_ok, micro, run_cli
from datasets import build_transform
from test_reliability import each_case, one_line
from train.flags import ArgumentParser
from train.recipe import build_criterion, build_optimizer
from train.check_args import check_args
from utils import read_log

# every flag of facebookresearch/deit's get_args_parser (main.py at 7e160fe), and the authors' --crop-pct
DEIT_FLAGS = """--batch-size --epochs --bce-loss --unscale-lr --model --input-size --drop --drop-path --model-ema
--no-model-ema --model-ema-decay --model-ema-force-cpu --opt --opt-eps --opt-betas --clip-grad --momentum
--weight-decay --sched --lr --lr-noise --lr-noise-pct --lr-noise-std --warmup-lr --min-lr --decay-epochs
--warmup-epochs --cooldown-epochs --patience-epochs --decay-rate --dr --color-jitter --aa --smoothing
--train-interpolation --repeated-aug --no-repeated-aug --train-mode --no-train-mode --ThreeAugment --src
--reprob --remode --recount --resplit --mixup --cutmix --cutmix-minmax --mixup-prob --mixup-switch-prob
--mixup-mode --teacher-model --teacher-path --distillation-type --distillation-alpha --distillation-tau
--cosub --finetune --attn-only --data-path --data-set --inat-category --output_dir --device --seed --resume
--start_epoch --eval --eval-crop-ratio --dist-eval --num_workers --pin-mem --no-pin-mem --distributed
--world_size --dist_url --crop-pct""".split()


def parse(*flags):
    parser = ArgumentParser('test', parents=[main.get_args_parser()])
    return check_args(parser.parse_args(['--model', 'deit_micro_patch4_32', '--data-set', 'DIGITS',
                                       '--device', 'cpu', *map(str, flags)]))


def test_every_flag_of_deits_parser_is_accepted():
    known = main.get_args_parser()._option_string_actions
    assert [f for f in DEIT_FLAGS if f not in known] == []
    assert parse('--crop-pct', '0.9').eval_crop_ratio == parse('--eval-crop-ratio', '0.9').eval_crop_ratio == 0.9


def test_deit_flags_that_make_no_sense_here_are_one_line_before_the_folder(tmp_path):
    cases = {'resplit': (['--resplit'], r"^error: --resplit .*augmentation splits"),
             'cosub': (['--cosub'], r'^error: --cosub .*not supported'),
             'src alone': (['--src'], r'^error: --src changes the crop of --ThreeAugment'),
             'bce with smoothing': (['--bce-loss', '--smoothing', '0.1'], r'^error: --bce-loss .*--smoothing 0'),
             'crop ratio': (['--eval-crop-ratio', '1.2'], r'^error: --eval-crop-ratio is a share in \(0, 1\]')}

    def check(case, folder):
        flags, pattern = cases[case]
        out = folder / 'out'
        one_line(run_cli(['--epochs', '1', '--output_dir', out, *flags], folder), pattern)
        assert not out.exists()
    each_case(cases, check, tmp_path)


@pytest.mark.parametrize('mixup', [True, False])
def test_bce_loss_is_deits_on_the_targets_thresholded_at_0(mixup):
    args = parse('--bce-loss', '--smoothing', '0', *([] if mixup else ['--mixup', '0', '--cutmix', '0']))
    criterion, mixup_fn = build_criterion(args, 10)
    assert isinstance(criterion, BinaryCrossEntropy) and (mixup_fn is not None) == mixup
    torch.manual_seed(0)
    x, y, z = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)), torch.randn(4, 10)
    if mixup:
        x, y = mixup_fn(x, y)
        assert ((y > 0) & (y < 1)).any()  # mixed targets: DeiT makes every class mixed in a positive
    positives = y.gt(0).float() if mixup else F.one_hot(y, 10).float()
    assert criterion(z, y).item() == pytest.approx(F.binary_cross_entropy_with_logits(z, positives).item(), rel=1e-6)


def test_attn_only_trains_attention_head_and_position_embedding_and_keeps_the_gates_scored():
    model = micro()
    model.add_gates()
    optimizer = build_optimizer(parse('--attn-only'), model, 1e-3)
    trained = {id(p) for g in optimizer.param_groups for p in g['params']}
    names = {n for n, p in model.named_parameters() if id(p) in trained}
    assert names == {n for n, _ in model.named_parameters()
                     if ('.attn.' in n and not n.endswith('_gate.mask')) or n.startswith('head.') or n == 'pos_embed'}
    assert any('.attn.qkv.' in n for n in names) and not any('.mlp.' in n for n in names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(2, 3, 32, 32)).square().sum().backward()
    optimizer.step()
    assert all(p.grad is not None for p in model.gate_parameters())  # the Taylor scores can read them
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == names


def test_three_augment_is_a_crop_a_flip_one_of_three_and_jitter():
    image = Image.new('RGB', (40, 40), (30, 120, 200))
    for src, crop in ((False, transforms.RandomResizedCrop), (True, transforms.RandomCrop)):
        args = parse('--ThreeAugment', '--input-size', '32', *(['--src'] if src else []))
        t = build_transform(True, args)
        kinds = [type(s) for s in t.transforms]
        assert crop in kinds and transforms.RandomChoice in kinds and transforms.ColorJitter in kinds
        assert transforms.RandomErasing not in kinds  # 3-Augment replaces --aa and --reprob
        choice = next(s for s in t.transforms if isinstance(s, transforms.RandomChoice))
        assert len(choice.transforms) == 3
        assert t(image).shape == (3, 32, 32)
    # DIGITS: no flip (a flipped digit is another digit or none)
    flip = next(s for s in t.transforms if isinstance(s, transforms.RandomHorizontalFlip))
    assert flip.p == 0


@pytest.mark.parametrize('ratio,resize', [(None, 256), ('0.9', 248), ('1', 224)])
def test_eval_crop_ratio_sets_the_evaluation_resize(ratio, resize):
    args = parse('--model', 'deit_tiny_patch16_224', *(['--eval-crop-ratio', ratio] if ratio else []))
    t = build_transform(False, args)
    assert t.transforms[0].size == resize and t.transforms[1].size == (224, 224)


def test_a_deit_iii_command_line_prunes_on_digits(tmp_path):
    proc = check_ok(run_cli(['--ThreeAugment', '--src', '--bce-loss', '--smoothing', '0', '--attn-only',
                             '--eval-crop-ratio', '0.9', '--distributed', '--epochs', '2',
                             '--prune-method', 'block_pr', '--prune-ratio', '0.5', '--prune-start-epoch', '0',
                             '--prune-sparse-epoch', '1', '--output_dir', tmp_path / 'out'], tmp_path))
    assert (tmp_path / 'out' / 'first_sparse_checkpoint.pth').is_file(), proc.stdout[-2000:]
    assert all(math.isfinite(r['train_loss']) for r in read_log(tmp_path / 'out' / 'log.txt'))
