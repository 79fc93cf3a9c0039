"""Profile the real trainer (`bear-ds train`, in this process) on one configuration: the helper of
benchmarks/gpu_profile.sh.

    python benchmarks/trainer_profile.py make-model OUT --data PREPARED --layers 8 [--tiny] [--device cuda]
    python benchmarks/trainer_profile.py run --label NAME --steps 10 -- KEY=VALUE ...   # one JSON line
    python benchmarks/trainer_profile.py table RESULTS.jsonl                           # the markdown table

make-model: a randomly initialised Qwen2.5-7B-shaped model (hidden 3584, MLP 18944, 28 heads, 4
key-value heads, vocabulary 152,064, untied, qkv biases) cut to --layers decoder layers, saved in
bf16 as a Hugging Face folder with a BPE tokenizer trained on the prepared catalog's titles
(`--tiny`: the same architecture at hidden 64, for a CPU dry run).

run: `bear_ds.cli.main(["train", ...])`, the path `bear-ds train` takes, with two things left out
that are not the step being profiled: checkpoints and the final export (for a 3B-parameter model
they write tens of GB). While the optimiser steps run, the collectives that torch.distributed is
asked for are counted (all-gathers: ZeRO-3 gathers parameters with them; a coalesced gather counts
once per call; on one GPU ZeRO-3 gathers nothing but the lm_head of the loss head: with a single
partition DeepSpeed skips its parameter all-gathers). Prints one JSON line: median tokens/s and MFU over the steps after the first two
(allocator and kernel warm-up), mean padded share, peak GPU memory, all-gathers and host syncs
per micro-step, and whether activation checkpointing ran.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
from pathlib import Path

import torch

QWEN25_7B = dict(
    hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
    vocab_size=152064, max_position_embeddings=4096, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)  # fmt: skip
TINY = dict(QWEN25_7B, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=4096)  # fmt: skip
COLLECTIVES = ("all_gather_into_tensor", "all_gather", "_all_gather_base", "all_gather_coalesced",
               "reduce_scatter_tensor", "all_reduce")  # fmt: skip
WARMUP_STEPS = 2


def make_model(args: argparse.Namespace) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from bear_ds.data import load_catalog
    from bear_ds.tokenization import ensure_pad_token, train_bpe_tokenizer

    out = Path(args.out)
    titles = list(load_catalog(args.data).values())
    tokenizer = train_bpe_tokenizer(titles, 8000 if not args.tiny else 2000)
    ensure_pad_token(tokenizer)
    shape = TINY if args.tiny else QWEN25_7B
    config = Qwen2Config(**shape, num_hidden_layers=args.layers,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    assert len(tokenizer) <= config.vocab_size
    torch.manual_seed(0)
    with torch.device(args.device):  # initialised where it is fast (a GPU for billions of parameters)
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    print(f"{out}: Qwen2.5-7B shape, {args.layers} layers, {params / 1e9:.2f}B parameters")


class CollectiveCounter:
    """Counts the torch.distributed collectives called while `counting` (patched module functions,
    looked up at call time by DeepSpeed's and Accelerate's wrappers)."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.counting = False
        import torch.distributed as dist
        from torch.distributed import distributed_c10d

        for module in (dist, distributed_c10d):  # DeepSpeed calls both (distributed_c10d when coalescing)
            for name in COLLECTIVES:
                original = getattr(module, name, None)
                if original is not None:
                    setattr(module, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def counted(*args, **kwargs):
            if self.counting:
                self.counts[name] += 1
            return original(*args, **kwargs)

        return counted


def run(args: argparse.Namespace) -> None:
    from bear_ds.cli import main as cli_main
    from bear_ds.training import trainer

    collectives = CollectiveCounter()
    micro_steps = [0]
    step = trainer.Trainer.optimizer_step

    def counted_step(self, step_micro_batches):
        collectives.counting = True
        try:
            return step(self, step_micro_batches)
        finally:
            collectives.counting = False
            micro_steps[0] += len(step_micro_batches) // self.world

    trainer.Trainer.optimizer_step = counted_step
    trainer.Trainer.save_checkpoint = lambda self: None  # not the step being profiled (tens of GB)
    trainer.Trainer.export = lambda self, name, extra: None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    overrides = [*args.overrides, f"train.max_steps={args.steps}", "train.eval_every_epoch=false"]
    rc = cli_main(["train", *overrides])
    if rc:
        raise SystemExit(f"bear-ds train failed (exit {rc})")
    out = next(o.split("=", 1)[1] for o in args.overrides if o.startswith("output_dir="))
    log = [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]
    summary = json.loads((Path(out) / "summary.json").read_text())
    steady = log[WARMUP_STEPS:] or log
    mfus = [r["mfu"] for r in steady if r["mfu"] is not None]
    gathers = sum(n for name, n in collectives.counts.items() if name.startswith(("all_gather", "_all_gather")))
    print(json.dumps({
        "label": args.label,
        "zero_stage": summary["zero_stage"],
        "gradient_checkpointing": summary["gradient_checkpointing"],
        "micro_batch": next((int(o.split("=")[1]) for o in args.overrides if o.startswith("train.micro_batch=")), None),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "mfu": statistics.median(mfus) if mfus else None,
        "padded_frac": statistics.fmean(r["padded_frac"] for r in steady),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "all_gathers_per_micro_step": gathers / max(micro_steps[0], 1),
        "host_syncs_per_micro_step": sum(r["host_syncs"] for r in log) / max(micro_steps[0], 1),
        "collectives": dict(collectives.counts),
        "steps": len(log),
    }))  # fmt: skip


def table(args: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.startswith("{")]
    print(
        "| run | ZeRO | ckpt | B | tokens/s | MFU | padded | peak GiB | all-gathers / micro-step | host syncs / micro-step |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        print(f"| {r['label']} | {r['zero_stage']} | {'on' if r['gradient_checkpointing'] else 'off'} | "
              f"{r['micro_batch']} | {r['tokens_per_s']:,.0f} | {mfu} | {r['padded_frac']:.1%} | {peak} | "
              f"{r['all_gathers_per_micro_step']:.1f} | {r['host_syncs_per_micro_step']:.1f} |")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make-model")
    m.add_argument("out")
    m.add_argument("--data", required=True, help="a prepared data folder (its catalog trains the tokenizer)")
    m.add_argument("--layers", type=int, default=8)
    m.add_argument("--tiny", action="store_true")
    m.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r = sub.add_parser("run")
    r.add_argument("--label", required=True)
    r.add_argument("--steps", type=int, default=10)
    r.add_argument("overrides", nargs="+", help="bear-ds train overrides; output_dir=... is required")
    t = sub.add_parser("table")
    t.add_argument("results")
    args = p.parse_args()
    {"make-model": make_model, "run": run, "table": table}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
