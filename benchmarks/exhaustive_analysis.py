"""Pruning-analysis benchmark: seconds per user of the exhaustive ranking, full trie walk vs the
bounded walk (subtrees below min(target's total, B-th best) skipped), side by side on the same users.

For each dataset: the paper's files prepared by bear_ds.data, a BPE trained on its titles and
prompts, a tiny Llama trained for a few LML steps (as benchmarks/beam_search.py builds them), B = 10,
mask after. Batches of users alternate between the two walks so that load from other processes hits
both alike; the records of both must be identical (every integer and flag, log p to 1e-4).

    python benchmarks/exhaustive_analysis.py --data ../shared/data/Office ../shared/data/Clothing --users 32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from beam_search import _build  # noqa: E402  (same catalog, tokenizer and model recipe)

FLOAT_KEYS = ("exhaustive_logp", "target_logp")


def _same(full: dict, fast: dict) -> bool:
    exact = {k: v for k, v in full.items() if k not in FLOAT_KEYS} == {
        k: v for k, v in fast.items() if k not in FLOAT_KEYS
    }
    close = all(abs(a - b) < 1e-4 for a, b in zip(full["exhaustive_logp"], fast["exhaustive_logp"], strict=True))
    return exact and close and abs(full.get("target_logp", 0.0) - fast.get("target_logp", 0.0)) < 1e-4


def bench(data: str, args: argparse.Namespace) -> dict:
    from bear_ds.evaluation.analysis import analyze_users

    args.data, args.out = data, str(Path(args.out_root) / Path(data).name)
    print(f"building {data} catalog, BPE and tiny Llama in {args.out} ...", flush=True)
    model, tokenizer, catalog, prompt_ids, targets, _ = _build(args, torch.device("cpu"))
    common = dict(
        num_beams=args.num_beams,
        eos_token_id=catalog.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        mask="after",
        batch_items=args.batch_items,
        batch_users=args.batch_users,
    )
    clocks = {False: [0.0, 0.0], True: [0.0, 0.0]}
    records: dict[bool, list[dict]] = {False: [], True: []}
    for start in range(0, len(prompt_ids), args.batch_users):
        chunk = slice(start, start + args.batch_users)
        for bounded in (False, True):
            wall, cpu = time.perf_counter(), time.process_time()
            records[bounded] += analyze_users(
                model, prompt_ids[chunk], targets[chunk], catalog.group_token_ids, catalog.trie,
                bounded=bounded, **common,
            )  # fmt: skip
            clocks[bounded][0] += time.perf_counter() - wall
            clocks[bounded][1] += time.process_time() - cpu
        print(f"  {min(start + args.batch_users, len(prompt_ids))} users: full {clocks[False]}, bounded {clocks[True]}")
    n = len(prompt_ids)
    return {
        "dataset": Path(data).name,
        "groups": catalog.num_groups,
        "trie_nodes": catalog.trie.num_nodes,
        "users": n,
        "in_top_b": sum(bool(r["in_top_b"]) for r in records[False]),
        "full": [c / n for c in clocks[False]],
        "bounded": [c / n for c in clocks[True]],
        "identical": sum(_same(a, b) for a, b in zip(records[False], records[True], strict=True)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=["../shared/data/Office", "../shared/data/Clothing"])
    p.add_argument("--out-root", default="runs/bench_exhaustive")
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--num-beams", type=int, default=10)
    p.add_argument("--batch-users", type=int, default=8)
    p.add_argument("--batch-items", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=2000)
    p.add_argument("--train-steps", type=int, default=60, help="LML steps before the analysis (0: random model)")
    args = p.parse_args()
    rows = [bench(data, args) for data in args.data]
    print()
    print("| dataset | groups | trie nodes | users | top-B targets | full s/user (wall, CPU) | bounded s/user (wall, CPU) "
          "| speed-up (CPU) | identical records |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['dataset']} | {r['groups']:,} | {r['trie_nodes']:,} | {r['users']} | {r['in_top_b']} "
            f"| {r['full'][0]:.2f}, {r['full'][1]:.2f} | {r['bounded'][0]:.2f}, {r['bounded'][1]:.2f} "
            f"| {r['full'][1] / r['bounded'][1]:.1f}x | {r['identical']} / {r['users']} |"
        )


if __name__ == "__main__":
    main()
