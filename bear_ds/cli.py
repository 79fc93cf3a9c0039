"""`bear-ds` command line: the only place that touches argv and exit codes.

Every subcommand takes `--config FILE.yaml` plus dotted overrides:

    bear-ds prepare data.source=bear_csv data.path=../shared/data/Office output_dir=runs/office_data
    bear-ds train --config configs/paper/office_bear.yaml loss.lam=0.5 train.seed=3
    accelerate launch --config_file launchers/accelerate/cpu_zero3.yaml -m bear_ds.train data.path=... output_dir=...
    bear-ds evaluate model.path=runs/x/model data.path=runs/office_data eval.num_beams=10 output_dir=runs/x/eval
    bear-ds analyze model.path=runs/x/model data.path=runs/office_data output_dir=runs/x/analysis
    bear-ds sweep --config configs/sweeps/office_ablation.yaml
    bear-ds report runs/demo          # or: bear-ds report --config configs/sweeps/office_ablation.yaml
    bear-ds config --config configs/paper/office_bear.yaml loss.lam=0.5   # every key, value and meaning
    bear-ds demo                      # the embedded default: ML-100k, tiny Llama, LML vs MSL vs BEAR
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import yaml
from pydantic import BaseModel

from bear_ds import __version__
from bear_ds.config import Config, load_config
from bear_ds.errors import BearDsError, report_user_error
from bear_ds.runtime import configure_logging, exit_process, run_scope

SUBCOMMANDS: dict[str, str] = {
    "prepare": "build train/valid/test splits, the catalog and stats.json from a data source",
    "train": "fine-tune a model with LML, MSL, BEAR, beamsim or S-DPO/DPO (single process or under accelerate/torchrun/deepspeed)",
    "evaluate": "trie-constrained beam search on a split; predictions.jsonl and metrics.json",
    "analyze": "exhaustive ranking and the beam-search pruning analysis",
    "sweep": "expand a grid of overrides, run (or write job scripts for) each point, aggregate",
    "report": "plots and results.md for a run, a folder of runs, or a sweep (RUN_DIR, else output_dir)",
    "config": "print the resolved config (--config file + overrides) with each key's description",
    "demo": "the embedded default end to end: ML-100k -> tiny Llama -> LML, MSL, BEAR -> results.md",
}


# Each command imports its module when it runs (deferred: torch, transformers and DeepSpeed load in
# seconds, and `bear-ds --help`, `bear-ds config` and a config error need none of them).
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


def _run_sweep(cfg: Config, overrides: Sequence[str] = ()) -> None:
    from bear_ds.pipeline import sweep

    sweep(cfg, overrides)


def _run_report(cfg: Config) -> None:
    from bear_ds.reports import report

    out = report(Path(cfg.output_dir))
    print(f"report written to {out}")


def _run_config(cfg: Config) -> None:
    print(describe_config(cfg), end="")


def describe_config(cfg: Config) -> str:
    """The resolved config as YAML (it loads back to the same config), each key commented with its description."""

    lines: list[str] = []

    def walk(section: BaseModel, depth: int) -> None:
        for name, field in type(section).model_fields.items():
            value = getattr(section, name)
            comment = f"  # {field.description}" if field.description else ""
            if isinstance(value, BaseModel):
                lines.append(f"{'  ' * depth}{name}:{comment}")
                walk(value, depth + 1)
                continue
            if isinstance(value, str) and "\n" in value:  # one line: a JSON string is a YAML double-quoted one
                text = json.dumps(value)
            else:
                text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...")
            lines.append(f"{'  ' * depth}{name}: {text}{comment}")

    walk(cfg, 0)
    return "\n".join(lines) + "\n"


def _run_demo(cfg: Config) -> None:
    from bear_ds.pipeline import demo

    demo(cfg)


# `bear-ds demo` defaults, under any --config file and overrides: sized so that LML, MSL and BEAR
# train, decode and are analysed on 2 slow CPU cores within about 12 minutes, and the pruning
# table has >= 30 top-10 positives per method. The recipe is configs/sweeps/ml100k_evidence.yaml's
# (compact prompt, 5 history items, lr 3e-3, batch 64) on a sample of its training windows.
DEMO_PRESET: list[str] = [
    "output_dir=runs/demo",
    "data.max_history=5",
    # of the 97,171 leave-last-out training windows: fewer windows fit a slow 2-core laptop better,
    # and the models trained on 20,000 still have >= 30 top-10 positives in 600 analysed users
    "data.train_sample=20000",
    # configs/prompts/compact.yaml: the history titles only (a from-scratch model learns nothing
    # from the Alpaca prompt's fixed text, which is half of a 5-item prompt's tokens)
    'prompt.template="{instruction}{input}\\n"',
    'prompt.instruction=""',
    'prompt.history_phrase=""',
    "train.epochs=1",
    "train.lr=3e-3",
    "train.global_batch=64",
    "train.micro_batch=64",
    "train.zero_stage=0",  # one process: ZeRO partitioning would only add gathers
    # of the 943 valid users decoded after the (one) epoch: with one epoch there is nothing to select,
    # so the valid figure is for reading only; the test split stays whole
    "train.eval_max_users=300",
    # of the 943 test users: the exhaustive ranking is a third of the demo's time; the first 600 test
    # users of the 20,000-window demo held 38 / 34 / 36 top-10 positives (LML / MSL / BEAR; 41 / 39 / 41 in 700)
    "analyze.max_users=600",
    # the exhaustive walk's rows of a batch's 16 users share forwards: bigger matrix products (the
    # same records; 1.3-1.4x less CPU time than 256 rows per forward one user at a time, 2 threads)
    "analyze.batch_items=2048",
]

RUNNERS: dict[str, Callable[[Config], None]] = {
    "prepare": _run_prepare,
    "train": _run_train,
    "evaluate": _run_evaluate,
    "analyze": _run_analyze,
    "sweep": _run_sweep,
    "demo": _run_demo,
    "report": _run_report,
    "config": _run_config,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bear-ds",
        description="BEAR fine-tuning and trie-constrained beam-search evaluation of LLM recommenders.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides are dotted keys, e.g. loss.lam=0.5 train.seed=3 eval.num_beams=20. "
        "See configs/ and docs/architecture.md.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", "-c", default=None, help="YAML config (may compose others via `defaults:`)")
        # the `deepspeed` launcher passes --local_rank; the rank is read from the environment instead
        p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
        p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. loss.lam=0.5")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        with run_scope():
            return _run_command(args)
    except BearDsError as err:  # names the key, file or value; anything else keeps its traceback (exit 1)
        return report_user_error(f"bear-ds {args.command}", err)


def _run_command(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.command == "report" and overrides and "=" not in overrides[0]:
        overrides[0] = f"output_dir={overrides[0]}"  # `bear-ds report RUN_DIR`: the folder to report on
    cfg = load_config(args.config, overrides, preset=DEMO_PRESET if args.command == "demo" else None)
    runner = RUNNERS[args.command]
    if args.command == "sweep":  # a two-stage sweep applies the command line's overrides to stage 1 too
        runner = functools.partial(_run_sweep, overrides=overrides)
    runner(cfg)  # each command leaves its process group itself (end_distributed)
    return 0


def console_main() -> NoReturn:
    """The `bear-ds` console script and `python -m bear_ds[.cli]`."""
    exit_process(main())


if __name__ == "__main__":
    console_main()
