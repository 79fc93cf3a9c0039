#!/usr/bin/env bash
# One GPU profile of the real trainer (`bear-ds train`, not the stripped step of benchmarks/train_step.py):
# a Qwen2.5-7B-shaped model (hidden 3584, MLP 18944, GQA 28/4 heads, vocabulary 152,064, untied) cut
# to LAYERS decoder layers (default 8: 2.9B parameters), bf16, BEAR on Office, ZeRO stage 0 / 2 / 3 on
# one GPU, activation checkpointing on / off, micro-batch 8 / 16 (accumulation 1). Per run: tokens/s,
# MFU (train_log.jsonl's, over the card's dense bf16 peak), padded share, peak GPU memory, all-gathers
# and host syncs per micro-step; a markdown table at the end (for docs/results.md).
#
# Budget: within 8 minutes of device time with the machine's start. Each run starts a process, loads
# the model and encodes the data (about half a minute) before its STEPS steps, so the default matrix
# has 6 runs; MATRIX=full runs all 12 (about 6 minutes of runs alone). Memory is not what limits
# LAYERS (an H200 holds the 28 layers at stage 0), the load time of every run is.
#
# Prepare here, once, the carry of benchmarks/gpu_check.sh (wheels the GPU image lacks, the Office CSVs):
#   PY=.venv/bin/python bash benchmarks/gpu_profile.sh --prepare
# then through the device tool, carry=["benchmarks/gpu_carry"], timeout_s=480:
#   bash benchmarks/gpu_profile.sh
# A dry run on a CPU (a tiny model of the same architecture, stage 0 and 3 for 3 steps; the plumbing):
#   DEV=cpu PY=.venv/bin/python bash benchmarks/gpu_profile.sh
# Settings (environment): LAYERS, STEPS (default 10; the first 2 are warm-up), MATRIX (default|full),
# OUT (/tmp/gpu_profile: results.jsonl, table.md, one log per run), WORK (/tmp/gpu_profile_work).
set -uo pipefail
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
  sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 0
fi
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prepare" ]; then
  exec bash benchmarks/gpu_check.sh --prepare
fi
CARRY=benchmarks/gpu_carry
PY=${PY:-python3}
DEV=${DEV:-cuda}
OUT=${OUT:-/tmp/gpu_profile}
WORK=${WORK:-/tmp/gpu_profile_work}
LAYERS=${LAYERS:-8}
STEPS=${STEPS:-10}
MATRIX=${MATRIX:-default}
mkdir -p "$OUT" "$WORK"
: >"$OUT/results.jsonl"
source "$(dirname "$0")/carried_wheels.sh"  # PYTHONPATH (+ carried wheels on a GPU), DATA
T0=$SECONDS

if [ "$DEV" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
  MAKE_ARGS="--layers $LAYERS --device cuda"
  # the default matrix: every stage at B = 8 without checkpointing, then B = 16 and checkpointing where they differ most
  if [ "$MATRIX" = full ]; then
    RUNS="0:false:8 0:true:8 0:false:16 0:true:16 2:false:8 2:true:8 2:false:16 2:true:16 3:false:8 3:true:8 3:false:16 3:true:16"
  else
    RUNS="0:false:8 2:false:8 3:false:8 0:false:16 3:false:16 3:true:16"
  fi
  DS_CONFIG_ARG=""
  EXTRA="train.precision=bf16"
  PREPARE_EXTRA=""
else
  echo "cpu dry run" | tee "$OUT/card.txt"
  LAYERS=2
  MAKE_ARGS="--layers $LAYERS --tiny --device cpu"
  RUNS="0:false:4 3:true:4"
  STEPS=3
  DS_CONFIG_ARG="train.ds_config=ds_configs/zero3_cpu.json"  # gloo and no fused kernels on a CPU
  EXTRA="train.peak_flops=1e11"
  PREPARE_EXTRA="data.train_sample=256"
fi
# data once (bear_csv -> prepared splits), then the model folder once
# shellcheck disable=SC2086
$PY -m bear_ds prepare data.source=bear_csv "data.path=$DATA" "output_dir=$WORK/office" $PREPARE_EXTRA \
  >"$OUT/prepare.log" 2>&1 || { tail -n 20 "$OUT/prepare.log"; exit 1; }
$PY benchmarks/trainer_profile.py make-model "$WORK/model" --data "$WORK/office" $MAKE_ARGS >"$OUT/make_model.log" 2>&1 \
  || { tail -n 20 "$OUT/make_model.log"; exit 1; }
tail -n 1 "$OUT/make_model.log"
echo "setup: $((SECONDS - T0)) s"

for spec in $RUNS; do
  IFS=: read -r stage ckpt micro <<<"$spec"
  label="zero${stage}_ckpt-${ckpt}_b${micro}"
  ds=""
  [ "$stage" != 0 ] && ds=$DS_CONFIG_ARG
  start=$SECONDS
  # shellcheck disable=SC2086  # EXTRA and ds are word lists
  timeout 150 $PY benchmarks/trainer_profile.py run --label "$label" --steps "$STEPS" \
    "output_dir=$WORK/$label" "data.path=$WORK/office" model.name=hf "model.path=$WORK/model" \
    loss.name=bear "train.zero_stage=$stage" "model.gradient_checkpointing=$ckpt" \
    "train.micro_batch=$micro" "train.global_batch=$micro" train.lr=1e-5 train.warmup_steps=0 \
    eval.num_beams=10 $EXTRA $ds >"$OUT/$label.log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then
    grep '^{' "$OUT/$label.log" | tail -n 1 >>"$OUT/results.jsonl"
    echo "$label ok $((SECONDS - start)) s"
  else
    echo "$label FAILED (rc $rc) $((SECONDS - start)) s"
    tail -n 8 "$OUT/$label.log"
  fi
done

echo "================ $(cat "$OUT/card.txt"); $LAYERS layers, $STEPS steps per run, $((SECONDS - T0)) s"
$PY benchmarks/trainer_profile.py table "$OUT/results.jsonl" | tee "$OUT/table.md"
