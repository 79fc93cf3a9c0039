"""Micro-benchmark: catalog + trie build and batched trie queries on a real catalog (CPU by default).

    OMP_NUM_THREADS=1 python benchmarks/bench_catalog_trie.py --catalog ../shared/data/Clothing/id2name4Rec.json

States are sampled from the nodes on the gold paths (what the loss and the beam search query).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bear_ds.catalog import Catalog
from bear_ds.tokenization import train_bpe_tokenizer
from bear_ds.trie import TokenTrie


class QuotedResponse:
    def response(self, title: str) -> str:
        return f'"{title}"'


def per_call(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", type=Path, default=Path("../shared/data/Clothing/id2name4Rec.json"))
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--batches", type=int, nargs="+", default=[160, 4096], help="states per query")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    items = json.loads(args.catalog.read_text())
    t0 = time.perf_counter()
    tok = train_bpe_tokenizer((f'"{t}"' for t in items.values()), args.vocab_size)
    t1 = time.perf_counter()
    cat = Catalog.build(items, tok, QuotedResponse())
    t2 = time.perf_counter()
    TokenTrie.from_sequences(cat.group_token_ids, cat.vocab_size, list(range(cat.num_groups)))
    t3 = time.perf_counter()
    trie = cat.trie.to(device)
    lengths = [len(ids) for ids in cat.group_token_ids]
    print(
        f"catalog {args.catalog}: {cat.num_items} items, {cat.num_groups} groups, "
        f"{cat.num_shared_title_items} items with a shared title; vocab {cat.vocab_size}; "
        f"response tokens mean {sum(lengths) / len(lengths):.1f} max {max(lengths)}; "
        f"trie {trie.num_nodes} nodes"
    )
    print(
        f"BPE training {t1 - t0:.2f} s | Catalog.build (tokenise + group + trie) {t2 - t1:.2f} s | trie build alone {t3 - t2:.3f} s"
    )

    targets = torch.full((cat.num_groups, max(lengths)), -100, dtype=torch.int64)
    for g, ids in enumerate(cat.group_token_ids):
        targets[g, : len(ids)] = torch.tensor(ids)
    targets = targets.to(device)
    dt = per_call(lambda: trie.states_along(targets), 3, device)
    print(f"states_along all {cat.num_groups} titles x {max(lengths)}: {dt * 1e3:.1f} ms")

    on_path = trie.states_along(targets)
    gold_states = on_path[on_path >= 0]  # every (title, position) state, with its gold next token
    gold_tokens = targets[on_path >= 0]
    gen = torch.Generator().manual_seed(0)
    for batch in args.batches:
        pick = torch.randint(gold_states.numel(), (batch,), generator=gen).to(device)
        states, tokens = gold_states[pick], gold_tokens[pick]
        reps = 20 if batch > 1000 else 200
        rows = [
            ("allowed_mask", per_call(lambda s=states: trie.allowed_mask(s), reps, device)),
            ("allowed_pairs", per_call(lambda s=states: trie.allowed_pairs(s), reps, device)),
            ("advance", per_call(lambda s=states, t=tokens: trie.advance(s, t), reps * 5, device)),
        ]
        for name, sec in rows:
            print(f"  {name:13s} batch {batch:5d}: {sec * 1e3:7.3f} ms/call  {batch / sec / 1e6:6.2f} M states/s")


if __name__ == "__main__":
    main()
