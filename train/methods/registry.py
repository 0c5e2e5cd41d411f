"""The table of pruning methods: --prune-method NAME -> the one Family that declares it.

A family (DAP with its budget ablations, WD-Prune, SaViT) is declared once, in its own module,
by `register(Family(...))`: its pruner class and the dataclasses of its settings. A setting is
declared once, as a field of such a dataclass (`pruning.setting`: default, flag, help, kind).
Everything else here is derived from those declarations: the family's flags, its configuration
and schedule from the parsed flags (`from_args`), the `--prune-method` choices, the refusal of
a family's flags under another method (a flag is given when its value differs from its
default), and the flag a `ConfigError(field, reason)` is reported under.
"""
import argparse
import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

from pruning import ConfigError
from train.flags import Flatten, format_gate_scale, gate_scale, numbers, real, steps_or_auto
from errors import UsageError

# the flags every method reads, and the configuration fields they set
COMMON_FIELDS = {'prune_ratio': '--prune-ratio', 'finalize_epoch': '--prune-finalize-epoch',
                 'block_params_only': '--prune-rate-by-block-param-only', 'method': '--prune-method'}

# a setting's kind (pruning.setting) -> how its flag parses
KINDS = {'text': {}, 'file': {'metavar': 'FILE'}, 'int': {'type': int}, 'real': {'type': real},
         'switch': {'action': 'store_true'}, 'steps_or_auto': {'type': steps_or_auto},
         'ints': {'type': int, 'nargs': '*'},
         'numbers': {'type': numbers, 'nargs': '+', 'action': Flatten},  # spaces or commas between
         'gate_scale': {'type': gate_scale}}
# how a kind's default is written for its flag (argparse parses a text default like a value given)
FLAG_DEFAULTS = {'ints': list, 'gate_scale': format_gate_scale}


def settings_of(cls) -> List[dataclasses.Field]:
    """The fields of a configuration dataclass that are flags (`pruning.setting`)."""
    return [f for f in dataclasses.fields(cls) if 'flag' in f.metadata]


def dest_of(flag: str) -> str:
    return flag.lstrip('-').replace('-', '_')


def add_setting(group, f: dataclasses.Field):
    """A setting's flag: parsed as its kind says, defaulting to the field's default."""
    meta = f.metadata
    value = meta.get('flag_default', field_default(f))
    if meta['kind'] in FLAG_DEFAULTS:
        value = FLAG_DEFAULTS[meta['kind']](value)
    choices = {} if meta['choices'] is None else {'choices': meta['choices']}
    group.add_argument(meta['flag'], default=value, help=meta['help'], **choices, **KINDS[meta['kind']])


def from_args(cls, args, **given):
    """A configuration or schedule dataclass from the parsed command line: each setting from its
    flag, each of COMMON_FIELDS from the common flag, `given` for values computed otherwise."""
    values = {}
    for f in dataclasses.fields(cls):
        flag = f.metadata.get('flag', COMMON_FIELDS.get(f.name))
        if flag is not None and f.name not in given:
            values[f.name] = getattr(args, dest_of(flag))
    return cls(**values, **given)


@dataclass(frozen=True)
class Family:
    methods: Tuple[str, ...]   # the --prune-method names it serves
    title: str                 # its group in --help
    settings: Sequence[type]   # the dataclasses whose settings are the family's flags, in --help order
    config: Callable           # args -> the pruner's configuration (ConfigError on a bad value)
    schedule: Callable         # (args, steps_per_epoch) -> pruning.PruneSchedule
    pruner: type               # (model, num_classes, config, schedule) -> a pruning.Pruner
    # a field computed from another flag than its own -> that flag (for ConfigError)
    fields: Dict[str, str] = dataclasses.field(default_factory=dict)

    def add_flags(self, group):
        for cls in self.settings:
            for f in settings_of(cls):
                add_setting(group, f)

    def own_flags(self) -> List[Tuple[str, str, object]]:
        """(dest, flag, default) of each of the family's flags, read from a parser that holds
        only them (the default as parsed, so that a typed default compares with a value)."""
        parser = argparse.ArgumentParser(add_help=False)
        self.add_flags(parser.add_argument_group(self.title))
        defaults = vars(parser.parse_args([]))
        # argparse lists its actions only in this attribute
        return [(a.dest, a.option_strings[0], defaults[a.dest]) for a in parser._actions]

    def flag_of(self, field: str) -> str:
        declared = {f.name: f.metadata['flag'] for cls in self.settings for f in settings_of(cls)}
        return {**COMMON_FIELDS, **declared, **self.fields}.get(field, field)


def field_default(f: dataclasses.Field):
    """A field's default: the flag that sets it defaults to it (one default per setting)."""
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


FAMILIES: List[Family] = []


def register(family: Family) -> Family:
    taken = [m for m in family.methods if m in methods()]
    if taken:
        raise ValueError(f'--prune-method {taken[0]} is registered already')
    FAMILIES.append(family)
    return family


def methods() -> Dict[str, Family]:
    return {name: f for f in FAMILIES for name in f.methods}


def family_of(method: str) -> Family:
    return methods()[method]


def prune_method(text):
    """--prune-method's type: a registered name, or none."""
    if text.lower() == 'none':
        return None
    if text not in methods():
        raise argparse.ArgumentTypeError(f'unknown method {text!r}; choose from {", ".join(methods())} or none')
    return text


def add_flags(parser):
    """The pruning flags: those every method reads, then each family's group."""
    group = parser.add_argument_group('Pruning (METHOD.md, docs/BASELINES.md)')
    group.add_argument('--prune-method', default=None, type=prune_method,
                       help=f'{" / ".join(methods())}, or none to fine-tune: block_pr is Depth Aware '
                            'Pruning, uniform and global its ablations, the others baselines')
    group.add_argument('--prune-ratio', default=0.5, type=real,
                       help='fraction of the parameters to remove')
    group.add_argument('--prune-finalize-epoch', default=None, type=int,
                       help='epoch after which masks are binarised and the model cut (default: --epochs)')
    group.add_argument('--prune-rate-by-block-param-only', action='store_true',
                       help='the prune ratio counts block parameters only')
    for family in FAMILIES:
        family.add_flags(parser.add_argument_group(family.title))


def check_flags(args):
    """A flag of one family given under another method is refused: it would be ignored."""
    for family in FAMILIES:
        if args.prune_method in family.methods:
            continue
        for dest, flag, default in family.own_flags():
            if getattr(args, dest) != default:
                raise UsageError(f'{flag} belongs to --prune-method {" / ".join(family.methods)}, '
                                 f'not {args.prune_method or "none"}')


def usage_error(family: Family, e: ConfigError) -> UsageError:
    return UsageError(f'{family.flag_of(e.field)} {e.reason}')


def check_config(args):
    """Every range a configuration and schedule check, with no model or data yet."""
    family = family_of(args.prune_method)
    try:
        family.config(args)
        family.schedule(args, 1)
    except ConfigError as e:
        raise usage_error(family, e) from None


def build_pruner(args, model, num_classes: int, steps_per_epoch: int):
    family = family_of(args.prune_method)
    try:
        return family.pruner(model, num_classes, family.config(args), family.schedule(args, steps_per_epoch))
    except ConfigError as e:
        raise usage_error(family, e) from None


def keeps_lr_constant(method) -> bool:
    """A pruning run whose backbone learning rate stays constant (METHOD.md §6): while pruning and,
    after a cut before --epochs, until the run ends (resumed or not)."""
    return method is not None and not family_of(method).pruner.follows_lr_schedule
