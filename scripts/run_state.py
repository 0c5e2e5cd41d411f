"""What a long script should do with one main.py run folder, so that it can be started again
after a crash or a preemption: prints `done` (the run finished: skip it), `resume PATH` (its
last checkpoint, to pass as --resume) or `new` (nothing to continue: start it, with
--overwrite for whatever a run killed in its first epoch left). A folder that holds a run it
cannot continue (a checkpoint it cannot read; best_checkpoint.pth or log.txt records without
checkpoint.pth) is one line on stderr and exit status 1: never `new`, which would overwrite it.

    python scripts/run_state.py output/table/IFOOD/deit_small_patch16_224/block_pr_pr0.5/prune

A run is finished when its checkpoint.pth is of its last epoch (args.epochs), or, for a
one-shot pruning run (SaViT), which writes no checkpoint.pth, when first_sparse_checkpoint.pth
exists. Used by scripts/reproduce_table.sh.
"""
import argparse
import os
import sys

import common  # noqa: F401  (first: it puts the repository root on sys.path)
from errors import UsageError


def run_state(output_dir: str) -> str:
    checkpoint = os.path.join(output_dir, 'checkpoint.pth')
    if not os.path.isfile(checkpoint):
        return state_without_checkpoint(output_dir)
    from models.checkpoint import whole_number  # torch only where there is a checkpoint to read
    from train.checkpoints import load_checkpoint_file
    ckpt = load_checkpoint_file(checkpoint, '--resume')
    saved = ckpt.get('args')
    epochs = saved.get('epochs') if isinstance(saved, dict) else None
    if not all(whole_number(n, 0) for n in (ckpt.get('epoch'), epochs)):
        raise UsageError(f'{checkpoint} records no whole "epoch" and "args" epochs: not a checkpoint of main.py')
    if ckpt['epoch'] + 1 >= epochs:
        return 'done'
    return f'resume {checkpoint}'


def state_without_checkpoint(output_dir: str) -> str:
    """`done` for a one-shot run (its cut and no best_checkpoint.pth), `new` for the leftovers of
    a first epoch; a folder that holds any other checkpoint, or records in log.txt, holds a run
    that lost its checkpoint.pth: UsageError, since --overwrite would delete what is left."""
    names = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    checkpoints = [n for n in names if n.endswith(('.pth', '.safetensors'))]
    if 'first_sparse_checkpoint.pth' in checkpoints and \
            set(checkpoints) <= {'first_sparse_checkpoint.pth', 'first_sparse_checkpoint.safetensors'}:
        return 'done'
    log = os.path.join(output_dir, 'log.txt')
    kept = checkpoints + (['log.txt'] if os.path.isfile(log) and os.path.getsize(log) > 0 else [])
    if kept:
        raise UsageError(f'it holds a run ({", ".join(kept[:4])}{", …" if len(kept) > 4 else ""}) '
                         'but no checkpoint.pth to continue from, and starting it again would delete them')
    return 'new'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('output_dir')
    args = p.parse_args(argv)
    try:
        print(run_state(args.output_dir))
    except Exception as e:  # UsageError (not a checkpoint), or one without epoch / args
        reason = f'it holds no {e}' if isinstance(e, KeyError) else str(e)
        sys.exit(f'error: {args.output_dir}: {reason}; continue or remove that run by hand')


if __name__ == '__main__':
    main()
