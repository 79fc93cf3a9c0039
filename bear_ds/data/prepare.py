"""`prepare`: any source -> the prepared folder (three splits, catalog, stats.json, config.yaml).

Layout and API are the contract in docs/architecture.md ("Prepared dataset folder"). stats.json is
written last: a folder with it is complete.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from bear_ds.config import Config, save_config
from bear_ds.data.amazon import detect_amazon, load_amazon
from bear_ds.data.bear_csv import load_bear_csv
from bear_ds.data.common import CATALOG_SCHEMA, EXAMPLE_SCHEMA, SPLITS, DataError, SourceData, shared_title_counts
from bear_ds.data.movielens import is_ml100k_folder, load_ml100k
from bear_ds.domains import canonical_domain
from bear_ds.folders import check_output_dir
from bear_ds.outputs import atomic_path, check_writable_folder, write_json_atomic

logger = logging.getLogger(__name__)

PREPARED_FILES = ("catalog.parquet", "stats.json")


def is_prepared(folder: Path) -> bool:
    return all((folder / name).is_file() for name in PREPARED_FILES)


def detect_source(path: str | None) -> str:
    """The source `data.source=auto` means for `data.path`."""
    if path is None:
        return "ml100k"
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"data.path {folder} does not exist or is not a folder")
    if is_prepared(folder):
        return "prepared"
    if (folder / "id2name4Rec.json").is_file():
        return "bear_csv"
    if is_ml100k_folder(folder):
        return "ml100k"
    found = detect_amazon(folder)
    if found is not None:
        return found[0]
    raise DataError(
        f"data.source=auto cannot tell what {folder} holds: expected catalog.parquet + stats.json (prepared), "
        "id2name4Rec.json (bear_csv), u.data/u.item or ml-100k.inter (ml100k), or <Category>.json.gz + "
        "meta_<Category>.json.gz (amazon18) / .jsonl.gz (amazon23); set data.source explicitly"
    )


def load_source(cfg: Config) -> SourceData:
    data = cfg.data
    source = detect_source(data.path) if data.source == "auto" else data.source
    if data.valid_from != "train_tail" and source != "bear_csv":
        # the other sources split by their own rule (ml100k: data.split); never ignore the key silently
        raise DataError(
            f"data.valid_from={data.valid_from} applies to data.source=bear_csv only, not to {source} "
            f"(data.path {data.path or 'the default'}); remove it or use the default train_tail"
        )
    if source == "bear_csv":
        if not data.path:
            raise DataError("data.source=bear_csv needs data.path (the dataset folder)")
        return load_bear_csv(data)
    if source == "ml100k":
        return load_ml100k(data)
    if source in ("amazon18", "amazon23"):
        return load_amazon(data, source)
    raise DataError(f"source {source!r} cannot be prepared (data.path {data.path})")


def _check_ids(data: SourceData) -> None:
    """Every id of every split is in the catalog (sources guarantee it; a bug here must not pass)."""
    catalog_ids = data.catalog.column("item_id")
    for name, table in data.splits.items():
        ids = pa.chunked_array(
            [pc.list_flatten(table.column("history")).combine_chunks(), table.column("target").combine_chunks()]
        )
        unknown = pc.unique(ids.filter(pc.invert(pc.is_in(ids, value_set=catalog_ids))))
        if len(unknown):
            raise DataError(f"internal error: split {name} uses ids not in the catalog: {unknown[:5].to_pylist()}")


def _write_parquet(table: pa.Table, schema: pa.Schema, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table.cast(schema), tmp)


def duplicate_rows(table: pa.Table) -> int:
    """Rows equal to an earlier row of the same table in every column (kept, but counted)."""
    if len(table) == 0:
        return 0
    # a list column cannot be a group key: join each history into one string (ids hold no \x1f)
    keys = pa.table(
        {
            "user_id": table.column("user_id"),
            "history": pc.binary_join(table.column("history"), "\x1f"),
            "history_len": pc.list_value_length(table.column("history")),
            "target": table.column("target"),
            "timestamp": table.column("timestamp"),
        }
    )
    distinct = len(keys.group_by(keys.column_names).aggregate([]))
    return len(table) - distinct


def _refuse_empty_splits(data: SourceData, cfg: Config) -> None:
    """An empty train or test split would prepare fine and fail later (an IndexError in training);
    say so here. An empty valid split (tiny data, data.valid_fraction=0) is noted in stats.json."""
    for name in ("train", "test"):
        if len(data.splits[name]) == 0:
            raise DataError(
                f"split {name!r} is empty after reading {data.source} data from {cfg.data.path or 'the default'}: "
                "nothing to " + ("train on" if name == "train" else "test on")
            )
    if len(data.splits["valid"]) == 0:
        data.notes.append("valid is empty: train with train.eval_every_epoch=false (no epoch selection)")


def build_stats(data: SourceData, domain: str) -> dict[str, Any]:
    users = pa.chunked_array([t.column("user_id").combine_chunks() for t in data.splits.values()], pa.string())
    return {
        "source": data.source,
        "domain": domain,
        "users": len(pc.unique(users)),
        "items": len(data.catalog),
        "rows": {name: len(data.splits[name]) for name in SPLITS},
        "dropped": data.dropped,
        "duplicate_rows": {name: duplicate_rows(data.splits[name]) for name in SPLITS},
        **shared_title_counts(data.catalog.column("title")),
        # an empty title is an item (its response is `""`); the released data may have some
        "empty_title_items": int(
            pc.sum(pc.equal(pc.utf8_trim_whitespace(data.catalog.column("title")), "")).as_py() or 0
        ),
        "notes": data.notes,
        **data.extra,
    }


def prepare(cfg: Config) -> Path:
    """Read `cfg.data`'s source and write the prepared folder to `cfg.output_dir`; return it."""
    out = check_output_dir(cfg.output_dir, "prepare")
    source = detect_source(cfg.data.path) if cfg.data.source == "auto" else cfg.data.source
    if source == "prepared":
        return _copy_prepared(cfg, out)
    data = load_source(cfg)
    _refuse_empty_splits(data, cfg)
    _check_ids(data)
    _sample_train(data, cfg.data.train_sample, cfg.data.sample_seed)
    domain = cfg.data.domain or data.domain
    check_writable_folder(out)
    (out / "stats.json").unlink(missing_ok=True)  # the folder is incomplete until stats.json is back
    for name in SPLITS:
        _write_parquet(data.splits[name], EXAMPLE_SCHEMA, out / f"{name}.parquet")
    _write_parquet(data.catalog, CATALOG_SCHEMA, out / "catalog.parquet")
    save_config(cfg, out)
    stats = build_stats(data, domain)
    stats["prompt_domain"] = canonical_domain(domain)
    write_json_atomic(out / "stats.json", stats)
    return out


def sample_indices(num_rows: int, size: int | None, seed: int) -> np.ndarray | None:
    """The rows a data.train_sample of `size` keeps, in their original order (None: all of them).
    The same draw whether the sample is taken at preparation or from an already-prepared folder."""
    if size is None or size >= num_rows:
        return None
    return np.sort(np.random.default_rng(seed).choice(num_rows, size=size, replace=False))


def _sample_note(size: int, num_rows: int, seed: int) -> str:
    return (
        f"train is a random sample of {size} of {num_rows} windows (data.train_sample, seed {seed}), "
        "kept in their original order"
    )


def _sample_train(data: SourceData, size: int | None, seed: int) -> None:
    """Keep a seeded random sample of `size` training windows, in their original order."""
    train = data.splits["train"]
    keep = sample_indices(train.num_rows, size, seed)
    if keep is None:
        return
    data.splits["train"] = train.take(pa.array(keep))
    data.notes.append(_sample_note(len(keep), train.num_rows, seed))
    data.extra["train_windows_before_sample"] = train.num_rows


def load_train_split(folder: str | Path, data: Any) -> tuple[datasets.Dataset, dict[str, Any]]:
    """The train split of a prepared folder with `data.train_sample` applied (`sample_indices`: a
    folder prepared without a sample gives the windows preparing with it would have kept), and
    what was used: {"prepared", "train_windows", and when sampled here "sampled_from", "train_sample",
    "sample_seed"}."""
    rows = load_split(folder, "train")
    used: dict[str, Any] = {"prepared": str(folder), "train_windows": len(rows)}
    keep = sample_indices(len(rows), data.train_sample, data.sample_seed)
    if keep is not None:
        logger.info("%s: %s", folder, _sample_note(len(keep), len(rows), data.sample_seed))
        used.update(train_windows=len(keep), sampled_from=len(rows), train_sample=data.train_sample,
                    sample_seed=data.sample_seed)  # fmt: skip
        rows = rows.select(keep)
    return rows, used


def _copy_prepared(cfg: Config, out: Path) -> Path:
    folder = Path(cfg.data.path or "")
    if not is_prepared(folder):
        raise DataError(f"data.path {folder} is not a prepared folder (needs {', '.join(PREPARED_FILES)})")
    for name in SPLITS:
        load_split(folder, name)  # validates presence and columns
    train = pq.read_table(folder / "train.parquet")
    keep = sample_indices(train.num_rows, cfg.data.train_sample, cfg.data.sample_seed)
    same_folder = folder.resolve() == out.resolve()
    if keep is not None and same_folder:
        raise DataError(
            f"data.train_sample={cfg.data.train_sample} would sample {folder}'s own train split ({train.num_rows} "
            "windows) in place: prepare into another output_dir"
        )
    if not same_folder:
        check_writable_folder(out)
        (out / "stats.json").unlink(missing_ok=True)  # stats.json last: the copy is complete with it
        copied = [f"{s}.parquet" for s in SPLITS if keep is None or s != "train"] + ["catalog.parquet"]
        for name in copied + (["stats.json"] if keep is None else []):
            with atomic_path(out / name) as tmp:
                shutil.copy2(folder / name, tmp)
        if keep is not None:
            stats = load_stats(folder)
            _write_parquet(train.take(pa.array(keep)), EXAMPLE_SCHEMA, out / "train.parquet")
            notes = stats.get("notes") or []
            notes = notes if isinstance(notes, list) else [notes]
            stats["notes"] = [*notes, _sample_note(len(keep), train.num_rows, cfg.data.sample_seed)]
            stats["train_windows_before_sample"] = train.num_rows
            stats.setdefault("rows", {})["train"] = len(keep)
            write_json_atomic(out / "stats.json", stats)
    return out


def resolve_prepared(cfg: Config, workdir: str | Path) -> Path:
    """`data.path` if it is a prepared folder, else prepare into `workdir` (reused when it holds
    a complete preparation of the same `data` config)."""
    path = cfg.data.path
    if cfg.data.source == "prepared" or (cfg.data.source == "auto" and path and is_prepared(Path(path))):
        folder = Path(path or "")
        if not is_prepared(folder):
            raise DataError(f"data.path {folder} is not a prepared folder (needs {', '.join(PREPARED_FILES)})")
        return folder
    workdir = Path(workdir)
    saved = workdir / "config.yaml"
    if is_prepared(workdir) and saved.is_file():
        previous = (yaml.safe_load(saved.read_text()) or {}).get("data")
        if previous == cfg.data.model_dump():
            return workdir
    return prepare(cfg.model_copy(update={"output_dir": str(workdir)}))


def _read_prepared_table(path: Path, schema: pa.Schema) -> pa.Table:
    """A prepared parquet file, with every column of `schema` present."""
    if not path.is_file():
        raise DataError(f"{path} does not exist (run `bear-ds prepare` first)")
    table = pq.read_table(path)
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    return table


def load_split(folder: str | Path, split: str) -> datasets.Dataset:
    """One split as an in-memory `datasets.Dataset` (user_id, history, target, timestamp)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    table = _read_prepared_table(Path(folder) / f"{split}.parquet", EXAMPLE_SCHEMA)
    return datasets.Dataset(table.select(EXAMPLE_SCHEMA.names).cast(EXAMPLE_SCHEMA))


def load_catalog(folder: str | Path) -> dict[str, str]:
    """item id -> title, in catalog order."""
    path = Path(folder) / "catalog.parquet"
    table = _read_prepared_table(path, CATALOG_SCHEMA)
    ids = table.column("item_id").to_pylist()
    if len(set(ids)) != len(ids):
        duplicate = next(
            i for i, c in zip(*np.unique(np.asarray(ids, dtype=object), return_counts=True), strict=True) if c > 1
        )
        raise DataError(f"{path}: item id {duplicate!r} appears more than once")
    return dict(zip(ids, table.column("title").to_pylist(), strict=True))


def load_stats(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "stats.json"
    if not path.is_file():
        raise DataError(f"{path} does not exist (run `bear-ds prepare` first)")
    return json.loads(path.read_text())
