"""A tiny, learnable prepared dataset for the training tests (no shared data needed).

20 items; each user's history is 3 consecutive items of a cycle and the target is one of 4
"popular" items chosen by the first history item: the marginal (4 targets out of 20) is learnt
in a few steps, the mapping from the history after that.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

WORDS = ["red", "blue", "green", "stapler", "pen", "paper", "desk", "lamp", "clip", "folder"]


def write_prepared(
    folder: Path, rows: int = 256, items: int = 20, history: int = 3, varied_titles: bool = False
) -> Path:
    """varied_titles: titles of 1 to 4 words (responses of different lengths, so a step's number of
    response positions tells which examples it held); else every title has three words."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"i{k}" for k in range(items)]
    if varied_titles:
        titles = [" ".join(WORDS[(k + 3 * j) % 10] for j in range(k % 4)) + f" {k}" for k in range(items)]
    else:
        titles = [f"{WORDS[k % 10]} {WORDS[(k * 3 + 1) % 10]} {k}" for k in range(items)]
    pq.write_table(pa.table({"item_id": ids, "title": titles}), folder / "catalog.parquet")

    def split(n: int, offset: int) -> pa.Table:
        users, hist, target, ts = [], [], [], []
        for r in range(n):
            start = (r * 7 + offset) % items
            seq = [ids[(start + j) % items] for j in range(history)] + [ids[start % 4]]
            users.append(f"u{offset}_{r}")
            hist.append(seq[:-1])
            target.append(seq[-1])
            ts.append(1_600_000_000 + r)
        schema = pa.schema(
            [
                ("user_id", pa.string()),
                ("history", pa.list_(pa.string())),
                ("target", pa.string()),
                ("timestamp", pa.int64()),
            ]
        )
        return pa.table({"user_id": users, "history": hist, "target": target, "timestamp": ts}, schema=schema)

    pq.write_table(split(rows, 0), folder / "train.parquet")
    pq.write_table(split(16, 3), folder / "valid.parquet")
    pq.write_table(split(16, 5), folder / "test.parquet")
    stats = {"source": "test", "users": rows, "items": items, "domain": "office", "notes": "synthetic cycle"}
    (folder / "stats.json").write_text(json.dumps(stats))
    return folder
