#!/usr/bin/env bash
# Every GPU check in one call (the device tool lends one H100/H200 for minutes): training-step cost of
# LML/MSL/BEAR on a random-init ~1B Llama in bf16 (step time, tokens/s, peak memory, MFU, BEAR/MSL ratio),
# the loss-head memory benchmark at V = 32k/128k, and beam-search users/s vs transformers generate.
#
# Prepare here (the GPU image has torch, transformers, accelerate, peft; no deepspeed, no network):
#   mkdir -p benchmarks/wheels && pip download --no-deps -d benchmarks/wheels pydantic pydantic-core \
#       annotated-types typing-inspection && pip wheel --no-deps -w benchmarks/wheels deepspeed==0.19.8 .
# then run it through the device tool with carry=["benchmarks/wheels"] and a timeout of ~480 s:
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if [ -d benchmarks/wheels ]; then
  pip install -q --no-deps --no-index --find-links benchmarks/wheels benchmarks/wheels/*.whl 2>&1 | tail -2
fi
pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"

run() {  # name, timeout, command...: keep going when one check fails, say so in the table
  local name=$1 limit=$2; shift 2
  if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then echo "ok   $name"; else echo "FAIL $name (rc $?)"; fi
}
run train_step_1b 200 python benchmarks/train_step.py --device cuda --dtype bf16 --hidden 2048 --layers 16 \
    --heads 32 --vocab 128256 --micro-batch 16 --seq-len 256 --rounds 8
run loss_head 150 python benchmarks/loss_head.py
run beam_search 150 python benchmarks/beam_search.py --out "$OUT/beam" --users 256 --batch-users 64 --train-steps 0

echo "================ summary ($(cat "$OUT/card.txt")) ================"
for f in train_step_1b loss_head beam_search; do
  echo "--- $f"; tail -n 12 "$OUT/$f.log"
done
