#!/usr/bin/env bash
# The standard comparison: all-MiniLM-L6-v2 on GLUE MRPC and STS-B, 3 seeds, rank 8, every
# method against LoRA with everything else identical (python -m app.compare).
#
#   bench/compare_glue.sh            # CPU budget (below), writes bench/results/compare_glue/
#   bench/compare_glue.sh --gpu      # GPU budget, bf16-mixed, writes bench/results/compare_glue_gpu/
#   bench/compare_glue.sh --smoke    # 2 methods x 1 seed x 5 steps: checks the pipeline (minutes)
#
# Environment overrides: TASKS="mrpc stsb", SEEDS="0 1 2", RANKS="8", METHODS="...",
# DEVICES=N (GPU: N devices per run with DDP), EXTRA="more --trainer/--data arguments".
# Rerunning the same command skips finished runs and resumes an interrupted one. Tables, CSV,
# JSON and PNGs land in <out>/<task>/ (commit them). Of each run folder <out>/<task>/runs/<run>/
# git keeps result.json, spec.json and config.yaml (.gitignore), so a fresh clone skips the runs
# already recorded; checkpoints and logs stay local (an interrupted run resumes only where its
# last.ckpt is).
#
# Budgets (fixed optimizer steps, batch, max_length 128 and full dev sets for every run; every
# fragment's own learning rate and schedule; validation several times per run so that best and
# final differ):
#   CPU (2 cores): 400 steps of batch 16 (6,400 pairs: 1.1 epochs of STS-B, 1.7 of MRPC),
#       validation every 200 steps on STS-B and every 100 on MRPC (its dev set is small).
#       Shorter budgets cannot tell the methods apart: at 100 steps of batch 32 every
#       LoRA-family method on MRPC still predicted the majority class (0.684, dev loss at the
#       prior's entropy) and on STS-B was still fitting the label mean (Pearson ~0.15). About
#       0.3-0.4 s per LoRA step on 2 quiet cores (batches are padded to their longest pair,
#       not to 128), ~0.5 s for full fine-tuning and GaLore, plus start-up and validation:
#       ~1.6 h per task. STS-B runs first; runs go seed-major, so a comparison stopped early
#       has every method on the first seeds, and rerunning the command continues it.
#   GPU: 10 epochs of batch 32 (MRPC 1,150 steps, STS-B 1,800), validation every epoch,
#       bf16-mixed.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=cpu
for arg in "$@"; do
  case "$arg" in
    --gpu) MODE=gpu ;;
    --smoke) MODE=smoke ;;
    -h|--help) sed -n "2,30p" "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (use --gpu, --smoke or nothing)" >&2; exit 2 ;;
  esac
done

TASKS=${TASKS:-"stsb mrpc"}
SEEDS=${SEEDS:-"0 1 2"}
RANKS=${RANKS:-8}
METHODS=${METHODS:-"full lora rslora dora asymmetric allora stella manifold_stiefel manifold_sphere galore garare"}
PYTHON=${PYTHON:-python}
read -r -a extra_user <<< "${EXTRA:-}"

declare -A steps val
warm=(--warmup-steps 5)
case "$MODE" in
  cpu)
    OUT=bench/results/compare_glue
    steps=([mrpc]=400 [stsb]=400); val=([mrpc]=100 [stsb]=200); batch=16
    device=(--accelerator cpu --devices 1)
    extra=()
    note="CPU budget: @STEPS@ optimizer steps, batch 16, max_length 128, validation every @VAL@ steps on the full dev set."
    ;;
  gpu)
    OUT=bench/results/compare_glue_gpu
    steps=([mrpc]=1150 [stsb]=1800); val=([mrpc]=115 [stsb]=180); batch=32
    device=(--accelerator gpu --devices "${DEVICES:-1}")
    if [ "${DEVICES:-1}" != 1 ]; then device+=(--strategy ddp); fi
    extra=(--trainer.precision bf16-mixed)
    note="GPU budget: 10 epochs (MRPC 1,150 / STS-B 1,800 optimizer steps), batch 32 per device, max_length 128, bf16-mixed, validation every epoch on the full dev set."
    ;;
  smoke)
    OUT=runs/compare_glue_smoke
    METHODS=${SMOKE_METHODS:-"lora stella"}; SEEDS=0
    steps=([mrpc]=5 [stsb]=5); val=([mrpc]=5 [stsb]=5); batch=32
    device=(--accelerator cpu --devices 1)
    extra=(--trainer.limit_val_batches 2)
    warm=(--warmup-steps 2)
    note="Smoke test: 5 steps, 2 validation batches (numbers mean nothing)."
    ;;
esac

status=0
for task in $TASKS; do
  task_note=${note//@STEPS@/${steps[$task]}}
  task_note=${task_note//@VAL@/${val[$task]}}
  # shellcheck disable=SC2086  # word splitting of the method / seed / rank lists is intended
  "$PYTHON" -m app.compare \
    --base "configs/data/glue_${task}.yaml" configs/model/minilm.yaml \
    --methods $METHODS --seeds $SEEDS --ranks $RANKS --baseline lora \
    --out "$OUT/$task" "${device[@]}" "${warm[@]}" \
    --note "all-MiniLM-L6-v2 on GLUE ${task^^}. $task_note" \
    --extra --trainer.max_steps "${steps[$task]}" --trainer.max_epochs -1 \
    --trainer.val_check_interval "${val[$task]}" --trainer.check_val_every_n_epoch null \
    --trainer.log_every_n_steps 5 \
    --data.init_args.batch_size "$batch" --data.init_args.max_length 128 \
    "${extra[@]}" "${extra_user[@]}" || status=$?
done
exit "$status"
