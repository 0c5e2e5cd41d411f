"""Distributed set-up, metric logging and checkpoint input / output (DeiT's utils.py, device-agnostic)."""
import datetime
import hashlib
import os
import random
import time
from collections import defaultdict, deque
from urllib.parse import urlparse

import numpy as np
import torch
import torch.distributed as dist


class UsageError(Exception):
    """Bad input from the command line: main.py prints it as one line and exits non-zero."""


class NonFiniteLossError(Exception):
    """The training loss became NaN or infinite."""


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


def init_distributed_mode(args):
    """Set args.distributed / rank / world_size / gpu from torchrun, `launch --use_env` or SLURM.

    nccl on CUDA, gloo on CPU.
    """
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        args.rank = int(os.environ['RANK'])
        args.world_size = int(os.environ['WORLD_SIZE'])
        args.gpu = int(os.environ.get('LOCAL_RANK', 0))
    elif 'SLURM_PROCID' in os.environ and int(os.environ.get('SLURM_NTASKS', 1)) > 1:
        args.rank = int(os.environ['SLURM_PROCID'])
        args.world_size = int(os.environ['SLURM_NTASKS'])
        args.gpu = int(os.environ.get('SLURM_LOCALID', args.rank % max(torch.cuda.device_count(), 1)))
    else:
        print('Not using distributed mode')
        args.distributed = False
        args.rank, args.world_size, args.gpu = 0, 1, 0
        return
    args.distributed = True
    on_cuda = str(args.device).startswith('cuda')
    if on_cuda:
        torch.cuda.set_device(args.gpu)
    args.dist_backend = 'nccl' if on_cuda else 'gloo'
    print(f'| distributed init (rank {args.rank}): {args.dist_url}, backend {args.dist_backend}',
          flush=True)
    dist.init_process_group(backend=args.dist_backend, init_method=args.dist_url,
                            world_size=args.world_size, rank=args.rank,
                            timeout=datetime.timedelta(minutes=30))
    dist.barrier()
    setup_for_distributed(args.rank == 0)


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
    """torch.save on the master process only, atomically (temporary file, then rename)."""
    if not is_main_process():
        return
    tmp = f'{path}.tmp.{os.getpid()}'
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def is_url(path: str) -> bool:
    return urlparse(str(path)).scheme in ('http', 'https', 'file', 'ftp')


def load_checkpoint_file(path_or_url: str, what: str = 'checkpoint') -> dict:
    """Load a checkpoint with weights_only=True from a file or a URL; UsageError if it is not one."""
    try:
        if is_url(path_or_url):
            ckpt = torch.hub.load_state_dict_from_url(path_or_url, map_location='cpu',
                                                      check_hash=False, weights_only=True)
        else:
            if not os.path.isfile(path_or_url):
                raise UsageError(f'{what} {path_or_url} does not exist')
            ckpt = torch.load(path_or_url, map_location='cpu', weights_only=True)
    except UsageError:
        raise
    except Exception as e:  # truncated zip, pickle of arbitrary objects, HTTP error, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f'{what} {path_or_url} is not a readable PyTorch checkpoint: {reason[:200]}')
    if not isinstance(ckpt, dict):
        raise UsageError(f'{what} {path_or_url} holds a {type(ckpt).__name__}, not a dict')
    return ckpt



class ShardSampler(torch.utils.data.Sampler):
    """Every rank takes indices rank, rank + world, ...: no padding, so that metrics summed
    over ranks are exactly those of a single process (DistributedSampler repeats samples)."""

    def __init__(self, dataset, num_replicas, rank):
        self.indices = list(range(rank, len(dataset), num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


@torch.no_grad()
def count_flops(model: torch.nn.Module, img_size: int, device='cpu') -> int:
    """FLOPs of one image's forward, counted by torch.utils.flop_counter (matmuls and
    convolutions, a multiply-add counted as 2; norms, softmax and GELU are not counted).

    Attention runs unfused while counting: the counter has no formula for the CPU kernel of
    scaled_dot_product_attention and would leave out q·kᵀ and attn·v.
    """
    from torch.utils.flop_counter import FlopCounterMode
    was_training = model.training
    fused = {m: m.fused_attn for m in model.modules() if hasattr(m, 'fused_attn')}
    model.eval()
    for m in fused:
        m.fused_attn = False
    x = torch.zeros(1, 3, img_size, img_size, device=device)
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for m, f in fused.items():
            m.fused_attn = f
        model.train(was_training)
    return counter.get_total_flops()
