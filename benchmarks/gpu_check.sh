#!/usr/bin/env bash
# Every GPU check in one call (the device tool lends one H100/H200 for minutes), ending in a short table:
#   train_step_1b  LML/MSL/BEAR training step on a random-init Llama-3.2-1B shape, bf16, sdpa: step time,
#                  tokens/s, peak memory, model FLOPs utilisation, BEAR/MSL and BEAR/LML ratios
#   loss_head      the released loss head vs ours at V = 128,256, N = 2k and 8k response positions
#   beam_search    our constrained beam search vs transformers generate + a Python trie on Office, users/s
#   zero3          `bear-ds train` through Accelerate + DeepSpeed ZeRO-3 on nccl, bf16, then
#                  `bear-ds evaluate` of the exported model on the GPU (users/s, HR@10)
#   stages         the one-GPU training loop at ZeRO stage 0 vs 3 (median step), and a cProfile of
#                  stage 3 (STAGE_PROFILE=0 leaves it out)
# CHECKS="loss_head stages" runs a subset. docs/results.md section 6 has the figures of one H100.
#
# Prepare here, once, with the project's venv (the GPU image has torch, accelerate and numpy, but no
# deepspeed, datasets or pydantic, an older transformers, and no network), into the git-ignored
# benchmarks/gpu_carry:
#   PY=.venv/bin/python bash benchmarks/gpu_check.sh --prepare
# then through the device tool, carry=["benchmarks/gpu_carry"], timeout_s=560 (it took 297 s on an H100):
#   bash benchmarks/gpu_check.sh
# A dry run on this CPU machine with tiny sizes (checks the plumbing, not the GPU):
#   DEV=cpu PY=.venv/bin/python bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=benchmarks/gpu_carry
PY=${PY:-python3}
if [ "${1:-}" = "--prepare" ]; then  # PY: the project's venv python (deepspeed's sdist imports torch to build)
  # the versions this repository is tested with (constraints.txt), for CPython 3.12 on x86-64 Linux
  mkdir -p "$CARRY/wheels" "$CARRY/Office"
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$CARRY/wheels" transformers==5.23.0 huggingface_hub==2.4.0 hf-xet==1.8.0 httpx2==2.16.2 \
    httpcore2==2.16.2 truststore datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 hjson==3.1.0 \
    pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection peft==0.21.2 \
    tokenizers==0.23.3 || exit 1
  $PY -m pip wheel -q --no-deps -w "$CARRY/wheels" deepspeed==0.19.8 || exit 1  # an sdist: build the pure wheel here
  cp ../shared/data/Office/{train_10000.csv,test_5000.csv,id2name4Rec.json} "$CARRY/Office/" || exit 1
  du -sh "$CARRY"
  exit 0
fi

OUT=${OUT:-/tmp/gpu_check}
WORK=${WORK:-/tmp/gpu_check_work}
DEV=${DEV:-cuda}
mkdir -p "$OUT" "$WORK"
source "$(dirname "$0")/carried_wheels.sh"  # PYTHONPATH (+ carried wheels on a GPU), DATA
if [ "$DEV" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
  STEP_ARGS="--hidden 2048 --layers 16 --heads 32 --kv-heads 8 --intermediate 8192 --tie --vocab 128256
             --micro-batch 16 --seq-len 512 --rounds 8"
  HEAD_ARGS=${HEAD_ARGS:-"--vocab 128256 --positions 2048 8192"}
  BEAM_ARGS="--users 256 --batch-users 64 --train-steps 60"
  STAGE_STEPS=40
  TRAIN_ARGS="train.precision=bf16 train.max_steps=80 model.hidden_size=512 model.num_layers=8
              model.num_heads=8 model.intermediate_size=1408 eval.max_users=512 eval.batch_users=64 eval.top_k=[1,5,10]"
else  # plumbing only
  echo "cpu dry run" | tee "$OUT/card.txt"
  STEP_ARGS="--hidden 64 --layers 2 --heads 2 --kv-heads 1 --intermediate 128 --tie --vocab 2048
             --micro-batch 2 --seq-len 64 --items 300 --title-len 8 --rounds 1"
  HEAD_ARGS="--device cpu --vocab 2048 --positions 64 --hidden 32 --repeats 1"
  BEAM_ARGS="--users 8 --batch-users 4 --train-steps 2"
  STAGE_STEPS=7
  TRAIN_ARGS="train.max_steps=3 eval.max_users=8 eval.batch_users=4 eval.top_k=[1,5,10]"
fi
$PY - 2>/dev/null <<'EOF' | grep -v WARNING | tee "$OUT/versions.txt"
import importlib
print(" ".join(f"{m} {importlib.import_module(m).__version__}"
               for m in ("torch", "transformers", "accelerate", "deepspeed", "peft", "datasets")))
EOF

run() {  # name, time limit (s), command...: keep going when one check fails, and say so in the table
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  if [ $rc -eq 0 ]; then status="ok"; else status="FAIL (rc $rc)"; fi
  printf '%-13s %-13s %4ss\n' "$name" "$status" "$((SECONDS - start))" | tee -a "$OUT/status.txt"
}
stage_times() {  # one-GPU training loop at ZeRO stage 0 vs 3, same model and batches; a profile of stage 3
  for stage in 0 3; do
    $PY -m bear_ds train --config configs/office/bear.yaml "output_dir=$WORK/stage$stage" "data.path=$DATA" \
      train.zero_stage=$stage train.epochs=1 train.eval_every_epoch=false $TRAIN_ARGS train.max_steps=$STAGE_STEPS \
      >"$WORK/stage$stage.log" 2>&1 || { tail -n 20 "$WORK/stage$stage.log"; return 1; }
  done
  [ "${STAGE_PROFILE:-1}" = 1 ] && $PY -m cProfile -o "$WORK/stage3.prof" -m bear_ds train --config configs/office/bear.yaml \
    "output_dir=$WORK/stage3_profiled" "data.path=$DATA" train.zero_stage=3 train.epochs=1 \
    train.eval_every_epoch=false $TRAIN_ARGS train.max_steps=$STAGE_STEPS >"$WORK/stage3_profiled.log" 2>&1
  $PY - "$WORK" <<'PYEOF'
import json, os, pstats, statistics, sys
work = sys.argv[1]
for stage in (0, 3):
    rows = [json.loads(line) for line in open(f"{work}/stage{stage}/train_log.jsonl")]
    steady = [r for r in rows if r["step"] > 5]  # after allocator and kernel warm-up
    step = statistics.median(r["step_time_s"] for r in steady)
    tok = statistics.median(r["tokens_per_s"] for r in steady)
    print(f"ZeRO stage {stage}: median step {step:.3f} s, {tok:,.0f} tokens/s over steps 6-{rows[-1]['step']}")
if os.path.exists(f"{work}/stage3.prof"):
    pstats.Stats(f"{work}/stage3.prof").sort_stats("tottime").print_stats(18)
PYEOF
}

export -f stage_times
export PY WORK DATA TRAIN_ARGS STAGE_STEPS STAGE_PROFILE
declare -A CHECK
for name in ${CHECKS:-train_step_1b loss_head beam_search zero3 stages}; do CHECK[$name]=1; done
# shellcheck disable=SC2086  # the *_ARGS are word lists
[ -n "${CHECK[train_step_1b]:-}" ] && run train_step_1b 120 $PY benchmarks/train_step.py --device "$DEV" $STEP_ARGS
[ -n "${CHECK[loss_head]:-}" ] && run loss_head 150 $PY benchmarks/loss_head.py $HEAD_ARGS
[ -n "${CHECK[beam_search]:-}" ] && run beam_search 100 $PY benchmarks/beam_search.py --device "$DEV" --data "$DATA" \
  --out "$WORK/beam" $BEAM_ARGS
if [ -n "${CHECK[zero3]:-}" ]; then
  run zero3_train 100 $PY -m bear_ds train --config configs/office/bear.yaml "output_dir=$WORK/zero3" \
    "data.path=$DATA" train.zero_stage=3 train.epochs=1 train.eval_every_epoch=false $TRAIN_ARGS
  run zero3_eval 60 $PY -m bear_ds evaluate --config configs/office/bear.yaml "output_dir=$WORK/zero3_eval" \
    "data.path=$DATA" "model.path=$WORK/zero3/model" $TRAIN_ARGS
  cp "$WORK/zero3/summary.json" "$OUT/zero3_summary.json" 2>/dev/null
  cp "$WORK/zero3_eval/metrics.json" "$OUT/zero3_eval_metrics.json" 2>/dev/null
fi
[ -n "${CHECK[stages]:-}" ] && run stages 200 bash -c stage_times

echo "================ summary: $(cat "$OUT/card.txt"); $(cat "$OUT/versions.txt") ================"
cat "$OUT/status.txt"
show() { [ -f "$OUT/$1.log" ] && { echo "--- $1"; tr '\r' '\n' <"$OUT/$1.log" | grep -v -E "$3" | tail -n "$2"; }; }
show train_step_1b 6 "^$"
show loss_head 9 "^$"
show beam_search 8 "^$"
show zero3_train 2 "it/s|Saving|saved|Warning|return func"
[ -f "$OUT/zero3_summary.json" ] && $PY -c 'import json,sys; s=json.load(open(sys.argv[1])); print({k: s[k] for k in ("steps", "zero_stage", "loss", "train_time_s", "optim_time_s")})' \
  "$OUT/zero3_summary.json"
show zero3_eval 1 "^$"
show stages 40 "^$"
