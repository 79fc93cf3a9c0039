"""Raw Amazon Reviews 2018 and 2023 with the D3 protocol.

2018: `<Category>.json.gz` (reviewerID, asin, unixReviewTime in s) + `meta_<Category>.json.gz`
(asin, title). 2023: `<Category>.jsonl.gz` (user_id, parent_asin, timestamp in ms) +
`meta_<Category>.jsonl.gz` (parent_asin, title).

Protocol: titles cleaned (whitespace normalised, HTML entities kept; items with no metadata, an
empty title or more than `max_title_words` words dropped), exact duplicate interactions dropped,
then a time window of `window_years` ending at `window_end_year` (default: the data's last year),
widened one year at a time until the iterative `k_core` filter leaves `min_catalog_items` items;
sliding windows of `max_history` items per user; a global chronological 8:1:1 split on the target
timestamp. Files are streamed: Arrow's JSON reader in blocks with only the needed fields, or, to
locate a malformed line, a line-by-line parse into columnar batches.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

from bear_ds.config import DataConfig
from bear_ds.data.common import (
    DataError,
    Problems,
    SourceData,
    catalog_table,
    chronological_split,
    clean_titles,
    sliding_windows,
)

BATCH_ROWS = 100_000
OPTIONAL_FIELDS = frozenset({"title"})  # metadata without a title: the item is dropped and counted, not an error
BLOCK_BYTES = 16 << 20  # Arrow JSON block; a metadata line longer than this falls back to the line parser


@dataclass(frozen=True)
class Layout:
    """File names and field names of one Amazon release."""

    name: str
    reviews: str
    meta: str
    user: str
    item: str
    time: str
    meta_item: str
    time_divisor: int  # raw time units per second


LAYOUTS = {
    "amazon18": Layout("amazon18", "{}.json.gz", "meta_{}.json.gz", "reviewerID", "asin", "unixReviewTime", "asin", 1),
    "amazon23": Layout(
        "amazon23", "{}.jsonl.gz", "meta_{}.jsonl.gz", "user_id", "parent_asin", "timestamp", "parent_asin", 1000
    ),
}

# category keyword -> prompt domain (first match wins)
CATEGORY_DOMAINS = (
    ("office", "office"),
    ("clothing", "clothing"),
    ("toy", "toy"),
    ("book", "book"),
    ("beauty", "beauty"),
    ("video_game", "games"),
    ("game", "games"),
    ("cd", "music"),
    ("vinyl", "music"),
    ("music", "music"),
    ("movie", "movies"),
)


def domain_of_category(category: str) -> str:
    lowered = category.lower()
    for keyword, domain in CATEGORY_DOMAINS:
        if keyword in lowered:
            return domain
    return lowered


def detect_amazon(folder: Path) -> tuple[str, str] | None:
    """(source, category) when `folder` holds a reviews file and its meta file, else None."""
    for source, layout in LAYOUTS.items():
        suffix = layout.reviews.format("")
        for path in sorted(folder.glob("*" + suffix)):
            category = path.name[: -len(suffix)]
            if not category.startswith("meta_") and (folder / layout.meta.format(category)).is_file():
                return source, category
    return None


def _read_json_lines(path: Path, fields: dict[str, pa.DataType], problems: Problems, reason: str) -> pa.Table:
    """Stream a gzip JSON-lines file into a table of `fields` only.

    Fast path: Arrow's streaming JSON reader with an explicit schema (other fields ignored). If it
    fails, the line parser finds the culprit: with drop_malformed off it names the file and line;
    on it drops such lines (counted under `reason`).
    """
    if not path.is_file():
        raise DataError(f"file {path} does not exist")
    schema = pa.schema(list(fields.items()))
    try:
        reader = pajson.open_json(
            pa.input_stream(str(path), compression="gzip"),
            read_options=pajson.ReadOptions(block_size=BLOCK_BYTES, use_threads=True),
            parse_options=pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"),
        )
        table = pa.Table.from_batches(list(reader), schema=schema)
        if not any(table.column(name).null_count for name in fields if name not in OPTIONAL_FIELDS):
            return table
    except (pa.ArrowInvalid, OSError, EOFError):
        pass
    return _read_json_lines_slow(path, fields, schema, problems, reason)


def _read_json_lines_slow(
    path: Path, fields: dict[str, pa.DataType], schema: pa.Schema, problems: Problems, reason: str
) -> pa.Table:
    batches: list[pa.RecordBatch] = []
    columns: dict[str, list] = {name: [] for name in fields}
    bad_count = 0
    bad_examples: list[str] = []
    want_int = {name for name, t in fields.items() if pa.types.is_integer(t)}

    def flush() -> None:
        batches.append(pa.record_batch([pa.array(columns[n], fields[n]) for n in fields], schema=schema))
        for values in columns.values():
            values.clear()

    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                problem = None
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    problem = f"invalid JSON ({exc.msg})"
                else:
                    if not isinstance(record, dict):
                        problem = "not a JSON object"
                    else:
                        for name in fields:
                            value = record.get(name)
                            if value is None and name in OPTIONAL_FIELDS:
                                continue
                            if value is None:
                                problem = f"missing field {name!r}"
                            elif name in want_int and (isinstance(value, bool) or not isinstance(value, int)):
                                problem = f"field {name!r} is not an integer: {value!r}"
                            elif name not in want_int and not isinstance(value, str):
                                problem = f"field {name!r} is not a string: {value!r}"
                            if problem:
                                break
                if problem:
                    message = f"{path} line {line_no}: {problem}"
                    if not problems.drop:
                        raise DataError(message + "; set data.drop_malformed=true to drop such lines (counted)")
                    bad_count += 1
                    if len(bad_examples) < 3:
                        bad_examples.append(message)
                    continue
                for name in fields:
                    columns[name].append(record[name])
                if len(columns[next(iter(fields))]) >= BATCH_ROWS:
                    flush()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the gzip file: {exc}") from None
    flush()
    problems.add(reason, bad_count, bad_examples)
    return pa.Table.from_batches(batches, schema=schema)


def _titles(meta: pa.Table, layout: Layout, max_words: int) -> tuple[pa.Table, dict[str, int]]:
    """Per item (first metadata line wins) its cleaned title and a verdict: ok / empty / too long."""
    ids = meta.column(layout.meta_item).combine_chunks()
    first = np.unique(ids.dictionary_encode().indices.to_numpy(zero_copy_only=False), return_index=True)[1]
    first = pa.array(np.sort(first))
    ids = ids.take(first)
    titles = clean_titles(pc.fill_null(meta.column("title").combine_chunks().take(first), ""))
    words = pc.count_substring_regex(titles, r"\S+").to_numpy(zero_copy_only=False)
    empty = words == 0
    long = words > max_words
    counts = {"items_with_empty_title": int(empty.sum()), "items_with_title_over_max_words": int(long.sum())}
    verdict = np.where(empty, 1, np.where(long, 2, 0)).astype(np.int8)
    return pa.table({"item": ids, "title": titles, "verdict": verdict}), counts


def k_core(users: np.ndarray, items: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """Mask of interactions kept by the iterative k-core (users and items with >= k interactions)."""
    keep = np.ones(len(users), dtype=bool)
    iterations = 0
    while True:
        iterations += 1
        user_counts = np.bincount(users[keep], minlength=users.max(initial=-1) + 1)
        item_counts = np.bincount(items[keep], minlength=items.max(initial=-1) + 1)
        next_keep = keep & (user_counts[users] >= k) & (item_counts[items] >= k)
        if np.array_equal(next_keep, keep):
            return keep, iterations
        keep = next_keep


def _detected_category(folder: Path, source: str) -> str:
    """The category of the raw files in `folder` (data.category unset); an error when none is found."""
    layout = LAYOUTS[source]
    found = detect_amazon(folder)
    if found is None or found[0] != source:
        raise DataError(
            f"data.category is not set and {folder} has no {layout.reviews.format('<Category>')} "
            f"with its {layout.meta.format('<Category>')}"
        )
    return found[1]


def _without_duplicates(
    user_codes: np.ndarray, item_codes: np.ndarray, seconds: np.ndarray, keep: np.ndarray
) -> tuple[np.ndarray, int]:
    """(indices of the kept interactions, first of each duplicate group; number of duplicates dropped):
    exact duplicates (same user, item and second) are one interaction."""
    key = np.stack([user_codes, item_codes, seconds])[:, keep]
    _, first = np.unique(key, axis=1, return_index=True)
    unique_mask = np.zeros(int(keep.sum()), dtype=bool)
    unique_mask[first] = True
    return np.flatnonzero(keep)[unique_mask], int((~unique_mask).sum())


def _title_filter(items: pa.Array, title_table: pa.Table, dropped: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """(each interaction's row in `title_table`, 0 where none; interactions whose item has a usable
    title); the others are counted in `dropped` by reason."""
    where = pc.fill_null(pc.index_in(items, value_set=title_table.column("item")), -1).to_numpy()
    has_meta = where >= 0
    position = np.where(has_meta, where, 0).astype(np.int64)
    verdict = np.where(has_meta, title_table.column("verdict").to_numpy()[position], 3)
    for code, reason in ((3, "item_without_metadata"), (1, "item_with_empty_title"), (2, "item_title_over_max_words")):
        if (verdict == code).any():
            dropped[reason] = int((verdict == code).sum())
    return position, verdict == 0


def load_amazon(cfg: DataConfig, source: str) -> SourceData:
    layout = LAYOUTS[source]
    if not cfg.path:
        raise DataError(f"data.source={source} needs data.path (the folder of the raw files)")
    folder = Path(cfg.path)
    category = cfg.category if cfg.category is not None else _detected_category(folder, source)
    problems = Problems(cfg.drop_malformed)
    reviews_path = folder / layout.reviews.format(category)
    meta_path = folder / layout.meta.format(category)
    reviews = _read_json_lines(
        reviews_path,
        {layout.user: pa.string(), layout.item: pa.string(), layout.time: pa.int64()},
        problems,
        "malformed_review_line",
    )
    meta = _read_json_lines(
        meta_path, {layout.meta_item: pa.string(), "title": pa.string()}, problems, "malformed_meta_line"
    )
    problems.raise_if_any()
    dropped = problems.dropped()
    title_table, item_counts = _titles(meta, layout, cfg.max_title_words)

    users = reviews.column(layout.user).combine_chunks()
    items = reviews.column(layout.item).combine_chunks()
    seconds = reviews.column(layout.time).to_numpy() // layout.time_divisor
    rows_read = len(reviews)

    # title filter first, so the k-core below holds on the final data
    position, keep = _title_filter(items, title_table, dropped)

    user_codes = users.dictionary_encode().indices.to_numpy(zero_copy_only=False).astype(np.int64)
    item_codes = position
    kept_rows, duplicates = _without_duplicates(user_codes, item_codes, seconds, keep)
    if duplicates:
        dropped["duplicate_interaction"] = duplicates

    years = seconds[kept_rows].astype("datetime64[s]").astype("datetime64[Y]").astype(np.int64) + 1970
    if len(years) == 0:
        raise DataError(f"{reviews_path}: no interaction left after the title filter")
    end_year = cfg.window_end_year or int(years.max())
    first_year = int(years.min())
    start_year = end_year - cfg.window_years + 1
    while True:
        in_window = (years >= start_year) & (years <= end_year)
        core = _k_core_in(in_window, user_codes[kept_rows], item_codes[kept_rows], cfg.k_core)
        core_mask, iterations = core
        n_items = len(np.unique(item_codes[kept_rows][core_mask]))
        if n_items >= cfg.min_catalog_items or start_year <= first_year:
            break
        start_year -= 1
    outside = int((~in_window).sum())
    if outside:
        dropped["outside_time_window"] = outside
    below_k = int((in_window & ~core_mask).sum())
    if below_k:
        dropped["k_core"] = below_k
    rows = kept_rows[core_mask]
    notes = [
        f"{source} {category}: {rows_read} interactions read; time window {start_year}-{end_year} "
        f"(started at {cfg.window_years} year(s) ending {end_year}, widened until the {cfg.k_core}-core catalog "
        f"had >= {cfg.min_catalog_items} items)",
        f"{iterations} k-core iterations; titles: whitespace normalised, HTML entities kept",
        "chronological 8:1:1 split of all windows by the target timestamp (stable: ties keep user order)",
    ]
    if n_items < cfg.min_catalog_items:
        notes.append(
            f"catalog has {n_items} items, below data.min_catalog_items={cfg.min_catalog_items}, with all years used"
        )

    # windows: per user, chronologically (lexsort is stable: ties keep file order)
    order = rows[np.lexsort((seconds[rows], user_codes[rows]))]
    index = pa.array(order)
    windows = sliding_windows(users.take(index), items.take(index), seconds[order], cfg.max_history, cfg.min_history)
    splits = chronological_split(windows.table)
    used = np.unique(item_codes[rows])
    catalog = catalog_table(
        title_table.column("item").take(pa.array(used)), title_table.column("title").take(pa.array(used))
    )
    return SourceData(
        source=source,
        domain=domain_of_category(category),
        splits=splits,
        catalog=catalog,
        dropped=dropped,
        notes=notes,
        extra={
            "category": category,
            "interactions_read": rows_read,
            "interactions_kept": len(rows),
            "window_years": [start_year, end_year],
            "k_core_iterations": iterations,
            **item_counts,
        },
    )


def _k_core_in(in_window: np.ndarray, users: np.ndarray, items: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """k-core restricted to the interactions inside the window (mask over all of them)."""
    inside = np.flatnonzero(in_window)
    core, iterations = k_core(users[inside], items[inside], k)
    mask = np.zeros(len(users), dtype=bool)
    mask[inside[core]] = True
    return mask, iterations
