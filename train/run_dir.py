"""The run folder, --output_dir: what a run may write there, what it finds there, and what it
continues from (--resume). One run per folder: a folder holding a run is refused unless
--resume continues it or --overwrite replaces it; a continued run cuts its logs back to the
lines its checkpoint recorded. Checkpoints are written atomically (utils.save_on_master)."""
import json
import os
import shutil
import tempfile
from pathlib import Path

import models
import utils
from utils import UsageError

# what a run writes into --output_dir: a folder holding any of them holds a run
RUN_FILES = ('checkpoint.pth', 'best_checkpoint.pth', 'first_sparse_checkpoint.pth', 'log.txt',
             'pruning_log.jsonl', 'args.json', 'tensorboard')
LOGS = ('log.txt', 'pruning_log.jsonl')


def continues_run(args) -> bool:
    """--resume names a checkpoint inside --output_dir: the run there goes on."""
    return bool(args.resume and args.output_dir) and not utils.is_url(args.resume) and \
        Path(args.resume).resolve().parent == Path(args.output_dir).resolve()


def check_run_dir(args):
    """A run is never mixed into another one's folder: its checkpoints would be replaced (a worse
    best_checkpoint.pth over a better one) and its logs appended to. Reads only; called by every
    process before they meet in init_distributed_mode, so none writes before all have checked."""
    if args.eval or not args.output_dir:
        return
    if args.overwrite and continues_run(args):
        raise UsageError(f'--overwrite would delete --resume {args.resume}: leave out one of them')
    out = Path(args.output_dir)
    found = [name for name in RUN_FILES if (out / name).exists()]
    if not found or args.overwrite or continues_run(args):
        return
    how = f'--resume {out / "checkpoint.pth"} continues it, ' if 'checkpoint.pth' in found else ''
    raise UsageError(f'--output_dir {out} holds a run ({", ".join(found[:3])}{", …" if len(found) > 3 else ""}): '
                     f'{how}--overwrite replaces it')


def check_output_dir(output_dir):
    """Fail early, and before writing anything there, if output_dir cannot be written."""
    if not output_dir:
        return
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as e:
        raise UsageError(f'--output_dir {output_dir} is not writable: {e.strerror or e}')


# ---- --resume: what a checkpoint must be to be continued ----------------------------------------
def load_resume_checkpoint(args):
    checkpoint = utils.load_checkpoint_file(args.resume, '--resume')
    if 'model' not in checkpoint:
        raise UsageError(f'--resume {args.resume} has no "model" entry: not a checkpoint of this script')
    return checkpoint


def check_resume_kind(args, checkpoint, pruning):
    """A --resume checkpoint of another kind of run than this command line's."""
    saved = checkpoint.get('args') or {}
    if checkpoint.get('pruner') is not None and not pruning:
        raise UsageError(f'--resume {args.resume} was written while pruning: repeat the pruning flags')
    if pruning and checkpoint.get('pruner') is None:
        raise UsageError(f'--resume {args.resume} is not from a pruning run (it holds no pruner state): '
                         'to prune its weights, pass it as --model-path')
    if pruning and saved.get('prune_method') not in (None, args.prune_method):
        raise UsageError(f'--resume {args.resume} was written by --prune-method {saved["prune_method"]}, '
                         f'not {args.prune_method}')


def check_resume_steps(args, checkpoint, steps_per_epoch):
    """The pruning schedule counts optimizer steps (§6), and steps per epoch follow from the
    processes, --batch-size and --grad-accum-steps: resumed with others, the schedule would be
    off by the difference. Refused rather than re-derived (the masks could not match an
    uninterrupted run anyway: the batches differ)."""
    saved = checkpoint.get('args') or {}
    then = (saved.get('world_size', 1), saved.get('batch_size'), saved.get('grad_accum_steps'),
            checkpoint.get('steps_per_epoch', steps_per_epoch))
    now = (utils.get_world_size(), args.batch_size, args.grad_accum_steps, steps_per_epoch)
    if then != now:
        raise UsageError(f'--resume {args.resume} is a pruning run of {then[0]} process(es) × --batch-size '
                         f'{then[1]} × --grad-accum-steps {then[2]} ({then[3]} steps per epoch), this run '
                         f'{now[0]} × {now[1]} × {now[2]} ({now[3]}): resume with the same ones')


def restore_weights(args, checkpoint, model, pruner):
    """The model's (and the pruner's) state from a --resume checkpoint, or one line on why not."""
    state = checkpoint['model']
    problem = models.state_dict_mismatch(model, state)
    if problem:
        saved_model = (checkpoint.get('args') or {}).get('model')
        head = state.get('head.weight')
        if saved_model not in (None, args.model):
            problem = f'it was written for --model {saved_model}'
        elif head is not None and head.shape[0] != args.nb_classes:
            problem = f'its classifier has {head.shape[0]} classes, --data-set {args.data_set} has {args.nb_classes}'
        raise UsageError(f'--resume {args.resume} does not fit --model {args.model}: {problem}')
    model.load_state_dict(state)
    if pruner is not None and checkpoint.get('pruner') is not None:
        try:
            pruner.load_state_dict(checkpoint['pruner'])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
            raise UsageError(f'--resume {args.resume}: its pruner state does not fit --prune-method '
                             f'{args.prune_method}: {reason}')


# ---- the folder of a running run ----------------------------------------------------------------
def open_run(args, checkpoint, steps_per_epoch):
    """The RunDir of this command line (nothing is written under --eval or without --output_dir)."""
    if args.eval:
        return RunDir('')
    check_output_dir(args.output_dir)
    continued = checkpoint if continues_run(args) else None
    resumed_step = (checkpoint['epoch'] + 1) * steps_per_epoch \
        if continued is not None and 'optimizer' in checkpoint else None
    run = RunDir(args.output_dir, overwrite=args.overwrite, continued=continued, purge_step=resumed_step)
    run.write_args(args)
    return run


class RunDir:
    """Where a run writes: checkpoints, log.txt and TensorBoard, on the master process only.

    `overwrite` deletes the files of an earlier run first. `continued` is the --resume
    checkpoint when it continues the run in this folder: the logs are cut back to the lines
    they held when it was saved (`log_lines`), so the records of an epoch that was killed and
    is now repeated appear once, and TensorBoard hides its events from the repeated steps on
    (`purge_step`)."""

    def __init__(self, output_dir, overwrite=False, continued=None, purge_step=None):
        self.dir = Path(output_dir) if output_dir else None
        self.writer = None
        self.lines = dict.fromkeys(LOGS, 0)  # lines in each log, saved with every checkpoint
        if self.dir is None or not utils.is_main_process():
            return
        if overwrite:
            self.remove_run()
        if continued is not None:
            self.cut_logs(continued.get('log_lines'))
        for name in LOGS:
            if (self.dir / name).exists():
                self.lines[name] = len((self.dir / name).read_text().splitlines())
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(self.dir / 'tensorboard'), purge_step=purge_step)

    def remove_run(self):
        removed = [p for p in [self.dir / name for name in RUN_FILES] + list(self.dir.glob('*.pth.tmp.*'))
                   if p.exists()]
        for p in removed:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if removed:
            print(f'--overwrite: removed {", ".join(p.name for p in removed)} from {self.dir}')

    def cut_logs(self, log_lines):
        if log_lines is None:  # saved before checkpoints recorded them
            print('note: the --resume checkpoint does not record its log lines: log.txt and '
                  'pruning_log.jsonl are appended to as they are')
            return
        for name, n in log_lines.items():
            path = self.dir / name
            lines = path.read_text().splitlines(keepends=True) if path.exists() else []
            if len(lines) > n:
                tmp = path.with_name(f'{name}.tmp.{os.getpid()}')
                tmp.write_text(''.join(lines[:n]))
                os.replace(tmp, path)
                print(f'{name}: removed {len(lines) - n} line(s) written after the --resume checkpoint')

    def save(self, name, obj):
        if self.dir is not None:
            utils.save_on_master(obj, self.dir / name)

    def log(self, stats, epoch):
        if self.dir is None or not utils.is_main_process():
            return
        with (self.dir / 'log.txt').open('a') as f:
            f.write(json.dumps(stats) + '\n')
        self.lines['log.txt'] += 1
        for k, v in stats.items():
            if k not in ('epoch', 'n_parameters') and isinstance(v, (int, float)):
                self.writer.add_scalar(k.replace('_', '/', 1), v, epoch)
        self.writer.flush()

    def log_pruning(self, record):
        """One JSON line per pruner record in pruning_log.jsonl; its scalars to TensorBoard."""
        if self.dir is None or not utils.is_main_process():
            return
        with (self.dir / 'pruning_log.jsonl').open('a') as f:
            f.write(json.dumps(record) + '\n')
        self.lines['pruning_log.jsonl'] += 1
        for tag, value in getattr(record, 'scalars', {}).items():
            self.writer.add_scalar(tag, value, record.get('step', 0))

    def write_args(self, args):
        if self.dir is not None and utils.is_main_process():
            (self.dir / 'args.json').write_text(json.dumps(vars(args), indent=2))

    def close(self):
        if self.writer is not None:
            self.writer.close()
