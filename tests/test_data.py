"""Data layer: bear_csv, ml100k, prepare/load, auto detection, prompts, error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bear_ds.config import PromptConfig, load_config
from bear_ds.data import DataError, PromptBuilder, load_catalog, load_split, load_stats, prepare, resolve_prepared
from bear_ds.data.prepare import detect_source

CATALOG = {"1": "Pen", "2": "Paper &amp; Pad", "3": "Stapler", "4": "Pen", "5": "Tape"}
TRAIN_ROWS = [
    ("u1", "[1, 2, 3]", 100),
    ("u2", "[2, 3, 4, 5]", 300),
    ("u3", "[1, 5]", 200),
    ("u1", "[1, 2, 3, 4]", 400),
    ("u4", "['3', '1', '2']", 50),
]
TEST_ROWS = [("u1", "[1, 2, 3, 4, 5]", 500), ("u2", "[5, 1]", 600)]


def write_csv(path: Path, rows, header: str = "user_id,item_ids,timestamp") -> Path:
    lines = [header] + [",".join([str(u), f'"{items}"', str(t)]) for u, items, t in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def make_bear_folder(root: Path, train_rows=TRAIN_ROWS, test_rows=TEST_ROWS, catalog=CATALOG) -> Path:
    folder = root / "Office"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "id2name4Rec.json").write_text(json.dumps(catalog))
    write_csv(folder / "train_10000.csv", train_rows)
    write_csv(folder / "test_5000.csv", test_rows)
    return folder


def config(folder: Path | None, out: Path, *overrides: str):
    path = [f"data.path={folder}"] if folder else []
    return load_config(None, [*path, f"output_dir={out}", *overrides])


def test_bear_csv_small_splits_and_valid_carving(tmp_path):
    folder = make_bear_folder(tmp_path)
    out = prepare(config(folder, tmp_path / "out", "data.valid_fraction=0.4", "data.max_history=2"))
    train, valid, test = (load_split(out, s) for s in ("train", "valid", "test"))
    # valid = the 2 latest of 5 training rows (timestamps 400, 300), chronological; train keeps file order
    assert valid["timestamp"] == [300, 400]
    assert train["timestamp"] == [100, 200, 50]
    assert train["user_id"] == ["u1", "u3", "u4"]
    # histories keep the most recent max_history items, oldest first; quotes stripped from ids
    assert train["history"] == [["1", "2"], ["1"], ["3", "1"]]
    assert train["target"] == ["3", "5", "2"]
    assert test["history"] == [["3", "4"], ["5"]]
    stats = load_stats(out)
    assert stats["rows"] == {"train": 3, "valid": 2, "test": 2}
    assert stats["train_windows_before_valid"] == 5
    assert stats["domain"] == "office" and stats["source"] == "bear_csv"
    assert stats["items_sharing_title"] == 2 and stats["duplicate_title_items"] == 1
    assert stats["histories_truncated"] == 3  # u2 and u1 (train), u1 (test)
    assert stats["dropped"] == {}
    assert any("chronologically last 0.4" in n for n in stats["notes"])
    assert load_catalog(out)["2"] == "Paper &amp; Pad"  # HTML entities kept as they are
    assert (out / "config.yaml").is_file()
    schema = pq.read_schema(out / "train.parquet")
    assert pa.types.is_list(schema.field("history").type)
    assert schema.field("history").type.value_type == pa.string()
    assert schema.field("timestamp").type == pa.int64()


BAD_ROWS = {
    "unparsable_item_list": (("u9", "[1, 2", 10), "line 7", "cannot parse item_ids"),
    "bad_timestamp": (("u9", "[1, 2]", "soon"), "line 7", "timestamp is not an integer"),
    "empty_history": (("u9", "[3]", 10), "line 7", "no history"),
    "unknown_item": (("u9", "[1, 99]", 10), "line 7", "'99' not in the catalog"),
}


def test_bear_csv_valid_from_test_users(tmp_path):
    # valid = all windows of a seeded half of the test file's users, moved out of test; train keeps
    # every training window; the same seed gives the same users, another seed may not
    rows = [(f"t{u}", f"[1, {2 + u % 3}]", 1000 + u) for u in range(10)] + [("t3", "[2, 4]", 2000)]
    folder = make_bear_folder(tmp_path, test_rows=rows)
    out = prepare(config(folder, tmp_path / "out", "data.valid_from=test_users", "data.valid_fraction=0.5"))
    train, valid, test = (load_split(out, s).to_dict() for s in ("train", "valid", "test"))
    assert len(train["user_id"]) == len(TRAIN_ROWS)
    assert len(set(valid["user_id"])) == 5 and not set(valid["user_id"]) & set(test["user_id"])
    assert len(valid["user_id"]) + len(test["user_id"]) == len(rows)
    assert sorted(
        zip(valid["user_id"] + test["user_id"], valid["timestamp"] + test["timestamp"], strict=True)
    ) == sorted((u, t) for u, _, t in rows)
    assert valid["user_id"].count("t3") in (0, 2)  # a user's windows stay together
    notes = load_stats(out)["notes"]
    assert any("sample of 0.5 of test_5000.csv's users (5 of 10 users, data.sample_seed=42)" in n for n in notes), notes
    again = prepare(config(folder, tmp_path / "again", "data.valid_from=test_users", "data.valid_fraction=0.5"))
    assert load_split(again, "valid")["user_id"][:] == valid["user_id"]


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_bear_csv_bad_row_is_an_error_with_file_and_line(tmp_path, reason):
    row, line, text = BAD_ROWS[reason]
    folder = make_bear_folder(tmp_path, train_rows=[*TRAIN_ROWS, row])
    with pytest.raises(DataError) as err:
        prepare(config(folder, tmp_path / "out"))
    message = str(err.value)
    assert "train_10000.csv" in message and line in message and text in message and reason in message
    assert "data.drop_malformed" in message


def test_bear_csv_drop_malformed_counts_every_reason(tmp_path):
    rows = [*TRAIN_ROWS, *(BAD_ROWS[r][0] for r in sorted(BAD_ROWS))]
    folder = make_bear_folder(tmp_path, train_rows=rows)
    with (folder / "train_10000.csv").open("a") as f:
        f.write('u9,"[1, 2]",10,extra\n')
    out = prepare(config(folder, tmp_path / "out", "data.drop_malformed=true", "data.valid_fraction=0"))
    stats = load_stats(out)
    assert stats["dropped"] == {reason: 1 for reason in [*BAD_ROWS, "wrong_column_count"]}
    assert stats["rows"]["train"] == len(TRAIN_ROWS)


def test_bear_csv_wrong_column_count_names_the_line(tmp_path):
    folder = make_bear_folder(tmp_path)
    with (folder / "train_10000.csv").open("a") as f:
        f.write('u9,"[1, 2]"\n')
    with pytest.raises(DataError, match=r"train_10000.csv line 7: expected 3 columns, found 2"):
        prepare(config(folder, tmp_path / "out"))


def test_bear_csv_missing_column_file_and_empty_title(tmp_path):
    folder = make_bear_folder(tmp_path)
    write_csv(folder / "bad_header.csv", TRAIN_ROWS, header="user_id,items,timestamp")
    with pytest.raises(DataError, match=r"bad_header.csv line 1: .*missing: item_ids"):
        prepare(config(folder, tmp_path / "out", "data.train_file=bad_header.csv"))
    with pytest.raises(DataError, match=r"nope.csv does not exist"):
        prepare(config(folder, tmp_path / "out", "data.test_file=nope.csv"))
    (folder / "id2name4Rec.json").write_text(json.dumps({**CATALOG, "3": 7}))
    with pytest.raises(DataError, match=r"item id '3' has a non-string title 7"):
        prepare(config(folder, tmp_path / "out"))
    # dropping: the item leaves the catalog, and the rows using it are counted as unknown_item
    out = prepare(config(folder, tmp_path / "out", "data.drop_malformed=true"))
    stats = load_stats(out)
    assert stats["dropped"] == {"catalog_non_string_title": 1, "unknown_item": 5}
    assert "3" not in load_catalog(out)


def test_empty_title_is_an_item_counted_in_stats(tmp_path):
    # the paper's released data has items whose title is "": they are items, decoded as `""`
    folder = make_bear_folder(tmp_path, catalog={**CATALOG, "5": ""})
    stats = load_stats(prepare(config(folder, tmp_path / "out")))
    assert load_catalog(tmp_path / "out")["5"] == ""
    assert stats["empty_title_items"] == 1 and stats["dropped"] == {}
    assert stats["rows"]["test"] == 2  # the rows whose target or history is item 5 are kept


def test_duplicate_catalog_id_is_an_error_naming_it(tmp_path):
    folder = make_bear_folder(tmp_path)
    (folder / "id2name4Rec.json").write_text(
        '{"1": "Pen", "2": "Pad", "3": "Stapler", "4": "Ink", "5": "Tape", "2": "Paper"}'
    )
    with pytest.raises(
        DataError, match=r"id2name4Rec.json: item id '2' appears more than once \(titles 'Pad' and 'Paper'\)"
    ):
        prepare(config(folder, tmp_path / "out"))


@pytest.mark.parametrize("which", ["train_10000.csv", "test_5000.csv"])
def test_header_only_file_is_an_error_at_prepare_naming_it(tmp_path, which):
    folder = make_bear_folder(tmp_path)
    write_csv(folder / which, [])
    with pytest.raises(DataError, match=rf"{which}: no examples \(0 data rows read: the file has only its header\)"):
        prepare(config(folder, tmp_path / "out"))
    assert not (tmp_path / "out" / "stats.json").exists()


def test_empty_split_is_an_error_naming_it_and_empty_valid_a_note(tmp_path):
    folder = make_bear_folder(tmp_path, train_rows=TRAIN_ROWS[:1])
    stats = load_stats(prepare(config(folder, tmp_path / "out")))
    assert stats["rows"]["valid"] == 0 and any("valid is empty" in n for n in stats["notes"])
    ml = tmp_path / "ml-100k"
    ml.mkdir()
    (ml / "u.data").write_text("1\t10\t5\t3\n1\t11\t4\t4\n")  # one user, two items: only a test window
    (ml / "u.item").write_text("10|A|||" + "|0" * 19 + "\n11|B|||" + "|0" * 19 + "\n")
    with pytest.raises(DataError, match=r"split 'train' is empty after reading ml100k data from .*ml-100k"):
        prepare(config(ml, tmp_path / "out2"))
    assert not (tmp_path / "out2").exists()


def test_valid_from_test_users_is_refused_outside_bear_csv(tmp_path):
    ml = tmp_path / "ml-100k"
    ml.mkdir()
    (ml / "u.data").write_text("1\t10\t5\t3\n1\t11\t4\t4\n1\t12\t4\t5\n")
    (ml / "u.item").write_text("".join(f"{i}|T{i}|||" + "|0" * 19 + "\n" for i in (10, 11, 12)))
    with pytest.raises(
        DataError, match=r"data.valid_from=test_users applies to data.source=bear_csv only, not to ml100k"
    ):
        prepare(config(ml, tmp_path / "out", "data.valid_from=test_users"))
    assert not (tmp_path / "out").exists()


def test_duplicate_rows_are_kept_and_counted(tmp_path):
    folder = make_bear_folder(tmp_path, train_rows=TRAIN_ROWS, test_rows=[*TEST_ROWS, TEST_ROWS[0], TEST_ROWS[0]])
    stats = load_stats(prepare(config(folder, tmp_path / "out", "data.valid_fraction=0")))
    assert stats["duplicate_rows"] == {"train": 0, "valid": 0, "test": 2}
    assert stats["rows"]["test"] == 4


def test_auto_detection_and_clear_error(tmp_path):
    assert detect_source(None) == "ml100k"
    assert detect_source(str(make_bear_folder(tmp_path))) == "bear_csv"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cannot tell what"):
        detect_source(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="does not exist"):
        detect_source(str(tmp_path / "missing"))


def test_resolve_prepared_reuses_and_accepts_prepared(tmp_path):
    folder = make_bear_folder(tmp_path)
    cfg = config(folder, tmp_path / "unused")
    work = resolve_prepared(cfg, tmp_path / "work")
    first = (work / "stats.json").stat().st_mtime_ns
    assert resolve_prepared(cfg, tmp_path / "work") == work
    assert (work / "stats.json").stat().st_mtime_ns == first  # same data config: reused
    assert resolve_prepared(config(work, tmp_path / "unused"), tmp_path / "other") == work
    assert detect_source(str(work)) == "prepared"
    with pytest.raises(DataError, match="unknown split 'dev'"):
        load_split(work, "dev")


def test_ml100k_from_the_recbole_wheel(tmp_path):
    out = prepare(config(None, tmp_path / "ml"))
    stats = load_stats(out)
    assert stats["source"] == "ml100k" and stats["domain"] == "movies"
    assert stats["users"] == 943 and stats["items"] == 1682
    assert stats["rows"]["test"] == 943 and stats["rows"]["valid"] == 943
    test = load_split(out, "test")
    valid = load_split(out, "valid")
    assert len(set(test["user_id"])) == 943
    assert all(1 <= len(h) <= 10 for h in test["history"])
    # the valid target is the most recent item of the same user's test history
    valid_target = dict(zip(valid["user_id"], valid["target"], strict=True))
    assert all(h[-1] == valid_target[u] for u, h in zip(test["user_id"], test["history"], strict=True))
    titles = load_catalog(out)
    assert titles["1"] == "Toy Story (1995)"
    # every interaction is a target once, except each user's first (min_history=1)
    assert sum(stats["rows"].values()) == 100_000 - 943
    chrono = load_stats(prepare(config(None, tmp_path / "ml2", "data.split=chronological")))
    assert sum(chrono["rows"].values()) == 100_000 - 943
    assert chrono["rows"]["train"] == int(0.8 * (100_000 - 943))


def test_ml100k_grouplens_folder(tmp_path):
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    rows = [(1, 10, 5, 0), (1, 10, 5, 3), (1, 11, 4, 1), (1, 12, 3, 2), (2, 11, 2, 7), (2, 10, 4, 8), (2, 12, 1, 9)]
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    genres = "|0" * 19
    (folder / "u.item").write_bytes(
        (
            f"10|Caf\xe9 (1995)|01-Jan-1995||http://x{genres}\n11|No Year|||{genres}\n12|Dated|01-Jan-1990||{genres}\n"
        ).encode("latin-1")
    )
    out = prepare(config(folder, tmp_path / "out", "data.min_rating=2"))
    assert load_catalog(out) == {"10": "Café (1995)", "11": "No Year", "12": "Dated (1990)"}
    stats = load_stats(out)
    assert stats["dropped"] == {"rating_below_min_rating": 1}
    # user 1 by time: 10, 11, 12, 10; user 2 (rating-1 row dropped): 11, 10
    assert load_split(out, "test")["target"] == ["10", "10"]
    assert load_split(out, "valid")["history"] == [["10", "11"]]
    assert load_split(out, "train")["target"] == ["11"]
    (folder / "u.data").write_text("1\t10\t5\t3\n1\t99\t4\tnow\n")
    with pytest.raises(DataError, match=r"u.data line 2: bad_timestamp 'now'"):
        prepare(config(folder, tmp_path / "out"))
    (folder / "u.data").write_text("1\t10\t5\t3\n1\t99\t4\t4\n")
    with pytest.raises(DataError, match=r"u.data line 2: item id '99' is not in u.item"):
        prepare(config(folder, tmp_path / "out"))


OFFICE_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n\n### Instruction:\n"
    "Given a list of office products the user has used before, please recommend a new office product that the "
    "user likes to the user.\n\n### Input:\nThe user has used the following office products before: "
    '"Pen", "Tape {x}"\n\n### Response:\n'
)


def test_prompt_builder_default_overrides_and_errors():
    builder = PromptBuilder(PromptConfig(), "Office")
    assert builder.prompt(["Pen", "Tape {x}"]) == OFFICE_PROMPT
    assert builder.response("Pen") == '"Pen"'
    assert "watched the following movies" in PromptBuilder(PromptConfig(), "movies").prompt(["A"])
    assert "video games" in PromptBuilder(PromptConfig(), "games").prompt([])
    assert "following items before" in PromptBuilder(PromptConfig(), "garden").prompt(["A"])
    custom = PromptBuilder(PromptConfig(template="I: {instruction} | H: {input}", history_phrase="had "), "toy")
    assert custom.prompt(["A", "B"]) == "I: " + custom.instruction + ' | H: had "A", "B"'
    with pytest.raises(ValueError, match=r"prompt.template must contain \{input\}"):
        PromptBuilder(PromptConfig(template="{instruction} only"), "office")


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("name", "train_file", "test_file", "train_windows", "test_windows"),
    [
        ("Office", "train.csv", "test.csv", 15_400, 1_925),
        ("Office", "train_10000.csv", "test_5000.csv", 10_000, 1_925),
        ("Clothing", "train.csv", "test.csv", 44_351, 5_544),
        ("Clothing", "train_10000.csv", "test.csv", 10_000, 5_544),
    ],
)
def test_shared_bear_csv_counts(shared_data, tmp_path, name, train_file, test_file, train_windows, test_windows):
    cfg = config(shared_data / name, tmp_path / "out", f"data.train_file={train_file}", f"data.test_file={test_file}")
    out = prepare(cfg)
    stats = load_stats(out)
    assert stats["train_windows_before_valid"] == train_windows
    assert stats["rows"]["train"] + stats["rows"]["valid"] == train_windows
    assert stats["rows"]["valid"] == round(0.1 * train_windows)
    assert stats["rows"]["test"] == test_windows
    assert stats["dropped"] == {}
    assert stats["domain"] == name.lower()
    for f in ("train.parquet", "valid.parquet", "test.parquet", "catalog.parquet", "stats.json", "config.yaml"):
        assert (out / f).is_file(), f
    train, valid = load_split(out, "train"), load_split(out, "valid")
    assert max(train["timestamp"]) <= min(valid["timestamp"])
    assert stats["duplicate_title_items"] == {"Office": 3, "Clothing": 220}[name]
