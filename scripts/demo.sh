#!/usr/bin/env bash
# The whole Depth Aware Pruning path on scikit-learn's bundled 8x8 digits, on the CPU:
#   1. train a dense ViT (the stand-in for an ImageNet-pretrained DeiT),
#   2. prune it by half with the paper's first command (2 processes, torch.distributed.launch),
#   3. fine-tune the cut model with the paper's second command (--resize-model-by-checkpoint),
#   4. measure dense vs cut, and print one table.
# Usage: bash scripts/demo.sh [OUTPUT_DIR]   (default output/demo; a few minutes on 2 cores)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:-output/demo}
PORT=${PORT:-$((29500 + RANDOM % 1000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # two processes share the two cores
# digits are 8x8: 16x16 inputs and 4x4 patches; DeiT's heavy augmentation is off for them;
# eval mode while training, as the authors' runs (METHOD.md §8 v2)
COMMON=(--model deit_micro_patch4_32 --input-size 16 --data-set DIGITS --num_workers 0
        --aa none --mixup 0 --cutmix 0 --reprob 0 --drop-path 0.0 --no-model-ema --no-train-mode
        --overwrite)  # a demo run replaces the one before it
LAUNCH=(python -m torch.distributed.launch --nproc_per_node=2 --master_port "$PORT" --use_env)
mkdir -p "$OUT"

echo "== 1/4 dense starting model -> $OUT/dense"
python main.py "${COMMON[@]}" --output_dir "$OUT/dense" --epochs 30 --batch-size 32 \
  --unscale-lr --lr 2e-3 --warmup-epochs 1 > "$OUT/dense.log" 2>&1
tail -n 4 "$OUT/dense.log" | grep -E 'Max accuracy'

echo "== 2/4 prune (paper's first command, 2 processes) -> $OUT/prune"
# any kept width (the paper's method): the default multiples of 8 suit GPUs, but would leave
# this micro model's 16-wide head_dim only 8 or 16
"${LAUNCH[@]}" main.py "${COMMON[@]}" --output_dir "$OUT/prune" --epochs 12 --batch-size 32 \
  --grad-accum-steps 2 --model-path "$OUT/dense/checkpoint.pth" --prune-method block_pr \
  --prune-ratio 0.5 --prune-steps-update-mask auto --prune-start-epoch 2 \
  --prune-sparse-epoch 8 --prune-round-to 1 --dist-eval > "$OUT/prune.log" 2>&1
grep -A12 '^sub-block' "$OUT/prune.log" | grep -E '^(sub-block|attn|mlp|params)'
echo "cut model, right after the cut: $(grep -A10 'Accuracy of the cut model' "$OUT/prune.log" | grep -m1 '^\*')"

echo "== 3/4 fine-tune the cut model (paper's second command) -> $OUT/finetune"
"${LAUNCH[@]}" main.py "${COMMON[@]}" --output_dir "$OUT/finetune" --epochs 15 --batch-size 32 \
  --unscale-lr --lr 5e-4 --warmup-epochs 1 --model-path "$OUT/prune/first_sparse_checkpoint.pth" \
  --resize-model-by-checkpoint --dist-eval > "$OUT/finetune.log" 2>&1
tail -n 4 "$OUT/finetune.log" | grep -E 'Max accuracy'

echo "== 4/4 benchmark dense vs cut"
OMP_NUM_THREADS=2 python scripts/benchmark.py --checkpoint "$OUT/prune/first_sparse_checkpoint.pth" \
  --batch-size 256 --json "$OUT/benchmark.json" > "$OUT/benchmark.log" 2>&1
python scripts/plot_block_performance.py "$OUT/prune/pruning_log.jsonl" \
  --out "$OUT/BlockPerformance_overTrainingEpochs.png" > /dev/null
python scripts/demo_summary.py "$OUT"
