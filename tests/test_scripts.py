"""The table scripts: every command of reproduce_table.sh parses; make_table.py reads runs."""
import json
import os
import shlex
import subprocess
import sys

import pytest
import torch

import main
from train.check_args import check_args
from train.methods import family_of
from conftest import REPO

sys.path.insert(0, f'{REPO}/scripts')
import make_table  # noqa: E402


def dry_run(env=None, root=None):
    env = dict(os.environ if env is None else env, ROOT=str(root or '/nonexistent/table'))
    proc = subprocess.run(['bash', 'scripts/reproduce_table.sh', '--dry-run'], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()


def fake_checkpoint(path, epoch, epochs):
    """What scripts/run_state.py reads of a main.py checkpoint.pth."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({'epoch': epoch, 'args': {'epochs': epochs}}, path)


def run_state(out):
    return subprocess.run([sys.executable, 'scripts/run_state.py', str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_run_state_says_what_to_do_with_a_run_folder(tmp_path):
    assert run_state(tmp_path / 'nothing').stdout == 'new\n'
    (tmp_path / 'killed').mkdir()
    (tmp_path / 'killed' / 'log.txt').write_text('')  # killed in its first epoch
    assert run_state(tmp_path / 'killed').stdout == 'new\n'
    fake_checkpoint(tmp_path / 'stopped' / 'checkpoint.pth', 20, 50)
    assert run_state(tmp_path / 'stopped').stdout == f'resume {tmp_path}/stopped/checkpoint.pth\n'
    fake_checkpoint(tmp_path / 'finished' / 'checkpoint.pth', 49, 50)
    assert run_state(tmp_path / 'finished').stdout == 'done\n'
    (tmp_path / 'one_shot').mkdir()  # SaViT's pruning run writes only the cut
    torch.save({'epoch': 0}, tmp_path / 'one_shot' / 'first_sparse_checkpoint.pth')
    assert run_state(tmp_path / 'one_shot').stdout == 'done\n'
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'checkpoint.pth').write_text('not a checkpoint')
    proc = run_state(tmp_path / 'bad')
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1
    assert 'not a readable PyTorch checkpoint' in proc.stderr and proc.stdout == ''


def test_reproduce_table_started_again_skips_finished_runs_and_resumes_the_stopped_one(tmp_path):
    base = tmp_path / 'IFOOD' / 'deit_small_patch16_224'
    fake_checkpoint(base / 'deit' / 'checkpoint.pth', 49, 50)
    fake_checkpoint(base / 'block_pr_pr0.5' / 'prune' / 'checkpoint.pth', 49, 50)
    (base / 'block_pr_pr0.5' / 'prune' / 'first_sparse_checkpoint.pth').write_bytes(b'')
    fake_checkpoint(base / 'block_pr_pr0.5' / 'finetune' / 'checkpoint.pth', 7, 300)
    lines = dry_run(root=tmp_path)
    assert f'# {base}/deit: finished' in lines and f'# {base}/block_pr_pr0.5/prune: finished' in lines
    commands = [shlex.split(line) for line in lines if not line.startswith('#')]
    dirs = [argv[argv.index('--output_dir') + 1] for argv in commands]
    assert f'{base}/deit' not in dirs and f'{base}/block_pr_pr0.5/prune' not in dirs
    (finetune,) = [argv for argv in commands if argv[argv.index('--output_dir') + 1] ==
                   f'{base}/block_pr_pr0.5/finetune']
    assert finetune[finetune.index('--resume') + 1] == f'{base}/block_pr_pr0.5/finetune/checkpoint.pth'
    assert '--overwrite' not in finetune
    others = [argv for argv, d in zip(commands, dirs) if not d.startswith(f'{base}/block_pr_pr0.5')]
    assert others and all('--overwrite' in argv and '--resume' not in argv for argv in others)


@pytest.mark.parametrize('ablations', [False, True])
def test_dry_run_lists_every_cell_and_every_command_parses(ablations):
    parser = main.ArgumentParser('t', parents=[main.get_args_parser()])
    cells, dense, finetunes = set(), set(), set()
    env = dict(os.environ, ABLATIONS='1') if ablations else {k: v for k, v in os.environ.items()
                                                            if k != 'ABLATIONS'}
    for line in dry_run(env):
        argv = shlex.split(line)
        assert argv[:3] == ['python', '-m', 'torch.distributed.launch'] and '--use_env' in argv
        args = parser.parse_args(argv[argv.index('main.py') + 1:])
        args = check_args(args)  # model name, pruning flags and schedule are valid
        assert args.train_mode is False  # the authors' runs trained in eval mode (§8 v2)
        if args.prune_method:
            cells.add((args.data_set, args.model, args.prune_method, args.prune_ratio))
            assert args.epochs == 50 and args.batch_size == 64 and args.grad_accum_steps == 2
            assert args.model_path.startswith('https://dl.fbaipublicfiles.com/deit/')
        elif args.resize_model_by_checkpoint:
            finetunes.add(args.model_path)
        else:
            dense.add((args.data_set, args.model))
    datasets, models_ = ('IFOOD', 'INAT19'), ('deit_small_patch16_224', 'deit_tiny_patch16_224')
    methods = ('block_pr', 'wdprune', 'savit') + (('uniform', 'global') if ablations else ())
    assert cells == {(d, m, k, r) for d in datasets for m in models_ for k in methods
                     for r in (0.5, 0.75)}
    assert dense == {(d, m) for d in datasets for m in models_}
    assert len(finetunes) == len(cells) and all(p.endswith('prune/first_sparse_checkpoint.pth')
                                                for p in finetunes)


def test_prune_sh_needs_a_data_path():
    proc = subprocess.run(['bash', 'scripts/prune.sh'], cwd=REPO, capture_output=True, text=True,
                          env={'PATH': '/usr/bin:/bin', 'DRY_RUN': '1'})
    assert proc.returncode != 0 and 'DATA_PATH' in proc.stderr


def write_log(path, accs, n_parameters):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(''.join(json.dumps({'test_acc1': a, 'epoch': i, 'n_parameters': n_parameters}) + '\n'
                            for i, a in enumerate(accs)))


def test_make_table_on_fabricated_runs(tmp_path):
    base = tmp_path / 'IFOOD' / 'deit_small_patch16_224'
    write_log(base / 'deit' / 'log.txt', [70.0, 74.25, 73.0], 21_700_000)
    run = base / 'block_pr_pr0.5'
    write_log(run / 'finetune' / 'log.txt', [72.0, 74.04], 10_900_000)
    (run / 'prune').mkdir(parents=True)
    torch.save({'summary': {'params_cut': 10_900_000, 'flops_cut': 4.6e9}},
               run / 'prune' / 'first_sparse_checkpoint.pth')
    # a pruning run without its fine-tuning yet: sizes known, top-1 missing
    torch.save({'summary': {'params_cut': 5_400_000, 'flops_cut': 2.3e9}},
               (base / 'block_pr_pr0.75' / 'prune').mkdir(parents=True) or
               base / 'block_pr_pr0.75' / 'prune' / 'first_sparse_checkpoint.pth')
    table = make_table.make_table(tmp_path).splitlines()
    rows = {(line.split('|')[1].strip(), line.split('|')[2].strip()): [c.strip() for c in line.split('|')[3:-1]]
            for line in table[2:]}
    # columns: IFOOD 50 (top-1, size), IFOOD 75, INAT19 50, INAT19 75
    small_deit = rows[('Deit-Small', 'Deit')]
    assert small_deit[0] == '74.2 / 73.9' and small_deit[1] == '21.70M'
    dap_rows = [line for line in table if '| DAP |' in line]
    cells = [c.strip() for c in dap_rows[0].split('|')[3:-1]]
    assert cells[0] == '74.0 / 74.3' and cells[1] == '10.90M, 4.60 GFLOPs'
    assert cells[2] == '– / 73.4' and cells[3] == '5.40M, 2.30 GFLOPs'
    assert cells[4] == '– / 75.5' and cells[5] == '–'
    tiny_dap = [c.strip() for c in dap_rows[1].split('|')[3:-1]]
    assert tiny_dap[0] == '– / 71.5'
    # the ablation rows appear only where such a run exists, without a paper value
    assert not any('uniform' in line for line in table)
    write_log(base / 'uniform_pr0.5' / 'finetune' / 'log.txt', [71.0], 10_900_000)
    table = make_table.make_table(tmp_path).splitlines()
    uniform = [line for line in table if 'uniform' in line]
    assert len(uniform) == 1 and '71.0 / –' in uniform[0]


@pytest.mark.parametrize('steps_per_epoch,expected', [(231, 77), (22, 7), (2, 1), (1, 1)])
def test_auto_mask_updates_are_about_three_per_epoch(steps_per_epoch, expected):
    args = main.ArgumentParser('t', parents=[main.get_args_parser()]).parse_args(
        ['--prune-method', 'block_pr', '--prune-steps-update-mask', 'auto'])
    n = family_of('block_pr').schedule(check_args(args), steps_per_epoch).steps_update_mask
    assert n == expected and 2 <= steps_per_epoch // n <= 3 or steps_per_epoch < 3


@pytest.mark.parametrize('script', ['export', 'benchmark', 'make_table'])
@pytest.mark.parametrize('bad', ['text', 'dense'])
def test_scripts_answer_a_bad_checkpoint_in_one_line(tmp_path, script, bad):
    """A text file, or a checkpoint without the cut model's "arch" and "summary"."""
    ckpt = tmp_path / 'IFOOD' / 'deit_small_patch16_224' / 'block_pr_pr0.5' / 'prune' / 'first_sparse_checkpoint.pth'
    ckpt.parent.mkdir(parents=True)
    if bad == 'text':
        ckpt.write_text('not a checkpoint\n')
    else:
        torch.save({'model': {'head.weight': torch.zeros(10, 64)}}, ckpt)
    argv = {'export': [ckpt, '--out', tmp_path / 'm.onnx'], 'benchmark': ['--checkpoint', ckpt],
            'make_table': [tmp_path]}[script]
    proc = subprocess.run([sys.executable, f'scripts/{script}.py', *map(str, argv)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and str(ckpt) in lines[0], proc.stderr
    if bad == 'text':
        assert lines[0].endswith('is not a readable PyTorch checkpoint: it is not a file written by torch.save')
    assert not (tmp_path / 'm.onnx').exists()


def test_compare_summary_on_fabricated_runs(tmp_path, capsys):
    """compare_summary.py: per method and ratio the mean ± std over seeds of the kept params,
    the measured latency share (latency.json) and both top-1s; a run without latency.json
    shows '–'."""
    import compare_summary

    def fake_run(seed, name, params, cut, tuned, latency=None):
        run = tmp_path / f'seed{seed}' / name
        (run / 'prune').mkdir(parents=True)
        (run / 'finetune').mkdir()
        rows = [{'sub_block': 'attn0', 'keep_ratio': 0.5}, {'sub_block': 'mlp0', 'keep_ratio': 0.25}]
        (run / 'prune' / 'pruning_log.jsonl').write_text(json.dumps(
            {'event': 'finalize', 'params_cut': params, 'params_dense': 1000, 'sub_blocks': rows}) + '\n')
        (run / 'prune' / 'log.txt').write_text(json.dumps({'epoch': 0, 'test_acc1': cut}) + '\n')
        (run / 'finetune' / 'log.txt').write_text(json.dumps({'epoch': 0, 'test_acc1': tuned}) + '\n')
        if latency is not None:
            (run / 'latency.json').write_text(json.dumps({'latency_ratio': latency}))

    for seed, (lat, acc) in enumerate(((0.40, 70.0), (0.50, 74.0))):
        fake_run(seed, 'block_pr_latency_pr0.5', 600, acc - 10, acc, lat)
        fake_run(seed, 'block_pr_pr0.5', 500, acc - 20, acc - 1)
        dense = tmp_path / f'seed{seed}' / 'dense'
        dense.mkdir()
        (dense / 'log.txt').write_text(json.dumps({'epoch': 0, 'test_acc1': 80.0 + seed}) + '\n')
    compare_summary.main([str(tmp_path), '--markdown'])
    lines = {line.split('|')[1].strip(): [c.strip() for c in line.split('|')[2:-1]]
             for line in capsys.readouterr().out.splitlines() if line.startswith('| ')}
    assert lines['method'] == ['pr', 'seeds', 'params', 'latency / dense', 'top-1 cut', 'top-1 fine-tuned']
    assert lines['DAP, latency budget'] == ['0.50', '2', '600', '0.450 ± 0.071', '62.0 ± 2.8', '72.0 ± 2.8']
    assert lines['DAP'] == ['0.50', '2', '500', '–', '52.0 ± 2.8', '71.0 ± 2.8']
    assert lines['dense, fine-tuned'][-1] == '80.5 ± 0.7'


def test_benchmark_train_step_with_a_teacher_runs_it_in_both_steps():
    """--teacher-model: the fine-tuning and the DAP step both distil (the teacher's forward is
    part of the measured step), and the ΔΨ heads still see the label loss only."""
    import benchmark_train_step as bts
    from losses import DistillationLoss
    args = bts.get_args(['--model', 'deit_micro_patch4_32', '--batch-size', '4', '--teacher-model',
                         'deit_micro_patch4_32', '--bpi-mode', 'fast'])
    device = torch.device('cpu')
    criterion = bts.make_criterion(args, device)
    assert isinstance(criterion, DistillationLoss) and not criterion.teacher.training
    calls = []
    criterion.teacher.register_forward_hook(lambda *a: calls.append(1))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for prune in (False, True):
        model, pruner, opt = bts.build(args, prune, device)
        seen = []
        if pruner is not None:
            aux_loss = pruner.aux_loss
            pruner.aux_loss = lambda aux, t, c: seen.append(c) or aux_loss(aux, t, c)
        bts.make_step(model, pruner, opt, x, y, criterion, None)()
        assert seen == ([criterion.base_criterion] if prune else [])
    assert len(calls) == 2
