"""The table of scripts/compare_methods.sh: every method and prune ratio against the dense model.

    python scripts/compare_summary.py OUTPUT_DIR   (--markdown for a markdown table)

Top-1 is the best epoch of the fine-tuning run; "cut" is the cut model right after pruning,
before fine-tuning. Throughput is scripts/benchmark.py's at batch 256 on the CPU; the dense
model is timed in every method's benchmark run and its median is shown. On a model this small
the dense timing varies between processes (19–33 ms per batch seen on 2 cores), so the table
gives throughputs, not per-run speed-ups; speed on a real-sized model: scripts/benchmark.py.
"""
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_table import best_top1  # noqa: E402

NAMES = {'block_pr': 'DAP', 'uniform': 'DAP, uniform κ', 'global': 'DAP, global threshold',
         'wdprune': 'WD-Prune', 'savit': 'SaViT'}


def best_acc(log_txt: Path):
    run = best_top1(log_txt)  # (best top-1, n_parameters) or None
    return run and run[0]


def rows(out: Path):
    """(name, pr, top-1 after cut, top-1 fine-tuned, params, FLOPs, img/s)."""
    benches = [json.loads(b.read_text()) for b in sorted(out.glob('*_pr*/benchmark.json'))]
    if not benches:
        return []
    dense = benches[0]['dense']
    table = [('dense ViT', None, None, best_acc(out / 'dense' / 'log.txt'), dense['params'],
              dense['flops_per_image'], statistics.median(b['dense']['throughput_img_s'] for b in benches))]
    for method in NAMES:
        for run in sorted(out.glob(f'{method}_pr*')):
            b = run / 'benchmark.json'
            if not b.is_file():
                continue
            b = json.loads(b.read_text())
            cut_acc = None
            for line in (run / 'prune' / 'log.txt').read_text().splitlines()[-1:]:
                cut_acc = json.loads(line)['test_acc1']
            table.append((NAMES[method], float(run.name.rsplit('_pr', 1)[1]), cut_acc,
                          best_acc(run / 'finetune' / 'log.txt'), b['cut']['params'],
                          b['cut']['flops_per_image'], b['cut']['throughput_img_s']))
    return table


def fmt(x, spec):
    return '–' if x is None else format(x, spec)


def main(argv):
    out = Path(argv[0] if argv and not argv[0].startswith('--') else 'output/compare')
    header = ('method', 'pr', 'top-1 cut', 'top-1 fine-tuned', 'params', 'MFLOPs', 'CPU img/s')
    lines = []
    for name, pr, cut_acc, acc, params, flops, thr in rows(out):
        lines.append((name, fmt(pr, '.2f'), fmt(cut_acc, '.1f'), fmt(acc, '.1f'), f'{params:,}',
                      f'{flops / 1e6:.2f}', f'{thr:.0f}'))
    if '--markdown' in argv:
        print('| ' + ' | '.join(header) + ' |\n|' + '---|' * len(header))
        print('\n'.join('| ' + ' | '.join(r) + ' |' for r in lines))
        return
    widths = [max(len(h), *(len(r[i]) for r in lines)) if lines else len(h) for i, h in enumerate(header)]
    for r in [header] + lines:
        print('  '.join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


if __name__ == '__main__':
    main(sys.argv[1:])
