"""Trie-constrained beam search: equality with transformers generate, with the exhaustive ranking."""

from __future__ import annotations

import math

import pytest
import torch
from eval_fixtures import EOS, PAD, hf_constrained_beam, random_prompts, random_titles, tiny_llama, trie_of

from bear_ds.evaluation.exhaustive import CatalogTargets, exhaustive_scores
from bear_ds.generation.beam import constrained_beam_search, next_token_log_probs
from bear_ds.trie import TokenTrie

VOCAB = 2000  # the size of a small trained BPE


def _ours(result, u):
    return [(g, s) for g, s in zip(result.groups[u].tolist(), result.scores[u].tolist(), strict=False) if g >= 0]


def _assert_same_lists(ours, ref, tol=1e-4):
    """Same items in the same order and scores within tol; a swap is allowed only between tied scores."""
    assert len(ours) == len(ref), (ours, ref)
    for (g1, s1), (g2, s2) in zip(ours, ref, strict=False):
        assert abs(s1 - s2) <= tol, (ours, ref)
        if g1 != g2:
            partner = dict(ref).get(g1)
            assert partner is not None and abs(partner - s1) <= tol, (ours, ref)


@pytest.mark.parametrize("mask", ["after", "before"])
@pytest.mark.parametrize(
    ("seed", "num_items", "alphabet", "logit_scale"),
    [(0, 60, 12, 8.0), (1, 150, 6, 20.0), (2, 8, 3, 1.0), (3, 40, 12, 8.0)],
)
def test_matches_transformers_generate(mask, seed, num_items, alphabet, logit_scale):
    model = tiny_llama(VOCAB, seed=seed, logit_scale=logit_scale)
    titles = random_titles(num_items, VOCAB, seed=seed, alphabet=alphabet)
    trie = trie_of(titles, VOCAB)
    ids, attn = random_prompts(5, VOCAB, seed=seed)
    for num_beams in (2, 5, 10):
        for length_penalty in (1.0, 0.0, 2.0):
            ours = constrained_beam_search(
                model, ids, attn, trie, num_beams=num_beams, eos_token_id=EOS, mask=mask, length_penalty=length_penalty
            )
            ref = hf_constrained_beam(
                model, ids, attn, titles, num_beams=num_beams, length_penalty=length_penalty, mask=mask
            )
            for u in range(ids.shape[0]):
                _assert_same_lists(_ours(ours, u), ref[u])


@pytest.mark.parametrize("mask", ["after", "before"])
def test_wide_beam_equals_exhaustive_ranking(mask):
    model = tiny_llama(VOCAB, seed=4, logit_scale=8.0)
    titles = random_titles(25, VOCAB, seed=4, alphabet=5)
    trie = trie_of(titles, VOCAB)
    ids, attn = random_prompts(3, VOCAB, seed=4)
    for length_penalty in (1.0, 0.0):
        res = constrained_beam_search(
            model, ids, attn, trie, num_beams=len(titles), eos_token_id=EOS, mask=mask, length_penalty=length_penalty
        )
        targets = CatalogTargets.build(titles, trie)
        for u in range(ids.shape[0]):
            prompt = ids[u][attn[u].bool()].tolist()
            ex = exhaustive_scores(model, prompt, targets, trie, mask=mask, batch_items=7).beam_scores(length_penalty)
            order = torch.argsort(ex, descending=True).tolist()
            _assert_same_lists(_ours(res, u), [(g, float(ex[g])) for g in order])


def test_mask_before_is_a_distribution_over_items():
    model = tiny_llama(VOCAB, seed=5, logit_scale=4.0)
    titles = random_titles(30, VOCAB, seed=5, alphabet=4)
    trie = trie_of(titles, VOCAB)
    targets = CatalogTargets.build(titles, trie)
    prompt = [5, 17, 300, 42]
    before = exhaustive_scores(model, prompt, targets, trie, mask="before")
    after = exhaustive_scores(model, prompt, targets, trie, mask="after")
    # renormalised over valid tokens, the item probabilities sum to one; over the vocabulary, less
    assert math.isclose(float(before.total_logp.exp().sum()), 1.0, rel_tol=1e-4)
    assert float(after.total_logp.exp().sum()) < 0.5
    assert bool((before.total_logp >= after.total_logp - 1e-5).all())
    # a catalog of one title: mask=before decodes it with probability one
    single = trie_of([titles[0]], VOCAB)
    ids = torch.tensor([prompt])
    res = constrained_beam_search(
        model, ids, torch.ones_like(ids), single, num_beams=3, eos_token_id=EOS, mask="before"
    )
    assert res.groups[0].tolist() == [0, -1, -1]
    assert abs(float(res.scores[0, 0])) < 1e-5


def test_batched_equals_one_user_at_a_time():
    # users stop at different steps and are dropped from the batch; the rest must be unaffected
    model = tiny_llama(VOCAB, seed=6)
    titles = random_titles(80, VOCAB, seed=6, alphabet=8)
    trie = trie_of(titles, VOCAB)
    ids, attn = random_prompts(7, VOCAB, seed=6)
    batch = constrained_beam_search(model, ids, attn, trie, num_beams=4, eos_token_id=EOS)
    assert len(set(batch.steps.tolist())) > 1  # the test needs users that stop at different steps
    for u in range(ids.shape[0]):
        keep = attn[u].bool()
        one = constrained_beam_search(
            model, ids[u : u + 1, keep], attn[u : u + 1, keep], trie, num_beams=4, eos_token_id=EOS
        )
        assert one.groups[0].tolist() == batch.groups[u].tolist()
        assert torch.allclose(one.scores[0], batch.scores[u], atol=1e-5)


def test_trace_holds_live_prefixes():
    model = tiny_llama(VOCAB, seed=7)
    titles = random_titles(40, VOCAB, seed=7, alphabet=6)
    trie = trie_of(titles, VOCAB)
    ids, attn = random_prompts(3, VOCAB, seed=7)
    res = constrained_beam_search(model, ids, attn, trie, num_beams=3, eos_token_id=EOS, return_trace=True)
    assert res.live_states is not None and len(res.live_states) == int(res.steps.max())
    for step, states in enumerate(res.live_states):
        assert states.shape == (3, 3)
        live = states[states >= 0]
        # a live beam after step s is a prefix of s + 1 tokens, never a finished title
        depth = {0: 0}
        for t in titles:
            node = torch.zeros(1, dtype=torch.int64)
            for k, tok in enumerate(t):
                node = trie.advance(node, torch.tensor([tok]))
                depth[int(node)] = k + 1
        assert all(depth[int(s)] == step + 1 for s in live)
    for u in range(3):  # each returned item was reachable: its first-token prefix was live at step 0
        for g in res.groups[u].tolist():
            if g >= 0 and len(titles[g]) > 1:
                first = int(trie.advance(torch.zeros(1, dtype=torch.int64), torch.tensor([titles[g][0]])))
                assert first in res.live_states[0][u].tolist()


def test_next_token_log_probs_modes():
    trie = TokenTrie.from_sequences([[5, EOS], [6, 7, EOS]], 10)
    logits = torch.randn(3, 10)
    states = torch.tensor([0, 0, -1])
    after = next_token_log_probs(logits, states, trie, "after")
    before = next_token_log_probs(logits, states, trie, "before")
    full = torch.log_softmax(logits, -1)
    assert torch.allclose(after[0, [5, 6]], full[0, [5, 6]])
    assert torch.allclose(before[0, [5, 6]].exp().sum(), torch.tensor(1.0))
    assert torch.isinf(after[2]).all() and torch.isinf(before[2]).all()  # off the trie: nothing allowed
    assert not torch.isnan(before).any()


def test_bad_inputs_are_named():
    model = tiny_llama(VOCAB, seed=0)
    trie = trie_of(random_titles(5, VOCAB), VOCAB)
    ids = torch.tensor([[PAD, 5, 6], [7, 8, PAD]])
    attn = torch.tensor([[0, 1, 1], [1, 1, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        constrained_beam_search(model, ids, attn, trie, num_beams=2, eos_token_id=EOS)
    with pytest.raises(ValueError, match="mask"):
        constrained_beam_search(model, ids[:1], attn[:1], trie, num_beams=2, eos_token_id=EOS, mask="middle")
    with pytest.raises(ValueError, match="smaller than the trie"):
        constrained_beam_search(tiny_llama(300), ids[:1], attn[:1], trie, num_beams=2, eos_token_id=EOS)


def test_generic_cache_path_gives_the_same_result(monkeypatch):
    # models whose cache is not a plain DynamicCache fall back to HF's reorder_cache
    import bear_ds.generation.beam as beam_module

    model = tiny_llama(VOCAB, seed=8)
    titles = random_titles(50, VOCAB, seed=8, alphabet=7)
    trie = trie_of(titles, VOCAB)
    ids, attn = random_prompts(6, VOCAB, seed=8)
    fast = constrained_beam_search(model, ids, attn, trie, num_beams=4, eos_token_id=EOS)
    monkeypatch.setattr(beam_module, "_beam_cache", lambda *args: None)
    generic = constrained_beam_search(model, ids, attn, trie, num_beams=4, eos_token_id=EOS)
    assert fast.groups.tolist() == generic.groups.tolist()
    assert torch.allclose(fast.scores, generic.scores, atol=1e-5)


def test_shared_prefix_attention_is_used_and_unsupported_models_fall_back(monkeypatch):
    # the prompt is stored once per user and attended by all its beams through the registered
    # attention function; a model that does not use the attention interface gets the generic path
    from transformers import AttentionInterface

    import bear_ds.generation.shared_prefix as shared_prefix_module

    model = tiny_llama(VOCAB, seed=9)
    titles = random_titles(50, VOCAB, seed=9, alphabet=7)
    trie = trie_of(titles, VOCAB)
    ids, attn = random_prompts(4, VOCAB, seed=9)
    calls = []

    def counting(module, *args, **kwargs):
        calls.append(module.layer_idx)
        return shared_prefix_module.shared_prefix_attention(module, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, shared_prefix_module.SHARED_PREFIX_ATTENTION, counting)
    shared = constrained_beam_search(model, ids, attn, trie, num_beams=4, eos_token_id=EOS)
    assert len(calls) == 2 * (int(shared.steps.max()) - 1)  # two layers, every decoding forward after prefill
    assert model.config._attn_implementation != shared_prefix_module.SHARED_PREFIX_ATTENTION  # restored
    monkeypatch.setattr(type(model), "_supports_attention_backend", False)
    generic = constrained_beam_search(model, ids, attn, trie, num_beams=4, eos_token_id=EOS)
    assert len(calls) == 2 * (int(shared.steps.max()) - 1)
    assert shared.groups.tolist() == generic.groups.tolist()
    assert torch.allclose(shared.scores, generic.scores, atol=1e-5)


@pytest.mark.parametrize("mask", ["after", "before"])
def test_prompts_with_a_common_prefix_match_transformers(mask):
    # prompts from one template share their first tokens: encoded once, then each prompt's rest
    from bear_ds.generation.beam import MIN_SHARED_PROMPT_PREFIX, common_prefix_length

    model = tiny_llama(VOCAB, seed=10)
    titles = random_titles(60, VOCAB, seed=10, alphabet=9)
    trie = trie_of(titles, VOCAB)
    g = torch.Generator().manual_seed(10)
    template = torch.randint(4, VOCAB, (MIN_SHARED_PROMPT_PREFIX + 4,), generator=g).tolist()
    rests = [[100 + u] + torch.randint(4, VOCAB, (n,), generator=g).tolist() for u, n in enumerate([0, 6, 2, 9, 4])]
    prompts = [template + rest for rest in rests]
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    assert common_prefix_length(ids, attn) == len(template)
    assert common_prefix_length(ids[:1], attn[:1]) == len(prompts[0]) - 1  # kept below the shortest prompt
    ours = constrained_beam_search(model, ids, attn, trie, num_beams=5, eos_token_id=EOS, mask=mask)
    ref = hf_constrained_beam(model, ids, attn, titles, num_beams=5, mask=mask)
    for u in range(len(prompts)):
        _assert_same_lists(_ours(ours, u), ref[u])
        alone = constrained_beam_search(
            model,
            torch.tensor([prompts[u]]),
            torch.ones(1, len(prompts[u]), dtype=torch.long),
            trie,
            num_beams=5,
            eos_token_id=EOS,
            mask=mask,
        )
        assert alone.groups[0].tolist() == ours.groups[u].tolist()
        assert torch.allclose(alone.scores[0], ours.scores[u], atol=1e-5)
