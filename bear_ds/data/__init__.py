"""Data layer: sources (bear_csv, amazon18, amazon23, ml100k) -> prepared folder; prompts.

folder = prepare(cfg)                       # train/valid/test.parquet, catalog.parquet, stats.json
train = load_split(folder, "train")         # datasets.Dataset: user_id, history, target, timestamp
train, used = load_train_split(folder, cfg.data)  # with data.train_sample applied, and what was used
titles = load_catalog(folder)               # item id -> title
"""

from bear_ds.data.common import DataError
from bear_ds.data.prepare import (
    detect_source,
    load_catalog,
    load_split,
    load_stats,
    load_train_split,
    prepare,
    resolve_prepared,
)
from bear_ds.data.prompts import PromptBuilder

__all__ = [
    "DataError",
    "PromptBuilder",
    "detect_source",
    "load_catalog",
    "load_split",
    "load_stats",
    "load_train_split",
    "prepare",
    "resolve_prepared",
]
