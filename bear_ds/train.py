"""`python -m bear_ds.train [--config FILE] key=value ...`: the entry point launchers run.

    accelerate launch --config_file launchers/accelerate/cpu_zero3.yaml -m bear_ds.train \\
        data.path=PREPARED model.name=tiny loss.name=bear train.max_steps=12 train.save_every=6 output_dir=OUT
    deepspeed --num_gpus 8 --module bear_ds.train --config configs/x.yaml train.zero_stage=3
    torchrun --nproc_per_node 8 -m bear_ds.train --config configs/x.yaml

An exception on any rank propagates (non-zero exit), so the launcher stops the other ranks.
"""

from __future__ import annotations

import argparse
import sys

from bear_ds.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bear_ds.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="YAML config file (with optional defaults: chain)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.lam=0.5 train.seed=3")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    from bear_ds.training import train

    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
