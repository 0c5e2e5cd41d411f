"""Export a cut (or dense) ViT checkpoint to ONNX and check it against PyTorch in onnxruntime,
or as a timm model folder (config.json and model.safetensors).

    python scripts/export.py OUT/first_sparse_checkpoint.pth --out model.onnx
    python scripts/export.py OUT/checkpoint.pth --format timm --out my_cut_vit/

A timm folder loads with `import models; timm.create_model('local-dir:my_cut_vit')`, and
after `huggingface_hub.upload_folder(repo_id=..., folder_path='my_cut_vit')` with
`timm.create_model('hf-hub:user/repo', pretrained=True)`; `main.py --model-path
local-dir:my_cut_vit` evaluates or fine-tunes it.

The checkpoint needs `arch` (a first_sparse_checkpoint.pth or a fine-tuned cut model); a dense
checkpoint needs `--model`. The batch dimension is dynamic. By default every cut sub-block is
exported in its fastest exact form on this CPU (`models.deploy`, timed at `--deploy-batch`);
`--deploy none` exports the cut model as it is.
"""
import argparse
import os
import sys

import numpy as np
import timm
import torch

# common first: it puts the repository root on sys.path
from common import export_onnx, prepare_folder, prepare_out
import models
from errors import DiskFullError, UsageError
from train.check_args import model_config
from train.checkpoints import load_checkpoint_file


def load_model(path, model_name=None):
    """The model of a checkpoint; UsageError (one line) if it holds none this code can rebuild."""
    ckpt = load_checkpoint_file(path, 'checkpoint')
    if ckpt.get('arch') is None and model_name is not None:
        model_config(model_name)
    try:
        return models.load_model(ckpt, model_name)
    except ValueError as e:
        hint = ' (--model)' if ckpt.get('arch') is None and model_name is None else ''
        raise UsageError(f'checkpoint {path}: {e}{hint}') from None


def export_timm(model, ckpt, folder, label_names=None):
    """Write `model` as a timm folder, with the preprocessing of the run that made `ckpt`;
    returns max |Δlogit| between `model` and timm.create_model('local-dir:folder')."""
    from datasets import eval_preprocessing
    run = ckpt.get('args') if isinstance(ckpt.get('args'), dict) else {}
    pre = eval_preprocessing(model.img_size, run.get('data_set'), run.get('eval_crop_ratio'))
    names = label_names if label_names is not None else pre['label_names']
    if names is not None and len(names) != model.num_classes:
        raise UsageError(f'{len(names)} class names for a model of {model.num_classes} classes')
    cfg = models.hub.pretrained_cfg(model, pre['mean'], pre['std'], pre['crop_pct'], pre['interpolation'], names)
    models.write_timm_folder(model, folder, cfg)
    again = timm.create_model(f'local-dir:{os.path.abspath(folder)}').eval()
    x = torch.randn(3, model.in_chans, model.img_size, model.img_size)
    with torch.no_grad():
        return float((again(x) - model.eval()(x)).abs().max())


def read_label_names(path):
    """The class names of a text file, one per line; UsageError if it is not UTF-8 text."""
    try:
        with open(path, encoding='utf-8') as f:
            text = f.read()
    except OSError as e:
        raise UsageError(f'--label-names {path}: {e.strerror or e}') from None
    except UnicodeDecodeError as e:
        raise UsageError(f'--label-names {path} is not UTF-8 text (byte {e.start}): a text file of '
                         'class names, one per line') from None
    if '\0' in text:
        raise UsageError(f'--label-names {path} is a binary file: a text file of class names, one per line')
    return [line.strip() for line in text.splitlines() if line.strip()]


def max_difference(model, path, x):
    """max |logits(PyTorch) − logits(onnxruntime)| on x."""
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    (got,) = session.run(None, {'images': x.numpy()})
    with torch.no_grad():
        want = model(x).numpy()
    return float(np.abs(got - want).max())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('checkpoint')
    p.add_argument('--out', default='model.onnx', help='the .onnx file, or the folder of --format timm')
    p.add_argument('--format', default='onnx', choices=['onnx', 'timm'],
                   help='onnx: one file for onnxruntime; timm: config.json and model.safetensors')
    p.add_argument('--label-names', default=None,
                   help='--format timm: a text file of the class names, one per line (DIGITS has its own)')
    p.add_argument('--model', default=None, help='family of a dense checkpoint')
    p.add_argument('--deploy', default='measure', choices=['measure', 'none'])
    p.add_argument('--deploy-batch', type=int, default=32)
    args = p.parse_args(argv)
    try:
        if args.deploy_batch < 1:
            raise UsageError(f'--deploy-batch must be at least 1, got {args.deploy_batch}')
        if args.format == 'timm':
            if os.path.exists(args.out) and not os.path.isdir(args.out):
                raise UsageError(f'--out {args.out} is a file: --format timm writes a folder')
            names = read_label_names(args.label_names) if args.label_names else None
            prepare_folder(args.out)
        else:
            prepare_out(args.out)
        model = load_model(args.checkpoint, args.model).eval()
        if args.format == 'timm':
            diff = export_timm(model, load_checkpoint_file(args.checkpoint), args.out, names)
            print(f'wrote {args.out}/config.json and model.safetensors ({model.num_parameters():,} parameters); '
                  f"timm.create_model('local-dir:{args.out}') vs PyTorch max |Δlogit| = {diff:.2e}")
            return
    except (UsageError, DiskFullError) as e:  # a full disk: DiskFullError says what was kept
        sys.exit(f'error: {e}')
    n_params = model.num_parameters()  # the deployment's dense forms only add exact zeros
    if args.deploy == 'measure' and model.is_cut:
        x = torch.randn(args.deploy_batch, model.in_chans, model.img_size, model.img_size)
        model, plan = models.deploy(model, x)
        model.set_inplace_writes(False)  # the exporter traces a functional graph either way
        forms = [f'{f["read"]}/{f["write"]}' for p in plan.values() for f in p.values()]
        print('deployment forms (read/write): ' + ', '.join(f'{forms.count(f)}× {f}' for f in sorted(set(forms))))
    x = export_onnx(model, args.out)
    diff = max_difference(model, args.out, torch.randn(3, *x.shape[1:]))
    print(f'wrote {args.out} ({n_params:,} parameters); '
          f'onnxruntime vs PyTorch max |Δlogit| = {diff:.2e} at batch 3')


if __name__ == '__main__':
    main()
