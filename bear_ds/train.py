"""`python -m bear_ds.train [--config FILE] key=value ...`: the entry point launchers run.

    accelerate launch --config_file launchers/accelerate/cpu_zero3.yaml -m bear_ds.train \\
        data.path=PREPARED model.name=tiny loss.name=bear train.max_steps=12 train.save_every=6 output_dir=OUT
    deepspeed --num_gpus 8 --module bear_ds.train --config configs/x.yaml train.zero_stage=3
    torchrun --nproc_per_node 8 -m bear_ds.train --config configs/x.yaml

An error on any rank exits non-zero (2 for the tool's own errors, printed as one line; 1 with the
traceback for anything else), so the launcher stops the other ranks.
"""

from __future__ import annotations

import argparse

from bear_ds.config import load_config
from bear_ds.errors import BearDsError, report_user_error
from bear_ds.runtime import configure_logging, exit_process, run_scope


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bear_ds.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="YAML config file (with optional defaults: chain)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.lam=0.5 train.seed=3")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        cfg = load_config(args.config, args.overrides)
        from bear_ds.training import train  # deferred: a config error is reported before torch loads

        with run_scope():
            train(cfg)
    except BearDsError as err:  # one line naming the key, file or value; anything else keeps its traceback
        return report_user_error("python -m bear_ds.train", err)
    return 0


if __name__ == "__main__":
    exit_process(main())
