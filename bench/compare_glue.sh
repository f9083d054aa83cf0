#!/usr/bin/env bash
# The standard comparison, protocol v2 (issue 15): all-MiniLM-L6-v2 on GLUE MRPC and STS-B
# (SST-2 optional), rank 8, every method in configs/methods/, each at the learning rate it
# wins on a held-out slice of the TRAINING set, then 3 seeds at that rate, reported on the
# dev set with paired 95% intervals against LoRA (python -m app.compare --select-lr).
#
#   bench/compare_glue.sh            # CPU protocol, writes bench/results/compare_glue_v2/<task>/
#   bench/compare_glue.sh --gpu      # same protocol on a GPU, writes bench/results/compare_glue_v2_gpu/
#   bench/compare_glue.sh --smoke    # 2 methods x 2 rates x 1 seed x 5 steps: checks the pipeline
#
# ONE command runs everything and is resumable: rerun it after an interruption (Ctrl-C, a
# closed sitting) and it skips every finished run, resumes an interrupted one from its
# last.ckpt and continues; the report is rebuilt at the end of every task (and at any time
# with REPORT_ONLY=1, which runs nothing).
#
# Environment overrides: TASKS="mrpc stsb" (add sst2 for the optional third task),
# SEEDS="0 1 2", RANKS="8", METHODS="lora stella ..." (default: every configs/methods/*.yaml),
# LRS="1e-4 1e-3" (one grid for every method instead of each fragment's '# lr_grid' line),
# HOLDOUT=0.1 (fraction of the training set held out for the selection), DEVICES=N (GPU),
# EXTRA="more --trainer/--data arguments", REPORT_ONLY=1, OUT=folder (instead of the mode's),
# SELECT_JOBS=N (selection runs at once; CPU default 2, one thread each: measured 1.3x the
# throughput of one two-thread run on 2 cores; their step times are not reported, the seed
# runs', which are, always run one at a time; GPU and smoke default 1),
# FINISH_BY=WHEN (21:30, 2026-12-05T21:30, or from now: 90m, 2h): start no run that is not
# expected to end by then (judged from the finished runs' wall times), let the runs in
# progress finish, write the report and exit 75; every task gets the same deadline. For
# sittings on a machine whose run folders may not survive: nothing is left half-trained.
#
# Stopping: Ctrl-C, or SIGTERM to this script alone (kill PID, timeout) or to its process
# group, reaches the comparison as SIGTERM; its run stops at the end of its batch with a
# resumable last.ckpt, the script waits for it, exits 143 and starts no further task.
#
# Protocol (identical for every method; what the runs differ in is the method fragment, its
# selected rate and the seed):
#   1. Learning-rate selection: every method x rate of its grid (the fragment's '# lr_grid'
#      line, 3-4 rates around its own) on seed 0, trained on 90% of the training set and
#      validated on the other 10% (a fixed slice, holdout seed 0; the dev set is never read);
#      the rate with the best held-out val/score at the end of the run wins (ties: lower
#      held-out loss, then the smaller rate). Runs in <out>/<task>/selection/runs/.
#   2. Seeds 0, 1, 2 of every method at its selected rate on the full training set,
#      validated on the full dev set after every epoch.
#   Budget (configs/protocol/glue_v2.yaml): 3 epochs of batch 16 (the budget at which the
#   plain-PEFT LoRA reference reaches MRPC accuracy 0.775 +- 0.012 / F1 0.850 +- 0.007):
#   MRPC 690 optimizer steps (selection runs 621), STS-B 1,080 (972), max_length 128; linear
#   warm-up over 6% of the steps, then linear decay. The pooler and classifier are trained by
#   every method at one rate per task, the same for all methods
#   (configs/protocol/glue_v2_<task>.yaml: MRPC 5e-5, STS-B 2e-3, with the measurements).
#   SST-2 (optional): 3 epochs over a fixed 6,400-sentence sample of its training set (1,200
#   steps).
#   CPU time (2 quiet cores; the first v2 MRPC selection runs took 8-10 min each on 2
#   threads, 0.80 s per step for LoRA-type methods, DoRA 15 min): about 12 h for MRPC (45
#   selection runs, two at a time, + 42 seed runs) and 20 h for STS-B (1.56x the steps),
#   over many sittings.
#   GPU: the same protocol, bf16-mixed.
#
# Tables, CSV, JSON and PNGs land in <out>/<task>/ (commit them). Of each run folder git keeps
# result.json, spec.json and config.yaml (.gitignore), so a fresh clone skips the runs already
# recorded; checkpoints and logs stay local (an interrupted run resumes only where its
# last.ckpt is). The v1 results (fixed rates, 400 steps, classifier-only heads) stay in
# bench/results/compare_glue/ as the old protocol.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=cpu
for arg in "$@"; do
  case "$arg" in
    --gpu) MODE=gpu ;;
    --smoke) MODE=smoke ;;
    -h|--help) sed -n "2,60p" "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (use --gpu, --smoke or nothing)" >&2; exit 2 ;;
  esac
done

TASKS=${TASKS:-"mrpc stsb"}
SEEDS=${SEEDS:-"0 1 2"}
RANKS=${RANKS:-8}
HOLDOUT=${HOLDOUT:-0.1}
PYTHON=${PYTHON:-python}
if [ -z "${METHODS:-}" ]; then  # every method fragment, never a hand-written list
  METHODS=$(find configs/methods -maxdepth 1 -name '*.yaml' -printf '%f\n' | sed 's/\.yaml$//' | sort | tr '\n' ' ')
fi
read -r -a extra_user <<< "${EXTRA:-}"
lrs=()
if [ -n "${LRS:-}" ]; then read -r -a lr_list <<< "$LRS"; lrs=(--lrs "${lr_list[@]}"); fi
report=()
if [ -n "${REPORT_ONLY:-}" ]; then report=(--report-only); fi
deadline=()
if [ -n "${FINISH_BY:-}" ] && [ -z "${REPORT_ONLY:-}" ]; then
  # One absolute time for every task (a duration would restart for each task's comparison).
  when=$("$PYTHON" -m app.compare.deadline "$FINISH_BY") || exit 2
  deadline=(--finish-by "$when")
fi

warm=(--warmup-steps 5)
# The budget and the heads' rates are config fragments (configs/protocol/glue_v2*.yaml, each
# choice stated once there with its reason); smoke mode overrides the budget below.
budget=()
case "$MODE" in
  cpu)
    OUT=${OUT:-bench/results/compare_glue_v2}
    SELECT_JOBS=${SELECT_JOBS:-2}
    device=(--accelerator cpu --devices 1)
    extra=()
    note="CPU protocol v2: learning rate selected per method on a held-out ${HOLDOUT} of the training set (seed 0), then 3 epochs of batch 16 per seed at that rate, max_length 128, validation on the full dev set after every epoch."
    ;;
  gpu)
    OUT=${OUT:-bench/results/compare_glue_v2_gpu}
    device=(--accelerator gpu --devices "${DEVICES:-1}")
    if [ "${DEVICES:-1}" != 1 ]; then device+=(--strategy ddp); fi
    extra=(--trainer.precision bf16-mixed)
    note="GPU protocol v2 (bf16-mixed): learning rate selected per method on a held-out ${HOLDOUT} of the training set, then 3 epochs of batch 16 per seed."
    ;;
  smoke)
    OUT=${OUT:-runs/compare_glue_v2_smoke}
    METHODS=${SMOKE_METHODS:-"lora stella"}; SEEDS=0
    device=(--accelerator cpu --devices 1)
    budget=(--trainer.max_steps 5 --trainer.max_epochs -1 --trainer.val_check_interval 5
            --trainer.check_val_every_n_epoch null --trainer.log_every_n_steps 1
            --data.init_args.batch_size 16 --data.init_args.max_length 64)
    extra=(--trainer.limit_val_batches 2)
    lrs=(--lrs 5e-4 2e-3)
    warm=(--warmup-steps 2)
    note="Smoke test: 5 steps, 2 validation batches (numbers mean nothing)."
    ;;
esac

# The comparison runs in the background and is waited for, so that a signal to this script
# alone is passed on (a foreground child would keep running after this shell is killed).
# Ctrl-C goes on as SIGTERM: a background child of a script ignores SIGINT.
run_comparison() {
  "$@" &
  local child=$! code
  trap 'kill -TERM "$child" 2>/dev/null || true' INT TERM
  while :; do
    code=0
    wait "$child" || code=$?
    kill -0 "$child" 2>/dev/null || break  # wait returned early for a trapped signal
  done
  trap - INT TERM
  return "$code"
}

status=0
for task in $TASKS; do
  task_extra=()
  task_note=$note
  if [ "$task" = sst2 ] && [ "$MODE" != smoke ]; then
    task_extra=(--data.init_args.max_train_samples 6400)
    task_note="$note SST-2: a fixed sample of 6,400 training sentences (seed 0)."
  fi
  # shellcheck disable=SC2086  # word splitting of the method / seed / rank lists is intended
  code=0
  run_comparison "$PYTHON" -m app.compare \
    --base "configs/data/glue_${task}.yaml" configs/model/minilm.yaml \
           configs/protocol/glue_v2.yaml "configs/protocol/glue_v2_${task}.yaml" \
    --methods $METHODS --seeds $SEEDS --ranks $RANKS --baseline lora \
    --select-lr "${lrs[@]}" --select-holdout "$HOLDOUT" --select-jobs "${SELECT_JOBS:-1}" \
    "${report[@]}" "${deadline[@]}" \
    --out "$OUT/$task" "${device[@]}" "${warm[@]}" \
    --note "all-MiniLM-L6-v2 on GLUE ${task^^}. $task_note" \
    --extra "${budget[@]}" "${task_extra[@]}" "${extra[@]}" "${extra_user[@]}" || code=$?
  if [ "$code" -ge 128 ] || [ "$code" -eq 75 ]; then  # a signal, or FINISH_BY reached:
    exit "$code"                                      # resume with the same command
  fi
  if [ "$code" -ne 0 ]; then status=$code; fi
done
exit "$status"
