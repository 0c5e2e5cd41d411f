"""The one shape of every pruning method: what a training loop and main.py use of a pruner.

    pruner = SomePruner(model, num_classes, config, schedule)   # attaches its gates
    net = pruner.module                  # forward(x) -> (logits, aux); wrap it in DDP
    optimizer = AdamW(network params + pruner.param_groups(lr, weight_decay))
    for x, y in batches:
        logits, aux = net(x)
        loss = criterion(logits, y) + pruner.aux_loss(aux, y, criterion)
        loss.backward()
        if not pruner.one_shot:
            optimizer.step()
        pruner.step()                    # after the optimizer step, before zero_grad
        optimizer.zero_grad()
    cut, rows = pruner.finalize()        # the dense, smaller ViT and one row per sub-block

A pruner's records (returned by `step`, and passed to `on_update`) are plain dicts for
pruning_log.jsonl that also carry the scalars they want in TensorBoard (`Record.scalars`).
"""
import abc
import dataclasses
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn


class ConfigError(ValueError):
    """A pruning configuration value out of range. `field` names the config field, so that a
    command line can name its own flag (the library does not know the flags)."""

    def __init__(self, field: str, reason: str):
        super().__init__(f'{field} {reason}')
        self.field, self.reason = field, reason


def setting(default=dataclasses.MISSING, *, flag: str, help: Optional[str] = None, kind: str = 'text',
            choices: Optional[Sequence] = None, default_factory=dataclasses.MISSING,
            flag_default=dataclasses.MISSING):
    """A configuration field that a command line sets, declared once: the dataclass field with its
    default, and in its metadata the flag's name, help and `kind` of value ('int', 'real',
    'switch', 'numbers', ...; train/methods/registry.py turns a kind into an argparse argument,
    the library knows no argparse). The flag defaults to the field's default, or to
    `flag_default`, a value only the command line resolves (such as 'auto')."""
    metadata = {'flag': flag, 'help': help, 'kind': kind, 'choices': choices}
    if flag_default is not dataclasses.MISSING:
        metadata['flag_default'] = flag_default
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


class Record(dict):
    """One log record: its items go to pruning_log.jsonl, `scalars` to TensorBoard."""

    def __init__(self, data: dict, scalars: Optional[Dict[str, float]] = None):
        super().__init__(data)
        self.scalars = dict(scalars or {})


class PrunerModule(nn.Module):
    """The gated model together with the pruner's trained auxiliary modules, one module for DDP
    (their gradients are all-reduced like any other). forward(x) -> (logits, aux): with
    `aux_heads`, aux = aux_heads(residual stream x_0 … x_{2L}); without, aux is None."""

    def __init__(self, model: nn.Module, aux_heads: Optional[nn.Module] = None):
        super().__init__()
        self.model = model
        self.aux_heads = aux_heads

    def forward(self, x):
        if self.aux_heads is None:
            return self.model(x), None
        logits, stream = self.model.forward_stream(x)
        return logits, self.aux_heads(stream)

    def forward_eval(self, x):
        """(logits, {name: logits}) of the auxiliary classifiers that evaluation reports
        (`acc1_<name>`); only those run (`aux_heads.forward_eval(stream)`)."""
        if self.aux_heads is None:
            return self.model(x), {}
        logits, stream = self.model.forward_stream(x)
        return logits, self.aux_heads.forward_eval(stream)


class Pruner(abc.ABC):
    """The pruner protocol, with the defaults of a method that needs nothing more."""
    module: PrunerModule               # forward(x) -> (logits, aux); forward_eval(x) for evaluate
    schedule: Optional['PruneSchedule']  # schedule.py: when the cut comes (`finalize_epoch`); None for one-shot
    one_shot: bool = False            # scores without weight updates, then the cut (SaViT)
    follows_lr_schedule: bool = False  # the backbone keeps DeiT's schedule while pruning
    on_update: Optional[Callable[[Record], None]] = None
    final_budget: Optional[dict] = None  # after finalize: the budget's unit and totals, if not params alone

    def param_groups(self, lr: float, weight_decay: float) -> List[dict]:
        """The pruner's own trained parameters, for the training optimizer (`lr` is the
        backbone's; a pruner may set its own)."""
        return []

    def aux_loss(self, aux, targets, criterion) -> torch.Tensor:
        """What the pruner adds to the training loss."""
        return torch.zeros((), device=targets.device)

    @abc.abstractmethod
    def step(self, grad_scale: float = 1.0) -> Optional[Record]:
        """After each optimizer step, with the gate gradients still there (`grad_scale` undoes
        AMP's loss scaling). Returns a record when there is one to log."""

    @abc.abstractmethod
    def finalize(self) -> Tuple[nn.Module, List[dict]]:
        """Binary masks, the physical cut; (cut model, one summary row per sub-block)."""

    def score_batches(self, batches_per_epoch: int) -> int:
        """One-shot pruners: the training batches to score on."""
        raise NotImplementedError

    def calibrate(self, batches: Iterable, criterion) -> None:
        """One-shot pruners: a further look at a few batches after scoring (a no-op here)."""

    def emit(self, record: Record) -> Record:
        if self.on_update is not None:
            self.on_update(record)
        return record

    @abc.abstractmethod
    def state_dict(self) -> dict:
        ...

    @abc.abstractmethod
    def load_state_dict(self, sd: dict) -> None:
        ...


def summary_row(name: str, dense: int, kept: int, goal: Optional[float] = None,
                unit: str = 'params', dense_cost: Optional[float] = None,
                kept_cost: Optional[float] = None) -> dict:
    """One row of the finalize table (`format_summary`): a sub-block's dense and kept params,
    and with a budget in another `unit` its dense and kept cost in it; κ is in the unit."""
    dense_cost = dense if dense_cost is None else dense_cost
    kept_cost = kept if kept_cost is None else kept_cost
    return {'sub_block': name, 'dense_params': dense, 'kept_params': kept, 'goal_keep_ratio': goal,
            'budget': unit, 'dense_cost': dense_cost, 'kept_cost': kept_cost,
            'keep_ratio': kept_cost / dense_cost, 'skipped': kept == 0}


UNIT_LABELS = {'params': 'params', 'flops': 'MFLOPs', 'latency': 'ms/batch'}
UNIT_SCALES = {'params': 1, 'flops': 1e-6, 'latency': 1}


def format_summary(rows: List[dict], flops_before: float, flops_after: float,
                   params_before: int, params_after: int, budget: Optional[dict] = None) -> str:
    """The table printed at finalize: per sub-block (any pruner's rows), then totals; a
    budget in another unit than params (`DepthAwarePruner.budget_report`) adds its columns
    and its totals, and κ is then in that unit."""
    unit = budget['budget'] if budget else 'params'
    extra = unit != 'params'
    label, scale = UNIT_LABELS[unit], UNIT_SCALES[unit]
    head = f'{"dense " + label:>16}{"kept " + label:>16}' if extra else ''
    lines = [f'{"sub-block":<10}{"dense":>12}{"kept":>12}{head}{"goal κ":>9}{"κ":>8}  skipped']
    for r in rows:
        goal = f'{r["goal_keep_ratio"]:>9.3f}' if r.get('goal_keep_ratio') is not None else f'{"–":>9}'
        cost = f'{r["dense_cost"] * scale:>16,.2f}{r["kept_cost"] * scale:>16,.2f}' if extra else ''
        lines.append(f'{r["sub_block"]:<10}{r["dense_params"]:>12,}{r["kept_params"]:>12,}{cost}'
                     f'{goal}{r["keep_ratio"]:>8.3f}  {"yes" if r["skipped"] else ""}')
    lines.append(f'params: {params_before:,} -> {params_after:,} ({params_after / params_before:.3f}); '
                 f'FLOPs: {flops_before / 1e6:,.1f}M -> {flops_after / 1e6:,.1f}M '
                 f'({flops_after / flops_before:.3f})')
    if budget:
        d, t, k = (budget[key] * scale for key in ('total_dense_cost', 'target_total_cost', 'total_kept_cost'))
        lines.append(f'budget in {unit} ({label}): {d:,.2f} -> {k:,.2f} ({k / d:.3f}); target {t:,.2f} ({t / d:.3f})')
    return '\n'.join(lines)
