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
# Started again (after a crash, a preemption), it skips the finished runs and resumes the
# interrupted one from its checkpoint.pth (scripts/run_state.py).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ "${1:-}" = "--dry-run" ]; then export DRY_RUN=1; fi
ROOT=${ROOT:-output/table}
export NGPU=${NGPU:-4}
declare -A PATHS=([IFOOD]=${IFOOD_PATH:-/data/ifood2019} [INAT19]=${INAT19_PATH:-/data/inat2019})
# continue_flags DIR: the flags that continue the run in DIR, or "done" if it finished
# A folder run_state.py refuses (a run that lost its checkpoint.pth, an unreadable checkpoint)
# stops the script with its line: never --overwrite (the failure of a command substitution does
# not stop a function under set -e, hence the explicit returns).
continue_flags() {
  local state
  state=$(python scripts/run_state.py "$1") || return 1
  case $state in
    done) echo done ;;
    resume\ *) echo "--resume ${state#resume }" ;;
    new) echo --overwrite ;;  # nothing to continue: whatever is there was left by a killed first epoch
    *) echo "error: scripts/run_state.py $1 said '$state'" >&2; return 1 ;;
  esac
}
for DATASET in IFOOD INAT19; do
  for MODEL in deit_small_patch16_224 deit_tiny_patch16_224; do
    base=$ROOT/$DATASET/$MODEL
    url=$(python -c "import sys, models; print(models.DEIT_URLS[sys.argv[1]])" "$MODEL")
    # the unpruned DeiT row
    flags=$(continue_flags "$base/deit")
    if [ "$flags" = done ]; then echo "# $base/deit: finished"; else
      # shellcheck disable=SC2206
      cmd=(python -m torch.distributed.launch --nproc_per_node="$NGPU" --master_port "${PORT:-29500}"
           --use_env main.py --output_dir "$base/deit" --epochs 50 --batch-size 64
           --grad-accum-steps 2 --data-set "$DATASET" --data-path "${PATHS[$DATASET]}"
           --model "$MODEL" --model-path "$url" --dist-eval --no-train-mode $flags)
      if [ -n "${DRY_RUN:-}" ]; then echo "${cmd[*]}"; else "${cmd[@]}"; fi
    fi
    for METHOD in block_pr wdprune savit ${ABLATIONS:+uniform global}; do
      for PR in 0.5 0.75; do
        run=$base/${METHOD}_pr$PR
        flags=$(continue_flags "$run/prune")
        if [ "$flags" = done ]; then echo "# $run/prune: finished"; else
          METHOD=$METHOD DATASET=$DATASET DATA_PATH=${PATHS[$DATASET]} MODEL=$MODEL MODEL_PATH=$url \
            PRUNE_RATIO=$PR OUTPUT_DIR=$run/prune EXTRA=$flags bash scripts/prune.sh
        fi
        flags=$(continue_flags "$run/finetune")
        if [ "$flags" = done ]; then echo "# $run/finetune: finished"; else
          DATASET=$DATASET DATA_PATH=${PATHS[$DATASET]} MODEL=$MODEL PRUNE_DIR=$run/prune \
            OUTPUT_DIR=$run/finetune EXTRA=$flags bash scripts/finetune.sh
        fi
      done
    done
  done
done
