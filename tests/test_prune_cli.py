"""The paper's pruning command, end to end on DIGITS: budget, outputs, resume, distribution."""
import json
import subprocess
import sys
import time

import pytest
import timm
import torch

import models  # noqa: F401  (registers the micro model)
from models import is_gate
from conftest import REPO, check_ok, cli_command, cli_env, free_port, run_cli

# 16x16 inputs: a 4x4 patch grid keeps the ΔΨ patch heads cheap on the CPU
PRUNE = ['--input-size', '16', '--batch-size', '32', '--grad-accum-steps', '2',
         '--prune-method', 'block_pr', '--prune-steps-update-mask', '4']


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def dense_counts():
    model = timm.create_model('deit_micro_patch4_32', num_classes=10, img_size=16)
    total = sum(p.numel() for p in model.parameters())
    blocks = sum(p.numel() for n, p in model.named_parameters() if n.startswith('blocks.'))
    return total, blocks


@pytest.mark.parametrize('ratio', [0.5, 0.75])
@pytest.mark.parametrize('block_only', [False, True])
def test_budget_is_met(tmp_path, ratio, block_only):
    out = tmp_path / 'out'
    args = [*PRUNE, '--epochs', '1', '--prune-start-epoch', '0', '--prune-sparse-epoch', '1',
            '--prune-ratio', ratio, '--output_dir', out]
    if block_only:
        args.append('--prune-rate-by-block-param-only')
    check_ok(run_cli(args, tmp_path))
    ckpt = load(out / 'first_sparse_checkpoint.pth')
    kept_total = sum(v.numel() for v in ckpt['model'].values())
    kept_blocks = sum(v.numel() for k, v in ckpt['model'].items() if k.startswith('blocks.'))
    total, blocks = dense_counts()
    if block_only:
        assert kept_blocks == pytest.approx((1 - ratio) * blocks, rel=0.01)
    else:
        assert kept_total == pytest.approx((1 - ratio) * total, rel=0.01)
    # the count the pruner reports is the count of the cut model
    assert ckpt['summary']['params_cut'] == kept_total
    assert ckpt['summary']['params_dense'] == total


@pytest.fixture(scope='module')
def pruned(tmp_path_factory):
    """A 3-epoch pruning run: warm-up epoch, ramp epoch, sharpening epoch, then the cut."""
    tmp = tmp_path_factory.mktemp('prune')
    out = tmp / 'out'
    proc = check_ok(run_cli([*PRUNE, '--epochs', '3', '--prune-start-epoch', '1',
                             '--prune-sparse-epoch', '2', '--prune-ratio', '0.5',
                             '--output_dir', out], tmp))
    return tmp, out, proc


def test_first_sparse_checkpoint(pruned):
    tmp, out, proc = pruned
    ckpt = load(out / 'first_sparse_checkpoint.pth')
    assert {'model', 'arch', 'args', 'epoch', 'acc1'} <= set(ckpt)
    assert ckpt['epoch'] == 2 and isinstance(ckpt['args'], dict)
    cut = models.build_from_arch(ckpt['arch'])
    cut.load_state_dict(ckpt['model'])  # strict: the arch describes exactly these weights
    assert not any(is_gate(k) or 'heads' in k for k in ckpt['model'])
    # the finalize table is printed, and acc1 is the accuracy printed right after the cut
    assert 'sub-block' in proc.stdout and 'params: ' in proc.stdout and 'FLOPs: ' in proc.stdout
    after_cut = proc.stdout.split('Accuracy of the cut model:')[1]
    assert f'* Acc@1 {ckpt["acc1"]:.3f}' in after_cut


def test_pruning_log(pruned):
    tmp, out, proc = pruned
    records = [json.loads(line) for line in (out / 'pruning_log.jsonl').read_text().splitlines()]
    updates = [r for r in records if 'step' in r]
    final = [r for r in records if r.get('event') == 'finalize']
    assert len(final) == 1 and len(updates) >= 2
    keys = {'step', 'epoch', 'delta_psi_cls', 'delta_psi_patch', 'importance_cls',
            'importance_patch', 'goal_keep_ratio', 'applied_keep_ratio', 'kept_params',
            'total_kept_params', 'tau'}
    for r in updates:
        assert keys <= set(r)
        assert len(r['kept_params']) == len(r['goal_keep_ratio']) == 8  # 2 x depth 4
        assert r['total_kept_params'] >= sum(r['kept_params'])
    steps = [r['step'] for r in updates]
    assert steps == sorted(steps)
    # the ramp: applied κ moves from 1 towards the goal; τ stays at τ_max until the sparse epoch
    first = updates[0]
    assert all(a >= g - 1e-9 for a, g in zip(first['applied_keep_ratio'], first['goal_keep_ratio']))
    assert first['tau'] == pytest.approx(0.1)
    assert updates[-1]['tau'] < 0.1
    # TensorBoard has the same scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / 'tensorboard'))
    acc.Reload()
    tags = set(acc.Tags()['scalars'])
    assert {'pruning/total_kept_params', 'pruning/tau', 'keep_ratio_goal/attn0',
            'delta_psi_cls/mlp3'} <= tags
    assert len(acc.Scalars('pruning/tau')) == len(updates)


def test_resume_in_the_middle_of_pruning_gives_the_same_masks_and_logs(pruned):
    """Kill the same run during its last epoch, after it logged a mask update there; resume
    from checkpoint.pth of the epoch before: the same cut model, and each record once in
    pruning_log.jsonl (the killed epoch's records are cut, then written again)."""
    tmp, out_full, _ = pruned
    out = tmp / 'interrupted'
    args = [*PRUNE, '--epochs', '3', '--prune-start-epoch', '1', '--prune-sparse-epoch', '2',
            '--prune-ratio', '0.5', '--output_dir', out]
    proc = subprocess.Popen(cli_command(args), cwd=REPO, env=cli_env(tmp),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_path, pruning_log = out / 'checkpoint.pth', out / 'pruning_log.jsonl'
    deadline, mtime, saved_lines = time.time() + 300, None, None
    while time.time() < deadline and proc.poll() is None:
        if ckpt_path.exists() and ckpt_path.stat().st_mtime_ns != mtime:
            mtime = ckpt_path.stat().st_mtime_ns
            ckpt = load(ckpt_path)
            saved_lines = ckpt['log_lines']['pruning_log.jsonl'] if ckpt['epoch'] == 1 else None
        if saved_lines is not None and len(pruning_log.read_text().splitlines()) > saved_lines:
            proc.kill()  # during epoch 2, after it logged a mask update
            break
        time.sleep(0.02)
    proc.wait()
    ckpt = load(ckpt_path)
    assert ckpt['epoch'] == 1 and 'pruner' in ckpt and not (out / 'first_sparse_checkpoint.pth').exists()
    assert ckpt['pruner']['step'] > 0 and any(is_gate(k) for k in ckpt['model'])
    assert len(pruning_log.read_text().splitlines()) > ckpt['log_lines']['pruning_log.jsonl']
    # the schedule counts steps: another batch size or process count would put it off
    refused = f'error: --resume {ckpt_path} is a pruning run of 1 process(es) × --batch-size 32 × ' \
              '--grad-accum-steps 2 (22 steps per epoch), this run {} ({}): resume with the same ones'
    proc = run_cli([*args, '--resume', ckpt_path, '--batch-size', '16'], tmp)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [refused.format('1 × 16 × 2', 44)], proc.stderr
    proc = run_cli([*args, '--resume', ckpt_path], tmp,
                   launcher=[sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
                             f'--master_port={free_port()}'])
    # (10 steps: 2 processes sample with DeiT's repeated augmentation, 1280 of the 1437 images)
    assert proc.returncode != 0 and refused.format('2 × 32 × 2', 10) in proc.stderr.splitlines(), proc.stderr
    resumed_proc = check_ok(run_cli([*args, '--resume', ckpt_path], tmp))
    assert 'pruning_log.jsonl: removed ' in resumed_proc.stdout
    a = load(out_full / 'first_sparse_checkpoint.pth')
    b = load(out / 'first_sparse_checkpoint.pth')
    assert a['arch'] == b['arch']
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    full = [json.loads(x) for x in (out_full / 'pruning_log.jsonl').read_text().splitlines()]
    resumed = [json.loads(x) for x in pruning_log.read_text().splitlines()]
    assert resumed == full
    assert (out / 'log.txt').read_text() == (out_full / 'log.txt').read_text()
    # TensorBoard hides the killed epoch's events (purge_step): each update once
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / 'tensorboard'))
    acc.Reload()
    taus = acc.Scalars('pruning/tau')
    assert [e.step for e in taus] == [r['step'] for r in full if 'step' in r]


@pytest.mark.parametrize('launcher', ['launch', 'torchrun'])
def test_distributed_pruning_is_identical_on_both_ranks(tmp_path, launcher):
    port = free_port()
    cmd = {'launch': [sys.executable, '-m', 'torch.distributed.launch', '--nproc_per_node=2',
                      f'--master_port={port}', '--use_env'],
           'torchrun': [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
                        f'--master_port={port}']}[launcher]
    out = tmp_path / 'out'
    proc = check_ok(run_cli([*PRUNE, '--batch-size', '16', '--epochs', '2',
                             '--prune-start-epoch', '0', '--prune-sparse-epoch', '1',
                             '--prune-ratio', '0.5', '--dist-eval', '--output_dir', out],
                            tmp_path, launcher=cmd))
    text = proc.stdout + proc.stderr
    import re
    digests = dict(re.findall(r'\[rank (\d)\] parameter digest (\w+)', text))
    assert set(digests) == {'0', '1'} and digests['0'] == digests['1']
    ckpt = load(out / 'first_sparse_checkpoint.pth')
    total, _ = dense_counts()
    assert sum(v.numel() for v in ckpt['model'].values()) == pytest.approx(0.5 * total, rel=0.01)


BAD = [
    (['--prune-ratio', '1.0'], '--prune-ratio'),
    (['--prune-ratio', '0'], '--prune-ratio'),
    (['--prune-start-epoch', '2', '--prune-sparse-epoch', '1'], 'prune-start-epoch'),
    (['--prune-finalize-epoch', '5'], '--epochs'),
    (['--prune-steps-update-mask', '0'], '--prune-steps-update-mask'),
    (['--prune-kr-handcraft', '0.5', '0.5'], '--prune-kr-handcraft'),
    (['--prune-kr-handcraft', *['1.5'] * 8], '--prune-kr-handcraft'),
    (['--prune-scale-gate-imp', 'attn_foo:1.5'], 'attn_foo'),
    (['--prune-scale-gate-imp', 'attn_out:big'], '--prune-scale-gate-imp'),
    (['--prune-method', 'magnitude'], '--prune-method'),
]


@pytest.mark.parametrize('extra,needle', BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_pruning_flags(tmp_path, extra, needle):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'keep.txt').write_text('x')
    args = [*PRUNE, '--epochs', '2', '--prune-start-epoch', '0', '--prune-sparse-epoch', '1',
            '--output_dir', out, *extra]
    proc = run_cli(args, tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error:') and needle in lines[0], proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ['keep.txt']


# ---------------------------------------------------------------- the second command: resize

def test_eval_of_resized_model_reproduces_acc1(pruned):
    tmp, out, _ = pruned
    ckpt = load(out / 'first_sparse_checkpoint.pth')
    common = ['--input-size', '16', '--batch-size', '32', '--eval',
              '--model-path', out / 'first_sparse_checkpoint.pth']
    for flag in ('--resize-model-by-checkpoint', '--model-resize-by-checkpoint'):
        proc = check_ok(run_cli([*common, flag], tmp))
        assert f'* Acc@1 {ckpt["acc1"]:.3f}' in proc.stdout
        assert f'number of params: {sum(v.numel() for v in ckpt["model"].values())}' in proc.stdout
    port = free_port()
    proc = check_ok(run_cli([*common, '--resize-model-by-checkpoint', '--dist-eval'], tmp,
                            launcher=[sys.executable, '-m', 'torch.distributed.run',
                                      '--nproc_per_node=2', f'--master_port={port}']))
    assert f'* Acc@1 {ckpt["acc1"]:.3f}' in proc.stdout


def test_finetune_resized_model_then_resume_and_eval(pruned):
    tmp, out, _ = pruned
    sparse = load(out / 'first_sparse_checkpoint.pth')
    out2 = tmp / 'finetune'
    args = ['--input-size', '16', '--batch-size', '32', '--epochs', '1', '--output_dir', out2,
            '--model-path', out / 'first_sparse_checkpoint.pth', '--resize-model-by-checkpoint']
    check_ok(run_cli(args, tmp))
    log = [json.loads(x) for x in (out2 / 'log.txt').read_text().splitlines()]
    assert log[0]['n_parameters'] == sum(v.numel() for v in sparse['model'].values())
    ckpt = load(out2 / 'checkpoint.pth')
    assert ckpt['arch'] == sparse['arch']  # checkpoints of the fine-tuning run keep the arch
    assert not any(is_gate(k) for k in ckpt['model'])
    # --eval --resume rebuilds the cut model from the checkpoint alone
    proc = check_ok(run_cli(['--input-size', '16', '--batch-size', '32', '--eval',
                             '--resume', out2 / 'checkpoint.pth'], tmp))
    assert f'* Acc@1 {log[0]["test_acc1"]:.3f}' in proc.stdout


def test_export_to_onnx_matches_pytorch(pruned, tmp_path):
    pytest.importorskip('onnxruntime')
    sys.path.insert(0, f'{REPO}/scripts')
    import export
    tmp, out, _ = pruned
    model = export.load_model(out / 'first_sparse_checkpoint.pth')
    export.export_onnx(model, str(tmp_path / 'cut.onnx'))
    x = torch.randn(5, 3, 16, 16)  # another batch size than the exported one
    assert export.max_difference(model, str(tmp_path / 'cut.onnx'), x) < 1e-4


RESIZE_BAD = [
    ('dense', ['--resize-model-by-checkpoint'], 'has none'),
    ('cut', [], '--resize-model-by-checkpoint'),
    ('cut', ['--resize-model-by-checkpoint', '--model', 'deit_tiny_patch16_224'], 'deit_micro_patch4_32'),
]


@pytest.mark.parametrize('which,extra,needle', RESIZE_BAD)
def test_resize_bad_input(pruned, tmp_path, which, extra, needle):
    tmp, out, _ = pruned
    path = out / ('first_sparse_checkpoint.pth' if which == 'cut' else 'dense.pth')
    if which == 'dense':
        torch.save({'model': timm.create_model('deit_micro_patch4_32', num_classes=10,
                                               img_size=16).state_dict()}, path)
    proc = run_cli(['--input-size', '16', '--eval', '--model-path', path, *extra], tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error:') and needle in lines[0], proc.stderr


def test_removed_sub_blocks_cost_nothing():
    """A dropped sub-block has no module and no FLOPs: the cut model's FLOPs are the dense
    model's minus exactly what those sub-blocks computed there."""
    from torch.utils.flop_counter import FlopCounterMode

    def flops_by_module(model):
        with FlopCounterMode(display=False) as counter:
            model.eval()(torch.zeros(1, 3, 32, 32))
        per_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
        return counter.get_total_flops(), per_module

    model = timm.create_model('deit_micro_patch4_32', num_classes=10)
    arch = model.arch()
    arch['blocks'][1]['attn'] = None
    arch['blocks'][2]['mlp'] = None
    cut = models.build_from_arch(arch)
    assert cut.blocks[1].attn is None and cut.blocks[2].mlp is None  # the one removed state
    dense_total, dense_parts = flops_by_module(model)
    cut_total, cut_parts = flops_by_module(cut)
    gone = ('VisionTransformer.blocks.1.attn', 'VisionTransformer.blocks.2.mlp')
    assert all(k in dense_parts and k not in cut_parts for k in gone)
    assert dense_total - cut_total == sum(dense_parts[k] for k in gone)


def test_after_a_cut_before_the_end_the_rate_stays_and_resume_is_exact(tmp_path):
    """--prune-finalize-epoch 2 of --epochs 3: training goes on with the cut model at the pruning
    run's constant rate (METHOD.md §6; not --warmup-lr), and a run stopped after the cut and
    resumed from its checkpoint.pth ends bit for bit as the uninterrupted one."""
    args = ['--input-size', '16', '--prune-method', 'block_pr', '--prune-steps-update-mask', '4',
            '--prune-start-epoch', '0', '--prune-sparse-epoch', '1', '--prune-finalize-epoch', '2',
            '--no-model-ema']
    full = check_ok(run_cli([*args, '--epochs', '3', '--output_dir', tmp_path / 'full'], tmp_path))
    lines = [json.loads(x) for x in (tmp_path / 'full' / 'log.txt').read_text().splitlines()]
    rates = {line['train_lr'] for line in lines}
    assert len(lines) == 3 and lines[1]['n_parameters'] < lines[0]['n_parameters']  # cut after epoch 1
    assert len(rates) == 1 and rates.pop() == pytest.approx(5e-4 * 64 / 512)  # DeiT's scaling, every epoch
    stopped = tmp_path / 'stopped'
    check_ok(run_cli([*args, '--epochs', '2', '--output_dir', stopped], tmp_path))
    assert 'arch' in load(stopped / 'checkpoint.pth') and 'pruner' not in load(stopped / 'checkpoint.pth')
    # without the pruning flags the rate would follow DeiT's schedule: refused
    fine_tune = ['--input-size', '16', '--no-model-ema', '--epochs', '3', '--output_dir', stopped]
    proc = run_cli([*fine_tune, '--resume', stopped / 'checkpoint.pth'], tmp_path)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f'error: --resume {stopped / "checkpoint.pth"} continues a run of --prune-method block_pr (after its '
        'cut), not none: repeat its flags'], proc.stderr
    resumed = check_ok(run_cli([*args, '--epochs', '3', '--output_dir', stopped,
                                '--resume', stopped / 'checkpoint.pth'], tmp_path))
    digest = [line for line in full.stdout.splitlines() if 'parameter digest' in line]
    assert digest and digest == [line for line in resumed.stdout.splitlines() if 'parameter digest' in line]
    assert (stopped / 'log.txt').read_text() == (tmp_path / 'full' / 'log.txt').read_text()
