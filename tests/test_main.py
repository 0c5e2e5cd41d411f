"""main.py as a user runs it: `python main.py ...` in a subprocess, on DIGITS, on the CPU."""
import json
import os
import re
import shutil
import sys

import pytest
import timm
import torch

import models  # noqa: F401  (registers deit_micro_patch4_32 with timm)
import utils
from conftest import BASE_ARGS, SCHEDULE_ARGS, check_ok, eval_lines, free_port, run_cli
from datasets import DigitsDataset

MICRO = 'deit_micro_patch4_32'
EPOCHS = 2
DEIT_LOG_KEYS = {'train_lr', 'train_loss', 'test_loss', 'test_acc1', 'test_acc5', 'epoch',
                 'n_parameters'}
CKPT_KEYS = {'model', 'optimizer', 'lr_scheduler', 'epoch', 'scaler', 'args', 'model_ema'}
BATCH = int(BASE_ARGS[BASE_ARGS.index('--batch-size') + 1])
# one data-loading worker where runs are compared bit for bit: real runs augment in workers
WORKERS = ['--num_workers', 1]


def read_log(out):
    return [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def logged_eval_line(stats):
    """The console line main.py prints for these log.txt test stats."""
    return f'{stats["test_acc1"]:.3f}', f'{stats["test_acc5"]:.3f}', f'{stats["test_loss"]:.3f}'


@pytest.fixture(scope='module')
def digits_run(tmp_path_factory):
    """One 2-epoch DIGITS run, shared by the tests that read what it wrote."""
    tmp = tmp_path_factory.mktemp('digits')
    out = tmp / 'out'
    proc = check_ok(run_cli([*SCHEDULE_ARGS, *WORKERS, '--epochs', EPOCHS, '--output_dir', out], tmp))
    return out, proc


# ---------------------------------------------------------------- one training run

def test_log_and_console(digits_run):
    out, proc = digits_run
    log = read_log(out)
    assert [set(stats) for stats in log] == [DEIT_LOG_KEYS] * EPOCHS
    assert [stats['epoch'] for stats in log] == list(range(EPOCHS))
    assert log[0]['n_parameters'] == sum(p.numel() for p in timm.create_model(MICRO, num_classes=10).parameters())
    # warm-up epoch at --warmup-lr, then --lr scaled by batch / 512 (DeiT's linear scaling rule)
    assert log[0]['train_lr'] == pytest.approx(1e-4)
    assert log[1]['train_lr'] == pytest.approx(5e-3 * BATCH / 512)
    assert eval_lines(proc.stdout) == [logged_eval_line(stats) for stats in log]
    # epoch timing, for the record: `Epoch: [0] Total time: 0:00:02 (0.1 s / it)`
    times = re.findall(r'^Epoch: \[\d+\] Total time: (\S+) \((\S+) s / it\)$', proc.stdout, re.M)
    assert len(times) == EPOCHS
    print('DIGITS epoch of the micro model:', times)


def test_checkpoints(digits_run):
    out, _ = digits_run
    log = read_log(out)
    last, best = load(out / 'checkpoint.pth'), load(out / 'best_checkpoint.pth')
    for ckpt in (last, best):
        assert CKPT_KEYS <= set(ckpt)
        assert isinstance(ckpt['args'], dict)
        assert ckpt['args']['model'] == MICRO and ckpt['args']['epochs'] == EPOCHS
        model = timm.create_model(MICRO, num_classes=10)
        model.load_state_dict(ckpt['model'], strict=True)
        model.load_state_dict(ckpt['model_ema'], strict=True)
        assert ckpt['optimizer']['state']  # AdamW moments were saved
    assert last['epoch'] == EPOCHS - 1
    best_epoch = max(range(EPOCHS), key=lambda e: (log[e]['test_acc1'], -e))  # the first best
    assert best['epoch'] == best_epoch
    if best_epoch != EPOCHS - 1:
        assert not torch.equal(best['model']['head.weight'], last['model']['head.weight'])


def test_tensorboard(digits_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, _ = digits_run
    assert list((out / 'tensorboard').glob('events.out.tfevents.*'))
    acc = EventAccumulator(str(out / 'tensorboard'))
    acc.Reload()
    log = read_log(out)
    for tag, key in (('train/loss', 'train_loss'), ('train/lr', 'train_lr'),
                     ('test/acc1', 'test_acc1'), ('test/acc5', 'test_acc5'),
                     ('test/loss', 'test_loss')):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == list(range(EPOCHS))
        assert [e.value for e in events] == pytest.approx([s[key] for s in log], rel=1e-6)
    # per-iteration loss every --print-freq (10) iterations, at the optimizer step it follows
    steps_per_epoch = len(DigitsDataset(train=True)) // BATCH
    iters = acc.Scalars('train/loss_iter')
    assert [e.step for e in iters] == [e * steps_per_epoch + i + 1 for e in range(EPOCHS)
                                       for i in range(0, steps_per_epoch, 10)]
    assert all(0 < e.value < 10 for e in iters)


# ---------------------------------------------------------------- --model-path

def loaded_line(stdout):
    return [line for line in stdout.splitlines() if line.startswith('Loaded weights from')]


def test_model_path_file_reproduces_logged_accuracy(digits_run, cli):
    out, _ = digits_run
    ckpt = out / 'checkpoint.pth'
    proc = check_ok(cli(['--eval', '--model-path', ckpt]))
    assert loaded_line(proc.stdout) == [f'Loaded weights from {ckpt}']
    assert eval_lines(proc.stdout) == [logged_eval_line(read_log(out)[-1])]


def test_model_path_url_bare_state_dict(digits_run, cli, tmp_path):
    out, _ = digits_run
    bare = tmp_path / 'bare.pth'
    torch.save(load(out / 'checkpoint.pth')['model'], bare)
    url = bare.as_uri()
    assert url.startswith('file://')
    proc = check_ok(cli(['--eval', '--model-path', url]))
    assert loaded_line(proc.stdout) == [f'Loaded weights from {url}']
    assert eval_lines(proc.stdout) == [logged_eval_line(read_log(out)[-1])]
    # cached under a key of the whole URL (a folder), with its own name
    assert [p.name for p in (tmp_path / 'torch_home' / 'hub' / 'checkpoints').glob('*/*')] == ['bare.pth']


def test_model_path_urls_with_one_name_are_two_files(digits_run, cli, tmp_path):
    """torch.hub caches by file name alone: the second URL would have loaded the first's
    weights, and a checkpoint of another architecture would not have been refused."""
    out, _ = digits_run
    (tmp_path / 'a').mkdir()
    (tmp_path / 'b').mkdir()
    shutil.copy(out / 'checkpoint.pth', tmp_path / 'a' / 'model.pth')
    torch.save(timm.create_model('deit_tiny_patch16_224').state_dict(), tmp_path / 'b' / 'model.pth')
    first = check_ok(cli(['--eval', '--model-path', (tmp_path / 'a' / 'model.pth').as_uri()]))
    assert eval_lines(first.stdout) == [logged_eval_line(read_log(out)[-1])]
    second = cli(['--eval', '--model-path', (tmp_path / 'b' / 'model.pth').as_uri()])
    assert second.returncode != 0
    assert re.fullmatch(r'error: --model-path file://\S+/b/model.pth: checkpoint does not fit the model: .*',
                        second.stderr.strip()), second.stderr
    assert len(list((tmp_path / 'torch_home' / 'hub' / 'checkpoints').glob('*/model.pth'))) == 2


def test_model_path_url_hash_suffix_is_checked(digits_run, cli, tmp_path):
    """DeiT's names end in the first hex digits of the file's sha256; a file that does not
    match is refused and not kept in the cache."""
    import hashlib
    data = (digits_run[0] / 'checkpoint.pth').read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    right, wrong = tmp_path / f'deit-{digest[:8]}.pth', tmp_path / 'deit-0123abcd.pth'
    right.write_bytes(data)
    wrong.write_bytes(data)
    check_ok(cli(['--eval', '--model-path', right.as_uri()]))
    proc = cli(['--eval', '--model-path', wrong.as_uri()])
    assert proc.returncode != 0
    assert proc.stderr.strip() == (f'error: --model-path {wrong.as_uri()}: the download\'s sha256 begins '
                                   f'{digest[:8]}, not with the hash its name ends in: a damaged or '
                                   'another file (not kept)')
    cached = sorted(p.name for p in (tmp_path / 'torch_home' / 'hub' / 'checkpoints').rglob('*') if p.is_file())
    assert cached == [right.name]


def test_model_path_with_1000_classes_resets_head(digits_run, cli, tmp_path):
    out, _ = digits_run
    sd = load(out / 'checkpoint.pth')['model']
    sd['head.weight'], sd['head.bias'] = torch.randn(1000, 64), torch.randn(1000)
    torch.save({'model': sd}, tmp_path / 'imagenet_head.pth')
    proc = check_ok(cli(['--eval', '--model-path', tmp_path / 'imagenet_head.pth']))
    assert loaded_line(proc.stdout) == [
        f'Loaded weights from {tmp_path / "imagenet_head.pth"}; '
        'classifier reset: checkpoint has 1000 classes, model has 10']
    assert len(eval_lines(proc.stdout)) == 1


def test_model_path_at_other_input_size_resamples_pos_embed(digits_run, cli):
    out, _ = digits_run
    proc = check_ok(cli(['--eval', '--model-path', out / 'checkpoint.pth', '--input-size', 48]))
    assert loaded_line(proc.stdout) == [
        f'Loaded weights from {out / "checkpoint.pth"}; pos_embed resampled from 65 to 145 tokens']
    assert len(eval_lines(proc.stdout)) == 1


# ---------------------------------------------------------------- resume

def test_resume_is_exact(digits_run, cli, tmp_path):
    """4 epochs straight == 2 epochs, then --resume to 4: bit for bit, with mixup, cutmix,
    RandAugment, random erasing, drop path and EMA all on, augmenting in a worker process
    (their randomness is reseeded from (seed, epoch) at every epoch start, and the sampler
    order from (seed, epoch))."""
    first_half, _ = digits_run
    straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
    check_ok(cli([*SCHEDULE_ARGS, *WORKERS, '--epochs', 4, '--output_dir', straight]))
    proc = check_ok(cli([*SCHEDULE_ARGS, *WORKERS, '--epochs', 4, '--output_dir', resumed,
                         '--resume', first_half / 'checkpoint.pth']))
    assert f'Resumed from {first_half / "checkpoint.pth"} at epoch {EPOCHS}' in proc.stdout
    # the short run was the start of the long one, and the resumed run is its end
    assert read_log(straight) == read_log(first_half) + read_log(resumed)
    a, b = load(straight / 'checkpoint.pth'), load(resumed / 'checkpoint.pth')
    assert a['epoch'] == b['epoch'] == 3
    for key in ('model', 'model_ema'):
        assert a[key].keys() == b[key].keys()
        unequal = [k for k in a[key] if not torch.equal(a[key][k], b[key][k])]
        assert not unequal, f'{key}: {unequal[:5]}'
    for i, state in a['optimizer']['state'].items():
        assert all(torch.equal(v, b['optimizer']['state'][i][k]) for k, v in state.items())
    # and the last two epochs did train: the weights moved on from the resumed checkpoint
    start = load(first_half / 'checkpoint.pth')['model']
    assert not torch.equal(start['blocks.0.attn.qkv.weight'], a['model']['blocks.0.attn.qkv.weight'])


# ---------------------------------------------------------------- distributed (gloo, 2 processes)

def torchrun():
    exe = os.path.join(os.path.dirname(sys.executable), 'torchrun')
    return [exe] if os.path.exists(exe) else [sys.executable, '-m', 'torch.distributed.run']


LAUNCHERS = {
    'launch': lambda port: [sys.executable, '-m', 'torch.distributed.launch', '--nproc_per_node=2',
                            '--master_port', port, '--use_env'],
    'torchrun': lambda port: [*torchrun(), '--nproc_per_node=2', '--master_port', port],
}


@pytest.mark.parametrize('launcher', sorted(LAUNCHERS))
def test_distributed_ranks_agree(launcher, tmp_path):
    out = tmp_path / 'out'
    proc = check_ok(run_cli([*SCHEDULE_ARGS, '--warmup-epochs', 0, '--epochs', 1, '--output_dir', out],
                            tmp_path, launcher=LAUNCHERS[launcher](free_port())))
    # not anchored to line starts: the two ranks share one stdout, and an unbuffered print()
    # writes its text and its newline separately, so lines of different ranks can run together
    found = re.findall(r'\[rank (\d)\] parameter digest ([0-9a-f]{16})', proc.stdout)
    digests = dict(found)
    # each rank was initialised with its own seed: equal digests mean DDP synchronised them
    assert len(found) == 2 and set(digests) == {'0', '1'}, proc.stdout[-3000:]
    assert digests['0'] == digests['1']
    assert '| distributed init (rank 1)' in proc.stdout
    assert [s['epoch'] for s in read_log(out)] == [0]  # written by rank 0 only
    model = timm.create_model(MICRO, num_classes=10)
    model.load_state_dict(load(out / 'checkpoint.pth')['model'])
    assert utils.parameter_digest(model) == digests['0']


def test_dist_eval_equals_single_process_eval(tmp_path):
    """On 7 validation images, a padding sampler would count 8 and change acc1 and loss."""
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    for split, per_class in (('train', (2, 2, 2)), ('val', (3, 2, 2))):
        for c, n in zip('abc', per_class):
            (tmp_path / 'tree' / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                    tmp_path / 'tree' / split / c / f'{i}.png')
    torch.manual_seed(0)
    torch.save(timm.create_model(MICRO, num_classes=3).state_dict(), tmp_path / 'three.pth')
    # 6 training images make no batch of 64: --eval must not care
    args = ['--eval', '--data-set', 'FOLDER', '--data-path', tmp_path / 'tree',
            '--model-path', tmp_path / 'three.pth']
    single = check_ok(run_cli(args, tmp_path))
    dist = check_ok(run_cli([*args, '--dist-eval'], tmp_path,
                            launcher=LAUNCHERS['torchrun'](free_port())))
    assert 'Accuracy of the network on the 7 test images' in single.stdout
    assert '| distributed init (rank 1)' in dist.stdout
    assert len(eval_lines(single.stdout)) == 1
    assert eval_lines(dist.stdout) == eval_lines(single.stdout)


# ---------------------------------------------------------------- bad input

def snapshot(folder):
    """Every entry under `folder` with its size and mtime, and the folder's own mtime."""
    entries = {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
               for p in sorted(folder.rglob('*'))}
    return entries, folder.stat().st_mtime_ns


class Evil:
    """A pickle that would run a shell command when loaded without weights_only."""

    def __reduce__(self):
        return os.system, ('echo pwned',)


@pytest.fixture(scope='module')
def bad_files(tmp_path_factory, digits_run):
    d = tmp_path_factory.mktemp('bad')
    (d / 'tree' / 'train' / 'a').mkdir(parents=True)       # a FOLDER tree without val/
    for split in ('train', 'val'):                          # a FOLDER tree with an empty class
        (d / 'empty' / split / 'b').mkdir(parents=True)
        write_image(d / 'empty' / split / 'a' / '0.png')
    (d / 'notes.txt').write_text('not a checkpoint\n')
    (d / 'regular_file').write_text('x')
    torch.save(timm.create_model('deit_tiny_patch16_224').state_dict(), d / 'deit_tiny.pth')
    dense = digits_run[0] / 'checkpoint.pth'
    data = dense.read_bytes()
    (d / 'truncated.pth').write_bytes(data[:len(data) // 2])
    shutil.copy(dense, d / 'dense.pth')
    ckpt = load(dense)
    del ckpt['args']  # so that only the weights tell the class count
    ckpt['model']['head.weight'], ckpt['model']['head.bias'] = torch.zeros(1000, 64), torch.zeros(1000)
    torch.save(ckpt, d / 'imagenet_head.pth')
    torch.save({'model': {}, 'note': Evil()}, d / 'evil.pth')
    return d


def write_image(path, seed=0):
    from PIL import Image
    import numpy as np
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


BAD_INPUTS = {  # name: (flags, with {d} the folder of bad_files, regex the error line must match)
    'no data path': (['--data-set', 'FOLDER'], r'--data-path is required for --data-set FOLDER'),
    'no val split': (['--data-set', 'FOLDER', '--data-path', '{d}/tree'], r'no val split.*{d}/tree/val'),
    'unknown model': (['--model', 'deit_smal_patch16_224'],
                      r"--model: unknown model 'deit_smal_patch16_224' \(did you mean deit_small_patch16_224"),
    'missing model path': (['--model-path', '{d}/nope.pth'], r'--model-path {d}/nope.pth does not exist'),
    'text model path': (['--model-path', '{d}/notes.txt'],
                        r'--model-path {d}/notes.txt is not a readable PyTorch checkpoint: it is not a '
                        r'file written by torch.save$'),
    'folder as model path': (['--model-path', '{d}'], r'--model-path {d} is a folder, not a checkpoint file$'),
    'pickle that runs code': (['--resume', '{d}/evil.pth'],
                              r'--resume {d}/evil.pth is not a readable PyTorch checkpoint: it would call '
                              r'(posix|os|nt)\.system while loading, .*a pickle can run code\)$'),
    'empty class folder': (['--data-set', 'FOLDER', '--data-path', '{d}/empty'],
                           r'class folder {d}/empty/train/b holds no image \(.jpg'),
    'other architecture': (['--model-path', '{d}/deit_tiny.pth'],
                           r'--model-path {d}/deit_tiny.pth: checkpoint does not fit the model: .*mis-shaped'),
    'zero batch size': (['--batch-size', 0], r'--batch-size must be at least 1, got 0'),
    'zero input size': (['--input-size', 0], r'--input-size must be at least 1, got 0$'),
    'negative input size': (['--input-size', -32], r'--input-size must be at least 1, got -32$'),
    'negative lr': (['--lr=-1'], r'--lr must not be negative, got -1.0$'),
    'drop path of 1': (['--drop-path', 1], r'--drop-path is a rate in \[0, 1\), got 1.0$'),
    'unknown device': (['--device', 'foo'], r"--device 'foo' is not a device: cpu, cuda, cuda:N, …$"),
    'cuda without a GPU': (['--device', 'cuda'], r'--device cuda: no CUDA GPU is available here \(use --device cpu\)$'),
    'negative workers': (['--num_workers=-1'], r'--num_workers must not be negative, got -1$'),
    'input size off the patch grid': (['--input-size', 30],
                                      r'--input-size 30 is not a multiple of the patch size 4'),
    'truncated resume': (['--resume', '{d}/truncated.pth'],
                         r'--resume {d}/truncated.pth is not a readable PyTorch checkpoint: a damaged or truncated'),
    'resume of another model': (['--resume', '{d}/dense.pth', '--model', 'deit_micro12_patch4_32'],
                                r'--resume {d}/dense.pth does not fit --model deit_micro12_patch4_32: it was '
                                r'written for --model deit_micro_patch4_32$'),
    'resume of another class count': (['--resume', '{d}/imagenet_head.pth'],
                                      r'--resume {d}/imagenet_head.pth does not fit --model deit_micro_patch4_32: '
                                      r'its classifier has 1000 classes, --data-set DIGITS has 10$'),
    'resume of a dense run while pruning': (['--resume', '{d}/dense.pth', '--prune-method', 'block_pr',
                                             '--prune-start-epoch', 0, '--prune-sparse-epoch', 1],
                                            r'--resume {d}/dense.pth is not from a pruning run \(it holds no '
                                            r'pruner state\): to prune its weights, pass it as --model-path$'),
    'unwritable output_dir': (['--output_dir', '{d}/regular_file/out'],
                              r'--output_dir {d}/regular_file/out is not writable'),
}


@pytest.mark.parametrize('case', list(BAD_INPUTS))
def test_bad_input(case, bad_files, tmp_path):
    flags, pattern = BAD_INPUTS[case]
    flags = [str(f).format(d=bad_files) for f in flags]
    out = tmp_path / 'existing_out'
    out.mkdir()
    (out / 'sentinel.txt').write_text('keep me\n')
    before, before_bad = snapshot(out), snapshot(bad_files)
    # no GPU, even where the tests run on a machine that has one ('cuda without a GPU')
    proc = run_cli(['--epochs', 1, '--output_dir', out, *flags], tmp_path, env={'CUDA_VISIBLE_DEVICES': ''})
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr[-3000:]
    assert re.search(pattern.format(d=re.escape(str(bad_files))), lines[0]), lines[0]
    if case.startswith(('resume', 'pickle')):  # these once printed 2,616 characters, or were cut short
        assert len(lines[0]) < 300, len(lines[0])
    assert snapshot(out) == before
    assert snapshot(bad_files) == before_bad


def test_non_finite_loss_stops_the_run(cli, tmp_path):
    out = tmp_path / 'out'
    proc = cli(['--lr', '1e30', '--warmup-epochs', 0, '--epochs', 1, '--output_dir', out])
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert re.fullmatch(r'error: loss is (nan|inf|-inf) at epoch 0, iteration \d+: stopping training',
                        lines[0]), lines[0]
    assert not (out / 'checkpoint.pth').exists() and not (out / 'log.txt').exists()


# ---------------------------------------------------------------- an output dir that holds a run

def test_output_dir_holding_a_run_is_refused_unless_resumed_or_overwritten(digits_run, cli, tmp_path):
    """A new run into a finished run's folder once replaced its checkpoints (a worse
    best_checkpoint.pth over a better one) and appended to its logs."""
    out = tmp_path / 'run'
    shutil.copytree(digits_run[0], out)
    before = snapshot(out)
    proc = cli(['--epochs', 1, '--output_dir', out])
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f'error: --output_dir {out} holds a run (checkpoint.pth, best_checkpoint.pth, log.txt, …): '
        f'--resume {out}/checkpoint.pth continues it, --overwrite replaces it']
    proc = cli(['--epochs', 1, '--output_dir', out, '--overwrite', '--resume', out / 'checkpoint.pth'])
    assert proc.stderr.splitlines() == [
        f'error: --overwrite would delete --resume {out / "checkpoint.pth"}: leave out one of them']
    # --eval never writes, wherever --output_dir points
    check_ok(cli(['--eval', '--model-path', out / 'checkpoint.pth', '--output_dir', out]))
    assert snapshot(out) == before
    # --overwrite: the old run's files go first, then a run of its own
    (out / 'checkpoint.pth.tmp.999999').write_bytes(b'half a checkpoint')
    (out / 'notes.txt').write_text('mine\n')
    proc = check_ok(cli([*SCHEDULE_ARGS, '--epochs', 1, '--output_dir', out, '--overwrite']))
    assert '--overwrite: removed checkpoint.pth, best_checkpoint.pth, log.txt, args.json, tensorboard, ' \
           'checkpoint.pth.tmp.999999 from' in proc.stdout
    assert [s['epoch'] for s in read_log(out)] == [0]
    assert load(out / 'checkpoint.pth')['epoch'] == 0
    assert len(list((out / 'tensorboard').glob('events.out.tfevents.*'))) == 1
    assert (out / 'notes.txt').read_text() == 'mine\n'  # not a file of a run


def test_unreadable_image_is_named_or_skipped_and_counted(cli, tmp_path):
    tree = tmp_path / 'tree'
    for split, n in (('train', 4), ('val', 2)):
        for c in 'ab':
            for i in range(n):
                write_image(tree / split / c / f'{i}.png', seed=i)
    bad_train, bad_val = tree / 'train' / 'b' / '1.png', tree / 'val' / 'a' / '0.png'
    bad_train.write_bytes(b'not an image')
    bad_val.write_bytes(bad_train.read_bytes()[:4])
    torch.manual_seed(0)
    torch.save(timm.create_model(MICRO, num_classes=2).state_dict(), tmp_path / 'two.pth')
    # 8 training images in batches of 4: every image is read once an epoch
    args = ['--data-set', 'FOLDER', '--data-path', tree, '--model-path', tmp_path / 'two.pth',
            '--batch-size', 4, '--epochs', 1, '--warmup-epochs', 0]
    # in a DataLoader worker, whose exception comes back with the worker's traceback
    proc = cli([*args, '--num_workers', 1, '--output_dir', tmp_path / 'stopped'])
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f'error: unreadable image {bad_train}: not an image PIL can identify '
        '(--skip-bad-images skips such images)'], proc.stderr[-3000:]
    assert not (tmp_path / 'stopped' / 'checkpoint.pth').exists()
    out = tmp_path / 'skipped'
    proc = check_ok(cli([*args, '--output_dir', out, '--skip-bad-images']))
    skipped = [re.fullmatch(r'warning: skipped unreadable image (\S+): not an image PIL can identify', line)
               for line in proc.stderr.splitlines() if line.startswith('warning:')]
    # each named where it was read: once in training, once in the evaluation of the epoch
    assert sorted(m.group(1) for m in skipped) == sorted([str(bad_train), str(bad_val)]), proc.stderr
    (log,) = read_log(out)
    assert log['train_unreadable_images'] == 1 and log['test_unreadable_images'] == 1


def test_stale_temporary_checkpoints_are_removed_by_the_next_write(tmp_path):
    """A write killed half-way leaves PATH.tmp.PID; the next successful write removes it."""
    path = tmp_path / 'checkpoint.pth'
    (tmp_path / 'checkpoint.pth.tmp.12345').write_bytes(b'half')
    (tmp_path / 'best_checkpoint.pth.tmp.12345').write_bytes(b'half')  # another file's: kept
    utils.save_on_master({'epoch': 3}, path)
    assert load(path) == {'epoch': 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ['best_checkpoint.pth.tmp.12345', 'checkpoint.pth']
