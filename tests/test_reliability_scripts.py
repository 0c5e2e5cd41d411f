"""The scripts read files and write where they are told: what they read is checked, and where
they will write is checked, before they work; a bad input is one line and an exit status,
never a traceback after minutes of timing (each case starts the real script)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, cli_env, micro
from test_reliability import each_case, one_line


def script(name, *args, tmp_path):
    return subprocess.run([sys.executable, f'scripts/{name}', *map(str, args)], cwd=REPO, env=cli_env(tmp_path),
                          capture_output=True, text=True, timeout=300)


def a_file(folder):
    (folder / 'file').write_text('x')
    return folder / 'file'


def checkpoint(folder):
    """A micro model saved with its arch, as export.py and benchmark.py read a cut model."""
    model = micro()
    torch.save({'model': model.state_dict(), 'arch': model.arch(), 'args': {'data_set': 'DIGITS'}},
               folder / 'model.pth')
    return folder / 'model.pth'


def log(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))
    return path


def compare_run(folder, name='block_pr_pr0.5', tuned=70.0, final=None):
    """A run folder of scripts/compare_methods.sh under folder/seed0 (as in test_scripts.py)."""
    run = folder / 'seed0' / name
    rows = [{'sub_block': 'attn0', 'keep_ratio': 0.5}, {'sub_block': 'mlp0', 'keep_ratio': 0.25}]
    log(run / 'prune' / 'pruning_log.jsonl', [final or {'event': 'finalize', 'params_cut': 500, 'params_dense': 1000,
                                                          'sub_blocks': rows}])
    log(run / 'prune' / 'log.txt', [{'epoch': 0, 'test_acc1': 50.0}])
    log(run / 'finetune' / 'log.txt', [{'epoch': 0, 'test_acc1': 60.0}, {'epoch': 1, 'test_acc1': tuned}])
    return folder


def table_run(folder, acc1):
    """A dense run of scripts/reproduce_table.sh whose second log line holds test_acc1 `acc1`."""
    log(folder / 'IFOOD' / 'deit_small_patch16_224' / 'deit' / 'log.txt',
        [{'epoch': 0, 'test_acc1': 70.0, 'n_parameters': 10}, {'epoch': 1, 'test_acc1': acc1, 'n_parameters': 10}])
    return folder


def a_binary_file(folder, name, data):
    (folder / name).write_bytes(data)
    return folder / name


def table_summary(folder, summary):
    """A first_sparse_checkpoint.pth of scripts/reproduce_table.sh holding `summary`."""
    path = folder / 'IFOOD' / 'deit_small_patch16_224' / 'block_pr_pr0.5' / 'prune' / 'first_sparse_checkpoint.pth'
    path.parent.mkdir(parents=True)
    torch.save({'summary': summary}, path)
    return folder


def update(**kw):
    return {'step': 1, 'epoch': 0.5, 'window': 1, 'delta_psi_cls': [0.1, 0.2], 'delta_psi_patch': [0.3, 0.4], **kw}


# name: (script, argv made in the case's folder, stderr's one line, exit status)
CASES = {
    'export: a timm folder under a file': (
        'export.py', lambda f: [checkpoint(f), '--format', 'timm', '--out', a_file(f) / 'sub'],
        r'^error: --out \S+/file/sub: cannot write there: \S+/file is a file$', 1),
    'export: a timm folder where a file is': (
        'export.py', lambda f: [checkpoint(f), '--format', 'timm', '--out', a_file(f)],
        r'^error: --out \S+/file is a file: --format timm writes a folder$', 1),
    'export: binary label names': (
        'export.py', lambda f: [checkpoint(f), '--format', 'timm', '--out', f / 'timm', '--label-names',
                                a_binary_file(f, 'names.png', b'\x89PNG\r\n\x1a\n\xff\xfe')],
        r'^error: --label-names \S+/names.png is not UTF-8 text \(byte 0\): a text file of class names', 1),
    'export: label names with NUL bytes': (
        'export.py', lambda f: [checkpoint(f), '--format', 'timm', '--out', f / 'timm', '--label-names',
                                a_binary_file(f, 'names.bin', b'cat\x00dog\n')],
        r'^error: --label-names \S+/names.bin is a binary file', 1),
    'export: label names that are a folder': (
        'export.py', lambda f: [checkpoint(f), '--format', 'timm', '--out', f / 'timm', '--label-names', f],
        r'^error: --label-names \S+: Is a directory$', 1),
    'benchmark: an unknown reference': (
        'benchmark.py', lambda f: ['--model', 'deit_micro_patch4_32', '--reference', 'nope'],
        r"^error: --reference: unknown model 'nope': list the supported names with", 1),
    'benchmark: --json under a file': (
        'benchmark.py', lambda f: ['--model', 'deit_micro_patch4_32', '--json', a_file(f) / 'b.json'],
        r'^error: --json \S+/file/b.json: cannot write there: \S+/file is a file$', 1),
    'train step: --json under a file': (
        'benchmark_train_step.py', lambda f: ['--rounds', '1', '--json', a_file(f) / 'sub' / 't.json'],
        r'^error: --json \S+/file/sub/t.json: cannot write there: \S+/file is a file$', 1),
    'compare: a backup folder beside the runs': (
        'compare_summary.py', lambda f: [compare_run(compare_run(f), 'block_pr_pr0.5_old')],
        r'^warning: \S+/seed0/block_pr_pr0.5_old is not named METHOD_prRATIO \(METHOD one of block_pr, .*\): '
        r'skipped$', 0),
    'compare: --figure under a file': (
        'compare_summary.py', lambda f: [compare_run(f), '--figure', a_file(f) / 'fig.png'],
        r'^error: --figure \S+/file/fig.png: cannot write there: \S+/file is a file$', 1),
    'compare: --figure-dap under a file': (
        'compare_summary.py', lambda f: [compare_run(f), '--figure-dap', a_file(f) / 'fig.png'],
        r'^error: --figure-dap \S+/file/fig.png: cannot write there: \S+/file is a file$', 1),
    'compare: a top-1 that is not a number': (
        'compare_summary.py', lambda f: [compare_run(f, tuned='72%')],
        r'^error: \S+/seed0/block_pr_pr0.5/finetune/log.txt line 2: test_acc1 is "72%", not a number$', 1),
    'compare: a finalize record without numbers': (
        'compare_summary.py', lambda f: [compare_run(f, final={'event': 'finalize', 'params_cut': 'x'})],
        r'^error: \S+/pruning_log.jsonl line 1: a finalize record without numbers in params_cut', 1),
    'table: a top-1 that is not a number': (
        'make_table.py', lambda f: [table_run(f, 'abc')],
        r'^error: \S+/deit/log.txt line 2: test_acc1 is "abc", not a number$', 1),
    'table: a top-1 that is NaN': (
        'make_table.py', lambda f: [table_run(f, float('nan'))],
        r'^error: \S+/deit/log.txt line 2: test_acc1 is NaN, not a number$', 1),
    'table: a summary without numbers': (
        'make_table.py', lambda f: [table_summary(f, {'params_cut': '5M', 'flops_cut': 1.0})],
        r"^error: checkpoint \S+: its \"summary\" holds params_cut '5M' and flops_cut 1.0, not numbers$", 1),
    'plot: a log without ΔΨ records': (
        'plot_block_performance.py', lambda f: [log(f / 'pruning_log.jsonl', [{'step': 1, 'epoch': 0.5, 's': 0.3},
                                                                             {'event': 'finalize'}]),
                                                '--out', f / 'fig.png'],
        r'^error: \S+/pruning_log.jsonl has no mask update with ΔΨ \(delta_psi_cls\): not the pruning_log.jsonl '
        r'of a DAP run$', 1),
    'plot: a ΔΨ record without numbers': (
        'plot_block_performance.py', lambda f: [log(f / 'pruning_log.jsonl', [update(), update(delta_psi_patch=[1])]),
                                                '--out', f / 'fig.png'],
        r'^error: \S+/pruning_log.jsonl line 2: a mask update whose epoch, delta_psi_cls, delta_psi_patch are not ', 1),
    'plot: a binary log': (
        'plot_block_performance.py', lambda f: [a_binary_file(f, 'log.png', b'\x89PNG\r\n\x1a\n\xff\n' * 50),
                                                '--out', f / 'fig.png'],
        r'^error: \S+/log.png is not UTF-8 text \(byte 0\): not a pruning_log.jsonl$', 1),
    'plot: --out under a file': (
        'plot_block_performance.py', lambda f: [log(f / 'pruning_log.jsonl', [update()]), '--out', a_file(f) / 'x.png'],
        r'^error: --out \S+/file/x.png: cannot write there: \S+/file is a file$', 1),
    'plot: a NaN epoch': (
        'plot_block_performance.py', lambda f: [log(f / 'pruning_log.jsonl', [update()]), '--epochs', 'nan',
                                                '--out', f / 'fig.png'],
        r'^error: --epochs takes finite numbers, got nan$', 1),
}


def test_a_bad_input_of_a_script_is_one_line(tmp_path):
    def check(case, folder):
        name, argv, pattern, status = CASES[case]
        one_line(script(name, *argv(folder), tmp_path=folder), pattern, status)
        assert not (folder / 'timm').exists() and not (folder / 'fig.png').exists()
    each_case(CASES, check, tmp_path)


def can_unshare():
    return shutil.which('unshare') is not None and subprocess.run(['unshare', '-rm', 'true']).returncode == 0


READ_ONLY = {  # name: (script, argv with the read-only folder `ro`, the flag refused)
    'train step --json': ('benchmark_train_step.py', lambda f, ro: ['--rounds', '1', '--json', ro / 't.json'], '--json'),
    'benchmark --json': ('benchmark.py', lambda f, ro: ['--model', 'deit_micro_patch4_32', '--json', ro / 't.json'],
                         '--json'),
    'export --format timm': ('export.py', lambda f, ro: [checkpoint(f), '--format', 'timm', '--out', ro / 'timm'],
                             '--out'),
    'compare --figure': ('compare_summary.py', lambda f, ro: [compare_run(f), '--figure', ro / 'fig.png'], '--figure'),
}


@pytest.mark.skipif(not can_unshare(), reason='no mount namespaces here (unshare -rm) to make a read-only folder in')
def test_a_read_only_folder_is_refused_before_the_work(tmp_path):
    """As root, permissions do not stop a write, a read-only mount does: tried, not guessed."""
    def check(case, folder):
        name, argv, flag = READ_ONLY[case]
        ro = folder / 'ro'
        ro.mkdir()
        args = [sys.executable, f'scripts/{name}', *map(str, argv(folder, ro))]
        command = ' '.join(f"'{a}'" for a in args)
        proc = subprocess.run(['unshare', '-rm', 'sh', '-c', f'mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} '
                               f'&& {command}'], cwd=REPO, env=cli_env(folder), capture_output=True, text=True,
                              timeout=300)
        one_line(proc, rf'^error: {flag} {ro}/\S+: cannot write there: Read-only file system$', status=1)
        assert proc.stdout == '' and os.listdir(ro) == []
    each_case(READ_ONLY, check, tmp_path)


def test_benchmark_train_step_makes_the_folder_of_json(tmp_path):
    out = tmp_path / 'new' / 'folder' / 't.json'
    proc = script('benchmark_train_step.py', '--rounds', '1', '--iters', '1', '--warmup', '0', '--batch-size', '4',
                  '--json', out, tmp_path=tmp_path)
    assert proc.returncode == 0 and proc.stderr == '', proc.stderr[-2000:]
    assert json.loads(out.read_text())['rounds'] == 1


def test_compare_summary_skips_a_backup_folder_and_reads_the_runs(tmp_path):
    compare_run(compare_run(tmp_path), 'block_pr_pr0.5_old', tuned=10.0)
    proc = script('compare_summary.py', tmp_path, '--markdown', tmp_path=tmp_path)
    assert proc.returncode == 0 and len(proc.stderr.splitlines()) == 1, proc.stderr[-2000:]
    dap = [line for line in proc.stdout.splitlines() if line.startswith('| DAP |')]
    assert dap == ['| DAP | 0.50 | 1 | 500 | – | 50.0 ± 0.0 | 70.0 ± 0.0 |']
