"""`bear-ds` command line: the only place that touches argv and exit codes.

Every subcommand takes `--config FILE.yaml` plus dotted overrides:

    bear-ds prepare data.source=bear_csv data.path=../shared/data/Office output_dir=runs/office_data
    bear-ds train --config configs/paper/office_bear.yaml loss.lam=0.5 train.seed=3
    accelerate launch --config_file launchers/accelerate/cpu_zero3.yaml -m bear_ds.train data.path=... output_dir=...
    bear-ds evaluate model.path=runs/x/model data.path=runs/office_data eval.num_beams=10 output_dir=runs/x/eval
    bear-ds analyze model.path=runs/x/model data.path=runs/office_data output_dir=runs/x/analysis
    bear-ds sweep --config configs/sweeps/office_ablation.yaml
    bear-ds report runs/demo
    bear-ds demo                      # the embedded default: ML-100k, tiny Llama, LML vs MSL vs BEAR
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from bear_ds.config import Config, ConfigError, load_config

SUBCOMMANDS: dict[str, str] = {
    "prepare": "build train/valid/test splits, the catalog and stats.json from a data source",
    "train": "fine-tune a model with LML, MSL or BEAR (single process or under accelerate/torchrun/deepspeed)",
    "evaluate": "trie-constrained beam search on a split; predictions.jsonl and metrics.json",
    "analyze": "exhaustive ranking and the beam-search pruning analysis",
    "sweep": "expand a grid of overrides, run (or write job scripts for) each point, aggregate",
    "report": "plots and results.md for a run, a folder of runs, or a sweep",
    "demo": "the embedded default end to end: ML-100k -> tiny Llama -> LML, MSL, BEAR -> results.md",
}


def _run_prepare(cfg: Config) -> None:
    from bear_ds.data import prepare

    out = prepare(cfg)
    print(f"prepared dataset written to {out}")


def _run_train(cfg: Config) -> None:
    from bear_ds.training import train

    train(cfg)


def _run_evaluate(cfg: Config) -> None:
    from bear_ds.evaluation.evaluate import evaluate

    evaluate(cfg)


def _run_analyze(cfg: Config) -> None:
    from bear_ds.evaluation.analysis import analyze

    analyze(cfg)


def _run_sweep(cfg: Config) -> None:
    from bear_ds.pipeline import sweep

    sweep(cfg)


def _run_demo(cfg: Config) -> None:
    from bear_ds.pipeline import demo

    demo(cfg)


# `bear-ds demo` defaults, under any --config file and overrides: sized so that LML, MSL and BEAR
# train, decode and are analysed on 2 CPU cores within the README's 15 minutes.
DEMO_PRESET: list[str] = [
    "output_dir=runs/demo",
    "data.train_sample=12000",  # of the 97,171 leave-last-out training windows (the paper samples 10,000)
    "train.epochs=2",
    "train.lr=2e-3",
    "train.zero_stage=0",  # one process: ZeRO partitioning would only add gathers
    "train.eval_max_users=200",  # valid users decoded per epoch for epoch selection (test: all 943)
    "analyze.max_users=100",  # the exhaustive ranking scores every movie for each user
]

RUNNERS: dict[str, Callable[[Config], None]] = {
    "prepare": _run_prepare,
    "train": _run_train,
    "evaluate": _run_evaluate,
    "analyze": _run_analyze,
    "sweep": _run_sweep,
    "demo": _run_demo,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bear-ds",
        description="BEAR fine-tuning and trie-constrained beam-search evaluation of LLM recommenders.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides are dotted keys, e.g. loss.lam=0.5 train.seed=3 eval.num_beams=20. "
        "See configs/ and docs/architecture.md.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == "report":
            p.add_argument("run_dir", help="a run folder, a folder of runs, or a sweep folder")
            continue
        p.add_argument("--config", "-c", default=None, help="YAML config (may compose others via `defaults:`)")
        # the `deepspeed` launcher passes --local_rank; the rank is read from the environment instead
        p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
        p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. loss.lam=0.5")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "report":
            from bear_ds.reports import report

            out = report(Path(args.run_dir))
            print(f"report written to {out}")
            return 0
        cfg = load_config(args.config, args.overrides, preset=DEMO_PRESET if args.command == "demo" else None)
        RUNNERS[args.command](cfg)  # each command leaves its process group itself (end_distributed)
    except ConfigError as err:
        print(f"bear-ds {args.command}: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, ValueError, RuntimeError) as err:
        # RuntimeError only for our own SweepError: a torch RuntimeError keeps its traceback
        if os.environ.get("BEAR_DS_TRACEBACK") or (
            isinstance(err, RuntimeError) and type(err).__name__ != "SweepError"
        ):
            raise
        # data, catalog, sweep and output-folder errors name the file/line/key; a traceback would bury that
        # (BEAR_DS_TRACEBACK=1 shows it)
        print(f"bear-ds {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
