"""Distributed set-up and metric logging (DeiT's utils.py, device-agnostic): the process
group, seeds, the console's MetricLogger, atomic checkpoint saves, and reading log.txt back."""
import datetime
import glob
import hashlib
import os
import random
import time
from collections import defaultdict, deque

import numpy as np
import torch
import torch.distributed as dist

from errors import UsageError, first_line, write_whole


# ---- distributed --------------------------------------------------------------------------
def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


def setup_for_distributed(is_master):
    """Silence print() on every process but the master, unless called with force=True."""
    import builtins as __builtin__
    builtin_print = __builtin__.print

    def print(*args, **kwargs):
        force = kwargs.pop('force', False)
        if is_master or force:
            builtin_print(*args, **kwargs)

    __builtin__.print = print


def _whole_env(name, default=None):
    if name not in os.environ and default is not None:
        return default
    try:
        return int(os.environ[name])
    except ValueError:
        raise UsageError(f'the environment sets {name}={os.environ[name]!r}, not a whole number') from None


def distributed_env(dist_url='env://'):
    """(rank, world_size, local_rank) from torchrun / `launch --use_env` (RANK, WORLD_SIZE,
    LOCAL_RANK) or SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID); None for a single
    process. UsageError for an environment that cannot make a distributed run."""
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        rank, world, local = _whole_env('RANK'), _whole_env('WORLD_SIZE'), _whole_env('LOCAL_RANK', 0)
        how = 'RANK and WORLD_SIZE are set'
    elif 'SLURM_PROCID' in os.environ and _whole_env('SLURM_NTASKS', 1) > 1:
        rank, world = _whole_env('SLURM_PROCID'), _whole_env('SLURM_NTASKS')
        local = _whole_env('SLURM_LOCALID', rank % max(torch.cuda.device_count(), 1))
        how = f'SLURM_NTASKS={world} (a SLURM allocation of {world} tasks; start them with srun)'
    else:
        return None
    if not (world >= 1 and 0 <= rank < world and local >= 0):
        raise UsageError(f'the environment sets rank {rank} of world size {world} (local rank {local}): '
                         'not a process of that world')
    if dist_url == 'env://':
        missing = [k for k in ('MASTER_ADDR', 'MASTER_PORT') if not os.environ.get(k)]
        if missing:
            raise UsageError(f'{how}, but {" and ".join(missing)} {"is" if len(missing) == 1 else "are"} '
                             'not: start with torchrun, set them, or pass --dist_url')
        _whole_env('MASTER_PORT')
    return rank, world, local


def init_distributed_mode(args):
    """Set args.distributed / rank / world_size / gpu from torchrun, `launch --use_env` or SLURM.

    nccl on CUDA, gloo on CPU. The rendezvous and every collective wait at most
    --dist-timeout seconds; a rendezvous that cannot complete is one line, not a hang.
    """
    found = distributed_env(args.dist_url)
    if found is None:
        print('Not using distributed mode')
        args.distributed = False
        args.rank, args.world_size, args.gpu = 0, 1, 0
        return
    args.rank, args.world_size, args.gpu = found
    args.distributed = True
    on_cuda = str(args.device).startswith('cuda')
    if on_cuda:
        torch.cuda.set_device(args.gpu)
    args.dist_backend = 'nccl' if on_cuda else 'gloo'
    print(f'| distributed init (rank {args.rank}): {args.dist_url}, backend {args.dist_backend}',
          flush=True)
    where = args.dist_url if args.dist_url != 'env://' else \
        f'{os.environ["MASTER_ADDR"]}:{os.environ["MASTER_PORT"]}'
    try:
        dist.init_process_group(backend=args.dist_backend, init_method=args.dist_url,
                                world_size=args.world_size, rank=args.rank,
                                timeout=datetime.timedelta(seconds=args.dist_timeout))
        dist.barrier()
    except (RuntimeError, ValueError) as e:  # torch's DistStoreError, DistNetworkError, ...
        reason = first_line(e)
        timed_out = isinstance(e, getattr(dist, 'DistStoreError', ())) or 'timed out' in reason.lower() \
            or 'timeout' in reason.lower()
        what = f'did not complete within --dist-timeout {args.dist_timeout:g} s' if timed_out else 'failed'
        raise UsageError(f'the rendezvous of {args.world_size} processes at {where} {what} '
                         f'(this is rank {args.rank}): {reason}') from None
    setup_for_distributed(args.rank == 0)


def leave_distributed():
    """Every process waits for the others, then the process group is taken down, before any
    exits: a process that left first took the rendezvous store with it, and one still tearing
    down aborted ("terminate called without an active exception", seen after --eval --dist-eval)."""
    if is_dist_avail_and_initialized():
        dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed):
    """Seed torch, numpy and random. Called at every epoch start, so an epoch's randomness
    depends only on (seed, epoch, rank): a resumed run repeats the uninterrupted one."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def synchronize(device):
    """Wait for the device (CUDA kernels run asynchronously); a no-op elsewhere."""
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


def parameter_digest(module: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for name, p in module.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ---- metrics ------------------------------------------------------------------------------
class SmoothedValue:
    """A series of values: a window for the console, exact totals for the epoch average."""

    def __init__(self, window_size=20, fmt='{median:.4f} ({global_avg:.4f})'):
        self.deque = deque(maxlen=window_size)
        self.total, self.count, self.fmt = 0.0, 0, fmt

    def update(self, value, n=1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self):
        """Sum total and count over processes (the window stays local)."""
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64)
        if dist.get_backend() == 'nccl':
            t = t.cuda()
        dist.all_reduce(t)
        self.count, self.total = int(t[0].item()), t[1].item()

    @property
    def median(self):
        return float(np.median(self.deque)) if self.deque else 0.0

    @property
    def avg(self):
        return float(np.mean(self.deque)) if self.deque else 0.0

    @property
    def global_avg(self):
        return self.total / max(self.count, 1)

    @property
    def value(self):
        return self.deque[-1] if self.deque else 0.0

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               value=self.value)


class MetricLogger:
    def __init__(self, delimiter='  '):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, n=1, **kwargs):
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            self.meters[k].update(float(v), n=n)

    def __getattr__(self, attr):
        if attr in self.__dict__.get('meters', {}):
            return self.meters[attr]
        raise AttributeError(attr)

    def __str__(self):
        return self.delimiter.join(f'{name}: {meter}' for name, meter in self.meters.items())

    def synchronize_between_processes(self):
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def log_every(self, iterable, print_freq, header=''):
        start = end = time.time()
        iter_time, data_time = SmoothedValue(fmt='{avg:.4f}'), SmoothedValue(fmt='{avg:.4f}')
        n = len(iterable)
        width = len(str(n))
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == n - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (n - i)))
                print(self.delimiter.join([
                    f'{header} [{i:>{width}}/{n}]', f'eta: {eta}', str(self),
                    f'time: {iter_time}', f'data: {data_time}']), flush=True)
            end = time.time()
        total = datetime.timedelta(seconds=int(time.time() - start))
        print(f'{header} Total time: {total} ({(time.time() - start) / max(n, 1):.4f} s / it)')


# ---- checkpoints --------------------------------------------------------------------------
def save_on_master(obj, path):
    """torch.save on the master process only, atomically (temporary file, then rename).

    A write killed half-way leaves its `PATH.tmp.PID`; the next successful write of the same
    path removes such leftovers (only one process writes a run's checkpoints)."""
    if not is_main_process():
        return
    # torch.save reports a short write as "unexpected pos …", without an errno
    write_whole(path, f'{path}.tmp.{os.getpid()}', lambda tmp: torch.save(obj, tmp),
                ('unexpected pos', 'file write failed'))
    for stale in glob.glob(f'{glob.escape(str(path))}.tmp.*'):
        try:
            os.remove(stale)
        except FileNotFoundError:
            pass


# ---- logs read back ----------------------------------------------------------------------
def read_log(path, keys=()) -> list:
    """The records of a log.txt or pruning_log.jsonl (a JSON object a line). A line that is not
    one (the last line of a killed run is often cut short) or that lacks one of `keys` is
    skipped, with a warning on stderr naming the file and line."""
    import json
    import sys
    records = []
    with open(path, errors='replace') as f:
        text = f.read()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # cut short, or nested beyond Python's limit
            record = None
        missing = [k for k in keys if k not in record] if isinstance(record, dict) else None
        if missing is None or missing:
            what = f'lacks {", ".join(missing)}' if missing else 'is not a complete JSON record'
            print(f'warning: {path} line {n} {what}: skipped', file=sys.stderr)
            continue
        records.append(record)
    return records
