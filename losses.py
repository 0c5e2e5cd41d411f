"""Knowledge distillation (DeiT's losses.py): the training loss with a teacher.

DeiT's students have a distillation token and return (class logits, distillation logits); the
distillation term reads the second. The ViTs here have a class token only: both terms read the
class-token logits, blended by α as DeiT blends its two heads (docs/METHOD.md §10).

    soft: KL(softmax(z_t / τ) ‖ softmax(z_s / τ)) · τ², summed and divided by the logits' count
    hard: cross-entropy of the student against the teacher's argmax
    loss = (1 − α) · base(z_s, y) + α · distillation
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

DISTILLATION_TYPES = ('none', 'soft', 'hard')


class DistillationLoss(nn.Module):
    """criterion(inputs, outputs, labels): `base_criterion` on the labels, blended with the
    teacher's distillation term. The teacher runs in eval mode without gradients, under
    whatever autocast the caller runs in."""

    def __init__(self, base_criterion, teacher: nn.Module, distillation_type: str, alpha: float, tau: float):
        super().__init__()
        if distillation_type not in DISTILLATION_TYPES[1:]:
            raise ValueError(f'distillation_type must be soft or hard, got {distillation_type!r}')
        self.base_criterion = base_criterion
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.distillation_type, self.alpha, self.tau = distillation_type, alpha, tau

    def train(self, mode: bool = True):  # the teacher stays in eval mode
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, inputs, outputs, labels):
        class_logits, dist_logits = outputs if isinstance(outputs, (tuple, list)) else (outputs, outputs)
        base = self.base_criterion(class_logits, labels)
        with torch.no_grad():
            teacher = self.teacher(inputs)
        if self.distillation_type == 'soft':
            T = self.tau
            distill = F.kl_div(F.log_softmax(dist_logits / T, dim=1), F.log_softmax(teacher / T, dim=1),
                               reduction='sum', log_target=True) * (T * T) / dist_logits.numel()
        else:
            distill = F.cross_entropy(dist_logits, teacher.argmax(dim=1))
        return base * (1 - self.alpha) + distill * self.alpha


def base_of(criterion):
    """The label loss of a criterion: a DistillationLoss's base, or the criterion itself (the
    ΔΨ heads and any other auxiliary loss train on the labels only)."""
    return criterion.base_criterion if isinstance(criterion, DistillationLoss) else criterion


def training_loss(criterion, inputs, outputs, labels):
    """criterion(outputs, labels), or with the inputs for a DistillationLoss."""
    if isinstance(criterion, DistillationLoss):
        return criterion(inputs, outputs, labels)
    return criterion(outputs, labels)
