"""Raw Amazon 2018/2023 reviews with the D3 protocol, on hand-computable gzip fixtures."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from bear_ds.config import load_config
from bear_ds.data import DataError, load_catalog, load_split, load_stats, prepare
from bear_ds.data.amazon import k_core
from bear_ds.data.prepare import detect_source

Y2018, Y2017, Y2016 = 1_530_000_000, 1_500_000_000, 1_470_000_000
TITLES = {"a": "Alpha Pen", "b": "Beta Pad", "c": "Gamma \n Glue", "d": "   ", "e": "one two three four"}
# 2018 alone: c has one interaction -> dropped, then u3 has one -> dropped: catalog {a, b}
# 2017-2018: c has three, every user two: catalog {a, b, c}
REVIEWS = [
    ("u1", "a", Y2018), ("u1", "b", Y2018 + 1), ("u2", "a", Y2018 + 2), ("u2", "b", Y2018 + 3),
    ("u3", "a", Y2018 + 4), ("u3", "c", Y2018 + 5),
    ("u4", "c", Y2017), ("u4", "a", Y2017 + 1), ("u5", "c", Y2017 + 2), ("u5", "b", Y2017 + 3),
    ("u6", "a", Y2016), ("u6", "b", Y2016 + 1),
    ("u1", "d", Y2018 + 6), ("u2", "e", Y2018 + 7), ("u3", "x", Y2018 + 8),  # title drops / no metadata
    ("u1", "a", Y2018),  # exact duplicate
]  # fmt: skip


def write_gz(path: Path, lines: list[str]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def make_raw(folder: Path, release: str, extra_review_lines: tuple[str, ...] = ()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if release == "amazon18":
        reviews = [json.dumps({"reviewerID": u, "asin": i, "unixReviewTime": t, "overall": 5.0}) for u, i, t in REVIEWS]
        # item d has no title field at all (as in parts of the 2018 metadata)
        meta = [
            json.dumps({"asin": i, "also_buy": ["z"]} | ({"title": t} if i != "d" else {})) for i, t in TITLES.items()
        ]
        names = ("Office_Products.json.gz", "meta_Office_Products.json.gz")
    else:
        reviews = [
            json.dumps({"user_id": u, "parent_asin": i, "timestamp": t * 1000, "text": "ok"}) for u, i, t in REVIEWS
        ]
        meta = [json.dumps({"parent_asin": i, "title": t}) for i, t in TITLES.items()]
        names = ("Office_Products.jsonl.gz", "meta_Office_Products.jsonl.gz")
    reviews[2:2] = list(extra_review_lines)
    write_gz(folder / names[0], reviews)
    write_gz(folder / names[1], meta)
    return folder


def cfg_for(folder: Path, out: Path, *overrides: str):
    base = ["data.k_core=2", "data.max_title_words=3", "data.min_catalog_items=3", f"output_dir={out}"]
    return load_config(None, [f"data.path={folder}", *base, *overrides])


def test_k_core_iterates_until_stable():
    # user 2 has items 0 and 2; item 2 has one interaction -> gone, then user 2 has one -> gone
    users = [0, 0, 1, 1, 2, 2]
    items = [0, 1, 0, 1, 0, 2]
    import numpy as np

    keep, iterations = k_core(np.array(users), np.array(items), 2)
    assert keep.tolist() == [True, True, True, True, False, False]
    assert iterations == 3  # two removal rounds, one round that changes nothing


@pytest.mark.parametrize("release", ["amazon18", "amazon23"])
def test_window_widens_until_catalog_is_large_enough(tmp_path, release):
    folder = make_raw(tmp_path / "raw", release)
    assert detect_source(str(folder)) == release
    out = prepare(cfg_for(folder, tmp_path / "out"))
    stats = load_stats(out)
    assert stats["source"] == release and stats["domain"] == "office" and stats["category"] == "Office_Products"
    assert stats["window_years"] == [2017, 2018]
    assert load_catalog(out) == {"a": "Alpha Pen", "b": "Beta Pad", "c": "Gamma Glue"}
    assert stats["dropped"] == {
        "item_without_metadata": 1,
        "item_with_empty_title": 1,
        "item_title_over_max_words": 1,
        "duplicate_interaction": 1,
        "outside_time_window": 2,
    }
    assert stats["items_with_empty_title"] == 1 and stats["items_with_title_over_max_words"] == 1
    # one window per user (two interactions each), 8:1:1 of 5 by target time: 4 / 0 / 1
    assert stats["rows"] == {"train": 4, "valid": 0, "test": 1}
    test = load_split(out, "test")
    assert test["user_id"] == ["u3"] and test["history"] == [["a"]] and test["target"] == ["c"]
    assert test["timestamp"] == [Y2018 + 5]  # seconds, also for 2023's milliseconds


def test_fixed_window_applies_k_core(tmp_path):
    folder = make_raw(tmp_path / "raw", "amazon18")
    out = prepare(cfg_for(folder, tmp_path / "out", "data.window_end_year=2018", "data.min_catalog_items=1"))
    stats = load_stats(out)
    assert stats["window_years"] == [2018, 2018]
    assert stats["k_core_iterations"] == 3
    assert stats["dropped"]["k_core"] == 2 and stats["dropped"]["outside_time_window"] == 6
    assert sorted(load_catalog(out)) == ["a", "b"]
    assert stats["users"] == 2


def test_malformed_line_names_file_and_line(tmp_path):
    folder = make_raw(tmp_path / "raw", "amazon18", extra_review_lines=("{not json",))
    with pytest.raises(DataError, match=r"Office_Products.json.gz line 3: invalid JSON"):
        prepare(cfg_for(folder, tmp_path / "out"))
    out = prepare(cfg_for(folder, tmp_path / "out", "data.drop_malformed=true"))
    assert load_stats(out)["dropped"]["malformed_review_line"] == 1
    folder = make_raw(tmp_path / "raw2", "amazon23", extra_review_lines=(json.dumps({"user_id": "u9"}),))
    with pytest.raises(DataError, match=r"Office_Products.jsonl.gz line 3: missing field 'parent_asin'"):
        prepare(cfg_for(folder, tmp_path / "out"))
