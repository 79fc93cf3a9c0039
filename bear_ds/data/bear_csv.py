"""The BEAR/BIGRec CSV format: `id2name4Rec.json` + `user_id,item_ids,timestamp` window files.

`item_ids` is a Python-style list, oldest first, whose last id is the target. Train and test come
from the named files. No validation file was released: valid is carved from the chronologically
last `data.valid_fraction` of the training rows (`data.valid_from=train_tail`, the release's
practice), or from a seeded sample of the test file's users (`test_users`), whose windows share
test's period and item novelty.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from bear_ds.config import DataConfig
from bear_ds.data.common import (
    EXAMPLE_SCHEMA,
    DataError,
    Problems,
    SkippedRows,
    SourceData,
    catalog_table,
    gather_lists,
)

COLUMNS = ("user_id", "item_ids", "timestamp")
# one list element: a bare token or a quoted string; the whole field: [e, e, ...] with at least one
_ELEMENT = r"""(?:'[^']*'|"[^"]*"|[^,\[\]'"\s]+)"""
ITEM_LIST_RE = rf"^\s*\[\s*{_ELEMENT}(?:\s*,\s*{_ELEMENT})*\s*,?\s*\]\s*$"
INTEGER_RE = r"^\s*-?\d+\s*$"


def _refuse_duplicate_ids(path: Path):
    """A JSON object hook: an id given twice is an error naming it (plain `json` keeps the last title)."""

    def hook(pairs: list[tuple[str, object]]) -> dict[str, object]:
        seen: dict[str, object] = {}
        for key, value in pairs:
            if key in seen:
                raise DataError(f"{path}: item id {key!r} appears more than once (titles {seen[key]!r} and {value!r})")
            seen[key] = value
        return seen

    return hook


def read_catalog(path: Path, problems: Problems) -> dict[str, str]:
    """id -> title; a non-string title is a problem naming the id, an id given twice an error.
    An empty title is an item (the released data has such items): its response is `""`."""
    if not path.is_file():
        raise DataError(f"catalog file {path} does not exist (data.catalog_file)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_refuse_duplicate_ids(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} line {exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{path}: expected a non-empty JSON object {{item id: title}}")
    catalog: dict[str, str] = {}
    bad = []
    for item_id, title in raw.items():
        if not isinstance(title, str):
            bad.append(f"{path}: item id {item_id!r} has a non-string title {title!r}")
        else:
            catalog[str(item_id)] = title
    problems.add("catalog_non_string_title", len(bad), bad)
    return catalog


def _window_columns(path: Path) -> list[str]:
    """The column names of a window file's header line; an error naming the file unless they are COLUMNS."""
    if not path.is_file():
        raise DataError(f"window file {path} does not exist")
    with path.open(encoding="utf-8", newline="") as f:
        header = f.readline().strip().lstrip("\ufeff")
    names = [c.strip() for c in header.split(",")]
    missing = [c for c in COLUMNS if c not in names]
    extra = [c for c in names if c not in COLUMNS]
    if missing or extra or len(names) != len(COLUMNS):
        raise DataError(
            f"{path} line 1: expected the columns {','.join(COLUMNS)}, found {header!r}"
            + (f" (missing: {', '.join(missing)})" if missing else "")
            + (f" (unexpected: {', '.join(extra)})" if extra else "")
        )
    return names


def _well_formed_rows(
    path: Path, lines: np.ndarray, users: pa.Array, lists: pa.Array, stamps: pa.Array, problems: Problems
) -> tuple[np.ndarray, np.ndarray]:
    """(rows kept, blank rows) as bool [R]: a row with an empty user id, an unparsable item list or a
    non-integer timestamp is reported to `problems` (naming its line) and not kept."""
    blank = np.asarray(
        pc.and_(pc.and_(pc.equal(users, ""), pc.equal(lists, "")), pc.equal(pc.utf8_trim_whitespace(stamps), ""))
    )
    keep = ~blank  # blank lines are no data: skipped (counted in stats as blank_lines)

    def describe(column: pa.Array, what: str):
        return lambda i: f"{path} line {lines[i]}: {what} {column[i].as_py()!r}"

    checks = [
        ("empty_user_id", np.asarray(pc.equal(users, "")), describe(users, "empty user_id")),
        (
            "unparsable_item_list",
            ~np.asarray(pc.match_substring_regex(lists, ITEM_LIST_RE)),
            describe(lists, "cannot parse item_ids"),
        ),
        (
            "bad_timestamp",
            ~np.asarray(pc.match_substring_regex(stamps, INTEGER_RE)),
            describe(stamps, "timestamp is not an integer:"),
        ),
    ]
    for reason, bad, explain in checks:
        bad &= keep
        problems.add_mask(reason, bad, explain)
        keep &= ~bad
    return keep, blank


def read_window_csv(
    path: Path, catalog_ids: pa.Array, cfg: DataConfig, problems: Problems
) -> tuple[pa.Table, int, int]:
    """Parse one window file -> (examples, rows read, histories truncated). Bad rows go to `problems`."""
    names = _window_columns(path)
    # newlines_in_values=False: one physical line per row, so a skipped row's number is the file's line
    skipped = SkippedRows(path)
    table = pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(use_threads=False, column_names=names, skip_rows=1),
        parse_options=pacsv.ParseOptions(invalid_row_handler=skipped, ignore_empty_lines=False),
        convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in COLUMNS}, strings_can_be_null=False, quoted_strings_can_be_null=False
        ),
    )
    problems.add("wrong_column_count", len(skipped.lines), skipped.examples)
    rows_read = len(table) + len(skipped.lines)
    all_lines = np.arange(2, rows_read + 2)
    lines = np.setdiff1d(all_lines, np.asarray(skipped.lines, dtype=np.int64), assume_unique=True)  # [R]

    users = pc.utf8_trim_whitespace(table.column("user_id").combine_chunks())
    lists = table.column("item_ids").combine_chunks()
    stamps = table.column("timestamp").combine_chunks()
    keep, blank = _well_formed_rows(path, lines, users, lists, stamps, problems)

    # parse the lists of the surviving rows: "[1, 2]" -> ["1", "2"] (quotes stripped)
    survivors = pa.array(np.flatnonzero(keep))
    lines = lines[np.flatnonzero(keep)]
    users = users.take(survivors)
    stamps = pc.cast(pc.utf8_trim_whitespace(stamps.take(survivors)), pa.int64())
    inner = pc.utf8_trim(pc.utf8_trim_whitespace(lists.take(survivors)), "[]")
    inner = pc.replace_substring_regex(inner, r",\s*$", "")
    parts = pc.split_pattern_regex(inner, r"\s*,\s*")
    flat = pc.utf8_trim(pc.utf8_trim_whitespace(pc.list_flatten(parts)), "'\"")
    offsets = parts.offsets.to_numpy()  # [R+1]
    lengths = np.diff(offsets)
    ends = offsets[1:] - 1  # index of each row's target in `flat`

    keep = np.ones(len(lines), dtype=bool)
    problems.add_mask(
        "empty_history",
        lengths < 2,
        lambda i: f"{path} line {lines[i]}: the item list has no history (only the target)",
    )
    keep &= lengths >= 2
    unknown_flat = ~np.asarray(pc.is_in(flat, value_set=catalog_ids))
    unknown_rows = np.bitwise_or.reduceat(unknown_flat, offsets[:-1]) if len(flat) else np.zeros(0, bool)
    unknown_rows &= keep

    def describe_unknown(i: int) -> str:
        ids = [flat[j].as_py() for j in range(offsets[i], offsets[i + 1]) if unknown_flat[j]]
        return f"{path} line {lines[i]}: item id(s) {', '.join(map(repr, ids))} not in the catalog"

    problems.add_mask("unknown_item", unknown_rows, describe_unknown)
    keep &= ~unknown_rows
    too_short = keep & (lengths - 1 < cfg.min_history)
    # a short history is a filter (data.min_history), not malformed input: always counted as a drop
    idx = np.flatnonzero(keep & ~too_short)
    starts = np.maximum(offsets[:-1][idx], ends[idx] - cfg.max_history)
    truncated = int(np.sum(ends[idx] - offsets[:-1][idx] > cfg.max_history))
    examples = pa.table(
        {
            "user_id": users.take(pa.array(idx)),
            "history": gather_lists(flat, starts, ends[idx]),
            "target": flat.take(pa.array(ends[idx])),
            "timestamp": stamps.take(pa.array(idx)),
        },
        schema=EXAMPLE_SCHEMA,
    )
    examples = examples.replace_schema_metadata(
        {"short_history": str(int(too_short.sum())), "blank": str(int(blank.sum()))}
    )
    return examples, rows_read, truncated


PAPER_DATA_HINT = (
    "The paper's processed datasets (Office, Clothing, Toy: id2name4Rec.json, train_10000.csv, test_5000.csv) "
    "are released with the authors' code, https://github.com/Tiny-Snow/BEAR-SIGIR-2026 (MIT); put each in "
    "data/bear/<Dataset>/ where bear-ds runs (see data/README.md), or set data.path to its folder"
)


def _valid_from_train_tail(train_all: pa.Table, cfg: DataConfig) -> tuple[pa.Table, pa.Table, str]:
    """valid = the chronologically last share of training rows; a stable sort keeps file order on ties."""
    order = np.argsort(train_all.column("timestamp").to_numpy(), kind="stable")
    n_valid = int(round(len(order) * cfg.valid_fraction))
    valid_idx = order[len(order) - n_valid :]
    train_mask = np.ones(len(order), dtype=bool)
    train_mask[valid_idx] = False
    train = train_all.filter(pa.array(train_mask))  # file order
    valid = train_all.take(pa.array(valid_idx, pa.int64()))  # chronological order
    cut = int(valid.column("timestamp")[0].as_py()) if n_valid else None
    return (
        train,
        valid,
        f"valid is the chronologically last {cfg.valid_fraction:g} of {cfg.train_file} ({n_valid} windows, "
        f"target timestamps >= {cut}), by a stable sort on the target timestamp (ties keep file order); "
        "train keeps file order",
    )


def _valid_from_test_users(
    train_all: pa.Table, test: pa.Table, cfg: DataConfig
) -> tuple[pa.Table, pa.Table, pa.Table, str]:
    """valid = every window of a seeded sample of the test file's users (so no user is in both);
    training keeps all its windows. Both keep file order."""
    users = np.asarray(test.column("user_id").to_pylist(), dtype=object)
    distinct = np.array(sorted(set(users)), dtype=object)  # sorted: the sample depends on the seed only
    n_valid = int(round(len(distinct) * cfg.valid_fraction))
    chosen = np.random.default_rng(cfg.sample_seed).choice(len(distinct), size=n_valid, replace=False)
    in_valid = np.isin(users, distinct[chosen])
    valid, rest = test.filter(pa.array(in_valid)), test.filter(pa.array(~in_valid))
    return (
        train_all,
        valid,
        rest,
        f"valid is a sample of {cfg.valid_fraction:g} of {cfg.test_file}'s users ({n_valid} of {len(distinct)} "
        f"users, data.sample_seed={cfg.sample_seed}) with all their windows ({len(valid)}), moved out of test "
        f"({len(rest)} windows left); train is all of {cfg.train_file}",
    )


def load_bear_csv(cfg: DataConfig) -> SourceData:
    folder = Path(cfg.path)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise DataError(f"data.path {folder} {what}. {PAPER_DATA_HINT}")
    problems = Problems(cfg.drop_malformed)
    catalog = read_catalog(folder / cfg.catalog_file, problems)
    catalog_ids = pa.array(list(catalog), pa.string())
    train_all, train_read, train_trunc = read_window_csv(folder / cfg.train_file, catalog_ids, cfg, problems)
    test, test_read, test_trunc = read_window_csv(folder / cfg.test_file, catalog_ids, cfg, problems)
    problems.raise_if_any()
    for name, table, read in ((cfg.train_file, train_all, train_read), (cfg.test_file, test, test_read)):
        if len(table) == 0:
            raise DataError(
                f"{folder / name}: no examples ({read} data rows read"
                + (", every one dropped" if read else ": the file has only its header")
                + ")"
            )

    test_kept = len(test)  # before test_users moves some of them to valid
    if cfg.valid_from == "test_users":
        train, valid, test, valid_note = _valid_from_test_users(train_all, test, cfg)
    else:
        train, valid, valid_note = _valid_from_train_tail(train_all, cfg)

    dropped = problems.dropped()
    short = sum(int(t.schema.metadata[b"short_history"]) for t in (train_all, test))
    if short:
        dropped["history_shorter_than_min_history"] = short
    blank = sum(int(t.schema.metadata[b"blank"]) for t in (train_all, test))
    notes = [
        f"train comes from {cfg.train_file} ({len(train_all)} windows kept of {train_read} rows)",
        f"test comes from {cfg.test_file} ({test_kept} windows kept of {test_read} rows)",
        valid_note,
    ]
    if train_trunc + test_trunc:
        notes.append(
            f"{train_trunc + test_trunc} histories longer than data.max_history={cfg.max_history} kept their most recent items"
        )
    if blank:
        notes.append(f"{blank} blank lines skipped")
    items = list(catalog)
    strip = lambda t: t.replace_schema_metadata(None)  # noqa: E731
    return SourceData(
        source="bear_csv",
        domain=folder.resolve().name.lower(),
        splits={"train": strip(train), "valid": strip(valid), "test": strip(test)},
        catalog=catalog_table(items, [catalog[i] for i in items]),
        dropped=dropped,
        notes=notes,
        extra={
            "files": {"train": cfg.train_file, "test": cfg.test_file, "catalog": cfg.catalog_file},
            "train_windows_before_valid": len(train_all),
            "histories_truncated": train_trunc + test_trunc,
            "blank_lines": blank,
        },
    )
