#!/usr/bin/env bash
# Launch bear_ds.train with the `deepspeed` launcher. Outside `accelerate launch`, the DeepSpeed
# JSON is ds_configs/zero{train.zero_stage}.json (or train.ds_config=...), its "auto" values filled
# from the train section. --no_local_rank: bear_ds reads LOCAL_RANK from the environment.
#
#   one node, 8 GPUs:   launchers/deepspeed/run.sh --config CFG.yaml train.precision=bf16
#   several nodes:      HOSTFILE=launchers/deepspeed/hostfile launchers/deepspeed/run.sh --config CFG.yaml
#   CPU smoke test:     NUM_GPUS=2 launchers/deepspeed/run.sh data.path=PREPARED output_dir=OUT train.max_steps=4
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ -n "${HOSTFILE:-}" ]]; then
  exec deepspeed --hostfile "$HOSTFILE" --no_local_rank --module bear_ds.train "$@"
fi
exec deepspeed --num_nodes 1 --num_gpus "${NUM_GPUS:-8}" --no_local_rank --module bear_ds.train "$@"
