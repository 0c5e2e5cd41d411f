"""Checkpoint files as the command line reads them (main.py, train/, scripts/): the library's
reader, models/checkpoint_io.py, with its refusal turned into the one-line UsageError that
main.py and the scripts print."""
from errors import UsageError
from models.checkpoint_io import CheckpointError, read_checkpoint


def load_checkpoint_file(path_or_url: str, what: str = 'checkpoint') -> dict:
    """`read_checkpoint(path_or_url, what)`; UsageError (one line naming `what`) if it is not
    a checkpoint this code reads."""
    try:
        return read_checkpoint(path_or_url, what)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
