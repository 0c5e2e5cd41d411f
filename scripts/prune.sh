#!/usr/bin/env bash
# The paper's first command: prune a pretrained DeiT with Depth Aware Pruning while fine-tuning.
# Every setting is an environment variable, with the authors' defaults (METHOD.md §8); the
# optimiser, augmentation and regularisation defaults are main.py's (DeiT's). --no-train-mode:
# the authors' runs trained in eval mode (no drop-path, ΔΨ heads' BatchNorm frozen; §8 v2).
#   DATA_PATH=/data/ifood2019 DATASET=IFOOD MODEL=deit_small_patch16_224 PRUNE_RATIO=0.5 \
#     bash scripts/prune.sh
# DRY_RUN=1 prints the command instead of running it. EXTRA passes further flags.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NGPU=${NGPU:-4}
MODEL=${MODEL:-deit_small_patch16_224}
DATASET=${DATASET:-IFOOD}
DATA_PATH=${DATA_PATH:?set DATA_PATH to the dataset root}
PRUNE_RATIO=${PRUNE_RATIO:-0.5}
METHOD=${METHOD:-block_pr}
EPOCHS=${EPOCHS:-50}
BATCH=${BATCH:-64}
ACCUM=${ACCUM:-2}
START_EPOCH=${START_EPOCH:-10}
STEPS_UPDATE=${STEPS_UPDATE:-auto}   # about 3 mask updates per epoch
PORT=${PORT:-29500}
OUTPUT_DIR=${OUTPUT_DIR:-output/${DATASET}/${MODEL}/${METHOD}_pr${PRUNE_RATIO}/prune}
if [ -z "${MODEL_PATH:-}" ]; then  # the official DeiT ImageNet checkpoint of MODEL
  MODEL_PATH=$(python -c "import sys, models; print(models.DEIT_URLS[sys.argv[1]])" "$MODEL")
fi
# DAP's schedule flags are DAP's (and its ablations'): main.py refuses them under a baseline
case "$METHOD" in
  block_pr|uniform|global)
    SCHEDULE=(--prune-steps-update-mask "$STEPS_UPDATE" --prune-start-epoch "$START_EPOCH");;
  *) SCHEDULE=();;
esac
cmd=(python -m torch.distributed.launch --nproc_per_node="$NGPU" --master_port "$PORT" --use_env
     main.py --output_dir "$OUTPUT_DIR" --epochs "$EPOCHS" --batch-size "$BATCH"
     --grad-accum-steps "$ACCUM" --data-set "$DATASET" --data-path "$DATA_PATH" --model "$MODEL"
     --model-path "$MODEL_PATH" --prune-method "$METHOD" --prune-ratio "$PRUNE_RATIO"
     "${SCHEDULE[@]}" --dist-eval --no-train-mode ${EXTRA:-})
if [ -n "${DRY_RUN:-}" ]; then echo "${cmd[*]}"; else "${cmd[@]}"; fi
