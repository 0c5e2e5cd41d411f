"""Shared script code (a module the scripts import, not a script to run): one run or one
measurement in a fresh process, as gpu_check.py and benchmark_train_step.py make them.

A fresh process is a new interpreter (subprocess), never a fork: a child forked from a
parent that has called `torch.cuda.is_available()` cannot initialise CUDA and dies. The parent
never waits forever: each child has a time limit, its exit code is read, and a child that
dies or runs out of time becomes a `ChildFailed` whose message is one line naming it.
"""
import os
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, 'scripts')


class ChildFailed(Exception):
    """A child exited non-zero or ran out of time; str(e) is one line that names it."""

    def __init__(self, message, timed_out=False):
        super().__init__(message)
        self.timed_out = timed_out


def last_line(text: str, width: int = 240) -> str:
    """The last non-empty line of a child's output: main.py's `error: …`, or the exception
    line that ends a traceback."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[-1] if lines else 'no output'
    return line if len(line) <= width else line[:width - 1] + '…'


def stop(proc):
    """Kill the child and everything it started (torchrun's workers): its process group."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run(cmd, what, timeout, log=None, env=None, stop_when=None, poll_s=0.05):
    """Run `cmd` (a list) in the repository root, its output (stdout and stderr) into the file
    `log` (a temporary one if None); return that output. With `stop_when`, a callable, the
    child is killed as soon as it returns true, and the output is returned as well (a run
    stopped on purpose). ChildFailed(one line) on a non-zero exit or after `timeout` seconds."""
    with (open(log, 'w+') if log else tempfile.TemporaryFile('w+')) as out:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline, stopped = time.monotonic() + timeout, False
        try:
            while proc.poll() is None:
                if stop_when is not None and stop_when():
                    stop(proc)
                    stopped = True
                    break
                if time.monotonic() > deadline:
                    stop(proc)
                    raise ChildFailed(f'{what}: no result after {timeout:.0f} s (timed out)', timed_out=True)
                time.sleep(poll_s)
        finally:
            if proc.poll() is None:  # Ctrl-C or an error here: no child is left behind
                stop(proc)
        out.seek(0)
        text = out.read()
    if proc.returncode != 0 and not stopped:
        raise ChildFailed(f'{what}: exit {proc.returncode}: {last_line(text)}')
    return text


def python(script, *args):
    """The command line of a script of this folder, run by this interpreter."""
    return [sys.executable, os.path.join(SCRIPTS, script), *args]
