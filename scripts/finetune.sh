#!/usr/bin/env bash
# The paper's second command: fine-tune the dense, smaller ViT rebuilt from a pruning run's
# first_sparse_checkpoint.pth (DeiT's cosine schedule; --epochs is main.py's default unless set),
# in eval mode as the authors' fine-tuning runs were (--no-train-mode, METHOD.md §8 v2).
#   DATA_PATH=/data/ifood2019 DATASET=IFOOD MODEL=deit_small_patch16_224 \
#     PRUNE_DIR=output/IFOOD/deit_small_patch16_224/block_pr_pr0.5/prune bash scripts/finetune.sh
# DRY_RUN=1 prints the command instead of running it. EXTRA passes further flags.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NGPU=${NGPU:-4}
MODEL=${MODEL:-deit_small_patch16_224}
DATASET=${DATASET:-IFOOD}
DATA_PATH=${DATA_PATH:?set DATA_PATH to the dataset root}
PRUNE_DIR=${PRUNE_DIR:?set PRUNE_DIR to the output_dir of the pruning run}
BATCH=${BATCH:-128}
PORT=${PORT:-29500}
OUTPUT_DIR=${OUTPUT_DIR:-$(dirname "$PRUNE_DIR")/finetune}
cmd=(python -m torch.distributed.launch --nproc_per_node="$NGPU" --master_port "$PORT" --use_env
     main.py --output_dir "$OUTPUT_DIR" --batch-size "$BATCH" --data-set "$DATASET"
     --data-path "$DATA_PATH" --model "$MODEL" --model-path "$PRUNE_DIR/first_sparse_checkpoint.pth"
     --resize-model-by-checkpoint --dist-eval --no-train-mode ${EPOCHS:+--epochs "$EPOCHS"} ${EXTRA:-})
if [ -n "${DRY_RUN:-}" ]; then echo "${cmd[*]}"; else "${cmd[@]}"; fi
