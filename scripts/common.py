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


def make_folder(folder, path, flag):
    """os.makedirs(folder); UsageError naming `flag` and `path` (and the file in the way, if a
    file is) if it fails."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        above = folder
        while not os.path.lexists(above) and os.path.dirname(above) != above:
            above = os.path.dirname(above)
        reason = f'{above} is a file' if os.path.lexists(above) and not os.path.isdir(above) else e.strerror or e
        raise UsageError(f'{flag} {path}: cannot write there: {reason}') from None


def prepare_out(path, flag='--out'):
    """The folder of an output file exists (made if needed); UsageError if it cannot be."""
    folder = os.path.dirname(os.path.abspath(path))
    make_folder(folder, path, flag)
    if os.path.isdir(path):
        raise UsageError(f'{flag} {path} is a folder, not a file name')
    check_writable(folder, path, flag)


def prepare_folder(path, flag='--out'):
    """The output folder `path` exists (made if needed); UsageError if it cannot be."""
    make_folder(path, path, flag)
    check_writable(path, path, flag)


def check_writable(folder, path, flag):
    """A file can be made in `folder` now (tried: a read-only mount or a missing permission
    shows), not only after minutes of work; UsageError naming `flag` and `path` if not."""
    import tempfile
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UsageError(f'{flag} {path}: cannot write there: {e.strerror or e}') from None


def is_number(value) -> bool:
    """A finite int or float read from JSON (not a bool, a string, NaN or infinity)."""
    import math
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def line_of(path, bad):
    """The number of the first line of the log `path` whose record `bad` refuses (the file is
    read again, as utils.read_log reads it: only an error message needs the line)."""
    import json
    with open(path, errors='replace') as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict) and bad(record):
            return n
    return None


def numeric_rows(path, keys):
    """utils.read_log(path, keys), each of `keys` a finite number; UsageError naming the file
    and line of the first record where one is not."""
    from utils import read_log
    rows = read_log(path, keys)

    def bad(record):
        return all(k in record for k in keys) and not all(is_number(record[k]) for k in keys)
    first = next((r for r in rows if bad(r)), None)
    if first is not None:
        key = next(k for k in keys if not is_number(first[k]))
        raise UsageError(f'{path} line {line_of(path, bad)}: {key} is {json_text(first[key])}, not a number')
    return rows


def json_text(value, limit=40):
    """A value read from JSON as it reads in the file, cut to `limit` characters."""
    import json
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + '...'


def mask_updates(path, keys=('epoch', 'delta_psi_cls', 'delta_psi_patch')):
    """DAP's mask-update records of a pruning_log.jsonl: those with ΔΨ (the finalize summary and
    other methods' records have none). In each, 'epoch' (and 'window', where there is one) is a
    number and the other `keys` are lists of numbers, all of the first one's length (one per
    sub-block); UsageError naming the file and line of the first record where this does not hold."""
    from utils import read_log
    updates = [r for r in read_log(path) if 'delta_psi_cls' in r]
    first = updates[0].get(next(k for k in keys if k != 'epoch')) if updates else None
    n = len(first) if isinstance(first, list) else None

    def bad(record):
        lists = [record.get(k) for k in keys if k != 'epoch']
        return (not is_number(record.get('epoch')) or not is_number(record.get('window', 1))
                or not all(isinstance(v, list) and v and all(map(is_number, v)) for v in lists)
                or {len(v) for v in lists} != {n})
    if any(bad(r) for r in updates):
        raise UsageError(f'{path} line {line_of(path, lambda r: "delta_psi_cls" in r and bad(r))}: a mask update '
                         f'whose {", ".join(keys)} are not an epoch and lists of numbers, one per sub-block')
    return updates


def best_top1(log_txt):
    """(best test_acc1, n_parameters of the last epoch) of a log.txt (a Path), or None;
    UsageError naming the line of a test_acc1 or n_parameters that is not a number."""
    if not log_txt.is_file():
        return None
    rows = numeric_rows(log_txt, ('test_acc1', 'n_parameters'))
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
