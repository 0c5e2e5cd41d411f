"""engine.py's training loop: DeiT's --train-mode / --no-train-mode (METHOD.md §8 v2)."""
import copy

import timm
import torch

import models  # noqa: F401  (registers deit_micro_patch4_32)
from engine import train_one_epoch
from pruning import DepthAwarePruner, PruneConfig, PruneSchedule


def loader(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g))
            for _ in range(n)]


def pruning_run(train_mode, torch_seed):
    """One epoch of a pruning run (ΔΨ heads with BatchNorm) on a model with drop-path 0.5."""
    torch.manual_seed(0)
    model = timm.create_model('deit_micro_patch4_32', num_classes=10, img_size=16, drop_path_rate=0.5)
    pruner = DepthAwarePruner(model, 10, PruneConfig(prune_ratio=0.5),
                              PruneSchedule(steps_per_epoch=3, start_epoch=0, sparse_epoch=1,
                                            finalize_epoch=2, steps_update_mask=2))
    gates = {id(g) for g in model.gate_parameters()}
    params = [p for p in model.parameters() if id(p) not in gates]
    opt = torch.optim.AdamW([{'params': params}] + pruner.param_groups(1e-3, 0.05), lr=1e-3)
    bn_before = copy.deepcopy({k: v for k, v in pruner.heads.state_dict().items() if 'running' in k})
    torch.manual_seed(torch_seed)  # drop-path draws from this generator
    train_one_epoch(pruner.module, torch.nn.CrossEntropyLoss(), loader(), opt, torch.device('cpu'), 0,
                    pruner=pruner, print_freq=100, set_training_mode=train_mode)
    bn_after = {k: v for k, v in pruner.heads.state_dict().items() if 'running' in k}
    return model, bn_before, bn_after


def test_no_train_mode_turns_drop_path_off_and_freezes_head_batchnorm():
    a, bn_before, bn_after = pruning_run(False, torch_seed=1)
    b, _, _ = pruning_run(False, torch_seed=2)
    # no randomness left in the step: two generators give the same weights
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    # BatchNorm of the ΔΨ heads used, and kept, its initial running statistics
    assert bn_before.keys() == bn_after.keys() and bn_before
    assert all(torch.equal(bn_before[k], bn_after[k]) for k in bn_before)
    assert all(not m.training for m in a.modules())


def test_train_mode_uses_drop_path_and_updates_head_batchnorm():
    a, bn_before, bn_after = pruning_run(True, torch_seed=1)
    b, _, _ = pruning_run(True, torch_seed=2)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert any(not torch.equal(bn_before[k], bn_after[k]) for k in bn_before if 'running_mean' in k)
