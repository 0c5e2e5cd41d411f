"""Knowledge distillation (DeiT's --distillation-type, losses.py): the loss is DeiT's formula on
the class-token logits, the teacher never trains, the ΔΨ heads see the label loss only, and a
DeiT command line with a teacher prunes and fine-tunes on DIGITS."""
import math

import pytest
import torch
import torch.nn.functional as F

import engine
from conftest import check_ok, micro, run_cli
from losses import DistillationLoss
from test_reliability import each_case, one_line
from utils import read_log


def teacher_and_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    x, z = torch.randn(6, 3, 2, 2, generator=g), torch.randn(6, 5, generator=g, requires_grad=True)
    return teacher, x, z, torch.randint(0, 5, (6,), generator=g)


@pytest.mark.parametrize('kind', ['soft', 'hard'])
def test_the_distillation_loss_is_deits_formula_on_the_class_logits(kind):
    teacher, x, z, y = teacher_and_batch()
    alpha, tau = 0.3, 2.0
    loss = DistillationLoss(torch.nn.CrossEntropyLoss(), teacher, kind, alpha, tau)(x, z, y)
    t = teacher(x).detach()
    if kind == 'soft':  # KL(p_t ‖ p_s) at temperature τ, times τ², per logit, by hand
        p_t, log_p_s = F.softmax(t / tau, 1), F.log_softmax(z / tau, 1)
        distill = (p_t * (p_t.log() - log_p_s)).sum() * tau ** 2 / z.numel()
    else:
        distill = -F.log_softmax(z, 1)[torch.arange(6), t.argmax(1)].mean()
    want = (1 - alpha) * F.cross_entropy(z, y) + alpha * distill
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters()) and z.grad is not None
    criterion = DistillationLoss(torch.nn.CrossEntropyLoss(), teacher, kind, alpha, tau).train()
    assert not criterion.teacher.training  # train() on the loss leaves the teacher in eval mode


def test_the_delta_psi_heads_train_on_the_label_loss_only():
    teacher, x, z, y = teacher_and_batch()
    base = torch.nn.CrossEntropyLoss()
    seen = []

    class Pruner:
        def aux_loss(self, aux, targets, criterion):
            seen.append(criterion)
            return torch.zeros(())

    engine._loss(lambda s: (z, None), DistillationLoss(base, teacher, 'soft', 0.5, 1.0), x, y, Pruner())
    assert seen == [base]


def test_a_deit_command_line_with_a_teacher_prunes_and_fine_tunes(tmp_path):
    teacher = micro(7)
    torch.save({'model': teacher.state_dict()}, tmp_path / 'teacher.pth')
    common = ['--teacher-model', 'deit_micro_patch4_32', '--teacher-path', tmp_path / 'teacher.pth',
              '--distillation-alpha', '0.5', '--distillation-tau', '1.0']
    prune = check_ok(run_cli(['--distillation-type', 'soft', *common, '--prune-method', 'block_pr',
                              '--prune-ratio', '0.5', '--epochs', '2', '--prune-start-epoch', '0',
                              '--prune-sparse-epoch', '1', '--output_dir', tmp_path / 'prune'], tmp_path))
    assert 'Teacher: ' in prune.stdout and 'soft distillation' in prune.stdout
    assert (tmp_path / 'prune' / 'first_sparse_checkpoint.pth').is_file()
    tune = check_ok(run_cli(['--distillation-type', 'hard', *common, '--epochs', '1', '--resize-model-by-checkpoint',
                             '--model-path', tmp_path / 'prune' / 'first_sparse_checkpoint.pth',
                             '--output_dir', tmp_path / 'tune'], tmp_path))
    assert 'hard distillation' in tune.stdout
    assert all(math.isfinite(r['train_loss']) for r in read_log(tmp_path / 'tune' / 'log.txt'))


def test_a_teacher_that_does_not_fit_is_one_line_before_the_folder(tmp_path):
    from test_hub import cut_checkpoint
    torch.save({'model': micro(0, num_classes=7).state_dict()}, tmp_path / 'seven.pth')
    cut_checkpoint(tmp_path / 'cut32.pth')  # a cut teacher made at 32 px
    cases = {'no path': (['--distillation-type', 'soft'], r'^error: --distillation-type soft needs --teacher-path'),
             'cut teacher at another input size': (['--distillation-type', 'soft', '--teacher-path', str(tmp_path / 'cut32.pth'),
                                                    '--input-size', '16'],
                                                   r"^error: --teacher-path .* made at 32 px, this run's --input-size is 16"),
             'other classes': (['--distillation-type', 'hard', '--teacher-model', 'deit_micro_patch4_32',
                                '--teacher-path', str(tmp_path / 'seven.pth')], r'^error: --teacher-path .*do not fit'),
             'bad alpha': (['--distillation-type', 'soft', '--distillation-alpha', '1.5'],
                           r'^error: --distillation-alpha is a share in \[0, 1\], got 1.5'),
             'unknown type': (['--distillation-type', 'medium'], r"invalid choice: 'medium'")}

    def check(case, folder):
        flags, pattern = cases[case]
        out = folder / 'out'
        one_line(run_cli(['--epochs', '1', '--output_dir', out, *flags], folder), pattern)
        assert not out.exists()
    each_case(cases, check, tmp_path)
