"""The files a run reads or writes (issue 30): latency tables, data folders, safetensors files and
timm folders. One check of each kind of file, used by every reader; each case starts the real
command and asserts its one line (or, where the file is accepted, what was read)."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import models
from conftest import REPO, check_ok, cli_command, cli_env, eval_lines, run_cli
from test_cost import made_up_table
from test_hub import cut_checkpoint
from test_reliability import FAST, each_case, one_line, script

DEEP = '[' * 100_000 + ']' * 100_000  # json.loads: RecursionError


def can_unshare():
    return shutil.which('unshare') is not None and subprocess.run(['unshare', '-rm', 'true']).returncode == 0


# ---------------------------------------------------------------- latency tables
def table_file(folder, table=None, text=None):
    path = folder / 'table.json'
    path.write_text(text if text is not None else json.dumps(table))  # json.dumps writes NaN as NaN
    return path


def with_axis(kind, axis, values):
    table = made_up_table()
    table[kind]['axes'] = {**table[kind]['axes'], axis: values}
    return table


def fifo(folder):
    path = folder / 'table.json'
    os.mkfifo(path)  # an open for reading would wait for a writer forever
    return path


TABLES = {  # a table for the micro model but for what is named
    'nan in a width axis': (lambda f: table_file(f, with_axis('attn', 'd_in', [8, float('nan'), 40, 56, 64])),
                            r'attn axis d_in must hold whole widths, got \[8\.0, nan'),
    'inf in a width axis': (lambda f: table_file(f, with_axis('mlp', 'hidden', [8, 64, 128, 192, 248, float('inf')])),
                            r'mlp axis hidden must hold whole widths'),
    'a fraction in a width axis': (lambda f: table_file(f, with_axis('mlp', 'd_out', [8, 24.5, 48, 64])),
                                   r'mlp axis d_out must hold whole widths'),
    'tokens not a number': (lambda f: table_file(f, made_up_table(tokens='65')),
                            r'tokens must be a whole number of at least 1, got \'65\''),
    'a FIFO': (fifo, r'the latency table \S+/table.json is not a regular file$'),
    'JSON nested 100,000 deep': (lambda f: table_file(f, text=DEEP), r'is not a latency table \(JSON nested too deep\)$'),
}
LATENCY = ['--prune-method', 'block_pr', '--prune-ratio', '0.5', '--epochs', '2', '--prune-start-epoch', '0',
           '--prune-sparse-epoch', '1', '--prune-budget', 'latency']
BENCHMARK = ['benchmark.py', '--model', 'deit_micro_patch4_32', '--num-classes', '10', '--batch-size', '4',
             '--iters', '1', '--warmup', '0', '--deploy', 'none']


def test_a_latency_table_that_is_not_one_is_one_line_in_main(tmp_path):
    def check(case, folder):
        make, pattern = TABLES[case]
        out = folder / 'out'
        one_line(run_cli([*FAST, *LATENCY, '--latency-table', make(folder), '--output_dir', out], folder, timeout=120),
                 r'^error: --latency-table .*' + pattern)
        assert not out.exists()
    each_case(TABLES, check, tmp_path)


BENCHMARK_TABLES = {**TABLES, 'another token count': (lambda f: table_file(f, made_up_table(tokens=17)),
                                                     r'measured for another model .*: tokens 17 \(the model: 65\)$')}


def test_benchmark_reads_a_table_through_the_same_check_as_main(tmp_path):
    """Also where the table only predicts (a params budget): a table of another token count
    predicted nonsense before."""
    def check(case, folder):
        make, pattern = BENCHMARK_TABLES[case]
        one_line(script(*BENCHMARK, '--latency-table', make(folder), tmp_path=folder), r'^error: .*' + pattern,
                 status=1)
    each_case(BENCHMARK_TABLES, check, tmp_path)


LATENCY_TABLE = ['latency_table.py', '--model', 'deit_micro_patch4_32', '--batch-size', '8', '--device', 'cpu',
                 '--check-ratios', '0.5']


def test_latency_table_refuses_an_input_size_off_the_patch_grid(tmp_path):
    """30 px in patches of 4 is 7 × 7 patches: the table of 28 px, which then passed for 28."""
    proc = script(*LATENCY_TABLE, '--input-size', '30', '--out', tmp_path / 't.json', tmp_path=tmp_path)
    one_line(proc, r"^error: --input-size 30 is not a multiple of deit_micro_patch4_32's patch 4: its tokens "
                   r'would be those of 28 px$', status=1)
    assert not (tmp_path / 't.json').exists()


@pytest.mark.skipif(not can_unshare(), reason='no mount namespaces here (unshare -rm) to make a read-only folder in')
def test_latency_table_into_a_read_only_folder_is_refused_before_timing(tmp_path):
    folder = tmp_path / 'ro'
    folder.mkdir()
    command = ' '.join(f"'{a}'" for a in [sys.executable, f'scripts/{LATENCY_TABLE[0]}', *LATENCY_TABLE[1:],
                                          '--out', folder / 't.json'])
    script_text = f'mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} && {command}'
    proc = subprocess.run(['unshare', '-rm', 'sh', '-c', script_text], cwd=REPO, env=cli_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    one_line(proc, rf'^error: --out {folder}/t.json: cannot write there: ', status=1)
    assert 'timed' not in proc.stdout and os.listdir(folder) == []


def test_latency_table_stopped_by_ctrl_c_is_one_line_and_leaves_no_table(tmp_path):
    out = tmp_path / 't.json'
    proc = subprocess.Popen([sys.executable, f'scripts/{LATENCY_TABLE[0]}', *LATENCY_TABLE[1:], '--points', '6',
                             '--iters', '40', '--out', str(out)], cwd=REPO, env=cli_env(tmp_path), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline()  # 'attn: N sub-blocks timed': the MLP grid is being timed
        assert line.startswith('attn:'), line
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and stderr.strip() == 'stopped by Ctrl-C: no table was written', stderr[-2000:]
    assert not out.exists() and not (tmp_path / 't.json.tmp').exists()


# ---------------------------------------------------------------- data folders
def image_tree(root, classes=('a', 'b'), per_class=2):
    from PIL import Image
    for split in ('train', 'val'):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.new('RGB', (8, 8), (40 * i, 0, 0)).save(root / split / c / f'{i}.png')
    return root


def link(path, target):
    os.symlink(target, path)


def link_to_a_held_folder(root):
    (root / 'val/a/sub').mkdir()
    shutil.move(root / 'val/a/1.png', root / 'val/a/sub/1.png')
    link(root / 'val/a/again', 'sub')


def class_folder_elsewhere(root):
    shutil.move(root / 'val/b', root / 'b')
    link(root / 'val/b', root / 'b')


def two_names_of_one_class(root):
    link(root / 'train/c', 'a')
    link(root / 'val/c', 'a')


FOLDERS = {  # what the tree gets beside its 2 classes of 2 images in train/ and val/
    'a loop back to its class folder': (lambda r: link(r / 'val/a/loop', '.'), None),
    'a link to a folder the class holds': (link_to_a_held_folder, None),
    'a class folder linked from elsewhere': (class_folder_elsewhere, None),
    'a loop up to the split folder': (lambda r: link(r / 'val/a/up', '..'),
                                      r'^error: \S+/val/a/up links to \S+/val, outside its class folder \S+/val/a: '
                                      r"what it holds would take this class's label; copy it in, or remove the link$"),
    'a file linked from another class': (lambda r: link(r / 'val/a/2.png', '../b/0.png'),
                                         r'^error: \S+/val/a/2.png links to \S+/val/b/0.png, outside its class folder'),
    'a folder linked from outside the root': (lambda r: link(r / 'train/b/more', r.parent),
                                              r'^error: \S+/train/b/more links to \S+, outside its class folder'),
    'two class folders that are one': (two_names_of_one_class,
                                       r'^error: class folders \S+/train/a and \S+/train/c are one folder '
                                       r'\(\S+/train/a\): their images would have two labels$'),
}


def test_a_data_folder_is_read_once_and_a_link_out_of_a_class_is_refused(tmp_path):
    """Links below a class folder are not followed: one to what the class folder holds already is
    skipped with a warning (torchvision counted a loop's images again, 4 became 84), one out of it
    is refused, since its images would take this class's label."""
    def check(case, folder):
        change, pattern = FOLDERS[case]
        root = image_tree(folder / 'data')
        change(root)
        proc = run_cli(['--eval', '--data-set', 'FOLDER', '--data-path', root, '--input-size', '32'], folder)
        if pattern is not None:
            one_line(proc, pattern)
            return
        check_ok(proc)
        assert 'Accuracy of the network on the 4 test images' in proc.stdout, proc.stdout[-2000:]
        warned = [line for line in proc.stderr.splitlines() if line.startswith('warning: skipped ')]
        assert len(warned) == (0 if 'elsewhere' in case else 1), proc.stderr[-2000:]
    each_case(FOLDERS, check, tmp_path)


# ---------------------------------------------------------------- safetensors files and timm folders
def timm_folder(folder, config=None):
    cut = cut_checkpoint(folder / 'cut.pth')
    models.write_timm_folder(cut, str(folder / 'timm'), {})
    if config is not None:
        (folder / 'timm' / 'config.json').write_text(config)
    return f'local-dir:{folder / "timm"}'


def deep_metadata(folder):
    from safetensors.torch import save_file
    cut = cut_checkpoint(folder / 'cut.pth')
    save_file(cut.state_dict(), str(folder / 'cut.safetensors'), metadata={'format': 'pt', 'dap_checkpoint': DEEP})
    return folder / 'cut.safetensors'


HUB_FILES = {
    'safetensors metadata nested 100,000 deep': (deep_metadata, r'its dap_checkpoint metadata is not readable: '
                                                               r'JSON nested too deep$'),
    'a timm config that is a list': (lambda f: timm_folder(f, '[1, 2]'),
                                     r'config.json holds a JSON list, not a timm config \(an object\)$'),
    'a timm config whose model_args is a list': (
        lambda f: timm_folder(f, json.dumps({'architecture': 'dap_vit', 'model_args': [1]})),
        r'config.json does not describe a dap_vit model with an "arch" in a "model_args" object'),
    'a timm config nested 100,000 deep': (lambda f: timm_folder(f, DEEP),
                                          r'config.json is not a timm config \(JSON nested too deep\)$'),
}


def test_a_safetensors_file_or_timm_folder_that_is_not_one_is_one_line(tmp_path):
    def check(case, folder):
        make, pattern = HUB_FILES[case]
        one_line(run_cli(['--eval', '--resize-model-by-checkpoint', '--model-path', make(folder)], folder),
                 r'^error: --model-path .*' + pattern)
    each_case(HUB_FILES, check, tmp_path)


def test_a_cut_safetensors_by_file_url_keeps_its_arch(tmp_path):
    cut = cut_checkpoint(tmp_path / 'cut.pth')
    path = tmp_path / 'cut.safetensors'
    models.write_safetensors_checkpoint(str(path), {'model': cut.state_dict(), 'arch': cut.arch()})
    runs = [run_cli(['--eval', '--resize-model-by-checkpoint', '--model-path', source], tmp_path)
            for source in (tmp_path / 'cut.pth', path, path.as_uri())]
    pth, local, url = (eval_lines(check_ok(p).stdout) for p in runs)
    assert pth and local == pth and url == pth


@pytest.mark.skipif(not can_unshare(), reason='no mount namespaces here (unshare -rm) to make a small disk in')
def test_a_full_disk_during_a_safetensors_write_is_one_line_and_leaves_no_partial_file(tmp_path):
    """A 3 MB tmpfs: checkpoint.pth (2.5 MB) fits, its .safetensors beside it (0.8 MB) does not."""
    out, copy = tmp_path / 'small', tmp_path / 'copy'
    out.mkdir()
    command = ' '.join(f"'{a}'" for a in cli_command([*FAST, '--epochs', '2', '--save-format', 'safetensors',
                                                       '--output_dir', out]))
    script_text = f'mount -t tmpfs -o size=3m tmpfs {out} && {command}; status=$?; cp -r {out} {copy}; exit $status'
    proc = subprocess.run(['unshare', '-rm', 'sh', '-c', script_text], cwd=REPO, env=cli_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    one_line(proc, rf'^error: the disk is full: {out}/checkpoint.safetensors could not be written; no '
                   r'checkpoint.safetensors was written before', status=1)
    assert torch.load(copy / 'checkpoint.pth', weights_only=True)['epoch'] == 0
    assert not list(copy.glob('*.tmp*')) and not (copy / 'checkpoint.safetensors').exists()


def test_write_whole_leaves_the_previous_file_and_no_partial_one(tmp_path):
    """The same path without a small disk: safetensors' Rust error names the errno only in its text."""
    from safetensors import SafetensorError
    from errors import DiskFullError
    path = tmp_path / 'x.safetensors'
    path.write_text('previous')

    def full(tmp):
        open(tmp, 'w').write('half')
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')
    with pytest.raises(DiskFullError, match=r'could not be written; the previous x.safetensors is kept, complete$'):
        models.hub.write_whole(str(path), str(path) + '.tmp', full)
    assert path.read_text() == 'previous' and os.listdir(tmp_path) == ['x.safetensors']
