"""Shared script code (a module the scripts import, not a script to run; no script imports
another script): the checks and the output file of a script's command line, the best top-1 of
a log.txt, and the ONNX export.

Importing it puts the repository root on sys.path, so that a script run as
`python scripts/x.py` (whose own folder Python puts first on sys.path, which is how it finds
this module) imports the project's modules with `import common` first:

    import common  # noqa: F401  (first: it puts the repository root on sys.path)
    import models

torch is imported only where it is used: run_state.py answers without it.
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # first, so that datasets.py, utils.py, ... win over installed namesakes

from errors import UsageError  # noqa: E402


def check_at_least(checks) -> None:
    """UsageError for the first (flag, value, least) whose value is set and below least."""
    for flag, value, least in checks:
        if value is not None and value < least:
            raise UsageError(f'{flag} must be at least {least}, got {value}')


def checked_script_args(get_args, check_args, argv=None):
    """A script's arguments, checked by `check_args` (one line and exit 1 if it refuses them)."""
    args = get_args(argv)
    try:
        check_args(args)
    except UsageError as e:
        sys.exit(f'error: {e}')
    return args


def script_device(text: str):
    """The torch.device of a benchmark script; on the CPU float32 denormals are flushed, as
    main.py does (they multiply about 10x slower there)."""
    import torch
    device = torch.device(text)
    if device.type == 'cpu':
        torch.set_flush_denormal(True)
    return device


def prepare_out(path, flag='--out'):
    """The folder of an output file exists (made if needed); UsageError if it cannot be."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UsageError(f'{flag} {path}: cannot write there: {e.strerror or e}') from None
    if os.path.isdir(path):
        raise UsageError(f'{flag} {path} is a folder, not a file name')


def best_top1(log_txt):
    """(best test_acc1, n_parameters of the last epoch) of a log.txt (a Path), or None."""
    from utils import read_log
    if not log_txt.is_file():
        return None
    rows = read_log(log_txt, keys=('test_acc1', 'n_parameters'))
    return (max(r['test_acc1'] for r in rows), rows[-1]['n_parameters']) if rows else None


def export_onnx(model, path, batch_size=2):
    """Write `model` to ONNX (opset 18, dynamic batch, torch.export-based exporter; the
    TorchScript one bakes the batch size into the residual-write ops); returns the example input."""
    import torch
    model.eval()
    x = torch.randn(batch_size, model.in_chans, model.img_size, model.img_size)
    torch.onnx.export(model, (x,), path, input_names=['images'], output_names=['logits'],
                      dynamic_shapes={'x': {0: torch.export.Dim('batch')}},
                      opset_version=18, dynamo=True, verbose=False)
    return x
