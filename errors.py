"""The errors a run ends with, each printed by main.py as one line (`first_line`), and the one
atomic write that turns a full disk into `DiskFullError`."""
import errno
import os


def first_line(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type when it has none), cut to `limit`."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit] or type(e).__name__


class UsageError(Exception):
    """Bad input from the command line: main.py prints it as one line and exits non-zero."""


class NonFiniteLossError(Exception):
    """The training loss became NaN or infinite."""


class DiskFullError(Exception):
    """A checkpoint or log could not be written: the disk is full or over quota."""


class RunStopped(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: the run stops where it is. A KeyboardInterrupt, so that
    DataLoader workers (which inherit the handler) stop as quietly as on Ctrl-C; `where` is
    filled in by whoever knows where the run stood."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum, self.where = signum, None


def write_whole(path: str, tmp: str, write, full_disk_texts=()) -> None:
    """write(tmp), then rename it to `path`: `path` is whole or as it was, and no partial `tmp`
    stays. A full disk (or quota) is a DiskFullError, one line: an OSError with its errno, or a
    writer that reports it only in its message (`full_disk_texts`: torch.save's short write,
    safetensors' Rust errors)."""
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as e:
        codes = (errno.ENOSPC, errno.EDQUOT)
        if getattr(e, 'errno', None) in codes or any(t in str(e) for t in full_disk_texts):
            kept = f'the previous {os.path.basename(path)} is kept, complete' if os.path.exists(path) \
                else f'no {os.path.basename(path)} was written before'
            raise DiskFullError(f'the disk is full: {path} could not be written; {kept}') from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
