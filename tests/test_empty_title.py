"""An item whose title is the empty string (the paper's released data has such items) is an item:
prepared, counted, tokenised as `""` + EOS, in the trie, decoded by beam search and scored."""

from __future__ import annotations

import json

from eval_fixtures import write_model_folder

from bear_ds.catalog import Catalog
from bear_ds.config import load_config
from bear_ds.data import load_catalog, load_stats, prepare
from bear_ds.evaluation.evaluate import evaluate
from bear_ds.tokenization import load_tokenizer

CATALOG = {"1": "Pen", "2": "Paper Pad", "3": "", "4": "Stapler", "5": "Tape"}
ROWS = [("u1", "[1, 2, 3]", 100), ("u2", "[2, 3, 4]", 300), ("u3", "[3, 5]", 200), ("u4", "[4, 1, 5]", 50)]
TEST = [("u1", "[1, 2, 3]", 500), ("u2", "[3, 4, 5]", 600), ("u3", "[5, 3]", 700)]


def _write(folder, rows, name):
    lines = ["user_id,item_ids,timestamp"] + [f'{u},"{items}",{t}' for u, items, t in rows]
    (folder / name).write_text("\n".join(lines) + "\n")


def test_empty_title_item_end_to_end(tmp_path):
    src = tmp_path / "Office"
    src.mkdir()
    (src / "id2name4Rec.json").write_text(json.dumps(CATALOG))
    _write(src, ROWS, "train_10000.csv")
    _write(src, TEST, "test_5000.csv")
    data = prepare(load_config(None, [f"data.path={src}", f"output_dir={tmp_path / 'data'}"]))
    assert load_stats(data)["empty_title_items"] == 1 and load_catalog(data)["3"] == ""

    write_model_folder(tmp_path / "model", load_catalog(data))
    tok = load_tokenizer(tmp_path / "model")
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path / 'eval'}",
            f"data.path={data}",
            f"model.path={tmp_path / 'model'}",
            "eval.num_beams=5",  # as many beams as items: every item is in every list
            "eval.top_k=[1,5]",
        ],
    )
    metrics = evaluate(cfg)
    catalog = Catalog.load(tmp_path / "eval")
    empty_group = catalog.group_of_item("3")
    assert catalog.group_titles[empty_group] == ""
    assert catalog.group_token_ids[empty_group] == [*tok('""', add_special_tokens=False)["input_ids"], tok.eos_token_id]
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [r["target"] for r in rows] == ["", "Tape", ""]
    for r in rows:
        assert sorted(r["predictions"]) == sorted(CATALOG.values())  # "" decoded like any title
        assert r["target_rank"] == r["predictions"].index(r["target"])
    assert metrics["hr@5"] == 1.0 and 0 < metrics["ndcg@5"] <= 1.0
