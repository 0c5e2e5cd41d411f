"""The scripts of `--prune-attn-unit head` (issue 31): latency_table.py times head counts,
benchmark.py times head and head_dim cuts side by side, compare_methods.sh has DAP's whole-heads
rows and compare_summary.py names them."""
import json
import re
import shlex
import subprocess
import sys

import pytest

import main
from conftest import REPO, check_ok, cli_env
from pruning.cost import LatencyTable
from pruning.random_scores import random_cut
from test_reliability import one_line, script
from train.check_args import check_args

sys.path.insert(0, f'{REPO}/scripts')
import compare_summary  # noqa: E402

H = 4  # the micro model's heads
MICRO = ['--model', 'deit_micro_patch4_32', '--num-classes', '10']


@pytest.fixture(scope='module')
def head_table(tmp_path_factory):
    """A latency table of the micro model over head counts (--attn-unit head): (path, stdout)."""
    tmp = tmp_path_factory.mktemp('head_table')
    path = tmp / 'heads.json'
    proc = subprocess.run([sys.executable, 'scripts/latency_table.py', *MICRO, '--batch-size', '4',
                           '--device', 'cpu', '--points', '2', '--iters', '1', '--warmup', '0',
                           '--check-ratios', '0.5', '--attn-unit', 'head', '--out', str(path)],
                          cwd=REPO, env=cli_env(tmp), capture_output=True, text=True, timeout=300)
    check_ok(proc)
    return path, proc.stdout


def test_a_head_table_times_every_head_count_at_the_full_head_dim_and_a_cut_of_heads_uses_it(head_table):
    path, stdout = head_table
    table = LatencyTable.load(str(path))
    assert table.attn_unit == 'head' == LatencyTable.attn_unit_of(table.table)
    assert list(table.table['attn']['axes']) == ['d_in', 'heads', 'd_out']
    assert table.table['attn']['axes']['heads'] == list(range(1, H + 1))
    # checked against a random cut of whole heads, as the table will be used
    assert [c['model'] for c in table.table['check']] == ['dense', 'cut pr 0.5 (params)']
    assert 'predicted ms' in stdout
    dense, cut = random_cut('deit_micro_patch4_32', 0.5, 10, 32, budget='latency', latency_table=str(path),
                            attn_unit='head')
    blocks = [b['attn'] for b in cut.arch()['blocks'] if b['attn'] is not None]
    assert all(a['head_dim'] == dense.embed_dim // H for a in blocks)  # whole heads
    assert table.predict_ms(cut) < table.predict_ms(dense)


def test_a_head_dim_table_is_refused_for_a_cut_of_heads_in_one_line(head_table, tmp_path):
    """The same grid relabelled as head_dim widths: a table of the other unit, refused before
    anything is timed."""
    table = json.loads(head_table[0].read_text())
    axes = table['attn']['axes']
    table['attn']['axes'] = {'d_in': axes['d_in'], 'head_dim': [4, 8, 12, 16], 'd_out': axes['d_out']}
    other = tmp_path / 'head_dim.json'
    other.write_text(json.dumps(table))
    assert LatencyTable.load(str(other)).attn_unit == 'head_dim'
    one_line(script('benchmark.py', *MICRO, '--prune-budget', 'latency', '--latency-table', other,
                    '--prune-attn-unit', 'head', tmp_path=tmp_path),
             r'^error: \S+head_dim.json times attention by head_dim .*--prune-attn-unit head needs a table '
             r'made with --attn-unit head$', status=1)


def test_benchmark_times_head_and_head_dim_cuts_side_by_side(tmp_path):
    """Several ratios and units: each cut a row of the table and of the JSON, with its measured
    latency ratio and its share of the FLOPs-ideal speed-up."""
    out = tmp_path / 'b.json'
    proc = script('benchmark.py', *MICRO, '--batch-size', '4', '--iters', '1', '--warmup', '0',
                  '--prune-ratio', '0.5', '0.75', '--prune-attn-unit', 'head_dim', 'head', '--json', out,
                  tmp_path=tmp_path)
    check_ok(proc)
    res = json.loads(out.read_text())
    names = [f'cut pr {pr}, {unit}' for pr in (0.5, 0.75) for unit in ('head_dim', 'head')]
    assert res['cuts'] == names and 'latency_ratio' not in res
    for name in names:
        r = res[name]
        assert r['latency_ratio'] == pytest.approx(r['latency_ms_per_batch'] / res['dense']['latency_ms_per_batch'])
        assert r['speedup_vs_ideal'] == pytest.approx(r['speedup'] / r['flops_ideal_speedup'])
        assert r['flops_ideal_speedup'] > 1 and r['attn_unit'] in name and str(r['prune_ratio']) in name
    assert res['cut pr 0.75, head']['params'] < res['cut pr 0.5, head']['params']
    table = proc.stdout[proc.stdout.index('cut / dense'):].splitlines()
    assert re.split(r'\s{2,}', table[0]) == ['cut / dense', 'latency', 'FLOPs', 'params', 'speedup',
                                             'FLOPs-ideal', 'of ideal']
    assert [line[:len(n)] for line, n in zip(table[1:], names)] == names


@pytest.mark.parametrize('flags,pattern', [
    (['--prune-ratio', '0.5', '0.75', '--onnx'], r'^error: --onnx measures one cut: give one --prune-ratio'),
    (['--prune-attn-unit', 'head_dim', 'head', '--align', '8'], r'^error: --align measures one cut'),
    (['--prune-method', 'savit', '--prune-attn-unit', 'head'], r'^error: --prune-attn-unit sets the random DAP cut'),
    (['--prune-ratio', '0.5', '1.5'], r'^error: --prune-ratio must be in \(0, 1\), got 1.5$'),
])
def test_benchmark_refuses_what_several_cuts_cannot_do_in_one_line(flags, pattern, tmp_path):
    one_line(script('benchmark.py', *MICRO, *flags, tmp_path=tmp_path), pattern, status=1)


def compare_methods_rows():
    """{method: its main.py flags} of scripts/compare_methods.sh, and its default METHODS."""
    with open(f'{REPO}/scripts/compare_methods.sh') as f:
        text = f.read()
    schedule = re.search(r'^DAP_SCHEDULE="([^"]*)"', text, re.M).group(1)
    extra = {m: shlex.split(f.replace('$DAP_SCHEDULE', schedule).replace('$OUT', '/out'))
             for m, f in re.findall(r'^\s*\[(\w+)\]="([^"]*)"', text, re.M)}
    methods = re.search(r'^METHODS=\$\{METHODS:-([^}]*)\}', text, re.M).group(1).split()
    return extra, methods


def test_compare_methods_has_dap_cutting_whole_heads_and_every_row_has_a_name():
    extra, methods = compare_methods_rows()
    assert 'block_pr_head' in methods and set(methods) <= set(extra) <= set(compare_summary.NAMES)
    parser = main.ArgumentParser('t', parents=[main.get_args_parser()])
    for method in ('block_pr', 'block_pr_head'):
        args = check_args(parser.parse_args(['--model', 'deit_micro12_patch4_32', '--prune-ratio', '0.75',
                                             *extra[method]]))
        assert args.prune_attn_unit == ('head' if method == 'block_pr_head' else 'head_dim')


def test_compare_summary_prints_the_whole_heads_rows_with_their_latency(tmp_path, capsys):
    for seed, latency in enumerate((0.30, 0.40)):
        run = tmp_path / f'seed{seed}' / 'block_pr_head_pr0.75'
        (run / 'prune').mkdir(parents=True)
        (run / 'finetune').mkdir()
        (run / 'prune' / 'pruning_log.jsonl').write_text(json.dumps(
            {'event': 'finalize', 'params_cut': 250, 'params_dense': 1000,
             'sub_blocks': [{'sub_block': 'attn0', 'keep_ratio': 0.5}]}) + '\n')
        for part, acc in (('prune', 60.0), ('finetune', 70.0)):
            (run / part / 'log.txt').write_text(json.dumps({'epoch': 0, 'test_acc1': acc + seed}) + '\n')
        (run / 'latency.json').write_text(json.dumps({'latency_ratio': latency}))
    compare_summary.main([str(tmp_path), '--markdown'])
    rows = {line.split('|')[1].strip(): [c.strip() for c in line.split('|')[2:-1]]
            for line in capsys.readouterr().out.splitlines() if line.startswith('| ')}
    assert rows['DAP, whole heads (--prune-attn-unit head)'] == ['0.75', '2', '250', '0.350 ± 0.071',
                                                                  '60.5 ± 0.7', '70.5 ± 0.7']
