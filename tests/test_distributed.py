"""Two gloo processes under torchrun, on what only a distributed run shows: DDP and the
trainable parameters, every process making the same collectives, a resume in the middle of a
mask-update window, SaViT's scores, and the cut letting go of what it replaces."""
import gc
import json
import os
import re
import signal
import subprocess
import sys
import time
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, check_ok, cli_command, cli_env, free_port

DIGEST = re.compile(r'\[rank (\d)\] parameter digest ([0-9a-f]{16})')
# 2 processes × batch 16: DeiT's repeated augmentation gives each 640 of the 1437 DIGITS images
TINY = ['--input-size', '16', '--batch-size', '16', '--device', 'cpu']


def torchrun():
    return [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}']


def descendants(pid):
    """The pids of the processes under `pid` (torchrun starts its workers in sessions of their own)."""
    children = {}
    for entry in os.listdir('/proc'):
        try:
            with open(f'/proc/{entry}/stat') as f:
                children.setdefault(int(f.read().rsplit(')', 1)[1].split()[1]), []).append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def kill(launcher):
    """SIGKILL to a launcher and its workers."""
    for pid in [*descendants(launcher.pid), launcher.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run2(args, tmp_path, timeout=240):
    """main.py under torchrun with 2 processes. A hang fails the test instead of blocking it:
    after `timeout` seconds the launcher and its workers are killed."""
    proc = subprocess.Popen(cli_command([*TINY, *args], launcher=torchrun()), cwd=REPO, env=cli_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(proc)
        out, err = proc.communicate()
        pytest.fail(f'the 2-process run did not end in {timeout} s (a collective that one process '
                    f'never made?)\n{out[-3000:]}\n{err[-3000:]}')
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def digests(proc):
    found = dict(DIGEST.findall(proc.stdout + proc.stderr))
    assert set(found) == {'0', '1'} and found['0'] == found['1'], found
    return found['0']


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def records(out, name):
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def test_attn_only_prunes_under_ddp(tmp_path):
    """--attn-only turns requires_grad off on the MLPs; DDP wrapped the module before that and
    waited at the second step for gradients that never came ("Expected to have finished
    reduction in the prior iteration")."""
    out = tmp_path / 'out'
    proc = check_ok(run2(['--attn-only', '--prune-method', 'block_pr', '--prune-start-epoch', '0',
                          '--prune-sparse-epoch', '1', '--prune-steps-update-mask', '4', '--epochs', '1',
                          '--output_dir', out], tmp_path))
    digests(proc)
    assert (out / 'first_sparse_checkpoint.pth').exists()


def write_image(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


def test_dist_eval_with_a_shard_that_has_no_readable_image(tmp_path):
    """--dist-eval gives rank 1 the validation images 1, 3, …: here only image 1, unreadable.
    Rank 1 then updated no meter, made fewer all-reduces than rank 0 and the run hung; every
    process must make the same collectives (the ΔΨ heads' meters included) and report the
    metrics of the one readable image."""
    tree = tmp_path / 'tree'
    for c in 'ab':
        for i in range(4):  # 4 training batches of 4 per process: the pruner's schedule needs one
            write_image(tree / 'train' / c / f'{i}.png', seed=i)
        write_image(tree / 'val' / c / '0.png', seed=5)
    (tree / 'val' / 'b' / '0.png').write_bytes(b'not an image')  # index 1: rank 1's whole shard
    proc = check_ok(run2(['--data-set', 'FOLDER', '--data-path', tree, '--eval', '--dist-eval',
                          '--skip-bad-images', '--prune-method', 'block_pr', '--batch-size', '1',
                          '--no-repeated-aug'],
                         tmp_path, timeout=45))
    lines = re.findall(r'^\* Acc@1 (\S+) Acc@5 (\S+) loss (\S+)$', proc.stdout, re.M)
    assert len(lines) == 1 and float(lines[0][0]) in (0.0, 100.0), proc.stdout[-3000:]  # one image
    assert 'Accuracy of the network on the 2 test images' in proc.stdout


# a DAP run whose mask-update window spans the epoch boundary: 40 batches, 20 steps per epoch,
# an update every 3 (after steps 2, 5, …, 17, 20, …): epoch 0 ends with steps 18 and 19 summed
MID_WINDOW = ['--grad-accum-steps', '2', '--prune-method', 'block_pr', '--prune-steps-update-mask', '3',
              '--epochs', '2', '--prune-start-epoch', '0', '--prune-sparse-epoch', '1', '--dist-eval']


def saved_epoch(path):
    try:
        return load(path)['epoch']
    except (OSError, RuntimeError, EOFError, KeyError):
        return None


def test_resume_in_the_middle_of_a_mask_update_window_is_exact(tmp_path):
    """Each process sums ΔΨ over its own batches until the mask update all-reduces them. The
    checkpoint held only rank 0's partial window and both processes loaded it: rank 1's steps
    18-19 were lost and rank 0's counted twice. Killed after epoch 0's checkpoint and resumed,
    the run must end as the uninterrupted one, bit for bit."""
    ref = tmp_path / 'ref'
    digest = digests(check_ok(run2([*MID_WINDOW, '--output_dir', ref], tmp_path)))
    out = tmp_path / 'out'
    launcher = subprocess.Popen(cli_command([*TINY, *MID_WINDOW, '--output_dir', out], launcher=torchrun()),
                                cwd=REPO, env=cli_env(tmp_path), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while launcher.poll() is None and time.time() < deadline and saved_epoch(out / 'checkpoint.pth') != 0:
        time.sleep(0.05)
    kill(launcher)  # during epoch 1
    launcher.wait()
    ckpt = load(out / 'checkpoint.pth')
    assert ckpt['epoch'] == 0 and not (out / 'first_sparse_checkpoint.pth').exists()
    window = ckpt['pruner']['performance']
    assert window['count'] == 4  # steps 18 and 19, 2 micro-batches each, on each process
    proc = check_ok(run2([*MID_WINDOW, '--output_dir', out, '--resume', out / 'checkpoint.pth'], tmp_path))
    assert digests(proc) == digest
    assert records(out, 'pruning_log.jsonl') == records(ref, 'pruning_log.jsonl')
    assert records(out, 'log.txt') == records(ref, 'log.txt')
    a, b = load(ref / 'first_sparse_checkpoint.pth'), load(out / 'first_sparse_checkpoint.pth')
    assert a['arch'] == b['arch'] and all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])


SAVIT = ['--prune-method', 'savit', '--savit-fraction', '0.5', '--savit-population', '20',
         '--savit-children', '10', '--savit-generations', '10', '--epochs', '1', '--prune-ratio', '0.5']


def test_savit_calibration_skips_unreadable_images(tmp_path):
    """--need-hessian's calibration read the training batches as they came: an unreadable
    image's target -1 reached the loss ("Target -1 is out of bounds" on the CPU, a device-side
    assert on CUDA). The scoring pass before it already filled such rows."""
    tree = tmp_path / 'tree'
    for c in 'ab':
        for i in range(8):  # 2 batches of 4 per process, each read by the scores and the calibration
            write_image(tree / 'train' / c / f'{i}.png', seed=i)
        write_image(tree / 'val' / c / '0.png', seed=9)
    (tree / 'train' / 'a' / '3.png').write_bytes(b'not an image')
    out = tmp_path / 'out'
    proc = check_ok(run2(['--data-set', 'FOLDER', '--data-path', tree, '--skip-bad-images', '--need-hessian',
                          '--batch-size', '4', '--no-repeated-aug', *SAVIT, '--savit-fraction', '1',
                          '--output_dir', out], tmp_path, timeout=90))
    assert 'SaViT interaction matrix' in proc.stdout
    assert (out / 'first_sparse_checkpoint.pth').exists()


SCORES_UNDER_DDP = '''
import sys
import torch
import torch.distributed as dist
import timm
sys.path.insert(0, '.')
import models  # noqa: F401
from engine import accumulate_scores
from pruning import SaViTConfig, SaViTPruner

dist.init_process_group('gloo')
rank = dist.get_rank()
torch.manual_seed(0)
model = timm.create_model('deit_micro_patch4_32', num_classes=10, img_size=16)
pruner = SaViTPruner(model, 10, SaViTConfig(prune_ratio=0.5))
net = torch.nn.parallel.DistributedDataParallel(pruner.module)
g = torch.Generator().manual_seed(rank)  # each process its own batches
batches = [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(10, (8,), generator=g)) for _ in range(3)]
criterion = torch.nn.CrossEntropyLoss()
gates = pruner._gates()
# the definition: Taylor FO, (m · dL/dm)^2 summed over batches, on gradients DDP averaged
oracle = {k: torch.zeros_like(m, dtype=torch.float64) for k, m in gates.items()}
net.eval()
for x, y in batches:
    criterion(net(x)[0], y).backward()
    for k, m in gates.items():
        oracle[k] += (m.detach() * m.grad).double() ** 2
    net.zero_grad(set_to_none=True)
accumulate_scores(net, criterion, batches, torch.device('cpu'), pruner, steps=3, set_training_mode=False)
unequal = [k for k in gates if not torch.equal(pruner.taylor.sum[k], oracle[k])]
print(f'rank {rank} scores equal the DDP-averaged ones' if not unequal else f'rank {rank} differ: {unequal}')
dist.destroy_process_group()
'''


def test_savit_scores_equal_those_of_ddp_averaged_gradients(tmp_path):
    """SaViT's scoring pass reads the gates' gradients only: it skips DDP's all-reduce of every
    weight gradient (no_sync) and averages the gates' own, as DDP does, bit for bit."""
    script = tmp_path / 'scores.py'
    script.write_text(SCORES_UNDER_DDP)
    proc = subprocess.run([*torchrun(), str(script)], cwd=REPO, env=cli_env(tmp_path), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(re.findall(r'rank \d .*', proc.stdout)) == [
        f'rank {r} scores equal the DDP-averaged ones' for r in (0, 1)], proc.stdout[-3000:]


def test_the_cut_lets_go_of_the_wrapper_optimizer_and_heads(tmp_path, monkeypatch):
    """The cut builds the smaller model while the gated one exists: the old DDP wrapper and
    AdamW state must be gone by then, and the gated model with the ΔΨ heads before the new
    optimizer and wrapper are built (on a full GPU each is a peak of its own). One process of
    a gloo group, in this process, so that the wrapper is DDP's."""
    import builtins
    import main
    import train.trainer as trainer_module
    from conftest import BASE_ARGS
    from pruning import pruner as pruner_module
    for k, v in {'RANK': '0', 'LOCAL_RANK': '0', 'WORLD_SIZE': '1', 'MASTER_ADDR': '127.0.0.1',
                 'MASTER_PORT': str(free_port()), 'TORCH_HOME': str(tmp_path / 'torch_home')}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(builtins, 'print', builtins.print)  # the run replaces it (rank 0 prints)
    refs, alive = {}, {}

    def living(names):
        gc.collect()
        return [name for name in names if refs[name]() is not None]

    cut = trainer_module.Trainer.cut

    def watched_cut(self, loader_val, epoch):
        assert isinstance(self.net, torch.nn.parallel.DistributedDataParallel)
        refs.update({'DDP wrapper': weakref.ref(self.net), 'optimizer': weakref.ref(self.optimizer),
                     'gated model': weakref.ref(self.model), 'ΔΨ heads': weakref.ref(self.pruner.heads)})
        return cut(self, loader_val, epoch)

    cut_model = pruner_module.cut_model

    def watched_cut_model(model, *args, **kwargs):
        alive['when the cut model is built'] = living(['DDP wrapper', 'optimizer'])
        return cut_model(model, *args, **kwargs)

    build_optimizer = trainer_module.build_optimizer

    def watched_build_optimizer(args, model, *rest):
        if model.is_cut:
            alive['when its optimizer is built'] = living(refs)
        return build_optimizer(args, model, *rest)

    monkeypatch.setattr(trainer_module.Trainer, 'cut', watched_cut)
    monkeypatch.setattr(pruner_module, 'cut_model', watched_cut_model)
    monkeypatch.setattr(trainer_module, 'build_optimizer', watched_build_optimizer)
    argv = [*BASE_ARGS, '--input-size', '16', '--device', 'cpu', '--epochs', '1', '--prune-method', 'block_pr',
            '--prune-start-epoch', '0', '--prune-sparse-epoch', '1', '--prune-steps-update-mask', '10',
            '--output_dir', str(tmp_path / 'out')]
    main.main(main.ArgumentParser('t', parents=[main.get_args_parser()]).parse_args(argv))
    assert alive == {'when the cut model is built': [], 'when its optimizer is built': []}
