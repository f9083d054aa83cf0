#!/usr/bin/env bash
# StelLA and GaRare at scale on a GPU machine, against LoRA and full fine-tuning: the same
# MiniLM / MRPC run in fp32, in bf16-mixed, and under FSDP (bf16-mixed), with time per
# optimizer step and peak CUDA memory from python -m app.compare.
#
#   bench/scale_gpu.sh            # on a machine with a GPU; writes bench/results/scale_gpu/
#   bench/scale_gpu.sh --smoke    # on CPU: 2 methods x 3 steps in fp32 and bf16-mixed, and the
#                                 #   FSDP stage as a dry run (checks the pipeline, minutes)
#
# Stages, each its own comparison folder (summary.md, results.csv/json, plots):
#   fp32/   one GPU, 32-bit
#   bf16/   one GPU, configs/strategy/bf16.yaml (fp32 master weights and optimizer state)
#   fsdp/   configs/strategy/fsdp.yaml + bf16.yaml on DEVICES GPUs (default: all). StelLA and
#           GaRare refuse FSDP at start-up by design (they update whole matrices); their
#           refusal message is listed under the table as a failed run, and the script
#           treats that refusal as the expected outcome.
#   fsdp2/  configs/strategy/fsdp2.yaml + bf16.yaml on DEVICES GPUs: every method runs (the
#           manifold / projection math works on local shards); any failure counts.
#   ddp/    --strategy ddp + bf16.yaml on DEVICES GPUs, only when DEVICES > 1.
#
# Environment overrides: METHODS="full lora stella garare", SEEDS="0", STEPS=300, BATCH=32,
# DEVICES=N (GPUs for the fsdp and ddp stages), PYTHON=python.
# Rerunning the same command skips finished runs.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
for arg in "$@"; do
  case "$arg" in
    --smoke) MODE=smoke ;;
    -h|--help) sed -n "2,23p" "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (use --smoke or nothing)" >&2; exit 2 ;;
  esac
done

PYTHON=${PYTHON:-python}
METHODS=${METHODS:-"full lora stella garare"}
SEEDS=${SEEDS:-0}
STEPS=${STEPS:-300}
BATCH=${BATCH:-32}
BASE=(configs/data/glue_mrpc.yaml configs/model/minilm.yaml)

if [ "$MODE" = smoke ]; then
  OUT=${OUT:-runs/scale_gpu_smoke}
  METHODS=${SMOKE_METHODS:-"lora stella"}; SEEDS=0; STEPS=3; BATCH=8
  one=(--accelerator cpu --devices 1)
  warm=(--warmup-steps 1)
  limit=(--trainer.limit_val_batches 2)
else
  OUT=${OUT:-bench/results/scale_gpu}
  GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
  if [ "$GPUS" = 0 ]; then
    echo "bench/scale_gpu.sh needs a CUDA GPU (torch.cuda.device_count() is 0);" \
         "use --smoke to check the pipeline on CPU" >&2
    exit 2
  fi
  DEVICES=${DEVICES:-$GPUS}
  one=(--accelerator gpu --devices 1)
  warm=(--warmup-steps 10)
  limit=()
fi
VAL=$(( STEPS < 100 ? STEPS : STEPS / 2 ))

note() {
  echo "all-MiniLM-L6-v2 on GLUE MRPC, $1: $STEPS optimizer steps of batch $BATCH per device," \
       "max_length 128, validation every $VAL steps. StelLA and GaRare against LoRA and full" \
       "fine-tuning (bench/scale_gpu.sh)."
}

# stage NAME NOTE [app.compare device arguments...] -- [extra base fragments...]
stage() {
  local name=$1 text=$2; shift 2
  local devargs=() frags=()
  while [ "$1" != -- ]; do devargs+=("$1"); shift; done; shift
  frags=("$@")
  # shellcheck disable=SC2086  # word splitting of the method / seed lists is intended
  "$PYTHON" -m app.compare --base "${BASE[@]}" "${frags[@]}" \
    --methods $METHODS --seeds $SEEDS --ranks 8 --baseline lora \
    --out "$OUT/$name" "${devargs[@]}" "${warm[@]}" ${DRY_RUN:+--dry-run} \
    --note "$(note "$text")" \
    --extra --trainer.max_steps "$STEPS" --trainer.max_epochs -1 \
    --trainer.val_check_interval "$VAL" --trainer.check_val_every_n_epoch null \
    --trainer.log_every_n_steps 5 \
    --data.init_args.batch_size "$BATCH" --data.init_args.max_length 128 "${limit[@]}"
}

status=0
stage fp32 "one device, 32-bit" "${one[@]}" -- || status=$?
stage bf16 "one device, bf16-mixed" "${one[@]}" -- configs/strategy/bf16.yaml || status=$?

if [ "$MODE" = smoke ]; then
  # FSDP needs CUDA: print the commands the GPU run would make.
  DRY_RUN=1 stage fsdp "FSDP, bf16-mixed" --devices 1 -- \
    configs/strategy/fsdp.yaml configs/strategy/bf16.yaml || status=$?
  # FSDP2 runs on CPU too (tests/test_fsdp2.py); here only the commands, like FSDP.
  DRY_RUN=1 stage fsdp2 "FSDP2, bf16-mixed" --devices 1 -- \
    configs/strategy/fsdp2.yaml configs/strategy/bf16.yaml || status=$?
  exit "$status"
fi

# Methods whose declaration (MethodSpec.strategies, app/adapters/contract.py) excludes FSDP
# refuse it at start-up by design; under FSDP their refusal is the expected outcome, any other
# failure counts.
FSDP_REFUSERS=$("$PYTHON" - <<'EOF'
from pathlib import Path

from app.adapters import declared_spec
from app.compare.plan import _class_of, load_fragments

for path in sorted(Path("configs/methods").glob("*.yaml")):
    args = load_fragments([path])["model"]["init_args"]
    spec = declared_spec(_class_of(args.get("adapter")), _class_of(args.get("optimizer")))
    if "fsdp" not in spec.strategies:
        print(path.stem)
EOF
)
code=0
stage fsdp "FSDP on $DEVICES GPU(s), bf16-mixed" --devices "$DEVICES" -- \
  configs/strategy/fsdp.yaml configs/strategy/bf16.yaml || code=$?
if [ "$code" != 0 ]; then
  # shellcheck disable=SC2086  # one argument per method name
  "$PYTHON" - "$OUT/fsdp/results.json" $FSDP_REFUSERS <<'EOF' || status=1
import json, sys
failed = json.load(open(sys.argv[1]))["failed"]
refusers = set(sys.argv[2:])
unexpected = [f for f in failed if f["name"].rsplit("-s", 1)[0].split("-r")[0] not in refusers
              or "does not support trainer.strategy" not in f["message"]]
for f in failed:
    print(("unexpected failure: " if f in unexpected else "refused as designed: ")
          + f"{f['name']}: {f['message']}")
sys.exit(1 if unexpected else 0)
EOF
fi

stage fsdp2 "FSDP2 on $DEVICES GPU(s), bf16-mixed" --devices "$DEVICES" -- \
  configs/strategy/fsdp2.yaml configs/strategy/bf16.yaml || status=$?

if [ "$DEVICES" -gt 1 ]; then
  stage ddp "DDP on $DEVICES GPUs, bf16-mixed" --devices "$DEVICES" --strategy ddp -- \
    configs/strategy/bf16.yaml || status=$?
fi
exit "$status"
