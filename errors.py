"""The errors a run ends with, each printed by main.py as one line (`first_line`)."""


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
