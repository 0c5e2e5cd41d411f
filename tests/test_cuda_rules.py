"""What only a GPU would show, shown on the CPU: a tensor on the wrong device, a host wait in
the training step, a loss scale undone twice (issue 27).

`device_rules.DeviceRules` runs real pruning runs as if their device were a GPU and fails
where CUDA would; fake CUDA tensors check the forward-only pieces; a real GradScaler on the
CPU checks the float16 path. The tests that need a real GPU are in test_cuda.py.
"""
import pytest
import torch
from timm.utils import NativeScaler
from torch._subclasses.fake_tensor import FakeTensorMode

import main
from conftest import BASE_ARGS, micro, o1_weights
from device_rules import DeviceMismatch, DeviceRules
from engine import train_one_epoch
from pruning import DepthAwarePruner, PruneConfig, PruneSchedule
from pruning.cost import FlopsCost, LatencyTable
from pruning.gates import attn_params, mlp_params
from test_cost import made_up_table, write

C = 10


def test_the_rules_refuse_what_cuda_refuses_and_count_what_waits_for_the_device():
    with DeviceRules() as rules:
        dev = torch.device('cpu')  # the run's device, as main.py makes it
        x = torch.ones(5).to(dev)
        host = torch.arange(5.)
        with pytest.raises(DeviceMismatch):
            x + host                                  # noqa: B018  a CPU vector meets a CUDA one
        with pytest.raises(DeviceMismatch):
            torch.stack([x, host])
        with pytest.raises(DeviceMismatch):
            torch.searchsorted(host, x)
        with pytest.raises(DeviceMismatch):
            host[x.long()]                            # CUDA indices into a CPU tensor
        with pytest.raises(DeviceMismatch):
            x + torch.zeros(5, device=host.device)    # a host tensor's device is the host
        # what CUDA allows: CPU scalars, CPU indices, copies, tensors made on x's device
        y = x * torch.tensor(2.) + torch.zeros(5, device=x.device) + torch.zeros_like(host).to(x)
        y[torch.tensor([0, 1])] = 0.
        host.copy_(y)
        assert not rules.syncs
        y.sum().item(), bool(y.any()), y.cpu(), y[y > 0]
        host.sum().item()                             # the host's own numbers cost nothing
        assert rules.syncs == {'item': 1, '__bool__': 1, 'to host': 1, 'boolean mask': 1}


def test_the_cost_of_kept_counts_and_the_cut_model_run_on_fake_cuda_tensors():
    """Every cost unit evaluated on CUDA kept counts (the threshold search's), with Python
    ints beside them; the cut model's forward on CUDA."""
    table = LatencyTable(made_up_table())
    model = o1_weights(micro(0), seed=1)
    pruner = DepthAwarePruner(model, C, PruneConfig(prune_ratio=0.5), PruneSchedule(10, 0, 1, 2, 5))
    for g in model.gate_parameters():
        g.data = (torch.rand(g.shape) > 0.3).float()
    cut, _ = pruner.finalize()
    with FakeTensorMode(allow_non_fake_inputs=True):
        k = torch.full((7,), 8., device='cuda')
        for cost in (attn_params(k, 4, k, k), mlp_params(k, k, k), FlopsCost(65).attn(k, 4, k, k),
                     FlopsCost(65).mlp(k, k, k), table.attn(k, 4, k, k), table.mlp(k, k, k)):
            assert cost.device.type == 'cuda' and cost.shape == (7,)
        out = cut.to('cuda')(torch.randn(2, 3, 32, 32, device='cuda'))
        assert out.device.type == 'cuda' and out.shape == (2, C)


@pytest.fixture(scope='module')
def latency_table(tmp_path_factory):
    """A made-up table for the micro model at 16 px (16 patches and the class token)."""
    return write(tmp_path_factory.mktemp('table'), made_up_table(tokens=17, input_size=16))


SHORT = ['--input-size', '16', '--epochs', '1', '--prune-ratio', '0.5']
DAP = ['--prune-steps-update-mask', '4', '--prune-start-epoch', '0', '--prune-sparse-epoch', '1']
RUNS = {
    'block_pr params': ['--prune-method', 'block_pr', *DAP],
    'block_pr flops': ['--prune-method', 'block_pr', '--prune-budget', 'flops', *DAP],
    'block_pr latency': ['--prune-method', 'block_pr', '--prune-budget', 'latency', *DAP],
    'block_pr fast heads, trained gates, bfloat16': ['--prune-method', 'block_pr', '--bpi-mode', 'fast',
                                                     '--prune-train-gates', '--amp-dtype', 'bfloat16', *DAP],
    'handcrafted κ flops': ['--prune-method', 'block_pr', '--prune-budget', 'flops',
                            '--prune-kr-handcraft', *['0.5'] * 8, *DAP],
    'uniform latency': ['--prune-method', 'uniform', '--prune-budget', 'latency', *DAP],
    'global flops': ['--prune-method', 'global', '--prune-budget', 'flops', '--prune-round-to', '1', *DAP],
    'block_pr whole heads': ['--prune-method', 'block_pr', '--prune-attn-unit', 'head', *DAP],
    'global whole heads flops': ['--prune-method', 'global', '--prune-budget', 'flops', '--prune-attn-unit', 'head',
                                 *DAP],
    'block_pr on DINOv2 (registers, LayerScale)': ['--model', 'vit_micro_patch4_reg4_dinov2',
                                                   '--prune-method', 'block_pr', *DAP],
    'wdprune': ['--prune-method', 'wdprune', '--wdprune-lr', '0.1', '--wdprune-round', '8', '--classifiers', '2', '3'],
    'savit': ['--prune-method', 'savit', '--savit-fraction', '0.5', '--savit-population', '20',
              '--savit-children', '10', '--savit-generations', '10'],
}


def run_on_the_device(argv):
    """main.py's run, in this process, under CUDA's device rules; returns its stats."""
    args = main.ArgumentParser('t', parents=[main.get_args_parser()]).parse_args([*BASE_ARGS, *map(str, argv)])
    with DeviceRules():
        return main.main(args)


@pytest.mark.parametrize('name', list(RUNS))
def test_a_pruning_run_and_its_fine_tune_keep_to_the_device(tmp_path, name, latency_table):
    """Every method and budget unit through its mask updates, the cut and, for DAP's default,
    the fine-tune of the cut model: no tensor made on the host meets the device's."""
    extra = ['--latency-table', latency_table] if 'latency' in name else []
    out = tmp_path / 'prune'
    run_on_the_device([*SHORT, *RUNS[name], *extra, '--output_dir', out])
    assert (out / 'first_sparse_checkpoint.pth').exists()
    if name == 'block_pr params':
        stats = run_on_the_device(['--input-size', '16', '--epochs', '1', '--resize-model-by-checkpoint',
                                   '--model-path', out / 'first_sparse_checkpoint.pth',
                                   '--output_dir', tmp_path / 'tune'])
        assert stats is not None and (tmp_path / 'tune' / 'checkpoint.pth').exists()


def train_steps(n_steps, loss_scaler=None, amp=None, train_gates=False, delta_psi_mode='faithful', rules=None):
    """`n_steps` of engine.train_one_epoch with a DAP pruner between mask updates, on a model
    that `rules` (if given) sees on the device; returns the pruner."""
    dev = torch.device('cpu')
    model = o1_weights(micro(0, img_size=16), seed=1).to(dev)
    schedule = PruneSchedule(steps_per_epoch=100, start_epoch=0, sparse_epoch=1, finalize_epoch=2,
                             steps_update_mask=1000)
    config = PruneConfig(prune_ratio=0.5, train_gates=train_gates, delta_psi_mode=delta_psi_mode)
    pruner = DepthAwarePruner(model, C, config, schedule)
    gates = {id(p) for p in model.gate_parameters()}
    weights = [p for p in model.parameters() if id(p) not in gates]
    optimizer = torch.optim.AdamW([{'params': weights}] + pruner.param_groups(1e-4, 0.05), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, C, (16,), generator=g))
               for _ in range(n_steps)]
    before = rules.syncs.copy() if rules else None
    train_one_epoch(pruner.module, torch.nn.CrossEntropyLoss(), batches, optimizer, dev, 0,
                    loss_scaler=loss_scaler, amp=amp, pruner=pruner, print_freq=1000)
    if rules:
        pruner.syncs = rules.syncs - before
    return pruner


@pytest.mark.parametrize('delta_psi_mode', ['faithful', 'fast'])
def test_a_training_step_waits_for_the_device_only_for_the_loss(delta_psi_mode):
    """Between mask updates a step makes the host wait once, for DeiT's `loss.item()`; under a
    GradScaler once more, for its own check of inf / NaN gradients (torch.amp.GradScaler.step
    must know on the host whether to skip the optimizer step). Nothing of the pruner's."""
    with DeviceRules() as rules:
        assert train_steps(3, delta_psi_mode=delta_psi_mode, rules=rules).syncs == {'item': 3}
        scaled = train_steps(3, NativeScaler(device='cpu'), torch.float16, train_gates=True, rules=rules)
        assert scaled.syncs == {'item': 6}


@pytest.mark.parametrize('train_gates', [False, True])
def test_a_grad_scaler_leaves_the_taylor_scores_those_of_the_unscaled_run(train_gates):
    """float16 with timm's NativeScaler through engine.train_one_epoch against the same steps
    without a scale: the scale is undone once, whether or not the optimizer holds the gates
    (with --prune-train-gates its step unscales their gradients itself)."""
    unscaled = train_steps(1, None, torch.float16, train_gates)
    scaled = train_steps(1, NativeScaler(device='cpu'), torch.float16, train_gates)
    a = torch.cat([s.flatten() for s in unscaled.taylor.sum.values()])
    b = torch.cat([s.flatten() for s in scaled.taylor.sum.values()])
    assert a.sum() > 0 and scaled.taylor.count == unscaled.taylor.count == 1
    assert float((b - a).norm() / a.norm()) < 0.01  # measured 0.08%: float16's rounding, not the scale
