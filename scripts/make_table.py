"""The paper's table from the output directories of scripts/reproduce_table.sh.

    python scripts/make_table.py [ROOT]        (default output/table)

Each cell: our top-1 (best epoch of the run that yields the final model) beside the paper's,
then kept parameters and FLOPs per image; a run that is missing or unfinished shows "–".
Layout read: ROOT/DATASET/MODEL/deit/log.txt (unpruned) and
ROOT/DATASET/MODEL/METHOD_prPR/{prune/first_sparse_checkpoint.pth, finetune/log.txt}.
"""
import functools
import sys
from pathlib import Path

# common first: it puts the repository root on sys.path
from common import best_top1, is_number
from errors import UsageError
from train.checkpoints import load_checkpoint_file

DATASETS = ('IFOOD', 'INAT19')
RATIOS = (0.5, 0.75)
MODELS = (('deit_small_patch16_224', 'Deit-Small'), ('deit_tiny_patch16_224', 'Deit-Tiny'))
METHODS = (('deit', 'Deit'), ('wdprune', 'WD-Prune'), ('savit', 'SaVit'), ('block_pr', 'DAP'),
           ('uniform', 'DAP, uniform κ'), ('global', 'DAP, global threshold'))
# rows without a single run (the ablations unless ABLATIONS=1) are left out of the table
OPTIONAL = {'uniform', 'global'}
# top-1 of the paper's table (shared/reference/paper-readme.md); the unpruned row has one value per dataset
PAPER = {
    ('deit_small_patch16_224', 'deit'): {'IFOOD': 73.9, 'INAT19': 74.7},
    ('deit_small_patch16_224', 'wdprune'): {('IFOOD', .5): 50.7, ('IFOOD', .75): 49.2, ('INAT19', .5): 55.6, ('INAT19', .75): 54.0},
    ('deit_small_patch16_224', 'savit'): {('IFOOD', .5): 72.4, ('IFOOD', .75): 64.4, ('INAT19', .5): 71.3, ('INAT19', .75): 68.0},
    ('deit_small_patch16_224', 'block_pr'): {('IFOOD', .5): 74.3, ('IFOOD', .75): 73.4, ('INAT19', .5): 75.5, ('INAT19', .75): 73.1},
    ('deit_tiny_patch16_224', 'deit'): {'IFOOD': 72.7, 'INAT19': 72.6},
    ('deit_tiny_patch16_224', 'wdprune'): {('IFOOD', .5): 50.2, ('IFOOD', .75): 44.7, ('INAT19', .5): 54.8, ('INAT19', .75): 46.7},
    ('deit_tiny_patch16_224', 'savit'): {('IFOOD', .5): 65.7, ('IFOOD', .75): 59.5, ('INAT19', .5): 64.1, ('INAT19', .75): 45.3},
    ('deit_tiny_patch16_224', 'block_pr'): {('IFOOD', .5): 71.5, ('IFOOD', .75): 68.6, ('INAT19', .5): 69.3, ('INAT19', .75): 61.4},
}
DASH = '–'


def cut_summary(ckpt: Path):
    """The finalize summary of a first_sparse_checkpoint.pth, or None if there is none yet;
    UsageError if the file is there but is not such a checkpoint."""
    if not ckpt.is_file():
        return None
    summary = load_checkpoint_file(str(ckpt), 'checkpoint').get('summary')
    if not isinstance(summary, dict) or not {'params_cut', 'flops_cut'} <= set(summary):
        raise UsageError(f'checkpoint {ckpt} has no finalize "summary": not a first_sparse_checkpoint.pth')
    if not (is_number(summary['params_cut']) and is_number(summary['flops_cut'])):
        raise UsageError(f'checkpoint {ckpt}: its "summary" holds params_cut {summary["params_cut"]!r:.40} and '
                         f'flops_cut {summary["flops_cut"]!r:.40}, not numbers')
    return summary


def cell(root: Path, dataset, model, method, ratio, best_top1=best_top1):
    """'ours / paper' top-1 and 'params, FLOPs' of one cell."""
    paper = PAPER.get((model, method), {})
    paper = paper.get(dataset) if method == 'deit' else paper.get((dataset, ratio))
    paper_s = f'{paper:.1f}' if paper is not None else DASH
    base = root / dataset / model
    if method == 'deit':
        run = best_top1(base / 'deit' / 'log.txt')
        size = f'{run[1] / 1e6:.2f}M' if run else DASH
        return f'{run[0]:.1f} / {paper_s}' if run else f'{DASH} / {paper_s}', size
    run_dir = base / f'{method}_pr{ratio}'
    run = best_top1(run_dir / 'finetune' / 'log.txt')
    summary = cut_summary(run_dir / 'prune' / 'first_sparse_checkpoint.pth')
    top1 = f'{run[0]:.1f}' if run else DASH
    size = (f'{summary["params_cut"] / 1e6:.2f}M, {summary["flops_cut"] / 1e9:.2f} GFLOPs'
            if summary else DASH)
    return f'{top1} / {paper_s}', size


def make_table(root) -> str:
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f'{root} is not a folder of runs (scripts/reproduce_table.sh writes output/table)')
    cols = [(d, r) for d in DATASETS for r in RATIOS]
    head = '| model | method | ' + ' | '.join(f'{d} pr={int(r * 100)}% top-1 (ours / paper) | {d} pr={int(r * 100)}% params, FLOPs'
                                            for d, r in cols) + ' |'
    lines = [head, '|' + '---|' * (2 + 2 * len(cols))]
    best = functools.lru_cache(maxsize=None)(best_top1)  # a dense run fills two cells: read it once
    for model, model_name in MODELS:
        first = True
        for method, method_name in METHODS:
            if method in OPTIONAL and not any((root / d / model / f'{method}_pr{r}').is_dir()
                                              for d, r in cols):
                continue
            cells = [x for d, r in cols for x in cell(root, d, model, method, r, best)]
            lines.append(f'| {model_name if first else ""} | {method_name} | ' + ' | '.join(cells) + ' |')
            first = False
    return '\n'.join(lines)


if __name__ == '__main__':
    try:
        print(make_table(sys.argv[1] if len(sys.argv) > 1 else 'output/table'))
    except UsageError as e:
        sys.exit(f'error: {e}')
