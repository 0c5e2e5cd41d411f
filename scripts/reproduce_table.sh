#!/usr/bin/env bash
# Every cell of the paper's table: {IFOOD, INAT19} x {deit_small, deit_tiny} x pr {0.5, 0.75}
# pruned with DAP, WD-Prune and SaViT (BASELINES.md) then fine-tuned, plus the unpruned DeiT
# row per dataset and model. ABLATIONS=1 adds DAP's uniform and global budget ablations.
# Every method gets the same data, epochs, batch, cut and fine-tuning command; SaViT's pruning
# run is one-shot (Taylor scores over 10% of an epoch, search, cut), so its --epochs is unused.
# The unpruned row is fine-tuned from the same DeiT checkpoint with the pruning run's schedule
# (50 epochs, batch 64 x 4 GPUs x 2, the same augmentation) but DeiT's cosine learning rate.
# Every run trains in eval mode (--no-train-mode), as the authors' runs did (METHOD.md §8 v2).
#   IFOOD_PATH=/data/ifood2019 INAT19_PATH=/data/inat2019 bash scripts/reproduce_table.sh [--dry-run]
# Runs land in ${ROOT:-output/table}/DATASET/MODEL/...; scripts/make_table.py reads them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ "${1:-}" = "--dry-run" ]; then export DRY_RUN=1; fi
ROOT=${ROOT:-output/table}
export NGPU=${NGPU:-4}
declare -A PATHS=([IFOOD]=${IFOOD_PATH:-/data/ifood2019} [INAT19]=${INAT19_PATH:-/data/inat2019})
for DATASET in IFOOD INAT19; do
  for MODEL in deit_small_patch16_224 deit_tiny_patch16_224; do
    base=$ROOT/$DATASET/$MODEL
    url=$(python -c "import sys, models; print(models.DEIT_URLS[sys.argv[1]])" "$MODEL")
    # the unpruned DeiT row
    cmd=(python -m torch.distributed.launch --nproc_per_node="$NGPU" --master_port "${PORT:-29500}"
         --use_env main.py --output_dir "$base/deit" --epochs 50 --batch-size 64
         --grad-accum-steps 2 --data-set "$DATASET" --data-path "${PATHS[$DATASET]}"
         --model "$MODEL" --model-path "$url" --dist-eval --no-train-mode)
    if [ -n "${DRY_RUN:-}" ]; then echo "${cmd[*]}"; else "${cmd[@]}"; fi
    for METHOD in block_pr wdprune savit ${ABLATIONS:+uniform global}; do
      for PR in 0.5 0.75; do
        run=$base/${METHOD}_pr$PR
        METHOD=$METHOD DATASET=$DATASET DATA_PATH=${PATHS[$DATASET]} MODEL=$MODEL MODEL_PATH=$url \
          PRUNE_RATIO=$PR OUTPUT_DIR=$run/prune bash scripts/prune.sh
        DATASET=$DATASET DATA_PATH=${PATHS[$DATASET]} MODEL=$MODEL PRUNE_DIR=$run/prune \
          OUTPUT_DIR=$run/finetune bash scripts/finetune.sh
      done
    done
  done
done
