"""Shared set-up: the repository on sys.path, and main.py run as a subprocess on DIGITS.

Every run writes only under pytest's tmp_path, never touches the network (TORCH_HOME is a
temporary folder, checkpoints come from file paths or file:// URLs), and uses the tiny
`deit_micro_patch4_32` on scikit-learn's bundled digits, on the CPU.
"""
import os
import re
import socket
import subprocess
import sys

import math

import pytest
import timm
import torch

# Under pytest-xdist (the README's `-n 2`) each worker is one of two processes on the cores:
# one intra-op thread each, or their spinning OpenMP threads slow both down many times over.
if os.environ.get('PYTEST_XDIST_WORKER'):
    torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# A DIGITS epoch of the micro model takes a few seconds; workers would only add start-up.
BASE_ARGS = ['--num_workers', '0', '--model', 'deit_micro_patch4_32', '--data-set', 'DIGITS',
             '--batch-size', '64', '--input-size', '32']
# A learning-rate schedule that does not depend on --epochs (warm-up, then a step at epoch 2),
# so that the first epochs of a short run are those of a longer one (see test_resume_is_exact).
SCHEDULE_ARGS = ['--lr', '5e-3', '--sched', 'step', '--decay-epochs', '2', '--warmup-epochs', '1',
                 '--warmup-lr', '1e-4']


def round_trip(obj):
    """`obj` after torch.save and torch.load(weights_only=True), as a checkpoint travels."""
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def reloaded(model):
    """A new model built from `model`'s arch and weights after a checkpoint's round trip."""
    import models
    ckpt = round_trip({'arch': model.arch(), 'model': model.state_dict()})
    out = models.build_from_arch(ckpt['arch'])
    out.load_state_dict(ckpt['model'])
    return out


def micro(seed=0, num_classes=10, name='deit_micro_patch4_32', **kw):
    """The tiny ViT of the tests (width 64, depth 4, 4 heads, MLP 256, 32 px, patch 4), seeded."""
    import models  # noqa: F401  (registers the micro models with timm)
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=num_classes, **kw)


def o1_weights(model, seed):
    """O(1) activations, so that a 1e-4 logit tolerance is meaningful (init std .02 is not):
    matrices scaled by 1/sqrt(fan in), norms near 1, biases near 0. Gates stay as they are."""
    from models import is_gate
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_gate(name):
                continue
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif name.endswith('weight'):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def cli_env(tmp_dir, env=None):
    """The environment of a main.py subprocess: TORCH_HOME under `tmp_dir`, one thread."""
    full_env = dict(os.environ, TORCH_HOME=str(tmp_dir / 'torch_home'), PYTHONUNBUFFERED='1')
    # One intra-op thread: on a busy machine two spinning OpenMP threads per process made an
    # epoch ten times slower (1.6 s / it against 0.18), for a gain of ~2x on an idle one.
    # The same thread count in every run also keeps float sums bit-identical across runs.
    full_env.setdefault('OMP_NUM_THREADS', '1')
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'SLURM_PROCID', 'SLURM_NTASKS'):
        full_env.pop(k, None)  # a single-process run must not think it is distributed
    full_env.update(env or {})
    return full_env


def cli_command(args, launcher=(sys.executable,)):
    return [*map(str, launcher), 'main.py', *BASE_ARGS, *map(str, args)]


def run_cli(args, tmp_dir, launcher=(sys.executable,), timeout=300, env=None):
    """Run `launcher main.py BASE_ARGS args` in the repository root (launcher: this python,
    or a distributed launcher); returns the CompletedProcess with text stdout and stderr.
    Later flags override BASE_ARGS (argparse keeps the last). TORCH_HOME is under `tmp_dir`."""
    return subprocess.run(cli_command(args, launcher), cwd=REPO, env=cli_env(tmp_dir, env),
                          capture_output=True, text=True, timeout=timeout)


def killed_after_first_epoch(args, out, tmp_dir, timeout=300):
    """Start main.py `args --output_dir out` and kill it during its second epoch, once the
    first epoch's checkpoint.pth and log line are written (a run to --resume)."""
    import time
    proc = subprocess.Popen(cli_command([*args, '--output_dir', out]), cwd=REPO, env=cli_env(tmp_dir),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (out / 'log.txt').exists() and len((out / 'log.txt').read_text().splitlines()) >= 2:
            proc.kill()  # during epoch 2, after checkpoint.pth of epoch 1 was written
            break
        time.sleep(0.02)
    proc.wait()


def check_ok(proc):
    assert proc.returncode == 0, f'exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n' \
                                 f'stderr:\n{proc.stderr[-3000:]}'
    return proc


EVAL_LINE = re.compile(r'^\* Acc@1 (\S+) Acc@5 (\S+) loss (\S+)$', re.M)


def eval_lines(stdout):
    """The `* Acc@1 … Acc@5 … loss …` lines of a run, as tuples of their three strings."""
    return EVAL_LINE.findall(stdout)


@pytest.fixture
def cli(tmp_path):
    """`cli(args)` runs main.py on DIGITS with the micro model; TORCH_HOME under tmp_path."""
    return lambda args, **kw: run_cli(args, tmp_path, **kw)


# ---- tests that need a CUDA GPU (tests/test_cuda.py) -------------------------------------------
def pytest_configure(config):
    config.addinivalue_line('markers', 'cuda: needs a CUDA GPU; skipped (and counted as skipped) without one')


def pytest_collection_modifyitems(config, items):
    marked = [item for item in items if item.get_closest_marker('cuda') is not None]
    # asked only when a cuda test was collected: it starts the CUDA driver in this process
    if marked and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason='needs a CUDA GPU: torch.cuda.is_available() is False here')
        for item in marked:
            item.add_marker(skip)
