"""CUDA's rules, kept on the CPU: which tensors are on the device, which on the host, and where
the host waits for the device (tests only).

Every test runs on the CPU, where a CPU tensor meeting a "device" tensor never fails and
`.item()` costs nothing. `DeviceRules` is a `TorchFunctionMode` that tracks the provenance of
every tensor made while it is active, as if the run's device were a GPU:

- device: the model's parameters and inputs once moved with `.to(device)` (a `torch.device`
  object, as `main.py` passes) or `.cuda()`; a factory call given `device=` a `torch.device`
  (`device=x.device`); anything computed from a device tensor (`zeros_like`, `new_*`, ops);
- host: a factory call without `device=` (`torch.tensor([...])`, `torch.zeros(n)`,
  `torch.as_tensor(3)`), or with `device='cpu'`; `.cpu()`, `.to('cpu')`; anything computed
  from host tensors only.

An op that mixes the two raises `DeviceMismatch` where CUDA raises "Expected all tensors to be
on the same device": a host tensor of more than 0 dimensions in an elementwise op, any host
tensor in a concatenation, a search or a matrix product, device indices into a host tensor.
What CUDA allows is allowed: host 0-dim scalars in elementwise ops, host indices into a device
tensor, `copy_` and `.to` across devices.

It also counts host synchronisations on device tensors (`item`, `tolist`, `bool`, `int`,
`float`, `nonzero`, boolean-mask indexing, copies to the host): `rules.syncs` is a Counter of
their names, so a test can pin how often a training step makes the host wait.

Tensors the mode does not see made (before it was entered, `torch.from_numpy`, `torch.load`)
count as host: enter it before the model is built; gradients read through `.grad` are where
their parameter is.
"""
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

HOST, DEVICE = 'host', 'device'
T = torch.Tensor

# any host tensor, even 0-dim, is refused next to a device tensor
STRICT = {torch.stack, torch.cat, torch.concat, torch.hstack, torch.vstack, torch.searchsorted,
          torch.bucketize, torch.index_select, T.index_select, torch.gather, T.gather, T.scatter, T.scatter_,
          T.scatter_add_, T.index_add_, torch.matmul, T.matmul, T.__matmul__, torch.mm, T.mm, torch.bmm,
          torch.nn.functional.linear, torch.take, torch.cumsum}
# allowed across devices (copies, moves, views of each input on its own device)
CROSS = {T.copy_, T.to, T.cpu, T.cuda, T.type, torch.broadcast_tensors, T.new_tensor, T.new_zeros, T.new_ones,
         T.new_full, T.new_empty, torch.as_tensor, torch.tensor}
# functions that return a number or a list on the host: a wait when the tensor is on the device
TO_HOST = {T.item, T.tolist, T.numpy, T.__bool__, T.__int__, T.__float__, T.__index__, T.__format__}
# functions whose output size depends on the data: a wait on the device
DATA_SIZED = {torch.nonzero, T.nonzero, torch.masked_select, T.masked_select, torch.unique, T.unique,
              torch.equal, T.equal, torch.argwhere, torch.repeat_interleave, T.repeat_interleave}
FACTORIES_FROM_DATA = {torch.tensor, torch.as_tensor}


class DeviceMismatch(RuntimeError):
    """What CUDA raises as "Expected all tensors to be on the same device"."""


class DeviceRules(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        # what `x.device` returns for a host tensor: `device=x.device` then means the host
        self.host_device = torch.device('cpu')
        self.where = WeakIdKeyDictionary()
        self.memory = {}  # data_ptr -> provenance of the last tensor tagged there
        self.syncs = Counter()

    # ---- provenance --------------------------------------------------------------------
    def of(self, t):
        where = self.where.get(t)
        if where is None and isinstance(t, torch.nn.Parameter):
            # nn.Parameter(x) is a new tensor on x's memory, made where the mode cannot see
            where = self.memory.get(t.data_ptr())
        return where or HOST

    def _set(self, t, where):
        self.where[t] = where
        if t.numel():
            self.memory[t.data_ptr()] = where

    def on_device(self, *objs):
        """Mark tensors, or every parameter and buffer of modules, as on the device."""
        for obj in objs:
            tensors = list(obj.parameters()) + list(obj.buffers()) if isinstance(obj, torch.nn.Module) else [obj]
            for t in tensors:
                self._set(t, DEVICE)

    def _target(self, args, kwargs):
        """Where a `.to(...)` / factory `device=` sends its result: None if nowhere said."""
        for a in list(args[1:]) + [kwargs.get('device')]:
            if isinstance(a, torch.Tensor):
                return a
            if isinstance(a, str):
                return HOST if a.startswith('cpu') else DEVICE
            if isinstance(a, torch.device):  # a host tensor's .device, or the run's (main.py's, x.device)
                return HOST if a is self.host_device else DEVICE
        return None

    # ---- the mode ----------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, '__self__', None) is T.device and self.of(args[0]) == HOST:
            return self.host_device
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_device = [t for t in inputs if self.of(t) == DEVICE]
        if on_device:
            self._check(func, args, inputs)
            self._count_sync(func, args, kwargs)
        out = func(*args, **kwargs)
        return self._tag(func, args, kwargs, inputs, on_device, out)

    def _check(self, func, args, inputs):
        if func in CROSS:
            return
        if func in (T.__getitem__, T.__setitem__):
            indexed, index = args[0], tree_flatten(args[1])[0]
            if self.of(indexed) == HOST and any(isinstance(i, torch.Tensor) and self.of(i) == DEVICE for i in index):
                raise DeviceMismatch(f'{func.__name__}: device indices into a host tensor {tuple(indexed.shape)}')
            values = [args[2]] if func is T.__setitem__ and isinstance(args[2], torch.Tensor) else []
            if self.of(indexed) == DEVICE and any(self.of(v) == HOST and v.dim() > 0 for v in values):
                raise DeviceMismatch(f'__setitem__: host values {tuple(values[0].shape)} into a device tensor')
            return
        host = [t for t in inputs if self.of(t) == HOST and (func in STRICT or t.dim() > 0)]
        if host:
            name = getattr(func, '__name__', str(func))
            raise DeviceMismatch(f'{name}: host tensor of shape {tuple(host[0].shape)} meets device tensors '
                                 '(Expected all tensors to be on the same device)')

    def _count_sync(self, func, args, kwargs):
        name = getattr(func, '__name__', str(func))
        if func in TO_HOST or func in DATA_SIZED:
            self.syncs[name] += 1
        elif func is T.cpu or (func is T.to and self._target(args, kwargs) == HOST):
            self.syncs['to host'] += 1
        elif func in FACTORIES_FROM_DATA and not isinstance(args[0], torch.Tensor):
            self.syncs[f'{name} of device values'] += 1
        elif func is T.__getitem__ and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                           and self.of(i) == DEVICE for i in tree_flatten(args[1])[0]):
            self.syncs['boolean mask'] += 1

    def _tag(self, func, args, kwargs, inputs, on_device, out):
        """`out`, its provenance recorded (a copy where the CPU aliased what CUDA would copy)."""
        if func is torch.broadcast_tensors:  # views: each stays where its input is
            for src, view in zip(args, out):
                if isinstance(src, torch.Tensor):
                    self._set(view, self.of(src))
            return out
        if func in (T.to, T.cpu, T.cuda) or 'device' in kwargs:
            target = HOST if func is T.cpu else DEVICE if func is T.cuda else self._target(args, kwargs)
            where = self.of(target) if isinstance(target, torch.Tensor) else target
            if where == HOST and inputs and out is inputs[0] and self.of(out) == DEVICE:
                out = out.clone()  # on CUDA a new tensor on the host; the device one stays
        elif inputs and out is inputs[0]:  # in place, or a move that kept it: stays where it is
            return out
        elif func in FACTORIES_FROM_DATA and not (len(args) and isinstance(args[0], torch.Tensor)):
            where = HOST  # torch.tensor([...]) is made on the host whatever its values
        else:
            where = DEVICE if on_device else HOST
        if where is None:  # .to(dtype): stays where its input is
            where = DEVICE if on_device else HOST
        tree_map_only(torch.Tensor, lambda t: self._set(t, where), out)
        return out

    def __enter__(self):
        super().__enter__()
        return self
