"""Draw ΔΨ per block over training (the paper's Figure 1) from a run's pruning_log.jsonl.

Columns: Attention / MLP sub-blocks; rows: class-token ΔΨ^c / patch ΔΨ^p; x: block index;
one curve per chosen epoch, each divided by its largest magnitude (METHOD.md §3).

    python scripts/plot_block_performance.py OUTPUT_DIR/pruning_log.jsonl \
        --epochs 1 2 4 --out fig/BlockPerformance_overTrainingEpochs.png
"""
import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use('Agg')
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common import mask_updates, prepare_out  # noqa: E402  (first: it puts the repository root on sys.path)
from errors import UsageError  # noqa: E402


def read_updates(path):
    """DAP's mask-update records with a ΔΨ window (not the finalize summary); UsageError if
    one is malformed."""
    return [r for r in mask_updates(path) if r.get('window', 1) > 0]


def pick(updates, epochs, n_default=4):
    """The update nearest to each requested epoch, or n_default evenly spaced ones."""
    if not epochs:
        idx = np.unique(np.linspace(0, len(updates) - 1, min(n_default, len(updates))).round().astype(int))
        return [updates[i] for i in idx]
    return [min(updates, key=lambda r: abs(r['epoch'] - e)) for e in epochs]


def scaled(values):
    v = np.asarray(values, dtype=float)
    top = np.abs(v).max()
    return v / top if top > 0 else v


def plot(updates, out, title=None):
    fig, axes = plt.subplots(2, 2, figsize=(8, 5.5), sharex=True)
    cmap = plt.get_cmap('viridis')
    for j, r in enumerate(updates):
        color = cmap(j / max(len(updates) - 1, 1))
        for row, key in enumerate(('delta_psi_cls', 'delta_psi_patch')):
            v = np.asarray(r[key], dtype=float)
            for col in range(2):  # even indices: Attention, odd: MLP
                ax = axes[row, col]
                ax.plot(np.arange(len(v[col::2])), scaled(v[col::2]), marker='o', ms=3,
                        color=color, label=f'epoch {r["epoch"]:.1f}')
    for col, name in enumerate(('Attention', 'MLP')):
        axes[0, col].set_title(name)
        axes[1, col].set_xlabel('block index')
    axes[0, 0].set_ylabel('class token ΔΨ$^c$ (scaled)')
    axes[1, 0].set_ylabel('patches ΔΨ$^p$ (scaled)')
    for ax in axes.flat:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.axhline(0, color='grey', lw=0.5)
        ax.grid(alpha=0.3)
    axes[0, 1].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('log', help='pruning_log.jsonl of a pruning run')
    p.add_argument('--epochs', type=float, nargs='*', default=None,
                   help='epochs to draw (the nearest mask update each); default: 4 spread out')
    p.add_argument('--out', default='fig/BlockPerformance_overTrainingEpochs.png')
    p.add_argument('--title', default=None)
    args = p.parse_args(argv)
    if not Path(args.log).is_file():
        sys.exit(f'error: {args.log} does not exist')
    try:
        Path(args.log).read_text(encoding='utf-8')
    except UnicodeDecodeError as e:
        sys.exit(f'error: {args.log} is not UTF-8 text (byte {e.start}): not a pruning_log.jsonl')
    try:
        if any(not np.isfinite(e) for e in args.epochs or ()):
            raise UsageError(f'--epochs takes finite numbers, got {" ".join(map(str, args.epochs))}')
        prepare_out(args.out)
        updates = read_updates(args.log)
    except UsageError as e:
        sys.exit(f'error: {e}')
    if not updates:
        sys.exit(f'error: {args.log} has no mask update with ΔΨ (delta_psi_cls): not the pruning_log.jsonl '
                 'of a DAP run')
    chosen = pick(updates, args.epochs)
    plot(chosen, args.out, args.title)
    epochs = ', '.join(f'{r["epoch"]:.1f}' for r in chosen)
    print(f'wrote {args.out} ({len(chosen)} curves: epochs {epochs})')


if __name__ == '__main__':
    main()
