"""A pruned model as a timm model (scripts/export.py --format timm, models/hub.py): the folder
timm's `local-dir:` source reads rebuilds the cut model with the same logits, and main.py
evaluates it, or a bare .safetensors file, as it evaluates the checkpoint it came from."""
import json
import subprocess
import sys

import timm
import torch

import models
from conftest import REPO, check_ok, cli_env, eval_lines, micro, o1_weights, run_cli
from pruning import DepthAwarePruner, PruneConfig, PruneSchedule
from pruning.random_scores import fill_random_scores


def cut_checkpoint(path):
    """A cut micro model (random scores, pr 0.6) saved as main.py saves first_sparse_checkpoint.pth."""
    model = o1_weights(micro(0), seed=2)
    schedule = PruneSchedule(steps_per_epoch=1, start_epoch=0, sparse_epoch=0, finalize_epoch=1, steps_update_mask=1)
    pruner = DepthAwarePruner(model, 10, PruneConfig(prune_ratio=0.6), schedule)
    fill_random_scores(pruner, seed=0)
    cut, _ = pruner.finalize()
    torch.save({'model': cut.state_dict(), 'arch': cut.arch(), 'args': {'data_set': 'DIGITS', 'input_size': 32}},
               path)
    return cut.eval()


def test_a_cut_model_travels_as_a_timm_folder_and_comes_back_with_the_same_logits(tmp_path):
    cut = cut_checkpoint(tmp_path / 'cut.pth')
    folder = tmp_path / 'my_cut_vit'
    proc = subprocess.run([sys.executable, 'scripts/export.py', str(tmp_path / 'cut.pth'), '--format', 'timm',
                           '--out', str(folder)], cwd=REPO, env=cli_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    check_ok(proc)
    assert 'max |Δlogit| = 0.00e+00' in proc.stdout
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == 'dap_vit' and config['num_classes'] == 10
    assert config['model_args']['arch'] == json.loads(json.dumps(cut.arch()))
    cfg = config['pretrained_cfg']
    assert cfg['input_size'] == [3, 32, 32] and cfg['crop_pct'] == 1.0 and cfg['interpolation'] == 'bicubic'
    assert cfg['mean'] == list(timm.data.IMAGENET_DEFAULT_MEAN) and cfg['label_names'] == [str(i) for i in range(10)]
    again = timm.create_model(f'local-dir:{folder}').eval()
    assert isinstance(again, models.VisionTransformer) and again.arch() == cut.arch()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), cut(x))
    assert again.pretrained_cfg['crop_pct'] == 1.0  # timm's data config reads it from there
    # a file where the folder goes is refused in one line
    (tmp_path / 'file').write_text('x')
    proc = subprocess.run([sys.executable, 'scripts/export.py', str(tmp_path / 'cut.pth'), '--format', 'timm',
                           '--out', str(tmp_path / 'file')], cwd=REPO, env=cli_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip().endswith('is a file: --format timm writes a folder')


def test_main_evaluates_a_timm_folder_and_a_safetensors_file_as_the_checkpoint(tmp_path):
    cut_checkpoint(tmp_path / 'cut.pth')
    folder = tmp_path / 'folder'
    check_ok(subprocess.run([sys.executable, 'scripts/export.py', str(tmp_path / 'cut.pth'), '--format', 'timm',
                             '--out', str(folder)], cwd=REPO, env=cli_env(tmp_path), capture_output=True,
                            text=True, timeout=300))
    dense = micro(3)
    torch.save({'model': dense.state_dict()}, tmp_path / 'dense.pth')
    from safetensors.torch import save_file
    save_file(dense.state_dict(), str(tmp_path / 'dense.safetensors'))
    runs = {name: run_cli(['--eval', '--model-path', path, *extra], tmp_path)
            for name, path, extra in (('cut', tmp_path / 'cut.pth', ['--resize-model-by-checkpoint']),
                                      ('folder', f'local-dir:{folder}', ['--resize-model-by-checkpoint']),
                                      ('dense', tmp_path / 'dense.pth', []),
                                      ('safetensors', tmp_path / 'dense.safetensors', []))}
    lines = {name: eval_lines(check_ok(proc).stdout) for name, proc in runs.items()}
    assert lines['folder'] == lines['cut'] and lines['safetensors'] == lines['dense'] and lines['cut']
    bad = run_cli(['--eval', '--model-path', f'local-dir:{tmp_path}'], tmp_path)
    assert bad.returncode == 2 and 'has no config.json: not a timm model folder' in bad.stderr


def test_save_format_safetensors_writes_each_checkpoint_model_with_its_arch_and_main_reads_it(tmp_path):
    out = tmp_path / 'prune'
    check_ok(run_cli(['--save-format', 'safetensors', '--prune-method', 'block_pr', '--prune-ratio', '0.5',
                      '--epochs', '2', '--prune-start-epoch', '0', '--prune-sparse-epoch', '1',
                      '--output_dir', out], tmp_path))
    for name in ('first_sparse_checkpoint', 'checkpoint'):
        pth = torch.load(out / f'{name}.pth', weights_only=True)
        st = models.read_safetensors_checkpoint(str(out / f'{name}.safetensors'))
        assert st['arch'] == json.loads(json.dumps(pth['arch'])) and st['epoch'] == pth['epoch']
        assert st['model'].keys() == pth['model'].keys()
        assert all(torch.equal(st['model'][k], v) for k, v in pth['model'].items())
    runs = [run_cli(['--eval', '--resize-model-by-checkpoint', '--model-path', out / f'first_sparse_checkpoint.{ext}'],
                    tmp_path) for ext in ('pth', 'safetensors')]
    pth_lines, st_lines = (eval_lines(check_ok(p).stdout) for p in runs)
    assert st_lines == pth_lines and st_lines
    # the same validation as a .pth: an arch beyond its family is refused in one line
    st = models.read_safetensors_checkpoint(str(out / 'first_sparse_checkpoint.safetensors'))
    st['arch']['blocks'][0]['attn']['num_heads'] = 99
    models.write_safetensors_checkpoint(str(tmp_path / 'bad.safetensors'), st)
    bad = run_cli(['--eval', '--resize-model-by-checkpoint', '--model-path', tmp_path / 'bad.safetensors'], tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and 'num_heads must be' in bad.stderr
