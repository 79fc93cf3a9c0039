"""Exhaustive ranking and the pruning analysis."""

from __future__ import annotations

import json

import torch
from eval_fixtures import EOS, random_prompts, random_titles, tiny_llama, trie_of, write_model_folder, write_prepared

from bear_ds.config import load_config
from bear_ds.evaluation.analysis import analyze
from bear_ds.evaluation.exhaustive import CatalogTargets, exhaustive_scores
from bear_ds.evaluation.pruning import aggregate_pruning, user_pruning_record
from bear_ds.generation.beam import constrained_beam_search

VOCAB = 2000


@torch.no_grad()
def test_exhaustive_matches_full_forward():
    # teacher forcing with the reused prompt cache == one forward over prompt + title
    model = tiny_llama(VOCAB, seed=1)
    titles = random_titles(12, VOCAB, seed=1, alphabet=5)
    trie = trie_of(titles, VOCAB)
    prompt = [9, 99, 999, 5]
    scores = exhaustive_scores(model, prompt, CatalogTargets.build(titles, trie), trie, mask="after", batch_items=5)
    for g, t in enumerate(titles):
        ids = torch.tensor([prompt + t[:-1]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1 :].float(), -1)
        expected = logp.gather(1, torch.tensor(t)[:, None]).sum()
        assert abs(float(scores.total_logp[g]) - float(expected)) < 1e-4


def test_pruning_records_are_consistent():
    # B=2 over a bushy trie: some top-B targets get pruned; check each against the exhaustive scores
    model = tiny_llama(VOCAB, seed=2, logit_scale=3.0)
    titles = random_titles(60, VOCAB, seed=2, alphabet=4, max_len=5)
    trie = trie_of(titles, VOCAB)
    targets = CatalogTargets.build(titles, trie)
    ids, attn = random_prompts(24, VOCAB, seed=2)
    num_beams = 2
    beam = constrained_beam_search(
        model, ids, attn, trie, num_beams=num_beams, eos_token_id=EOS, mask="before", return_trace=True
    )
    records, pruned_seen = [], 0
    for u in range(ids.shape[0]):
        scores = exhaustive_scores(model, ids[u][attn[u].bool()].tolist(), targets, trie, mask="before")
        # the target: the user's exhaustive number 1 or 2 (in the top-B by construction)
        target = int(torch.argsort(scores.total_logp, descending=True)[u % 2])
        rec = user_pruning_record(target, scores, beam, u, titles, trie, num_beams)
        records.append(rec)
        assert rec["in_top_b"] and rec["global_rank"] == u % 2
        assert rec["pruned"] == (target not in beam.groups[u].tolist())
        if not rec["pruned"] or rec["prune_reason"] != "pruned":
            continue
        pruned_seen += 1
        step = rec["pruned_step"]
        # the target's prefix of step+1 tokens was beaten by every live beam of that step
        cum = scores.token_logp.cumsum(dim=1)  # [G, T] prefix scores
        prefix_score = float(cum[target, step])
        for state in beam.live_states[step][u].tolist():
            if state < 0:
                continue
            g = next(g for g in range(len(titles)) if int(targets.states[g, step + 1]) == state)
            assert float(cum[g, step]) >= prefix_score - 1e-5
        fails = scores.token_rank[target, : step + 1] >= num_beams
        assert rec["violated_at_or_before"] == bool(fails.any())
    assert pruned_seen > 0, "the setting should prune some top-B targets"
    agg = aggregate_pruning(records, [1, 2])
    assert agg["topb_positives"] == 24 and agg["pruned"] == sum(r["pruned"] for r in records)
    assert agg["exhaustive"]["hr@2"] == 1.0
    assert agg["beam"]["hr@2"] == 1.0 - agg["pruned_share"]


def test_analyze_end_to_end(tmp_path):
    titles = write_prepared(tmp_path / "data", num_items=20, num_users=7)
    write_model_folder(tmp_path / "model", titles)
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path}/an",
            f"data.path={tmp_path}/data",
            "data.source=prepared",
            f"model.path={tmp_path}/model",
            "eval.num_beams=3",
            "eval.top_k=[1,3]",
            "eval.mask=after",
            "analyze.batch_items=6",
        ],
    )
    summary = analyze(cfg)
    saved = json.loads((tmp_path / "an" / "analysis.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "an" / "analysis.jsonl").read_text().splitlines()]
    assert saved["users"] == summary["users"] == len(rows) == 7
    assert saved["targets_not_in_catalog"] == 1  # user U3's target is not in the catalog
    assert all(len(r["exhaustive_top"]) == 3 for r in rows)
    assert saved["mask"] == "after"
    # a pruned target's prefixes are kept as text: the target's own (a start of its quoted title)
    # and the B-th live beam's that beat it, so the report decodes nothing
    pruned = [r for r in rows if r["pruned"]]
    assert pruned and saved["pruned"] == len(pruned)
    for r in pruned:
        assert r["target"].startswith(r["pruned_prefix"].lstrip('"').rstrip('"')) and r["pruned_prefix"]
        if r["prune_reason"] == "pruned":
            assert isinstance(r["beam_cutoff_prefix"], str) and r["beam_cutoff_prefix"] != r["pruned_prefix"]
    assert all("pruned_prefix" not in r for r in rows if not r["pruned"])


@torch.no_grad()
def test_trie_scoring_matches_full_forward_in_both_masks():
    # every title's per-token log p and sibling rank, from the trie walk with the shared prompt
    # cache, equal those of one plain forward over prompt + title
    from bear_ds.generation.beam import next_token_log_probs

    model = tiny_llama(VOCAB, seed=3, logit_scale=4.0)
    titles = random_titles(30, VOCAB, seed=3, alphabet=4, max_len=6)
    trie = trie_of(titles, VOCAB)
    targets = CatalogTargets.build(titles, trie)
    prompt = [7, 70, 700, 1700, 17]
    for mask in ("after", "before"):
        scores = exhaustive_scores(model, prompt, targets, trie, mask=mask, batch_items=4)
        for g in (0, 7, 15, 29):
            t = titles[g]
            logits = model(input_ids=torch.tensor([prompt + t[:-1]])).logits[0, len(prompt) - 1 :]  # [T, V]
            states = targets.states[g, : len(t)]
            logp = next_token_log_probs(logits, states, trie, mask).gather(1, torch.tensor(t)[:, None])[:, 0]
            assert torch.allclose(scores.token_logp[g, : len(t)], logp, atol=1e-4)
            assert abs(float(scores.total_logp[g]) - float(logp.sum())) < 1e-4
            for k, tok in enumerate(t):
                rows, toks = trie.allowed_pairs(states[k : k + 1])
                expected_rank = int((logits[k, toks] > logits[k, tok]).sum())
                assert int(scores.token_rank[g, k]) == expected_rank
            assert bool((scores.token_rank[g, len(t) :] == -1).all())


@torch.no_grad()
def test_trie_scoring_equals_teacher_forcing_fallback(monkeypatch):
    # models without the shared-prefix cache teacher-force every title on prompt-cache copies
    import bear_ds.evaluation.exhaustive as exhaustive_module

    model = tiny_llama(VOCAB, seed=4, logit_scale=6.0)
    titles = random_titles(40, VOCAB, seed=4, alphabet=5, max_len=7)
    trie = trie_of(titles, VOCAB)
    targets = CatalogTargets.build(titles, trie)
    prompt = [11, 12, 1300, 14]
    for mask in ("after", "before"):
        walked = [exhaustive_scores(model, prompt, targets, trie, mask=mask, batch_items=b) for b in (1, 3, 256)]
        with monkeypatch.context() as patch:
            patch.setattr(exhaustive_module, "shared_prefix_cache", lambda *args: None)
            forced = exhaustive_scores(model, prompt, targets, trie, mask=mask, batch_items=5)
        for scores in walked:
            assert torch.allclose(scores.token_logp, forced.token_logp, atol=1e-4)
            assert torch.equal(scores.token_rank, forced.token_rank)
            assert torch.equal(scores.lengths, forced.lengths)


def _bushy_setting(seed: int, users: int):
    """A tiny model, 80 short titles over 4 tokens (a bushy trie) and `users` prompts."""
    model = tiny_llama(VOCAB, seed=seed, logit_scale=4.0)
    titles = random_titles(80, VOCAB, seed=seed, alphabet=4, max_len=6)
    ids, attn = random_prompts(users, VOCAB, seed=seed)
    return model, titles, trie_of(titles, VOCAB), [ids[u][attn[u].bool()].tolist() for u in range(users)]


def _analysis_options(mask: str) -> dict:
    return dict(num_beams=3, eos_token_id=EOS, pad_token_id=0, mask=mask, batch_items=16, batch_users=5)


@torch.no_grad()
def test_bounded_walk_gives_the_same_records_as_the_full_walk():
    # skipping subtrees below min(target's total, B-th best) must not change any pruning record
    from bear_ds.evaluation.exhaustive import PruneBound
    from bear_ds.evaluation.pruning import analyze_users

    model, titles, trie, prompts = _bushy_setting(seed=5, users=12)
    # targets: from the head, the middle and the tail of the ranking, and one not in the catalog
    first = exhaustive_scores(model, prompts[0], CatalogTargets.build(titles, trie), trie, mask="before")
    order = torch.argsort(first.total_logp, descending=True).tolist()
    targets = [order[(u * 7) % 80] for u in range(11)] + [None]
    for mask, probe in (("after", True), ("before", True), ("after", False), ("before", False)):
        full = analyze_users(model, prompts, targets, titles, trie, bounded=False, **_analysis_options(mask))
        fast = analyze_users(model, prompts, targets, titles, trie, probe=probe, **_analysis_options(mask))
        for a, b in zip(full, fast, strict=True):
            floats = ("exhaustive_logp", "target_logp", "pruned_prefix_logp", "beam_cutoff_logp")
            assert {k: v for k, v in a.items() if k not in floats} == {k: v for k, v in b.items() if k not in floats}
            assert torch.allclose(torch.tensor(a["exhaustive_logp"]), torch.tensor(b["exhaustive_logp"]), atol=1e-5)
            for key in floats[1:]:
                if a.get(key) is not None:
                    assert abs(a[key] - b[key]) < 1e-5
        assert any(r["in_top_b"] for r in full) and any(r["global_rank"] and r["global_rank"] > 20 for r in full)
    # and it does skip: a head target leaves most groups unscored (-inf)
    bounded = exhaustive_scores(
        model, prompts[0], CatalogTargets.build(titles, trie), trie, mask="before",
        bound=PruneBound(order[0], order[:3], 3),
    )  # fmt: skip
    skipped = int(torch.isinf(bounded.total_logp).sum())
    assert 0 < skipped < 80
    kept = ~torch.isinf(bounded.total_logp)
    assert torch.allclose(bounded.total_logp[kept], first.total_logp[kept], atol=1e-5)
    assert set(torch.argsort(bounded.total_logp, descending=True)[:3].tolist()) == set(order[:3])


@torch.no_grad()
def test_batched_walk_gives_each_user_what_its_own_walk_gives():
    # the users of a batch share the walk's forwards (rows padded per level, split over forwards by
    # batch_items): every user's scores must be those of its walk alone, bounded or not
    from bear_ds.evaluation.exhaustive import PruneBound, exhaustive_scores_batch

    model, titles, trie, prompts = _bushy_setting(seed=7, users=6)
    prompts[1] = prompts[1][:2]  # prompts of different lengths: the prefill pads them
    targets = CatalogTargets.build(titles, trie)
    alone = [exhaustive_scores(model, p, targets, trie, mask="before") for p in prompts]
    order = [torch.argsort(s.total_logp, descending=True).tolist() for s in alone]
    # head, middle and tail targets, one not in the catalog; one user unbounded
    bounds = [PruneBound(order[u][(u * 17) % 80] if u != 4 else None, order[u][:3], 3) for u in range(6)]
    bounds[2] = PruneBound(order[2][40], order[2][:3], 3, rank_cap=3)
    bounds[5] = None
    for mask in ("after", "before"):
        own = [
            exhaustive_scores(model, p, targets, trie, mask=mask, bound=b) for p, b in zip(prompts, bounds, strict=True)
        ]
        for batch_items in (1, 5, 256):
            batch = exhaustive_scores_batch(
                model, prompts, targets, trie, mask=mask, batch_items=batch_items, bounds=bounds
            )
            for a, b in zip(own, batch, strict=True):
                assert torch.equal(torch.isinf(a.total_logp), torch.isinf(b.total_logp))  # same subtrees skipped
                assert torch.equal(a.token_rank, b.token_rank)
                kept = ~torch.isinf(a.token_logp)
                assert torch.allclose(a.token_logp[kept], b.token_logp[kept], atol=1e-5)
    # the bounds did skip, differently per user, and the unbounded user scored everything ("before")
    skipped = [int(torch.isinf(s.total_logp).sum()) for s in own]
    assert skipped[5] == 0 and len(set(skipped[:5])) > 1 and max(skipped) > 0
    assert torch.allclose(own[5].total_logp, alone[5].total_logp, atol=1e-5)


@torch.no_grad()
def test_rank_cap_keeps_every_record_below_the_cap():
    # with rank_cap, ranks beyond the cap are lower bounds (>= cap); everything else is unchanged
    from bear_ds.evaluation.pruning import analyze_users

    model, titles, trie, prompts = _bushy_setting(seed=6, users=10)
    targets = [(u * 13) % 80 for u in range(10)]
    full = analyze_users(model, prompts, targets, titles, trie, bounded=False, **_analysis_options("after"))
    capped = analyze_users(model, prompts, targets, titles, trie, rank_cap=5, **_analysis_options("after"))
    unprobed = analyze_users(
        model, prompts, targets, titles, trie, rank_cap=5, probe=False, **_analysis_options("after")
    )
    assert aggregate_pruning(full, [1, 3, 5]) == aggregate_pruning(capped, [1, 3, 5])
    assert aggregate_pruning(full, [1, 3, 5]) == aggregate_pruning(unprobed, [1, 3, 5])
    for a, b in zip(full, capped, strict=True):
        assert b["global_rank_exact"] == (a["global_rank"] < 5)
        if b["global_rank_exact"]:
            assert b["global_rank"] == a["global_rank"]
        else:
            assert 5 <= b["global_rank"] <= a["global_rank"]
        same = ("exhaustive_top", "beam_top", "beam_rank", "in_top_b", "pruned", "condition_holds")
        assert {k: a[k] for k in same} == {k: b[k] for k in same}
    assert any(not r["global_rank_exact"] for r in capped) and any(r["global_rank_exact"] for r in capped)


@torch.no_grad()
def test_probe_walk_is_narrow_and_starts_the_exact_walk_from_the_targets_total(monkeypatch):
    # the probe keeps at most PROBE_WIDTH_PER_GROUP * B nodes per level besides the target's path,
    # and hands the exact walk the target's walked total and every group it finished
    import bear_ds.evaluation.exhaustive as exhaustive_module
    from bear_ds.evaluation.exhaustive import PROBE_WIDTH_PER_GROUP, PruneBound

    model, titles, trie, prompts = _bushy_setting(seed=8, users=1)
    targets = CatalogTargets.build(titles, trie)
    full = exhaustive_scores(model, prompts[0], targets, trie, mask="after")
    order = torch.argsort(full.total_logp, descending=True).tolist()
    rows_per_level: list[list[int]] = []  # per walk: the rows of each level
    starts: list[dict[int, float]] = []  # the groups (and totals) each walk's filter starts from
    score_level, start = exhaustive_module._BatchWalk.score_level, exhaustive_module._SubtreeFilter.start.__func__

    def counting_score_level(self, level, depth, *args):
        if depth == 0:
            rows_per_level.append([])
        rows_per_level[-1].append(sum(child.numel() for _, _, child in level))
        return score_level(self, level, depth, *args)

    def recording_start(cls, targets_, trie_, bound, known, width=None):
        starts.append(dict(known))
        return start(cls, targets_, trie_, bound, known, width)

    monkeypatch.setattr(exhaustive_module._BatchWalk, "score_level", counting_score_level)
    monkeypatch.setattr(exhaustive_module._SubtreeFilter, "start", classmethod(recording_start))
    bounded = exhaustive_scores(model, prompts[0], targets, trie, mask="after", bound=PruneBound(order[50], (), 1))
    probe_rows, exact_rows = rows_per_level
    assert max(probe_rows) <= PROBE_WIDTH_PER_GROUP + 1 < max(exact_rows)
    assert starts[0] == {} and abs(starts[1][order[50]] - float(full.total_logp[order[50]])) < 1e-5
    assert len(starts[1]) > 1 and all(abs(t - float(full.total_logp[g])) < 1e-5 for g, t in starts[1].items())
    assert int(torch.argmax(bounded.total_logp)) == order[0]  # the exact walk still finds the best group


def _plain_live_beams(model, prompt: list[int], trie, num_beams: int, mask: str, steps: int) -> list[list[tuple]]:
    """The live beams after each step of a plain beam search, every prefix scored by its own full
    forward: per step [(token ids, cumulative log p)] best first (2B best continuations, of which
    the B best non-EOS stay live, as `constrained_beam_search` does)."""
    from bear_ds.generation.beam import next_token_log_probs

    live: list[tuple[list[int], float, int]] = [([], 0.0, 0)]  # ids, log p, trie state (0: root)
    trace = []
    for _ in range(steps):
        candidates = []
        for ids, score, state in live:
            logits = model(input_ids=torch.tensor([prompt + ids])).logits[0, -1:]  # [1, V]
            logp = next_token_log_probs(logits, torch.tensor([state]), trie, mask)[0]
            for tok in trie.allowed_pairs(torch.tensor([state]))[1].tolist():
                child = int(trie.advance(torch.tensor([state]), torch.tensor([tok]))[0])
                candidates.append((ids + [tok], score + float(logp[tok]), child))
        candidates.sort(key=lambda c: -c[1])
        live = [c for c in candidates[: 2 * num_beams] if c[0][-1] != EOS][:num_beams]
        trace.append([(ids, score) for ids, score, _ in live])
    return trace


@torch.no_grad()
def test_pruned_records_hold_the_drop_step_prefix_and_the_beam_that_beat_it():
    # the paper's Figure 1 facts of each pruned top-B target, against a plain beam search and
    # teacher-forced log p: the step its prefix left the live beams, that prefix's log p, and the
    # B-th live beam of that step (its ids and log p), which scored at least as high
    from bear_ds.evaluation.pruning import analyze_users
    from bear_ds.generation.beam import next_token_log_probs

    model, titles, trie, prompts = _bushy_setting(seed=7, users=16)
    targets_all = CatalogTargets.build(titles, trie)
    num_beams, checked = 3, 0
    for mask in ("after", "before"):
        # each user's target: one of its exhaustive top-B (the ones beam search may prune)
        targets = []
        for u, prompt in enumerate(prompts):
            scores = exhaustive_scores(model, prompt, targets_all, trie, mask=mask)
            targets.append(int(torch.argsort(scores.total_logp, descending=True)[u % num_beams]))
        records = analyze_users(model, prompts, targets, titles, trie, **_analysis_options(mask))
        for u, rec in enumerate(records):
            if not rec["pruned"]:
                assert "pruned_prefix_logp" not in rec and "beam_cutoff_logp" not in rec
                continue
            title, step = titles[targets[u]], rec["pruned_step"]
            logits = model(input_ids=torch.tensor([prompts[u] + title[:-1]])).logits[0, len(prompts[u]) - 1 :]
            logp = next_token_log_probs(logits, targets_all.states[targets[u], : len(title)], trie, mask)
            expected_prefix = float(logp.gather(1, torch.tensor(title)[:, None])[: step + 1].sum())
            assert abs(rec["pruned_prefix_logp"] - expected_prefix) < 1e-4
            if rec["prune_reason"] != "pruned":
                assert rec["beam_cutoff_logp"] is None and rec["beam_cutoff_ids"] is None
                continue
            trace = _plain_live_beams(model, prompts[u], trie, num_beams, mask, step + 1)
            survived = [[tuple(ids) for ids, _ in beams] for beams in trace]
            assert all(tuple(title[: s + 1]) in survived[s] for s in range(step)), "dropped later than recorded"
            assert tuple(title[: step + 1]) not in survived[step], "not dropped at the recorded step"
            cutoff_ids, cutoff_logp = trace[step][-1]
            assert rec["beam_cutoff_ids"] == cutoff_ids
            assert abs(rec["beam_cutoff_logp"] - cutoff_logp) < 1e-4
            assert rec["beam_cutoff_logp"] >= rec["pruned_prefix_logp"] - 1e-5
            checked += 1
    assert checked >= 2, "the setting should prune some top-B targets at a live step"
