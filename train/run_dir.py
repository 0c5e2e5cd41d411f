"""The run folder, --output_dir: what a run may write there, what it finds there, and what it
continues from (--resume). One run per folder: a folder holding a run is refused unless
--resume continues it or --overwrite replaces it; a continued run cuts its logs back to the
lines its checkpoint recorded. The process that writes a run holds its folder's lock
(`run.lock`) while it lives. Checkpoints are written atomically (utils.save_on_master)."""
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import torch

import models
from models.checkpoint import whole_number
from models.checkpoint_io import is_url
import utils
from errors import UsageError
from train.checkpoints import load_checkpoint_file
from train.methods import registry

# what a run writes into --output_dir: a folder holding any of them holds a run ...
RUN_FILES = ('checkpoint.pth', 'best_checkpoint.pth', 'first_sparse_checkpoint.pth', 'log.txt',
             'checkpoint.safetensors', 'best_checkpoint.safetensors', 'first_sparse_checkpoint.safetensors')
# ... and what a start writes before its first epoch ends: alone, these are the leftovers of a
# start that failed (a loss that went NaN, an unreadable image), replaced by the next start
START_FILES = ('args.json', 'tensorboard', 'pruning_log.jsonl')
LOGS = ('log.txt', 'pruning_log.jsonl')


def holds_run(out: Path) -> bool:
    return any((out / name).exists() for name in RUN_FILES)


# held (flock) by the process that writes the run, for as long as it lives: the kernel lets go
# of it when that process ends, however it ends, so a lock file left behind is never in the way
LOCK = 'run.lock'


# file systems that do not lock (some FUSE or Lustre mounts) answer flock with one of these
NO_LOCKS = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL)


def lock_holder(out: Path):
    """Who holds out/run.lock ('pid N on HOST'), or None when no living process does. Reads only."""
    if not (out / LOCK).is_file():
        return None
    with open(out / LOCK) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or 'another process'
        except OSError as e:
            if e.errno not in NO_LOCKS:
                raise
            return None
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def in_use(out, holder) -> UsageError:
    return UsageError(f'--output_dir {out} is in use by a running job ({holder}): wait for it to end '
                      'or choose another folder')


def take_lock(out: Path):
    """The lock of the run in `out`, held until this process ends; UsageError if another has it."""
    f = open(out / LOCK, 'a+')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or 'another process'
        f.close()
        raise in_use(out, holder) from None
    except OSError as e:
        f.close()
        if e.errno not in NO_LOCKS:
            raise
        print(f'warning: {out} cannot be locked on this file system ({e.strerror}): nothing stops a second '
              'run from starting into it', file=sys.stderr)
        return None
    f.truncate(0)
    f.write(f'pid {os.getpid()} on {socket.gethostname()}\n')
    f.flush()
    return f


def continues_run(args) -> bool:
    """--resume names a checkpoint inside --output_dir (through links to the folder or to the
    file, compared as real paths): the run there goes on."""
    if not (args.resume and args.output_dir) or is_url(args.resume):
        return False
    out = Path(args.output_dir).resolve()
    return Path(args.resume).parent.resolve() == out or same_file(args.resume, out / 'checkpoint.pth')


def same_file(a, b) -> bool:
    """a and b are one file once links are followed (a refusal never advises what was typed)."""
    return Path(a).resolve() == Path(b).resolve()


def check_run_dir(args):
    """A run is never mixed into another one's folder: its checkpoints would be replaced (a worse
    best_checkpoint.pth over a better one) and its logs appended to. Reads only; called by every
    process before they meet in init_distributed_mode, so none writes before all have checked."""
    if args.eval or not args.output_dir:
        return
    holder = lock_holder(Path(args.output_dir))
    if holder is not None:
        raise in_use(args.output_dir, holder)
    if args.overwrite and continues_run(args):
        raise UsageError(f'--overwrite would delete --resume {args.resume}: leave out one of them')
    out = Path(args.output_dir)
    if not holds_run(out) or args.overwrite or continues_run(args):
        return
    found = [name for name in RUN_FILES + START_FILES if (out / name).exists()]
    resumable = 'checkpoint.pth' in found and not (args.resume and same_file(args.resume, out / 'checkpoint.pth'))
    how = f'--resume {out / "checkpoint.pth"} continues it, ' if resumable else ''
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
    """A --resume checkpoint, its entries checked as data before any of them is used."""
    checkpoint = load_checkpoint_file(args.resume, '--resume')
    if 'model' not in checkpoint:
        raise UsageError(f'--resume {args.resume} has no "model" entry: not a checkpoint of this script')
    problem = checkpoint_problem(checkpoint)
    if problem:
        raise UsageError(f'--resume {args.resume}: {problem}: not a checkpoint of this script')
    if not args.eval and ('optimizer' not in checkpoint or 'epoch' not in checkpoint):
        raise UsageError(f'--resume {args.resume} holds weights only (no optimizer state and epoch): '
                         f'it cannot continue a run; {resumable_instead(args.resume)}')
    return checkpoint


def resumable_instead(path) -> str:
    """What to pass instead of a --resume file that holds weights only: its folder's
    checkpoint.pth (--save-format safetensors writes NAME.safetensors beside it) or NAME.pth,
    never the file given; else --model-path."""
    if not is_url(path):
        here = Path(path)
        for other in (here.parent / 'checkpoint.pth', here.with_suffix('.pth')):
            if other.is_file() and not same_file(other, here):
                return f'--resume {other} continues its run'
    return 'to train from its weights, pass it as --model-path (with --resize-model-by-checkpoint if it is cut)'


def checkpoint_problem(ckpt):
    """What makes a checkpoint.pth unfit to continue from, or None (its arch is checked where
    the model is built, models.check_arch)."""
    model = ckpt['model']
    if not isinstance(model, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in model.items()):
        return 'its "model" is not a state dict (names to tensors)'
    for key in ('optimizer', 'pruner', 'args', 'lr_scheduler', 'scaler', 'log_lines'):
        if ckpt.get(key) is not None and not isinstance(ckpt[key], dict):
            return f'its "{key}" is a {type(ckpt[key]).__name__}, not a dict'
    for key, low in (('epoch', 0), ('steps_per_epoch', 1)):
        if key in ckpt and not whole_number(ckpt[key], low):
            return f'its "{key}" must be a whole number of at least {low}, got {ckpt[key]!r}'
    if not isinstance(ckpt.get('max_accuracy', 0.0), (int, float)):
        return f'its "max_accuracy" is a {type(ckpt["max_accuracy"]).__name__}, not a number'
    if 'optimizer' in ckpt and 'epoch' not in ckpt:
        return 'it has an optimizer state but no "epoch"'
    lines = ckpt.get('log_lines') or {}
    if set(lines) - set(LOGS) or not all(whole_number(n, 0) for n in lines.values()):
        return f'its "log_lines" must count lines of {" and ".join(LOGS)} only, got {lines!r}'[:200]
    return None


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
    if pruning and not args.eval:
        check_resume_settings(args, checkpoint)
    # after an in-run cut the pruning method still decides the learning rate (constant for DAP)
    if checkpoint.get('arch') is not None and 'optimizer' in checkpoint and 'prune_method' in saved \
            and saved['prune_method'] != args.prune_method:
        raise UsageError(f'--resume {args.resume} continues a run of --prune-method '
                         f'{saved["prune_method"] or "none"} (after its cut), not {args.prune_method or "none"}: '
                         'repeat its flags')


def pruning_settings(method):
    """(dest, flag) of every flag that decides what a --prune-method's pruner does: the common
    pruning flags and each setting its family declares (train/methods/registry.py)."""
    family = registry.family_of(method)
    common = [(registry.dest_of(flag), flag) for flag in registry.COMMON_FIELDS.values()]
    return common + [(dest, flag) for dest, flag, _ in family.own_flags()]


def setting_digests(args) -> dict:
    """sha256 of each file a pruning setting names (kind 'file': --latency-table), by its dest,
    or None where none is named: a checkpoint records what the pruner read."""
    if args.prune_method is None:
        return {}
    digests = {}
    for cls in registry.family_of(args.prune_method).settings:
        for f in registry.settings_of(cls):
            if f.metadata['kind'] == 'file':
                path = getattr(args, registry.dest_of(f.metadata['flag']))
                digests[registry.dest_of(f.metadata['flag'])] = \
                    hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None
    return digests


def shown(value) -> str:
    return ' '.join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def check_resume_settings(args, checkpoint):
    """A pruning run resumed with another value of any setting of its method would switch
    targets mid-run (the log would mix two runs): every one must match. None may change, not
    even --lr-soft-head (the restored optimizer state would keep the old rate and ignore it);
    a file (--latency-table) is compared by its contents' sha256, not by its path (a moved
    table is the same table, an edited one is not)."""
    saved = checkpoint.get('args')
    if not saved:
        raise UsageError(f'--resume {args.resume} records no "args": its pruning settings cannot be checked')
    then_digests, now_digests = checkpoint.get('setting_digests') or {}, setting_digests(args)
    changed = []
    for dest, flag in pruning_settings(args.prune_method):
        then, now = saved.get(dest), getattr(args, dest)
        if dest in now_digests and dest in then_digests:
            if then_digests[dest] != now_digests[dest]:
                digest = [d[:12] if d else 'none' for d in (then_digests[dest], now_digests[dest])]
                changed.append(f'{flag} (sha256 {digest[0]} then, {digest[1]} now)')
        elif dest in saved and (list(then) if isinstance(then, tuple) else then) != \
                (list(now) if isinstance(now, tuple) else now):
            changed.append(f'{flag} ({shown(then)} then, {shown(now)} now)')
    if changed:
        raise UsageError(f'--resume {args.resume} was pruned with other settings: {"; ".join(changed)}'[:400] +
                         ': resume with the ones it was written with')


def check_logs(args, checkpoint):
    """The logs of a continued run hold, complete, every line its checkpoint counts
    (`log_lines`): a log cut short within them has lost a record, and the resumed run would
    append onto its half line. A last counted line that only lacks its newline is complete,
    and cut_logs adds the newline; anything else is refused. Reads only."""
    for name, n in (checkpoint.get('log_lines') or {}).items():
        path = Path(args.output_dir) / name
        lines = path.read_text(errors='replace').splitlines() if path.is_file() else []
        bad = next((i for i, line in enumerate(lines[:n]) if not is_record(line)), None)
        if bad is None and len(lines) >= n:
            continue
        where = f'line {bad + 1} is not a complete JSON record' if bad is not None else f'it has {len(lines)} line(s)'
        raise UsageError(f'--resume {args.resume} counts {n} line(s) of {path}, but {where}: records were lost '
                         'and the run would append onto a damaged log; restore it, or start the run again')


def is_record(line) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, RecursionError):
        return False


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
    continued = checkpoint if continues_run(args) else None
    if continued is not None:
        check_logs(args, continued)
    check_output_dir(args.output_dir)
    resumed_step = (checkpoint['epoch'] + 1) * steps_per_epoch \
        if continued is not None and 'optimizer' in checkpoint else None
    run = RunDir(args.output_dir, overwrite=args.overwrite, continued=continued, purge_step=resumed_step,
                 save_format=args.save_format)
    run.write_args(args)
    return run


class RunDir:
    """Where a run writes: checkpoints, log.txt and TensorBoard, on the master process only.

    `overwrite` deletes the files of an earlier run first. `continued` is the --resume
    checkpoint when it continues the run in this folder: the logs are cut back to the lines
    they held when it was saved (`log_lines`), so the records of an epoch that was killed and
    is now repeated appear once, and TensorBoard hides its events from the repeated steps on
    (`purge_step`)."""

    def __init__(self, output_dir, overwrite=False, continued=None, purge_step=None, save_format='pth'):
        self.dir = Path(output_dir) if output_dir else None
        self.save_format = save_format
        self.writer = None
        self.lines = dict.fromkeys(LOGS, 0)  # lines in each log, saved with every checkpoint
        if self.dir is None or not utils.is_main_process():
            return
        self.lock = take_lock(self.dir)  # before anything of the folder is changed
        if overwrite:
            self.remove(RUN_FILES + START_FILES, '--overwrite')
        elif not holds_run(self.dir):
            self.remove(START_FILES, 'a start that ended before its first epoch left files')
        if continued is not None:
            self.cut_logs(continued.get('log_lines'))
        for name in LOGS:
            if (self.dir / name).exists():
                self.lines[name] = len((self.dir / name).read_text().splitlines())
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(self.dir / 'tensorboard'), purge_step=purge_step)

    def remove(self, names, why):
        """Delete these files of a run (a link is removed, never what it points to)."""
        removed = [p for p in [self.dir / name for name in names] + list(self.dir.glob('*.pth.tmp.*'))
                   if p.exists() or p.is_symlink()]
        for p in removed:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        if removed:
            print(f'{why}: removed {", ".join(p.name for p in removed)} from {self.dir}')

    def cut_logs(self, log_lines):
        if log_lines is None:  # saved before checkpoints recorded them
            print('note: the --resume checkpoint does not record its log lines: log.txt and '
                  'pruning_log.jsonl are appended to as they are')
            return
        for name in LOGS:  # only the run's own logs, by name (log_lines was checked on load)
            if name not in log_lines:
                continue
            n, path = log_lines[name], self.dir / name
            lines = path.read_text().splitlines(keepends=True) if path.exists() else []
            kept = lines[:n]
            if kept and not kept[-1].endswith('\n'):  # complete (check_logs), only its newline was lost
                kept[-1] += '\n'
            if kept != lines:
                tmp = path.with_name(f'{name}.tmp.{os.getpid()}')
                tmp.write_text(''.join(kept))
                os.replace(tmp, path)
                if len(lines) > n:
                    print(f'{name}: removed {len(lines) - n} line(s) written after the --resume checkpoint')

    def save(self, name, obj):
        """NAME.pth; with --save-format safetensors also its model as NAME.safetensors (the
        .pth keeps what --resume needs: optimizer, schedule, pruner, RNG)."""
        if self.dir is None:
            return
        utils.save_on_master(obj, self.dir / name)
        if self.save_format == 'safetensors' and utils.is_main_process():
            models.write_safetensors_checkpoint(str(self.dir / Path(name).with_suffix(".safetensors")), obj)

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
        if getattr(self, 'lock', None) is not None:
            self.lock.close()  # lets go of the flock
            self.lock = None
