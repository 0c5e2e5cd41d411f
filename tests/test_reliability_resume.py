"""Nothing silently lost or silently changed (issue 30): what --resume continues from, what a
resumed pruning run must repeat, the logs it appends to, the run state a script reads, and the
settings that would do nothing or break the method. Each case starts the real command and
asserts its one line; where a refusal protects a run folder, the folder is unchanged after."""
import json
import re
import shutil
import signal
import subprocess

import pytest

from conftest import REPO, check_ok, cli_env, run_cli
from test_cost import made_up_table
from test_reliability import FAST, each_case, load, one_line, saved_epoch, script, start, wait_for

PRUNE = ['--prune-method', 'block_pr', '--prune-start-epoch', '0', '--prune-sparse-epoch', '1',
         '--prune-steps-update-mask', '4']


def files(folder):
    """Every file of a run folder and its bytes (tensorboard's events included)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()
            and p.name != 'run.lock'}


def copy_run(source, folder):
    out = folder / 'out'
    shutil.copytree(source, out, symlinks=True)
    return out


@pytest.fixture(scope='module')
def safetensors_run(tmp_path_factory):
    """A finished 2-epoch run written with --save-format safetensors."""
    tmp = tmp_path_factory.mktemp('st')
    check_ok(run_cli([*FAST, '--epochs', '2', '--save-format', 'safetensors', '--output_dir', tmp / 'out'], tmp))
    return tmp / 'out'


@pytest.fixture(scope='module')
def cut_run(tmp_path_factory):
    """A 2-epoch pruning run cut after epoch 0: its checkpoint.pth (after the cut) counts lines of
    both logs, its first_sparse_checkpoint.pth holds a cut model."""
    tmp = tmp_path_factory.mktemp('cut')
    check_ok(run_cli([*FAST, *PRUNE, '--epochs', '2', '--prune-finalize-epoch', '1', '--output_dir', tmp / 'out'],
                     tmp))
    return tmp / 'out'


@pytest.fixture(scope='module')
def stopped_pruning(tmp_path_factory):
    """A 3-epoch DAP run on a latency budget (a made-up table for the micro model at 32 px),
    stopped by SIGINT after its checkpoint of epoch 0: it holds the pruner's state."""
    tmp = tmp_path_factory.mktemp('stopped')
    table = tmp / 'table.json'
    table.write_text(json.dumps(made_up_table()))
    args = [*FAST, '--input-size', '32', *PRUNE, '--epochs', '3', '--prune-budget', 'latency',
            '--latency-table', table]
    out = tmp / 'out'
    proc = start([*args, '--output_dir', out], tmp)
    wait_for(lambda: saved_epoch(out / 'checkpoint.pth') == 0, proc)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert 'pruner' in load(out / 'checkpoint.pth')
    return out, args, table


# ---------------------------------------------------------------- data loss: what --resume continues from
def test_a_resume_from_weights_only_is_refused_and_names_the_checkpoint_that_continues(safetensors_run, tmp_path):
    cases = {
        'the .safetensors beside checkpoint.pth': ('checkpoint.safetensors',
                                                   r'--resume {out}/checkpoint.pth continues its run$'),
        'the best .safetensors': ('best_checkpoint.safetensors', r'--resume {out}/checkpoint.pth continues its run$'),
        'a weights-only file into a new folder': ('../weights.safetensors',
                                                  r'to train from its weights, pass it as --model-path'),
    }

    def check(case, folder):
        out = copy_run(safetensors_run, folder)
        shutil.copy(out / 'checkpoint.safetensors', folder / 'weights.safetensors')
        name, advice = cases[case]
        before = files(out)
        resume = out / name
        into = folder / 'new' if name.startswith('..') else out
        one_line(run_cli([*FAST, '--epochs', '3', '--output_dir', into, '--resume', resume], folder),
                 rf'^error: --resume {re.escape(str(resume))} holds weights only \(no optimizer state and epoch\): '
                 rf'it cannot continue a run; ' + advice.format(out=re.escape(str(out))))
        assert files(out) == before and not (folder / 'new').exists()
    each_case(cases, check, tmp_path)


def test_a_resume_through_a_linked_checkpoint_continues_and_is_never_advised_back(safetensors_run, tmp_path):
    """--resume OUT/checkpoint.pth that is a link to a file elsewhere continues the run in OUT
    (it was refused with the advice to pass exactly --resume OUT/checkpoint.pth)."""
    out = copy_run(safetensors_run, tmp_path)
    elsewhere = tmp_path / 'kept.pth'
    shutil.move(out / 'checkpoint.pth', elsewhere)
    (out / 'checkpoint.pth').symlink_to(elsewhere)
    proc = check_ok(run_cli([*FAST, '--epochs', '3', '--output_dir', out, '--resume', out / 'checkpoint.pth'],
                            tmp_path))
    assert 'Resumed from' in proc.stdout
    assert [json.loads(x)['epoch'] for x in (out / 'log.txt').read_text().splitlines()] == [0, 1, 2]
    assert load(elsewhere)['epoch'] == 1  # the link was replaced, not written through


# ---------------------------------------------------------------- data loss: the run state scripts read
def test_a_run_that_lost_its_checkpoint_is_never_new_and_the_table_script_stops(tmp_path):
    root = tmp_path / 'table'
    run = root / 'IFOOD' / 'deit_small_patch16_224' / 'deit'
    run.mkdir(parents=True)
    (run / 'best_checkpoint.pth').write_bytes(b'kept')
    (run / 'log.txt').write_text('{"epoch": 0}\n')
    one_line(script('run_state.py', run, tmp_path=tmp_path),
             rf'^error: {re.escape(str(run))}: it holds a run \(best_checkpoint.pth, log.txt\) but no checkpoint.pth '
             r'to continue from, and starting it again would delete them; continue or remove that run by hand$',
             status=1)
    proc = subprocess.run(['bash', 'scripts/reproduce_table.sh', '--dry-run'], cwd=REPO, capture_output=True,
                          text=True, env=dict(cli_env(tmp_path), ROOT=str(root)), timeout=120)
    assert proc.returncode != 0 and '--overwrite' not in proc.stdout, (proc.stdout, proc.stderr)
    assert proc.stderr.splitlines()[-1].startswith(f'error: {run}: it holds a run'), proc.stderr
    assert (run / 'best_checkpoint.pth').read_bytes() == b'kept'


# ---------------------------------------------------------------- data loss: logs cut short within the counted lines
def test_a_log_cut_short_within_its_counted_lines_is_refused_and_a_lost_newline_is_repaired(cut_run, tmp_path):
    def cut_short(name):
        def change(out):
            text = (out / name).read_text()
            (out / name).write_text(text[:len(text) - len(text.splitlines()[-1]) // 2 - 1])
        return change

    def last_newline_lost(out):
        (out / 'pruning_log.jsonl').write_text((out / 'pruning_log.jsonl').read_text()[:-1])

    cases = {
        'pruning_log.jsonl cut within its last counted line': (cut_short('pruning_log.jsonl'), 'pruning_log.jsonl'),
        'log.txt cut within its last counted line': (cut_short('log.txt'), 'log.txt'),
        'pruning_log.jsonl lost its last newline only': (last_newline_lost, None),
    }

    def check(case, folder):
        out = copy_run(cut_run, folder)
        change, damaged = cases[case]
        change(out)
        counted = load(out / 'checkpoint.pth')['log_lines']
        args = [*FAST, *PRUNE, '--epochs', '3', '--prune-finalize-epoch', '1', '--output_dir', out,
                '--resume', out / 'checkpoint.pth']
        if damaged is None:
            check_ok(run_cli(args, folder))
            records = [json.loads(x) for x in (out / 'pruning_log.jsonl').read_text().splitlines()]
            assert len(records) == counted['pruning_log.jsonl']
            return
        before = files(out)
        n = counted[damaged]
        one_line(run_cli(args, folder),
                 rf'^error: --resume {re.escape(str(out))}/checkpoint.pth counts {n} line\(s\) of '
                 rf'{re.escape(str(out / damaged))}, but line {n} is not a complete JSON record: records were '
                 r'lost and the run would append onto a damaged log; restore it, or start the run again$')
        assert files(out) == before
    each_case(cases, check, tmp_path)


# ---------------------------------------------------------------- silent changes: a resumed run repeats its settings
def test_a_resume_with_other_pruning_settings_is_refused_in_one_line_naming_the_flag(stopped_pruning, tmp_path):
    stopped, args, table = stopped_pruning
    edited = made_up_table(other_ms=0.9)
    cases = {
        'another --prune-ratio': (['--prune-ratio', '0.6'], r'--prune-ratio \(0.5 then, 0.6 now\)'),
        'another --pr-gamma': (['--pr-gamma', '0.3'], r'--pr-gamma \(0.2 then, 0.3 now\)'),
        'another --prune-steps-update-mask': (['--prune-steps-update-mask', '2'],
                                              r'--prune-steps-update-mask \(4 then, 2 now\)'),
        'another --epochs, so another cut': (['--epochs', '4'], r'--prune-finalize-epoch \(3 then, 4 now\)'),
        'a latency table with other contents': ('edited', r'--latency-table \(sha256 [0-9a-f]{12} then, '
                                                          r'[0-9a-f]{12} now\)'),
    }

    def check(case, folder):
        out = copy_run(stopped, folder)
        flags, pattern = cases[case]
        if flags == 'edited':
            (folder / 'table.json').write_text(json.dumps(edited))
            flags = ['--latency-table', folder / 'table.json']
        before = files(out)
        one_line(run_cli([*args, *flags, '--output_dir', out, '--resume', out / 'checkpoint.pth'], folder),
                 rf'^error: --resume {re.escape(str(out))}/checkpoint.pth was pruned with other settings: '
                 rf'{pattern}: resume with the ones it was written with$')
        assert files(out) == before
    each_case(cases, check, tmp_path)


def test_a_resume_with_the_same_table_moved_elsewhere_continues(stopped_pruning, tmp_path):
    stopped, args, table = stopped_pruning
    out = copy_run(stopped, tmp_path)
    moved = tmp_path / 'moved.json'
    shutil.copy(table, moved)
    check_ok(run_cli([*args, '--latency-table', moved, '--output_dir', out, '--resume', out / 'checkpoint.pth'],
                     tmp_path))
    assert (out / 'first_sparse_checkpoint.pth').exists()


# ---------------------------------------------------------------- settings that would do nothing or break the method
FLAGS = {
    'no mask update before the cut': (
        [*PRUNE, '--epochs', '2', '--prune-finalize-epoch', '1', '--grad-accum-steps', '8',
         '--prune-steps-update-mask', '100'],
        r'^error: no mask update falls before the cut: 2 optimizer step\(s\) per epoch \(--grad-accum-steps 8\), '
        r'a mask update every 100 \(--prune-steps-update-mask 100\), pruning from epoch 0 \(step 0\) to the cut '
        r'at epoch 1 \(step 2\): '),
    'a teacher without distillation': (
        ['--epochs', '1', '--teacher-path', '{d}/teacher.pth'],
        r'^error: --teacher-path \S+/teacher.pth is read only with --distillation-type soft or hard \(DeiT would '
        r'train without the teacher and say nothing\): add one, or leave out --teacher-path$'),
    'a dense teacher of this project without --teacher-model': (
        ['--epochs', '1', '--distillation-type', 'soft', '--teacher-path', '{d}/dense.pth',
         '--teacher-model', 'deit_tiny_patch16_224'],
        r'^error: --teacher-path \S+/dense.pth \(--teacher-model deit_tiny_patch16_224\): .*; it is a dense '
        r'checkpoint of --model deit_micro_patch4_32: pass --teacher-model deit_micro_patch4_32$'),
    'pruning a cut model rebuilt by its checkpoint': (
        [*PRUNE, '--epochs', '1', '--model-path', '{d}/first_sparse_checkpoint.pth', '--resize-model-by-checkpoint'],
        r'^error: --prune-method block_pr needs an uncut model \(its gates are sized by the dense ViT\), and '
        r'--resize-model-by-checkpoint rebuilds a cut one: prune the dense weights, or fine-tune the cut model '
        r'without --prune-method$'),
    'pruning a cut model': (
        [*PRUNE, '--epochs', '1', '--model-path', '{d}/first_sparse_checkpoint.pth'],
        r'^error: --model-path \S+/first_sparse_checkpoint.pth holds a cut model \(it has "arch"\): --prune-method '
        r'block_pr needs an uncut one \(its gates are sized by the dense ViT\); prune the dense weights, or '
        r'fine-tune the cut model without --prune-method$'),
}


def test_a_setting_that_would_do_nothing_or_break_the_method_is_one_line(cut_run, safetensors_run, tmp_path):
    d = tmp_path / 'files'
    d.mkdir()
    shutil.copy(cut_run / 'first_sparse_checkpoint.pth', d)
    shutil.copy(safetensors_run / 'checkpoint.pth', d / 'dense.pth')  # dense: no arch, its args name --model
    shutil.copy(safetensors_run / 'checkpoint.pth', d / 'teacher.pth')

    def check(case, folder):
        flags, pattern = FLAGS[case]
        out = folder / 'out'
        one_line(run_cli([*FAST, '--output_dir', out, *[str(f).format(d=d) for f in flags]], folder), pattern)
        assert not out.exists()
    each_case(FLAGS, check, tmp_path)
