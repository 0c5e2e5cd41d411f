"""What a user types, a file holds or a signal sends: one line and an exit status, never a
traceback, a hang or silently wrong training (each case starts the real command)."""
import json
import re
import shutil
import signal
import subprocess
import sys
import time

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import REPO, check_ok, cli_command, cli_env, free_port, run_cli

FAST = ['--input-size', '16', '--aa', 'none', '--no-model-ema', '--print-freq', '1000']


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def each_case(cases, check, tmp_path):
    """check(case, folder) for every case, two processes at a time (a start is mostly torch's
    import, one core each); every case that fails is reported, not only the first."""
    def run(item):
        i, case = item
        folder = tmp_path / f'case{i}'
        folder.mkdir()
        try:
            check(case, folder)
        except AssertionError as e:
            return f'{case}: {e}'
        return None
    with ThreadPoolExecutor(max_workers=2) as pool:
        failed = [f for f in pool.map(run, enumerate(cases)) if f]
    assert not failed, '\n'.join(failed)


def one_line(proc, pattern, status=2):
    lines = proc.stderr.splitlines()
    assert proc.returncode == status and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


@pytest.fixture(scope='module')
def run3(tmp_path_factory):
    """A finished 3-epoch run: its folder and its final parameter digest."""
    tmp = tmp_path_factory.mktemp('run3')
    proc = check_ok(run_cli([*FAST, '--epochs', '3', '--output_dir', tmp / 'out'], tmp))
    return tmp / 'out', digest(proc.stdout)


def digest(stdout):
    return re.findall(r'parameter digest (\w+)', stdout)


# ---------------------------------------------------------------- 1, 2: flags, before anything is written
FLAGS = {
    'nan temperature': (['--prune-method', 'block_pr', '--pr-tau-max', 'nan'],
                        r'^error: argument --pr-tau-max: takes a finite number, got \'nan\'$'),
    'nan lr': (['--lr', 'nan'], r'argument --lr: takes a finite number'),
    'inf lr': (['--lr', 'inf'], r'argument --lr: takes a finite number'),
    'inf in a list': (['--opt-betas', '0.9', 'inf'], r'argument --opt-betas: takes a finite number'),
    'negative head lr': (['--prune-method', 'block_pr', '--lr-soft-head', '-1'],
                         r'^error: --lr-soft-head must not be negative, got -1.0$'),
    'gamma above 1': (['--prune-method', 'block_pr', '--pr-gamma', '2'], r'--pr-gamma must be in \[0, 1\]'),
    'ema decay above 1': (['--model-ema-decay', '2'], r'--model-ema-decay is a share in \[0, 1\], got 2.0$'),
    'beta of 1': (['--opt-betas', '0.9', '1.0'], r'--opt-betas is a rate in \[0, 1\), got 1.0$'),
    'zero clip': (['--clip-grad', '0'], r'--clip-grad must be above 0'),
    'start after the end': (['--start_epoch', '3', '--epochs', '3'],
                            r'--start_epoch 3 is not before --epochs 3: nothing would be trained$'),
    'unknown optimizer': (['--opt', 'foo'], r'^error: --opt foo: timm cannot build it: .*foo'),
    'unknown scheduler': (['--sched', 'foo'], r'^error: --sched foo: timm cannot build it: .*foo'),
    'betas of another optimizer': (['--opt', 'adamw', '--opt-betas', '0.9'], r'^error: --opt adamw --opt-betas 0.9: '),
    'zero rendezvous time': (['--dist-timeout', '0'], r'--dist-timeout must be above 0'),
    'unknown augmentation': (['--aa', 'foo'], r'^error: --aa foo, .*: timm cannot build the training transform: '),
    'unknown interpolation': (['--train-interpolation', 'foo'], r'--train-interpolation foo, .*: timm cannot build'),
    'unknown erasing mode': (['--remode', 'foo'], r'--remode foo: timm cannot build the training transform'),
    'unknown mixup mode': (['--mixup-mode', 'foo'], r"argument --mixup-mode: invalid choice: 'foo'"),
}


def test_a_bad_flag_is_one_line_and_the_folder_stays_untouched(tmp_path):
    def check(case, folder):
        flags, pattern = FLAGS[case]
        out = folder / 'out'
        one_line(run_cli([*FAST, '--epochs', '2', '--output_dir', out, *flags], folder), pattern)
        assert not out.exists()
    each_case(FLAGS, check, tmp_path)


def test_a_start_that_failed_does_not_block_the_corrected_one(tmp_path):
    """A loss that goes NaN in the first epoch leaves args.json and tensorboard/, no checkpoint:
    the corrected command starts without --overwrite, and replaces them."""
    out = tmp_path / 'out'
    one_line(run_cli([*FAST, '--lr', '1e30', '--warmup-epochs', '0', '--epochs', '1', '--output_dir', out],
                     tmp_path), r'^error: loss is (nan|inf|-inf) at epoch 0', status=1)
    assert (out / 'args.json').exists() and not (out / 'checkpoint.pth').exists()
    proc = check_ok(run_cli([*FAST, '--epochs', '1', '--output_dir', out], tmp_path))
    assert 'a start that ended before its first epoch left files: removed args.json, tensorboard' in proc.stdout
    assert json.loads((out / 'args.json').read_text())['lr'] == 5e-4
    assert len((out / 'log.txt').read_text().splitlines()) == 1


# ---------------------------------------------------------------- 3: signals
def start(args, tmp_path):
    return subprocess.Popen(cli_command(args), cwd=REPO, env=cli_env(tmp_path), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(predicate, proc, seconds=120):
    deadline = time.time() + seconds
    while not predicate():
        assert proc.poll() is None and time.time() < deadline, 'the run ended or took too long'
        time.sleep(0.05)


def saved_epoch(path):
    try:
        return load(path)['epoch']
    except Exception:  # not there yet, or being replaced
        return None


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_a_signal_ends_the_run_in_one_line_and_resume_is_exact(run3, tmp_path, signum):
    full, full_digest = run3
    out = tmp_path / 'out'
    args = [*FAST, '--epochs', '3', '--output_dir', out]
    proc = start(args, tmp_path)
    wait_for(lambda: saved_epoch(out / 'checkpoint.pth') == 0, proc)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum and len(stderr.splitlines()) == 1, stderr
    assert re.fullmatch(rf'stopped by {name} in epoch [12] of 3: --resume {re.escape(str(out))}/checkpoint.pth '
                        r'continues it from epoch (\d)', stderr.strip()), stderr
    resumed = check_ok(run_cli([*args, '--resume', out / 'checkpoint.pth'], tmp_path))
    assert digest(resumed.stdout) == full_digest
    assert (out / 'log.txt').read_text() == (full / 'log.txt').read_text()


# ---------------------------------------------------------------- 4: one run per folder
def test_a_folder_in_use_is_refused_and_a_dead_runs_lock_is_not(tmp_path):
    out = tmp_path / 'out'
    first = start([*FAST, '--epochs', '100', '--output_dir', out], tmp_path)
    try:
        wait_for(lambda: saved_epoch(out / 'checkpoint.pth') is not None, first)
        for extra in ([], ['--overwrite'], ['--resume', out / 'checkpoint.pth']):
            one_line(run_cli([*FAST, '--epochs', '2', '--output_dir', out, *extra], tmp_path),
                     rf'^error: --output_dir {re.escape(str(out))} is in use by a running job \(pid {first.pid} on ')
        assert first.poll() is None
    finally:
        first.kill()  # SIGKILL: no handler runs, the lock file stays behind
        first.wait()
    assert (out / 'run.lock').exists()
    lines = len((out / 'log.txt').read_text().splitlines())
    check_ok(run_cli([*FAST, '--epochs', lines + 1, '--output_dir', out, '--resume', out / 'checkpoint.pth'],
                     tmp_path))
    assert [json.loads(x)['epoch'] for x in (out / 'log.txt').read_text().splitlines()] == list(range(lines + 1))


# ---------------------------------------------------------------- 5: a full disk
def test_a_full_disk_says_so_and_the_last_checkpoint_stays(tmp_path):
    """A 4 MB tmpfs (in a mount namespace of its own): checkpoint.pth (2.5 MB) fits, then
    best_checkpoint.pth does not."""
    if shutil.which('unshare') is None or subprocess.run(['unshare', '-rm', 'true']).returncode != 0:
        pytest.skip('no mount namespaces here (unshare -rm) to make a small disk in')
    out, copy = tmp_path / 'small', tmp_path / 'copy'
    out.mkdir()
    command = ' '.join(f"'{a}'" for a in cli_command([*FAST, '--epochs', '2', '--output_dir', out]))
    script = f'mount -t tmpfs -o size=4m tmpfs {out} && {command}; status=$?; cp -r {out} {copy}; exit $status'
    proc = subprocess.run(['unshare', '-rm', 'sh', '-c', script], cwd=REPO, env=cli_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    one_line(proc, rf'^error: the disk is full: {re.escape(str(out))}/best_checkpoint.pth could not be written; '
                   rf'no best_checkpoint.pth was written before; --resume {re.escape(str(out))}/checkpoint.pth '
                   r'continues it from epoch 1$', status=1)
    assert load(copy / 'checkpoint.pth')['epoch'] == 0
    assert not list(copy.glob('*.tmp.*'))


# ---------------------------------------------------------------- 6: files are data
def crafted(path, base, **changes):
    ckpt = load(base)
    for key, value in changes.items():
        ckpt[key] = value
    torch.save(ckpt, path)
    return path


def arch_with(base, **changes):
    arch = load(base)['arch']
    for path, value in changes.items():
        target, *keys = path.split('.')
        node = arch[target] if keys else arch
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        node[(int(keys[-1]) if isinstance(node, list) else keys[-1]) if keys else target] = value
    return arch


@pytest.fixture(scope='module')
def cut_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('cut')
    check_ok(run_cli([*FAST, '--epochs', '1', '--prune-method', 'block_pr', '--prune-start-epoch', '0',
                      '--prune-sparse-epoch', '1', '--output_dir', tmp / 'out'], tmp))
    return tmp / 'out' / 'first_sparse_checkpoint.pth'


ATTN = {'in_idx': None, 'out_idx': None, 'num_heads': 4, 'head_dim': 16}
MLP = {'in_idx': None, 'out_idx': None, 'hidden_features': 256}
ARCHS = {
    'absurd width': ({'blocks.0.mlp': {**MLP, 'hidden_features': 10 ** 9}},
                     r'arch blocks\[0\]\.mlp hidden_features must be a whole number in 1 … 512, got 1000000000$'),
    'negative width': ({'blocks.1.attn': {**ATTN, 'head_dim': -4}}, r'arch blocks\[1\]\.attn head_dim must be a whole number'),
    'string width': ({'embed_dim': '64'},
                     r"arch embed_dim must be a whole number in 1 … 64 for deit_micro_patch4_32, got '64'$"),
    'deeper than the family': ({'depth': 40}, r'arch depth must be a whole number in 1 … 4 '),
    'dims out of range': ({'blocks.0.attn': {**ATTN, 'in_idx': [0, 1, 99]}},
                          r'arch blocks\[0\]\.attn in_idx must be None or a list of dims in 0 … 63$'),
    'a string block': ({'blocks.2': 'attn'}, r'arch blocks\[2\] is a str, not a dict$'),
}


def test_an_absurd_arch_is_refused_before_anything_is_allocated(cut_checkpoint, tmp_path):
    def check(case, folder):
        changes, pattern = ARCHS[case]
        bad = crafted(folder / 'bad.pth', cut_checkpoint, arch=arch_with(cut_checkpoint, **changes))
        one_line(run_cli([*FAST, '--eval', '--model-path', bad, '--resize-model-by-checkpoint'], folder),
                 rf'^error: --model-path {re.escape(str(bad))}: {pattern}')
    each_case(ARCHS, check, tmp_path)


def test_an_arch_that_is_not_a_dict_is_refused(cut_checkpoint, tmp_path):
    bad = crafted(tmp_path / 'bad.pth', cut_checkpoint, arch='deit_micro_patch4_32')
    one_line(run_cli([*FAST, '--eval', '--model-path', bad, '--resize-model-by-checkpoint'], tmp_path),
             r'arch is a str, not a dict$')


NOT_OURS = r'.*: not a checkpoint of this script$'
RESUMES = {
    'model is a list': ({'model': [1, 2, 3]}, r'its "model" is not a state dict' + NOT_OURS),
    'epoch is a string': ({'epoch': 'one'}, r'its "epoch" must be a whole number of at least 0' + NOT_OURS),
    'log_lines name a user file': ({'log_lines': {'notes.txt': 0}},
                                   r'its "log_lines" must count lines of log.txt and pruning_log.jsonl only' + NOT_OURS),
    'log_lines name an absolute path': ({'log_lines': {'/etc/passwd': 0}}, r'its "log_lines" must count lines' + NOT_OURS),
    'log_lines negative': ({'log_lines': {'log.txt': -1}}, r'its "log_lines" must count lines' + NOT_OURS),
    'max_accuracy a string': ({'max_accuracy': 'high'}, r'its "max_accuracy" is a str, not a number' + NOT_OURS),
    'optimizer of another run': ({'optimizer': {'state': {}, 'param_groups': []}},
                                 r'its "optimizer" does not fit this run \(another --opt, --sched or set of '
                                 r'trained parameters\): \S'),
}


def test_a_crafted_resume_checkpoint_is_refused_and_nothing_is_cut(run3, tmp_path):
    full, _ = run3

    def check(case, folder):
        out = folder / 'out'
        shutil.copytree(full, out)
        (out / 'notes.txt').write_text('mine\n' * 3)
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.suffix != '.pth'}
        changes, pattern = RESUMES[case]
        bad = crafted(out / 'checkpoint.pth', full / 'checkpoint.pth', **changes)
        one_line(run_cli([*FAST, '--epochs', '4', '--output_dir', out, '--resume', bad], folder),
                 rf'^error: --resume {re.escape(str(bad))}: {pattern}')
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.suffix != '.pth'} == before
    each_case(RESUMES, check, tmp_path)


def test_overwrite_removes_a_linked_tensorboard_folder_not_its_target(run3, tmp_path):
    full, _ = run3
    out, elsewhere = tmp_path / 'out', tmp_path / 'elsewhere'
    shutil.copytree(full, out)
    shutil.move(out / 'tensorboard', elsewhere)
    (out / 'tensorboard').symlink_to(elsewhere, target_is_directory=True)
    kept = sorted(p.name for p in elsewhere.iterdir())
    check_ok(run_cli([*FAST, '--epochs', '1', '--output_dir', out, '--overwrite'], tmp_path))
    assert sorted(p.name for p in elsewhere.iterdir()) == kept
    assert (out / 'tensorboard').is_dir() and not (out / 'tensorboard').is_symlink()


# ---------------------------------------------------------------- 7: a broken distributed environment
ENVS = {
    'rank without a master': ({'RANK': '0', 'WORLD_SIZE': '2'},
                              r'^error: RANK and WORLD_SIZE are set, but MASTER_ADDR and MASTER_PORT are not'),
    'world size not a number': ({'RANK': '0', 'WORLD_SIZE': 'two', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': '1'},
                                r"^error: the environment sets WORLD_SIZE='two', not a whole number$"),
    'rank beyond the world': ({'RANK': '2', 'WORLD_SIZE': '2', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': '1'},
                              r'^error: the environment sets rank 2 of world size 2'),
    'slurm tasks without srun': ({'SLURM_PROCID': '0', 'SLURM_NTASKS': '2'}, r'^error: SLURM_NTASKS=2 .* start them with srun'),
}


def test_a_broken_distributed_environment_is_one_line(tmp_path):
    def check(case, folder):
        env, pattern = ENVS[case]
        one_line(run_cli([*FAST, '--epochs', '1', '--output_dir', folder / 'out'], folder, env=env), pattern)
        assert not (folder / 'out').exists()
    each_case(ENVS, check, tmp_path)


def test_a_rendezvous_that_cannot_complete_ends_after_dist_timeout(tmp_path):
    env = {'RANK': '0', 'WORLD_SIZE': '2', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(free_port())}
    began = time.time()
    one_line(run_cli([*FAST, '--epochs', '1', '--dist-timeout', '3', '--output_dir', tmp_path / 'out'], tmp_path,
                     env=env), r'^error: the rendezvous of 2 processes at 127.0.0.1:\d+ did not complete within '
                               r'--dist-timeout 3 s \(this is rank 0\)')
    assert time.time() - began < 60 and not (tmp_path / 'out').exists()


# ---------------------------------------------------------------- 8: the scripts keep the same promise
def script(name, *args, tmp_path):
    return subprocess.run([sys.executable, f'scripts/{name}', *map(str, args)], cwd=REPO, env=cli_env(tmp_path),
                          capture_output=True, text=True, timeout=300)


def test_export_makes_the_folder_of_out_and_refuses_one_under_a_file(cut_checkpoint, tmp_path):
    out = tmp_path / 'new' / 'folder' / 'model.onnx'
    proc = script('export.py', cut_checkpoint, '--out', out, '--deploy', 'none', tmp_path=tmp_path)
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-2000:]
    (tmp_path / 'file').write_text('x')
    proc = script('export.py', cut_checkpoint, '--out', tmp_path / 'file' / 'model.onnx', tmp_path=tmp_path)
    one_line(proc, r'^error: --out \S+/file/model.onnx: cannot write there: ', status=1)


@pytest.mark.parametrize('flags,pattern', [
    (['--prune-ratio', '1.5'], r'^error: --prune-ratio must be in \(0, 1\), got 1.5$'),
    (['--iters', '0'], r'^error: --iters must be at least 1, got 0$'),
    (['--device', 'cuda:7'], r'^error: --device cuda:7'),
])
def test_benchmark_refuses_bad_numbers_in_one_line(flags, pattern, tmp_path):
    proc = script('benchmark.py', '--model', 'deit_micro_patch4_32', *flags, tmp_path=tmp_path)
    one_line(proc, pattern, status=1)


def test_make_table_refuses_a_root_that_does_not_exist(tmp_path):
    one_line(script('make_table.py', tmp_path / 'nope', tmp_path=tmp_path), r'^error: \S+/nope is not a folder of runs', 1)


def test_logs_cut_short_or_malformed_are_skipped_with_a_warning(run3, tmp_path):
    """The last line of a killed run's log.txt is often cut short; a line may also lack keys or
    nest beyond any parser's depth: each is named on stderr and left out."""
    full, _ = run3
    root = tmp_path / 'table'
    run = root / 'IFOOD' / 'deit_tiny_patch16_224' / 'deit'
    run.mkdir(parents=True)
    lines = (full / 'log.txt').read_text().splitlines()
    bad = [lines[0], '{"epoch": 1}', '[' * 100_000 + ']' * 100_000, lines[2][:25]]
    (run / 'log.txt').write_text('\n'.join(bad) + '\n')
    proc = script('make_table.py', root, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [f'warning: {run}/log.txt line 2 lacks test_acc1, n_parameters: skipped',
                                        f'warning: {run}/log.txt line 3 is not a complete JSON record: skipped',
                                        f'warning: {run}/log.txt line 4 is not a complete JSON record: skipped']
    assert f'{json.loads(lines[0])["test_acc1"]:.1f} / 72.7' in proc.stdout


def test_plot_reads_a_pruning_log_cut_short(cut_checkpoint, tmp_path):
    log = cut_checkpoint.parent / 'pruning_log.jsonl'
    cut = tmp_path / 'pruning_log.jsonl'
    text = log.read_text()
    cut.write_text(text + text.splitlines()[0][:40])
    out = tmp_path / 'figs' / 'fig.png'
    proc = script('plot_block_performance.py', cut, '--out', out, tmp_path=tmp_path)
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-2000:]
    n = len(text.splitlines()) + 1
    assert proc.stderr.splitlines() == [f'warning: {cut} line {n} is not a complete JSON record: skipped']


def test_submitit_on_a_machine_without_slurm_is_one_line(tmp_path):
    if shutil.which('srun'):
        pytest.skip('this machine has SLURM')
    proc = subprocess.run([sys.executable, 'run_with_submitit.py', '--cluster', 'slurm', '--job_dir', tmp_path / 'job',
                           '--model', 'deit_micro_patch4_32', '--data-set', 'DIGITS', '--device', 'cpu'],
                          cwd=REPO, env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
    one_line(proc, r'^error: --cluster slurm: this machine has no SLURM')


def test_run_state_refuses_a_checkpoint_with_absurd_entries(tmp_path):
    (tmp_path / 'run').mkdir()
    torch.save({'epoch': 'x', 'args': {'epochs': 3}}, tmp_path / 'run' / 'checkpoint.pth')
    one_line(script('run_state.py', tmp_path / 'run', tmp_path=tmp_path),
             r'records no whole "epoch" and "args" epochs: not a checkpoint of main.py', status=1)
