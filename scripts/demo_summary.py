"""The demo's closing table: dense vs DAP, from what scripts/demo.sh wrote."""
import json
import sys
from pathlib import Path

from common import best_top1  # (best top-1, last n_parameters)


def main(out):
    out = Path(out)
    bench = json.loads((out / 'benchmark.json').read_text())
    dense_acc, _ = best_top1(out / 'dense' / 'log.txt')
    dap_acc, dap_params = best_top1(out / 'finetune' / 'log.txt')
    rows = [('dense ViT', bench['dense'], dense_acc), ('DAP pr=0.5, fine-tuned', bench['cut'], dap_acc)]
    print(f'\n{"model":<24}{"params":>10}{"MFLOPs":>9}{"top-1":>8}{"CPU img/s":>11}')
    for name, b, acc in rows:
        print(f'{name:<24}{b["params"]:>10,}{b["flops_per_image"] / 1e6:>9.2f}{acc:>8.1f}'
              f'{b["throughput_img_s"]:>11.0f}')
    assert dap_params == bench['cut']['params']
    print(f'speedup {bench["speedup"]:.2f}x (FLOPs-ideal {bench["flops_ideal_speedup"]:.2f}x) '
          f'on {bench["device"]}, batch {bench["batch_size"]}')
    print(f'\nlogs: {out}/{{dense,prune,finetune}}.log and */log.txt; pruning_log: '
          f'{out}/prune/pruning_log.jsonl\nTensorBoard: tensorboard --logdir {out}\n'
          f'figure: {out}/BlockPerformance_overTrainingEpochs.png')


if __name__ == '__main__':
    main(sys.argv[1] if len(sys.argv) > 1 else 'output/demo')
