"""Pruning-analysis benchmark: seconds per user of the exhaustive ranking, side by side on the same
users: the full trie walk; the bounded walk (subtrees below min(target's total, B-th best) skipped,
every record identical); the bounded walk with the rank cap `bear-ds analyze` uses (ranks exact
below B only: subtrees below the B-th best skipped whatever the target's total), which starts from
a narrow probe walk's groups; that capped walk started from beam search's B groups instead, as
before the probe (`probe=False`); and the capped walk again with one user per walk (`--per-user`:
the walk before it batched the users of a batch into the same forwards; same records required).

For each dataset: the paper's files prepared by bear_ds.data, a BPE trained on its titles and
prompts, a tiny Llama trained for a few LML steps (as benchmarks/beam_search.py builds them), B = 10,
mask after. Or, with `--run`, trained run folders (e.g. the demo's runs/demo/lml): their model,
catalog and first test users, with the mask `bear-ds analyze` chooses for them. Batches of users
alternate between the walks so that load from other processes hits all alike. Bounded records must
equal the full walk's (every integer and flag, log p to 1e-4); capped records too, except global
ranks at or beyond the cap (lower bounds there). Rows: trie-node rows forwarded per user (probe and
exact walk together).

    python benchmarks/exhaustive_analysis.py --data ../shared/data/Office ../shared/data/Clothing --users 32
    python benchmarks/exhaustive_analysis.py --run runs/demo/lml runs/demo/msl --users 96 --batch-users 16 --batch-items 2048
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from beam_search import _build  # noqa: E402  (same catalog, tokenizer and model recipe)

FLOAT_KEYS = ("exhaustive_logp", "target_logp")


def _same(full: dict, fast: dict) -> bool:
    skip = FLOAT_KEYS
    if fast.get("global_rank_exact") is False:  # the capped walk: a lower bound beyond the cap
        skip = (*FLOAT_KEYS, "global_rank")
    fast = {k: v for k, v in fast.items() if k != "global_rank_exact"}
    exact = {k: v for k, v in full.items() if k not in skip} == {k: v for k, v in fast.items() if k not in skip}
    close = all(abs(a - b) < 1e-4 for a, b in zip(full["exhaustive_logp"], fast["exhaustive_logp"], strict=True))
    return exact and close and abs(full.get("target_logp", 0.0) - fast.get("target_logp", 0.0)) < 1e-4


def _one_user_per_walk():
    """analyze_users' batched walk replaced by one walk per user (the same function, batches of one)."""
    from bear_ds.evaluation import exhaustive

    def per_user(model, prompts, targets, trie, *, bounds, **kwargs):
        return [
            exhaustive.exhaustive_scores_batch(model, [p], targets, trie, bounds=[b], **kwargs)[0]
            for p, b in zip(prompts, bounds, strict=True)
        ]

    return mock.patch("bear_ds.evaluation.pruning.exhaustive_scores_batch", per_user)


def _trained_run(run: Path, args: argparse.Namespace):
    """(model, catalog, prompt ids, target groups, pad id, mask) of a trained run folder's test users."""
    from bear_ds.config import load_config
    from bear_ds.distributed import make_accelerator
    from bear_ds.evaluation.evaluate import choose_mask, load_eval_inputs, load_eval_model

    cfg = load_config(
        run / "config.yaml",
        [f"model.path={run / 'model'}", f"output_dir={Path(args.out_root) / run.name}", "eval.split=test",
         f"eval.max_users={args.users}"],
    )  # fmt: skip
    accelerator = make_accelerator(None, timeout_s=60)
    inputs = load_eval_inputs(cfg, accelerator)
    model = load_eval_model(run / "model", accelerator)
    mask, _ = choose_mask(cfg.eval.mask, run / "model", cfg.loss.name)
    return model, inputs.catalog, inputs.prompt_ids, inputs.target_groups, inputs.pad_token_id, mask


@contextlib.contextmanager
def _counting_rows(counter: list[int]):
    """Adds every level's forwarded trie-node rows to counter[0]."""
    from bear_ds.evaluation import exhaustive

    score_level = exhaustive._BatchWalk.score_level

    def counting(self, level, *args):
        counter[0] += sum(child.numel() for _, _, child in level)
        return score_level(self, level, *args)

    with mock.patch.object(exhaustive._BatchWalk, "score_level", counting):
        yield


def bench(data: str, args: argparse.Namespace) -> dict:
    from bear_ds.evaluation.pruning import analyze_users

    if args.run:
        model, catalog, prompt_ids, targets, pad_id, mask = _trained_run(Path(data), args)
    else:
        args.data, args.out = data, str(Path(args.out_root) / Path(data).name)
        print(f"building {data} catalog, BPE and tiny Llama in {args.out} ...", flush=True)
        model, tokenizer, catalog, prompt_ids, targets, _ = _build(args, torch.device("cpu"))
        pad_id, mask = tokenizer.pad_token_id, "after"
    common = dict(
        num_beams=args.num_beams,
        eos_token_id=catalog.eos_token_id,
        pad_token_id=pad_id,
        mask=mask,
        batch_items=args.batch_items,
        batch_users=args.batch_users,
    )
    modes = {
        "full": {"bounded": False},
        "bounded": {"bounded": True},
        "capped": {"rank_cap": args.num_beams},
        "capped_unprobed": {"rank_cap": args.num_beams, "probe": False},
    }
    if args.per_user:
        modes["capped_per_user"] = modes["capped"]
    clocks = {m: [0.0, 0.0] for m in modes}
    rows = {m: [0] for m in modes}
    records: dict[str, list[dict]] = {m: [] for m in modes}
    for start in range(0, len(prompt_ids), args.batch_users):
        chunk = slice(start, start + args.batch_users)
        for mode, kwargs in modes.items():
            wall, cpu = time.perf_counter(), time.process_time()
            with (
                _one_user_per_walk() if mode == "capped_per_user" else contextlib.nullcontext(),
                _counting_rows(rows[mode]),
            ):
                records[mode] += analyze_users(
                    model, prompt_ids[chunk], targets[chunk], catalog.group_token_ids, catalog.trie, **kwargs, **common,
                )  # fmt: skip
            clocks[mode][0] += time.perf_counter() - wall
            clocks[mode][1] += time.process_time() - cpu
        done = min(start + args.batch_users, len(prompt_ids))
        print(f"  {done} users: " + ", ".join(f"{m} {c[0]:.1f} s wall {c[1]:.1f} s CPU" for m, c in clocks.items()))
    n = len(prompt_ids)
    return {
        "dataset": Path(data).name if not args.run else f"{data} (mask {mask})",
        "rows": {m: rows[m][0] / len(prompt_ids) for m in modes},
        "groups": catalog.num_groups,
        "trie_nodes": catalog.trie.num_nodes,
        "users": n,
        "in_top_b": sum(bool(r["in_top_b"]) for r in records["full"]),
        **{m: [c / n for c in clocks[m]] for m in modes},
        **{
            f"{m}_identical": sum(_same(a, b) for a, b in zip(records["full"], records[m], strict=True))
            for m in modes
            if m != "full"
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=["../shared/data/Office", "../shared/data/Clothing"])
    p.add_argument("--run", nargs="+", help="trained run folders to analyse instead of --data's tiny models")
    p.add_argument("--out-root", default="runs/bench_exhaustive")
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--num-beams", type=int, default=10)
    p.add_argument("--batch-users", type=int, default=8)
    p.add_argument("--batch-items", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=2000)
    p.add_argument("--train-steps", type=int, default=60, help="LML steps before the analysis (0: random model)")
    p.add_argument("--per-user", action="store_true", help="also time the capped walk one user at a time")
    args = p.parse_args()
    rows = [bench(data, args) for data in (args.run or args.data)]
    print()
    print("| dataset | groups | trie nodes | users | top-B targets | s/user (wall, CPU): full | bounded | capped "
          "| capped, no probe | CPU speed-up over full: bounded, capped, capped no probe | same records bounded, "
          "capped, capped no probe |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['dataset']} | {r['groups']:,} | {r['trie_nodes']:,} | {r['users']} | {r['in_top_b']} "
            + "".join(f"| {r[m][0]:.2f}, {r[m][1]:.2f} " for m in ("full", "bounded", "capped", "capped_unprobed"))
            + f"| {r['full'][1] / r['bounded'][1]:.1f}x, {r['full'][1] / r['capped'][1]:.1f}x, "
            f"{r['full'][1] / r['capped_unprobed'][1]:.1f}x "
            f"| {r['bounded_identical']}, {r['capped_identical']}, {r['capped_unprobed_identical']} of {r['users']} |"
        )
    for r in rows:
        print(
            f"{r['dataset']}: capped walk, probe / no probe: {r['capped_unprobed'][1] / r['capped'][1]:.2f}x CPU, "
            f"{r['capped_unprobed'][0] / r['capped'][0]:.2f}x wall; rows per user: "
            + ", ".join(f"{m} {n:,.0f}" for m, n in r["rows"].items())
        )
    for r in rows:
        if "capped_per_user" in r:
            print(
                f"{r['dataset']}: capped walk, batched / one user per walk: "
                f"{r['capped_per_user'][1] / r['capped'][1]:.2f}x CPU, {r['capped_per_user'][0] / r['capped'][0]:.2f}x wall, "
                f"same records {r['capped_per_user_identical']} of {r['users']}"
            )


if __name__ == "__main__":
    main()
