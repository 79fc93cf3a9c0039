"""Shared pieces of the data sources: the error type, problem bookkeeping, sliding windows, splits.

Every source turns its raw files into a `SourceData` (split tables, catalog, drop counts, notes);
`bear_ds.data.prepare` writes it out. Windows and splits are columnar (numpy index arithmetic and
Arrow `take`), never a Python loop per row.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bear_ds.errors import DataError  # noqa: F401  (re-exported: bear_ds.data.common.DataError)

SPLITS = ("train", "valid", "test")
EXAMPLE_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("history", pa.list_(pa.string())),
        ("target", pa.string()),
        ("timestamp", pa.int64()),
    ]
)
CATALOG_SCHEMA = pa.schema([("item_id", pa.string()), ("title", pa.string())])
MAX_EXAMPLES_PER_PROBLEM = 3


@dataclass
class SourceData:
    """What a source hands to `prepare`: the three split tables, the catalog and the bookkeeping."""

    source: str
    domain: str
    splits: dict[str, pa.Table]
    catalog: pa.Table
    dropped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class Problems:
    """Collects bad rows by reason: raise them all at once, or count them as drops.

    With `drop=False` (the default config) `raise_if_any` stops with every reason and its first
    examples; with `drop=True` each reason's row count ends up in stats.json under `dropped`.
    """

    def __init__(self, drop: bool) -> None:
        self.drop = drop
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, count: int, examples: list[str]) -> None:
        if count <= 0:
            return
        self.counts[reason] += int(count)
        kept = self.examples.setdefault(reason, [])
        kept.extend(examples[: MAX_EXAMPLES_PER_PROBLEM - len(kept)])

    def add_mask(self, reason: str, mask: np.ndarray, describe) -> None:
        """`mask` marks bad rows; `describe(row_index) -> str` formats one example."""
        bad = np.flatnonzero(mask)
        self.add(reason, len(bad), [describe(int(i)) for i in bad[:MAX_EXAMPLES_PER_PROBLEM]])

    def raise_if_any(self) -> None:
        if self.drop or not self.counts:
            return
        lines = []
        for reason, count in self.counts.items():
            lines.append(f"{reason} ({count} row{'s' if count != 1 else ''}):")
            lines.extend(f"  {e}" for e in self.examples.get(reason, []))
        raise DataError(
            "invalid input data:\n"
            + "\n".join(lines)
            + "\nfix the input, or set data.drop_malformed=true to drop such rows (counted in stats.json)"
        )

    def dropped(self) -> dict[str, int]:
        return dict(self.counts) if self.drop else {}


class SkippedRows:
    """pyarrow's `invalid_row_handler` for a CSV file: a row with a wrong column count is skipped
    and recorded, by its line in the file, for `Problems` ("wrong_column_count")."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[int] = []
        self.examples: list[str] = []

    def __call__(self, row: Any) -> str:
        self.lines.append(row.number)
        self.examples.append(
            f"{self.path} line {row.number}: expected {row.expected_columns} columns, "
            f"found {row.actual_columns}: {row.text!r}"
        )
        return "skip"


def gather_lists(values: pa.Array, starts: np.ndarray, ends: np.ndarray) -> pa.ListArray:
    """List i = values[starts[i]:ends[i]]; slices may overlap (sliding windows)."""
    lengths = (ends - starts).astype(np.int64)  # [N]
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)  # [N+1]
    np.cumsum(lengths, out=offsets[1:])
    # index of every output element into `values`: the slice start plus the position inside the slice
    index = np.repeat(starts.astype(np.int64) - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
    return pa.LargeListArray.from_arrays(pa.array(offsets), values.take(pa.array(index))).cast(pa.list_(values.type))


@dataclass
class Windows:
    """Sliding windows over per-user sequences; `from_end` = 0 for a user's last interaction."""

    table: pa.Table
    from_end: np.ndarray


def sliding_windows(
    users: pa.Array, items: pa.Array, timestamps: np.ndarray, max_history: int, min_history: int
) -> Windows:
    """One example per interaction with at least `min_history` earlier ones of the same user.

    Inputs must be sorted by user, then time (ties in a fixed order). The history is the user's
    previous `max_history` items, oldest first; the timestamp is the target's.
    """
    n = len(items)
    if n == 0:
        return Windows(EXAMPLE_SCHEMA.empty_table(), np.zeros(0, dtype=np.int64))
    user_codes = np.asarray(users.dictionary_encode().indices.to_numpy(zero_copy_only=False), dtype=np.int64)
    new_user = np.ones(n, dtype=bool)
    new_user[1:] = user_codes[1:] != user_codes[:-1]
    group_start = np.maximum.accumulate(np.where(new_user, np.arange(n), 0))  # [n] first row of the user
    group_id = np.cumsum(new_user) - 1
    group_size = np.bincount(group_id)
    position = np.arange(n) - group_start  # [n] 0-based position in the user's sequence
    from_end = group_size[group_id] - 1 - position
    targets = np.flatnonzero(position >= min_history)  # [W]
    starts = np.maximum(group_start[targets], targets - max_history)
    history = gather_lists(items, starts, targets)
    index = pa.array(targets)
    table = pa.table(
        {
            "user_id": users.take(index),
            "history": history,
            "target": items.take(index),
            "timestamp": pa.array(np.asarray(timestamps, dtype=np.int64)[targets]),
        },
        schema=EXAMPLE_SCHEMA,
    )
    return Windows(table, from_end[targets])


def chronological_split(table: pa.Table, fractions: tuple[float, float] = (0.8, 0.1)) -> dict[str, pa.Table]:
    """Global split by the target's timestamp (stable: ties keep their order): train, valid, test."""
    order = np.argsort(table.column("timestamp").to_numpy(), kind="stable")
    n = len(order)
    n_train = int(n * fractions[0])
    n_valid = int(n * fractions[1])
    cuts = {"train": order[:n_train], "valid": order[n_train : n_train + n_valid], "test": order[n_train + n_valid :]}
    return {name: table.take(pa.array(idx, pa.int64())) for name, idx in cuts.items()}


def catalog_table(item_ids: list[str] | pa.Array, titles: list[str] | pa.Array) -> pa.Table:
    return pa.table({"item_id": item_ids, "title": titles}, schema=CATALOG_SCHEMA)


def shared_title_counts(titles: pa.Array | pa.ChunkedArray) -> dict[str, int]:
    """Items whose title is also another item's, how many distinct titles that is, and items minus
    distinct titles (the "duplicate titles" figure of the released datasets' README)."""
    counts = pc.value_counts(titles).field("counts").to_numpy()
    shared = counts[counts > 1]
    return {
        "items_sharing_title": int(shared.sum()),
        "shared_titles": int(len(shared)),
        "duplicate_title_items": int(shared.sum() - len(shared)),
    }


def clean_titles(titles: pa.Array) -> pa.Array:
    """Whitespace normalised (runs -> one space, trimmed); HTML entities stay as they are."""
    return pc.utf8_trim_whitespace(pc.replace_substring_regex(titles, r"\s+", " "))
