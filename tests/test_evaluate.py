"""Evaluation orchestration in one process: sharding, outputs, metrics, bad input."""

from __future__ import annotations

import json
import logging
import shutil
from types import SimpleNamespace

import pytest
import torch
from eval_fixtures import EOS, PAD, random_titles, tiny_llama, trie_of, write_model_folder, write_prepared
from hypothesis import given
from hypothesis import strategies as st

from bear_ds.config import load_config, save_config, with_overrides
from bear_ds.evaluation.evaluate import evaluate, metric_ks, run_beam_evaluation, shard_indices
from bear_ds.generation.beam import constrained_beam_search
from bear_ds.masking import resolve_mask

VOCAB = 2000


@given(st.integers(0, 200), st.integers(1, 9))
def test_shards_cover_every_user_once(num_users, world_size):
    shards = [shard_indices(num_users, r, world_size) for r in range(world_size)]
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(num_users))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_metric_ks_and_mask():
    assert metric_ks([1, 5, 10, 20], 10) == ([1, 5, 10], [20])
    with pytest.raises(ValueError, match="num_beams=4"):
        metric_ks([5, 10], 4)
    assert resolve_mask("auto", "lml") == "after" and resolve_mask("auto", "bear") == "before"
    assert resolve_mask("before", "lml") == "before"
    with pytest.raises(ValueError, match="loss.name"):
        resolve_mask("auto", None)


def _fake_catalog(titles):
    trie = trie_of(titles, VOCAB)
    return SimpleNamespace(
        trie=trie, num_groups=len(titles), eos_token_id=EOS, group_titles=[f"t{g}" for g in range(len(titles))]
    )


def test_run_beam_evaluation_matches_direct_search():
    model = tiny_llama(VOCAB, seed=3)
    titles = random_titles(50, VOCAB, seed=3, alphabet=8)
    catalog = _fake_catalog(titles)
    prompts = [[4 + (7 * u + k) % 900 for k in range(3 + u % 5)] for u in range(9)]
    targets = [u % 50 for u in range(8)] + [None]
    eval_cfg = SimpleNamespace(num_beams=4, top_k=[1, 4, 10], mask="after", length_penalty=1.0, batch_users=2)
    tokenizer = SimpleNamespace(pad_token_id=PAD)
    model.train()
    preds, metrics = run_beam_evaluation(model, tokenizer, catalog, prompts, targets, eval_cfg, progress=False)
    assert model.training  # mode restored
    assert metrics["users"] == 9 and metrics["targets_not_in_catalog"] == 1
    assert metrics["decoding"]["top_k_skipped"] == [10] and "hr@10" not in metrics
    model.eval()
    for u, p in enumerate(prompts):
        ids = torch.tensor([p])
        ref = constrained_beam_search(model, ids, torch.ones_like(ids), catalog.trie, num_beams=4, eos_token_id=EOS)
        expected = [g for g in ref.groups[0].tolist() if g >= 0]
        assert preds[u]["groups"] == expected
        assert preds[u]["predictions"] == [f"t{g}" for g in expected]
        assert preds[u]["target_rank"] == (expected.index(targets[u]) if targets[u] in expected else None)
    hits = [p["target_rank"] for p in preds]
    assert metrics["hr@4"] == pytest.approx(sum(r is not None for r in hits) / 9)


def test_context_overflow_is_an_error():
    model = tiny_llama(VOCAB, seed=0, max_positions=16)
    catalog = _fake_catalog(random_titles(5, VOCAB, max_len=6))
    eval_cfg = SimpleNamespace(num_beams=2, top_k=[1], mask="after", length_penalty=1.0, batch_users=2)
    with pytest.raises(ValueError, match="exceed the model context of 16"):
        run_beam_evaluation(model, SimpleNamespace(pad_token_id=PAD), catalog, [[5] * 3, [6] * 14], [0, 1], eval_cfg)


@pytest.fixture(scope="module")
def run_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    titles = write_prepared(root / "data", num_items=30, num_users=13)
    write_model_folder(root / "model", titles)
    return root


def _cfg(root, out, *extra):
    return load_config(
        None,
        [
            f"output_dir={root}/{out}",
            f"data.path={root}/data",
            "data.source=prepared",
            f"model.path={root}/model",
            "eval.num_beams=5",
            "eval.top_k=[1,5,10]",
            "eval.batch_users=3",
            *extra,
        ],
    )


def test_evaluate_writes_the_run_folder(run_folders):
    metrics = evaluate(_cfg(run_folders, "one"))
    out = run_folders / "one"
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    saved = json.loads((out / "metrics.json").read_text())
    assert [r["user_id"] for r in rows] == [f"U{u}" for u in range(13)]  # original order
    assert saved["users"] == 13 and saved["targets_not_in_catalog"] == 1
    assert rows[3]["target"] is None and rows[3]["target_rank"] is None
    assert all(len(r["predictions"]) == len(r["scores"]) <= 5 for r in rows)
    assert all(r["scores"] == sorted(r["scores"], reverse=True) for r in rows)
    for key in ("hr@1", "ndcg@1", "hr@5", "ndcg@5", "elapsed_s", "users_per_second", "decoding"):
        assert key in saved
    assert saved["decoding"]["mask"] == "before"  # auto + the default loss (bear): the released protocol
    assert saved["hr@5"] == metrics["hr@5"]
    assert (out / "catalog.json").is_file() and (out / "config.yaml").is_file()
    hits = sum(r["target_rank"] is not None for r in rows)
    assert saved["hr@5"] == pytest.approx(hits / 13)


def test_evaluate_rejects_top_k_above_beams(run_folders):
    with pytest.raises(ValueError, match="every K exceeds eval.num_beams=5"):
        evaluate(_cfg(run_folders, "bad", "eval.top_k=[10,20]"))


def test_mask_auto_says_which_mask_it_used_and_why(run_folders, caplog):
    # the fixture's model folder records no training loss: the fallback is logged and saved, not silent
    assert not (run_folders / "model" / "config.yaml").exists()
    with caplog.at_level(logging.WARNING, logger="bear_ds.evaluation.evaluate"):
        evaluate(_cfg(run_folders, "fallback", "loss.name=msl"))
    decoding = json.loads((run_folders / "fallback" / "metrics.json").read_text())["decoding"]
    assert decoding["mask"] == "before"
    assert "records no training loss" in decoding["mask_reason"] and "loss.name=msl" in decoding["mask_reason"]
    assert decoding["mask_reason"] in caplog.text

    # a model that records its loss: auto follows it whatever this command's loss.name says
    recorded = run_folders / "model_lml"
    shutil.copytree(run_folders / "model", recorded)
    save_config(load_config(None, ["loss.name=lml"]), recorded)
    cfg = _cfg(run_folders, "recorded", f"model.path={recorded}", "loss.name=bear")
    evaluate(cfg)
    decoding = json.loads((run_folders / "recorded" / "metrics.json").read_text())["decoding"]
    assert decoding["mask"] == "after" and "records loss.name=lml" in decoding["mask_reason"]
    evaluate(with_overrides(cfg, ["eval.mask=before", f"output_dir={run_folders / 'explicit'}"]))
    decoding = json.loads((run_folders / "explicit" / "metrics.json").read_text())["decoding"]
    assert decoding == {**decoding, "mask": "before", "mask_reason": "eval.mask=before as configured"}
