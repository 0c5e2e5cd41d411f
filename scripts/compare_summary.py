"""The table and the κ figure of scripts/compare_methods.sh, from the runs' logs.

    python scripts/compare_summary.py OUTPUT_DIR [--markdown] [--figure fig/compare_keep_ratio.png]

Per method and prune ratio, over the seeds (OUTPUT_DIR/seed*/): kept parameters, the cut
model's measured latency as a share of the dense model's (`latency.json` of scripts/benchmark.py,
where the run has one), top-1 of the cut model right after pruning (before fine-tuning) and
top-1 at the last fine-tuning epoch, each as mean ± std; the dense row is the dense model fine-tuned for as many epochs in all.
The figure shows the keep ratio κ each method gave each sub-block (mean over seeds), read from
the `finalize` record of every pruning run's pruning_log.jsonl.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

# common first: it puts the repository root on sys.path
from common import is_number, line_of, mask_updates, numeric_rows, prepare_out
from errors import UsageError
from utils import read_log

NAMES = {'block_pr': 'DAP', 'block_pr_cumulative': 'DAP, cumulative Taylor',
         'block_pr_train_gates': 'DAP, gates trained (authors)',
         'block_pr_latency': 'DAP, latency budget',
         'block_pr_distill': 'DAP, dense model as teacher (soft)',
         'block_pr_head': 'DAP, whole heads (--prune-attn-unit head)',
         'uniform': 'DAP, uniform κ', 'global': 'DAP, global threshold',
         'wdprune': 'WD-Prune', 'savit': 'SaViT'}


def last_acc(log_txt: Path):
    """test_acc1 of the last epoch in a log.txt, or None; UsageError if one is not a number."""
    if not log_txt.is_file():
        return None
    rows = numeric_rows(log_txt, ('test_acc1',))
    return rows[-1]['test_acc1'] if rows else None


def latency_ratio(run: Path):
    """Measured cut / dense latency of the run's cut model, or None."""
    path = run / 'latency.json'
    if not path.is_file():
        return None
    try:
        ratio = json.loads(path.read_text())['latency_ratio']
    except (OSError, ValueError, RecursionError, KeyError, TypeError):
        print(f'warning: {path} holds no latency_ratio; left out', file=sys.stderr)
        return None
    return ratio if isinstance(ratio, (int, float)) else None


def bad_finalize(record):
    """Whether a finalize record lacks the numbers collect() reads."""
    rows = record.get('sub_blocks')
    return (record.get('event') == 'finalize'
            and not (is_number(record.get('params_cut')) and is_number(record.get('params_dense'))
                     and isinstance(rows, list) and rows
                     and all(isinstance(r, dict) and isinstance(r.get('sub_block'), str)
                             and is_number(r.get('keep_ratio')) for r in rows)))


def finalize_record(run: Path):
    """The last finalize record of the run's pruning_log.jsonl, or None; UsageError naming the
    line of a finalize record without the numbers collect() reads."""
    path = run / 'prune' / 'pruning_log.jsonl'
    if not path.is_file():
        return None
    records = [r for r in read_log(path) if r.get('event') == 'finalize']
    if any(bad_finalize(r) for r in records):
        raise UsageError(f'{path} line {line_of(path, bad_finalize)}: a finalize record without numbers in '
                         'params_cut, params_dense and sub_blocks (sub_block, keep_ratio)')
    return records[-1] if records else None


def run_key(run: Path):
    """(method, prune ratio) of a run folder named METHOD_prRATIO, as compare_methods.sh names
    them; None, with a warning, for another folder (a backup such as block_pr_pr0.5_old)."""
    method, _, pr = run.name.rpartition('_pr')
    try:
        ratio = float(pr)
    except ValueError:
        ratio = None
    if method in NAMES and ratio is not None and 0 < ratio < 1:
        return method, ratio
    print(f'warning: {run} is not named METHOD_prRATIO (METHOD one of {", ".join(NAMES)}, RATIO in (0, 1)): '
          'skipped', file=sys.stderr)
    return None


def collect(out: Path):
    """{(method, pr): [per-seed dict]} and the dense runs' accuracies."""
    runs, dense = {}, []
    for seed_dir in sorted(out.glob('seed*')):
        acc = last_acc(seed_dir / 'dense' / 'log.txt')
        if acc is not None:
            dense.append(acc)
        for run in sorted(seed_dir.glob('*_pr*')):
            key = run_key(run) if run.is_dir() else None
            if key is None:
                continue
            final, tuned = finalize_record(run), last_acc(run / 'finetune' / 'log.txt')
            if final is None or tuned is None:
                continue
            runs.setdefault(key, []).append({
                'seed': seed_dir.name, 'cut': last_acc(run / 'prune' / 'log.txt'), 'tuned': tuned,
                'params': final['params_cut'], 'params_dense': final['params_dense'],
                'latency': latency_ratio(run),
                'kappa': [r['keep_ratio'] for r in final['sub_blocks'] if r['sub_block'] != 'embed'],
                'names': [r['sub_block'] for r in final['sub_blocks'] if r['sub_block'] != 'embed']})
    return runs, dense


def mean_std(values, digits=1):
    values = [v for v in values if v is not None]
    if not values:
        return '–'
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f'{statistics.mean(values):.{digits}f} ± {std:.{digits}f}'


def table(runs, dense):
    header = ('method', 'pr', 'seeds', 'params', 'latency / dense', 'top-1 cut', 'top-1 fine-tuned')
    rows = [('dense, fine-tuned', '–', str(len(dense)), '', '1', '–', mean_std(dense))]
    for method in NAMES:
        for (m, pr), seeds in sorted(runs.items()):
            if m == method:
                params = statistics.mean(s['params'] for s in seeds)
                rows.append((NAMES[m], f'{pr:.2f}', str(len(seeds)), f'{params:,.0f}',
                             mean_std([s['latency'] for s in seeds], 3),
                             mean_std([s['cut'] for s in seeds]), mean_std([s['tuned'] for s in seeds])))
    if runs:
        first = next(iter(runs.values()))[0]
        rows[0] = rows[0][:3] + (f'{first["params_dense"]:,}',) + rows[0][4:]
    return header, rows


def plot(runs, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    ratios = sorted({pr for _, pr in runs})
    fig, axes = plt.subplots(len(ratios), 1, figsize=(11, 3.2 * len(ratios)), squeeze=False)
    for ax, pr in zip(axes[:, 0], ratios):
        for method, name in NAMES.items():
            seeds = runs.get((method, pr))
            if not seeds:
                continue
            n = len(seeds[0]['kappa'])
            kappa = [statistics.mean(s['kappa'][i] for s in seeds) for i in range(n)]
            ax.plot(range(n), kappa, marker='o', ms=3, label=name)
        names = next(s for (m, p), s in runs.items() if p == pr)[0]['names']
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.replace('attn', 'A').replace('mlp', 'M') for n in names], fontsize=7)
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel('κ (kept / dense)')
        ax.set_title(f'keep ratio per sub-block, pr = {pr} (mean over seeds)', fontsize=10)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=3)
    axes[-1, 0].set_xlabel('sub-block (A = attention, M = MLP, by layer)')
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def plot_over_time(out: Path, path, run='block_pr_pr0.5'):
    """DAP's signals over the pruning run (first seed): the class-token ΔΨ^c of every sub-block
    at each mask update, and the goal κ §4 gave it."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    log = next(iter(sorted(out.glob(f'seed*/{run}/prune/pruning_log.jsonl'))), None)
    if log is None:
        return None
    updates = mask_updates(log, ('epoch', 'delta_psi_cls', 'goal_keep_ratio'))
    if not updates:
        return None
    epochs = [r['epoch'] for r in updates]
    n = len(updates[0]['goal_keep_ratio'])
    fig, axes = plt.subplots(2, 2, figsize=(11, 6), sharex=True)
    for col, kind in enumerate(('attention', 'MLP')):
        for i in range(col, n, 2):
            color = plt.cm.viridis(i / max(n - 1, 1))
            axes[0, col].plot(epochs, [r['delta_psi_cls'][i] for r in updates], color=color, lw=1)
            axes[1, col].plot(epochs, [r['goal_keep_ratio'][i] for r in updates], color=color, lw=1,
                              label=f'layer {i // 2}' if i // 2 in (0, n // 4, n // 2 - 1) else None)
        axes[0, col].set_title(f'{kind} sub-blocks: ΔΨ^c of the window (dark: shallow, light: deep)', fontsize=9)
        axes[0, col].axhline(0, color='k', lw=0.5)
        axes[1, col].set_ylabel('goal κ')
        axes[1, col].set_xlabel('epoch')
        axes[1, col].legend(fontsize=7)
    fig.suptitle(f'DAP, {log.parent.parent.name} ({log.parts[-4]}): the signals at every mask update', fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('out', nargs='?', default='output/compare')
    parser.add_argument('--markdown', action='store_true')
    parser.add_argument('--figure', default=None, help='write the κ figure here')
    parser.add_argument('--figure-dap', default=None, help='write DAP\'s ΔΨ and κ over time here')
    args = parser.parse_args(argv)
    if not Path(args.out).is_dir():
        sys.exit(f'error: {args.out} is not a folder of runs (scripts/compare_methods.sh writes output/compare)')
    try:
        for flag, path in (('--figure', args.figure), ('--figure-dap', args.figure_dap)):
            if path:
                prepare_out(path, flag)
        runs, dense = collect(Path(args.out))
        dap_figure = args.figure_dap and plot_over_time(Path(args.out), args.figure_dap)
    except UsageError as e:
        sys.exit(f'error: {e}')
    header, rows = table(runs, dense)
    if args.markdown:
        print('| ' + ' | '.join(header) + ' |\n|' + '---|' * len(header))
        print('\n'.join('| ' + ' | '.join(r) + ' |' for r in rows))
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        for r in [header] + rows:
            print('  '.join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    if args.figure and runs:
        plot(runs, args.figure)
        print(f'figure: {args.figure}')
    if dap_figure:
        print(f'figure: {args.figure_dap}')


if __name__ == '__main__':
    main()
