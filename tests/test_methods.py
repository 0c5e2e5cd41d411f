"""The method registry (train/methods/): a method is one declaration, and everything the command
line does with its flags is derived from it."""
import argparse
import dataclasses
import sys

import pytest
import torch

import main
from conftest import check_ok, run_cli
from pruning import ConfigError, DepthAwarePruner, PruneConfig, PruneSchedule, SaViTConfig, WDPruneConfig, setting
from train.flags import real
from train.methods import registry
from train.check_args import check_args
from errors import UsageError

MICRO = ['--model', 'deit_micro_patch4_32', '--device', 'cpu']


def parse(argv):
    return main.ArgumentParser('t', parents=[main.get_args_parser()]).parse_args([*MICRO, *map(str, argv)])


def actions(family):
    parser = argparse.ArgumentParser(add_help=False)
    family.add_flags(parser.add_argument_group(family.title))
    return parser._actions


def other_value(action):
    """Command-line words that give `action` a value other than its default."""
    if action.nargs == 0:
        return []
    if action.choices:
        return [next(c for c in action.choices if c != action.default)]
    if action.dest == 'prune_scale_gate_imp':
        return ['attn_out:2']
    if action.nargs in ('+', '*'):
        return ['2']
    if isinstance(action.default, (int, float)) and not isinstance(action.default, bool):
        return [str(action.default * 2 + 1)]
    return ['3']


FLAGS = [(family, action) for family in registry.FAMILIES for action in actions(family)]


def test_every_family_declares_flags_and_the_registry_serves_each_name_once():
    assert [f.methods for f in registry.FAMILIES] == [('block_pr', 'uniform', 'global'), ('wdprune',), ('savit',)]
    assert len(FLAGS) >= 25  # about 30 method flags, none of them kept in a list by hand
    with pytest.raises(ValueError, match='block_pr is registered already'):
        registry.register(registry.FAMILIES[0])


@pytest.mark.parametrize('family,action', FLAGS, ids=[a.option_strings[0] for _, a in FLAGS])
def test_a_method_flag_given_under_another_method_is_refused(family, action):
    flag = action.option_strings[0]
    for method in [None, *(m for m in registry.methods() if m not in family.methods)]:
        args = parse([*(['--prune-method', method] if method else []), flag, *other_value(action)])
        assert getattr(args, action.dest) != action.default
        with pytest.raises(UsageError) as e:
            check_args(args)
        assert str(e.value) == f'{flag} belongs to --prune-method {" / ".join(family.methods)}, ' \
                               f'not {method or "none"}'
    # and its own method takes it (or names the flag of the value it refuses)
    args = parse(['--prune-method', family.methods[0], flag, *other_value(action)])
    try:
        check_args(args)
    except UsageError as e:
        assert str(e).startswith(flag), e


@pytest.mark.parametrize('method,expected', [
    ('block_pr', PruneConfig(prune_ratio=0.5)),
    ('uniform', PruneConfig(prune_ratio=0.5, method='uniform')),
    ('wdprune', WDPruneConfig(prune_ratio=0.5)),
    ('savit', SaViTConfig(prune_ratio=0.5)),
])
def test_a_flag_defaults_to_its_configuration_field(method, expected):
    """One default per setting: the flags' defaults build the library's default configuration."""
    args = check_args(parse(['--prune-method', method]))
    assert registry.family_of(method).config(args) == expected


@pytest.mark.parametrize('argv,message', [
    (['--prune-method', 'block_pr', '--pr-tau-min', '0.5'], '--pr-tau-min 0.5 is above the largest temperature'),
    (['--prune-method', 'block_pr', '--prune-round-to', '0'], '--prune-round-to must be at least 1'),
    (['--prune-method', 'uniform', '--prune-kr-handcraft', *['0.5'] * 8], "--prune-kr-handcraft replaces block_pr's"),
    (['--prune-method', 'wdprune', '--wdprune-lr', '-1'], '--wdprune-lr must not be negative'),
    (['--prune-method', 'wdprune', '--wdprune-lambda-lr', '-1'], '--wdprune-lambda-lr must not be negative'),
    (['--prune-method', 'savit', '--savit-population', '0'], '--savit-population must be at least 1'),
    (['--prune-method', 'savit', '--need-hessian', '--prune-ratio', '1.5'], '--prune-ratio must be in (0, 1)'),
])
def test_a_configuration_error_names_the_flag_of_its_own_method(argv, message):
    with pytest.raises(UsageError) as e:
        check_args(parse(argv))
    assert str(e.value).startswith(message), e.value


# ---- a setting declared once, in its configuration dataclass ---------------------------------
@dataclasses.dataclass
class PruneConfigPlus(PruneConfig):
    """PruneConfig with one more setting, declared as a new DAP setting is: one field."""
    beta: float = setting(0.25, flag='--pr-beta', kind='real', help='weight of a new term, in [0, 1]')

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.beta <= 1:
            raise ConfigError('beta', f'must be in [0, 1], got {self.beta}')


@pytest.fixture
def dap_plus(monkeypatch):
    """DAP with PruneConfigPlus in place of PruneConfig (what editing PruneConfig would do)."""
    dap = registry.family_of('block_pr')
    plus = dataclasses.replace(dap, settings=(PruneSchedule, PruneConfigPlus),
                               config=lambda args: registry.from_args(PruneConfigPlus, args))
    monkeypatch.setattr(registry, 'FAMILIES', [plus if f is dap else f for f in registry.FAMILIES])
    return plus


def test_a_new_dap_setting_gets_its_flag_value_and_error_name_from_its_field_alone(dap_plus):
    parser = main.ArgumentParser('t', parents=[main.get_args_parser()])
    group = next(g for g in parser._action_groups if g.title == dap_plus.title)
    action = next(a for a in group._group_actions if a.option_strings == ['--pr-beta'])
    assert (action.default, action.help, action.type) == (0.25, 'weight of a new term, in [0, 1]', real)
    config = lambda argv: registry.family_of(argv[1]).config(check_args(parse(argv)))  # noqa: E731
    assert config(['--prune-method', 'block_pr']).beta == 0.25
    plus = config(['--prune-method', 'uniform', '--pr-beta', '0.75'])
    assert isinstance(plus, PruneConfigPlus) and plus.beta == 0.75 and plus.method == 'uniform'
    with pytest.raises(UsageError, match=r'^--pr-beta must be in \[0, 1\], got 2.0$'):
        check_args(parse(['--prune-method', 'block_pr', '--pr-beta', '2']))
    with pytest.raises(UsageError, match=r'^--pr-beta belongs to --prune-method block_pr / uniform / global, '
                                         r'not savit$'):
        check_args(parse(['--prune-method', 'savit', '--pr-beta', '0.75']))


# ---- a method added by its own module and the registry alone ---------------------------------
@dataclasses.dataclass
class DummySettings:
    keep: float = setting(0.5, flag='--dummy-keep', kind='real', help='share of parameters kept')


def dummy_config(args):
    return PruneConfig(prune_ratio=1 - args.dummy_keep, method='uniform', round_to=1)


def dummy_schedule(args, steps_per_epoch):
    """Masks from the first step, 2 updates per epoch, sharp at the cut."""
    return PruneSchedule(steps_per_epoch=steps_per_epoch, start_epoch=0, sparse_epoch=args.prune_finalize_epoch,
                         finalize_epoch=args.prune_finalize_epoch, steps_update_mask=max(1, steps_per_epoch // 2))


DUMMY = registry.Family(methods=('dummy',), title='dummy', settings=(DummySettings,), config=dummy_config,
                        schedule=dummy_schedule, pruner=DepthAwarePruner, fields={'prune_ratio': '--dummy-keep'})


@pytest.fixture
def dummy(monkeypatch):
    monkeypatch.setattr(registry, 'FAMILIES', list(registry.FAMILIES))
    registry.register(DUMMY)


def test_a_registered_method_gets_its_flags_checks_and_a_run(dummy, tmp_path):
    with pytest.raises(UsageError, match=r'^--dummy-keep belongs to --prune-method dummy, not block_pr$'):
        check_args(parse(['--prune-method', 'block_pr', '--dummy-keep', '0.3']))
    with pytest.raises(UsageError, match=r'^--prune-kr-handcraft belongs to --prune-method block_pr / '
                                         r'uniform / global, not dummy$'):
        check_args(parse(['--prune-method', 'dummy', '--prune-kr-handcraft', *['0.5'] * 8]))
    with pytest.raises(UsageError, match=r'^--dummy-keep must be in \(0, 1\)'):  # prune_ratio = 1 - 2
        check_args(parse(['--prune-method', 'dummy', '--dummy-keep', '2']))
    # the run: main.py's command line in a process of its own, with the dummy registered there
    out = tmp_path / 'out'
    code = ('import sys; sys.path.insert(0, "tests"); import main, test_methods; '
            'from train.methods import registry; registry.register(test_methods.DUMMY); main.cli(sys.argv[2:])')  # -c main.py FLAGS
    argv = ['--input-size', '16', '--epochs', '1', '--prune-method', 'dummy', '--dummy-keep', '0.6',
            '--aa', 'none', '--print-freq', '1000', '--output_dir', out]
    check_ok(run_cli(argv, tmp_path, launcher=[sys.executable, '-c', code]))
    ckpt = torch.load(out / 'first_sparse_checkpoint.pth', weights_only=True)
    assert ckpt['summary']['method'] == 'dummy'
    assert ckpt['summary']['params_cut'] == pytest.approx(0.6 * ckpt['summary']['params_dense'], rel=0.01)
