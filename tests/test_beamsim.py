"""beamsim: the survival thresholds theta_s against a plain beam search written here, the survival
property (gold returned iff g_s >= theta_s for all s), and the chunked loss and its gradient
against autograd on the unchunked formula."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_llama_kwargs
from transformers import LlamaConfig, LlamaForCausalLM

from bear_ds.config import LossConfig
from bear_ds.generation.survival import batch_prompts, prompt_ends, prompt_state_of_forward, simulate_beam_search
from bear_ds.losses import (
    SimulatedSearch,
    backbone_forward,
    backbone_hidden_states,
    beamsim_loss,
    lm_head_context,
    margin_pruned,
    position_terms,
    response_loss,
    select_response,
)
from bear_ds.trie import TokenTrie

V, EOS, PAD = 24, 2, 0


def random_model(seed: int, logit_scale: float) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**tiny_llama_kwargs(V, 16, max_position_embeddings=64))).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)  # peaked distributions: pruning happens, no float ties
    return model


def random_catalog(seed: int, n_items: int) -> tuple[list[list[int]], list[int]]:
    """Titles over a 3-4 token alphabet (shared prefixes; short titles that finish while longer
    ones continue), each ending in EOS, plus a few items sharing another item's title."""
    rng = random.Random(seed)
    alphabet = rng.sample(range(4, V), rng.choice([3, 4]))
    distinct: list[tuple[int, ...]] = []
    while len(distinct) < n_items:
        seq = tuple(rng.choice(alphabet) for _ in range(rng.randint(1, 5))) + (EOS,)
        if seq not in distinct:
            distinct.append(seq)
    titles = [list(s) for s in distinct]
    groups = list(range(len(titles)))
    for g in rng.sample(range(len(distinct)), 2):  # shared titles: another item, the same group
        titles.append(list(distinct[g]))
        groups.append(g)
    return titles, groups


def micro_batch(prompts: list[list[int]], golds: list[list[int]]) -> dict[str, torch.Tensor]:
    """Right-padded like `collate`: input_ids, attention_mask, labels (-100 on prompt and padding)."""
    width = max(len(p) + len(g) for p, g in zip(prompts, golds, strict=True))
    ids = torch.full((len(prompts), width), PAD)
    labels = torch.full((len(prompts), width), -100)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for r, (p, g) in enumerate(zip(prompts, golds, strict=True)):
        ids[r, : len(p) + len(g)] = torch.tensor(p + g)
        labels[r, len(p) : len(p) + len(g)] = torch.tensor(g)
        mask[r, : len(p) + len(g)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def plain_beam_search(model, prompt, titles, *, beams, mask, tau, gold_len):
    """Reference, independent of bear_ds: one full forward per prefix (no cache), a dict trie,
    float64 scores, Hugging Face's beam rules without length penalty. Returns (theta_1..theta_T of
    the gold length, the returned token sequences)."""
    children: dict[tuple[int, ...], list[int]] = {}
    for t in titles:
        for i in range(len(t)):
            children.setdefault(tuple(t[:i]), [])
            if t[i] not in children[tuple(t[:i])]:
                children[tuple(t[:i])].append(t[i])
    depth = max(len(t) for t in titles)
    alive = [(0.0, ())]
    finished: list[tuple[float, tuple[int, ...]]] = []
    live_thr: dict[int, float] = {}
    all_thr: dict[int, float] = {}

    def lowest(scored):  # the B-th, or the lowest one when fewer
        return scored[min(beams, len(scored)) - 1][0] if scored else -math.inf

    for step in range(1, depth + 1):
        cands = []
        for score, prefix in alive:
            with torch.no_grad():
                z = model(input_ids=torch.tensor([prompt + list(prefix)])).logits[0, -1].double() / tau
            toks = children[prefix]
            lp = z[toks].log_softmax(0) if mask == "before" else z.log_softmax(0)[toks]
            cands += [(score + float(v), prefix + (t,)) for t, v in zip(toks, lp, strict=True)]
        cands.sort(key=lambda c: -c[0])
        top = cands[: 2 * beams]
        live = [c for c in top if c[1][-1] != EOS][:beams]
        live_thr[step], all_thr[step] = lowest(live), lowest(top)
        finished = sorted(finished + [c for c in top[:beams] if c[1][-1] == EOS], key=lambda c: -c[0])[:beams]
        if not live or (len(finished) == beams and live[0][0] <= finished[-1][0]):
            break
        alive = live
    returned = finished[beams - 1][0] if len(finished) == beams else -math.inf
    theta = []
    for s in range(1, gold_len + 1):
        if s < gold_len:
            theta.append(live_thr.get(s, returned))
        else:
            theta.append(max(all_thr[s], returned) if s in all_thr else returned)
    return theta, [seq for _, seq in finished]


@pytest.mark.parametrize("mask", ["before", "after"])
@pytest.mark.parametrize("beams", [1, 2, 5])
@pytest.mark.parametrize(
    ("seed", "n_items", "logit_scale", "tau"), [(0, 9, 6.0, 1.0), (1, 14, 3.0, 1.7), (2, 4, 6.0, 0.8)]
)
def test_thresholds_equal_a_plain_beam_search(mask, beams, seed, n_items, logit_scale, tau):
    model = random_model(seed, logit_scale)
    titles, groups = random_catalog(seed, n_items)
    trie = TokenTrie.from_sequences(titles, V, groups)
    rng = random.Random(100 + seed)
    golds = [titles[rng.randrange(len(titles))] for _ in range(6)]
    golds[0] = min(titles, key=len)  # one that finishes early, one among the longest
    golds[1] = max(titles, key=len)
    prompts = [[rng.randrange(4, V) for _ in range(rng.randint(2, 7))] for _ in golds]
    batch = micro_batch(prompts, golds)
    got = simulate_beam_search(model, **batch, trie=trie, beam_width=beams, eos_token_id=EOS, mask=mask, tau=tau)
    seen_fewer = seen_pruned = seen_returned = False
    for u, (prompt, gold) in enumerate(zip(prompts, golds, strict=True)):
        theta, returned = plain_beam_search(model, prompt, titles, beams=beams, mask=mask, tau=tau, gold_len=len(gold))
        assert int(got.lengths[u]) == len(gold)
        torch.testing.assert_close(
            got.thresholds[u, : len(gold)].double(), torch.tensor(theta, dtype=torch.float64), rtol=0, atol=1e-5
        )
        assert bool(got.pruned[u]) == (tuple(gold) not in returned), (u, gold, returned)
        seen_fewer |= len(returned) < beams
        seen_pruned |= bool(got.pruned[u])
        seen_returned |= not bool(got.pruned[u])
    if (beams, seed) == (5, 2):
        assert seen_fewer, "the case with fewer items than beams did not occur"
    if beams == 5 and seed in (0, 1):
        assert seen_pruned and seen_returned, "expected both pruned and returned golds"


def test_the_gold_survives_iff_its_prefixes_reach_the_thresholds():
    """eq. 3.1: gold returned <=> g_s >= theta_s for every s, with g_s from the loss's teacher-forced
    forward and theta_s from the cached search (a near-tie within 1e-4 would make this flaky)."""
    checked = pruned = 0
    for seed in range(4):
        model = random_model(seed, 5.0)
        titles, groups = random_catalog(seed, 12)
        trie = TokenTrie.from_sequences(titles, V, groups)
        rng = random.Random(seed)
        golds = [titles[rng.randrange(len(titles))] for _ in range(10)]
        prompts = [[rng.randrange(4, V) for _ in range(rng.randint(2, 7))] for _ in golds]
        batch = micro_batch(prompts, golds)
        for mask, beams in (("before", 2), ("after", 3)):
            search = simulate_beam_search(model, **batch, trie=trie, beam_width=beams, eos_token_id=EOS, mask=mask,
                                          tau=1.3)  # fmt: skip
            with torch.no_grad():
                hidden = backbone_hidden_states(model, batch["input_ids"], batch["attention_mask"])
                h, y, s = select_response(hidden, batch["labels"], trie)
                logits = model.lm_head(h)
            valid = trie.allowed_mask(s, V) if mask == "before" else None
            log_p = position_terms(logits, y, valid, tau=1.3).log_p_gold
            assert torch.equal(margin_pruned(log_p, search, atol=1e-4), search.pruned)
            checked += len(golds)
            pruned += int(search.pruned.sum())
    assert 0 < pruned < checked


@pytest.mark.parametrize("masked", [True, False])
def test_a_one_title_catalog_has_no_survival_term(masked):
    """One item: the search returns it whatever the scores, so beamsim is 0 like BEAR and MSL (no position
    has a choice), not lam * T * log(1/2) from the gold being its own B-th candidate."""
    model = random_model(0, 5.0)
    trie = TokenTrie.from_sequences([[5, 6, 7, EOS]], V)
    batch = micro_batch([[4, 9], [8, 10, 11]], [[5, 6, 7, EOS]] * 2)
    search = simulate_beam_search(model, **batch, trie=trie, beam_width=1, eos_token_id=EOS,
                                  mask="before" if masked else "after", tau=1.0)  # fmt: skip
    assert torch.isinf(search.thresholds).all() and not bool(search.pruned.any())
    with torch.no_grad():
        hidden = backbone_hidden_states(model, batch["input_ids"], batch["attention_mask"])
        h, y, s = select_response(hidden, batch["labels"], trie)
        logits = model.lm_head(h)
    valid = trie.allowed_mask(s, V) if masked else None
    loss = beamsim_loss(logits, y, valid, search, lam=1.0)
    assert float(loss) == float(beamsim_loss(logits, y, valid, search, lam=0.0))  # the CE alone
    if masked:
        assert float(loss) == 0.0


def test_prompts_are_recovered_left_padded():
    batch = micro_batch([[5, 6, 7], [8]], [[9, 2], [10, 11, 2]])
    ids, mask = batch_prompts(**batch)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def _unchunked_formula(hidden, weight, targets, states, trie, lengths, theta, *, masked, tau, xi, lam):
    """The beamsim loss written out directly (per example, per step) for autograd."""
    z = (hidden @ weight.T).float() / tau
    if masked:
        z = z.masked_fill(~trie.allowed_mask(states, V), float("-inf"))
    log_p = F.log_softmax(z, dim=-1).gather(1, targets[:, None]).squeeze(1)
    counted = trie.num_children(states) > 1 if masked else torch.ones_like(targets, dtype=torch.bool)
    total = -(log_p[counted]).sum()
    start = 0
    for u, n in enumerate(lengths.tolist()):
        g = 0.0
        for s in range(n):
            g = g + log_p[start + s]
            if math.isfinite(float(theta[u, s])):
                total = total + lam * F.logsigmoid((theta[u, s] - g) / xi)
        start += n
    return total / counted.sum().clamp(min=1)


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunked_loss_and_gradient_equal_autograd_on_the_formula(masked, chunk):
    torch.manual_seed(7)
    titles, groups = random_catalog(3, 10)
    trie = TokenTrie.from_sequences(titles, V, groups)
    golds = [titles[i] for i in (0, 3, 5, 1, 10)]
    labels = micro_batch([[4, 5]] * len(golds), golds)["labels"]
    n_pos = int((labels[:, 1:] != -100).sum())
    hidden_full = torch.randn(len(golds), labels.shape[1], 8, dtype=torch.float64)
    weight = (torch.randn(V, 8, dtype=torch.float64) * 2).requires_grad_()
    hidden_full.requires_grad_()
    h, y, s = select_response(hidden_full, labels, trie)
    assert h.shape[0] == n_pos
    lengths = torch.tensor([len(g) for g in golds])
    theta = torch.randn(len(golds), int(lengths.max()), dtype=torch.float64) * 2 - 3
    theta[1, 0] = float("-inf")  # no constraint at one step
    search = SimulatedSearch(theta.float(), lengths, torch.tensor([True, False, True, False, False]))
    cfg = LossConfig(name="beamsim", masked=masked, tau=1.3, xi=0.7, lam=0.9, chunk_size=chunk)
    out = response_loss(h, weight, y, s, trie, cfg, search=search)
    got = torch.autograd.grad(out.loss, (hidden_full, weight))
    h = select_response(hidden_full, labels, trie)[0]
    ref_loss = _unchunked_formula(h, weight, y, s, trie, lengths, theta.float(), masked=masked, tau=1.3, xi=0.7,
                                  lam=0.9)  # fmt: skip
    ref = torch.autograd.grad(ref_loss, (hidden_full, weight))
    torch.testing.assert_close(out.loss.double(), ref_loss.double(), rtol=1e-6, atol=1e-6)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)
    pure = beamsim_loss(h @ weight.T, y, trie.allowed_mask(s, V) if masked else None, search, tau=1.3, xi=0.7,
                        lam=0.9)  # fmt: skip
    torch.testing.assert_close(pure.double(), ref_loss.double(), rtol=1e-6, atol=1e-6)
    assert out.metrics["reg"] == pytest.approx(float(out.sums.reg) / float(out.sums.counted))
    assert "frac_outside_topb" in out.metrics


def test_response_loss_needs_the_search_exactly_for_beamsim():
    titles, groups = random_catalog(0, 5)
    trie = TokenTrie.from_sequences(titles, V, groups)
    labels = micro_batch([[4]], [titles[0]])["labels"]
    h, y, s = select_response(torch.randn(1, labels.shape[1], 8), labels, trie)
    with pytest.raises(ValueError, match="beamsim"):
        response_loss(h, torch.randn(V, 8), y, s, trie, LossConfig(name="beamsim"))
    search = SimulatedSearch(torch.zeros(1, len(titles[0])), torch.tensor([len(titles[0])]), torch.tensor([False]))
    with pytest.raises(ValueError, match="beamsim"):
        response_loss(h, torch.randn(V, 8), y, s, trie, LossConfig(name="bear"), search=search)


def test_model_head_path_matches_pure_loss():
    """Through a model: the lm_head context and the hidden states give the pure loss on full logits."""
    model = random_model(5, 3.0)
    titles, groups = random_catalog(5, 8)
    trie = TokenTrie.from_sequences(titles, V, groups)
    batch = micro_batch([[5, 6], [7, 8, 9]], [titles[1], titles[6]])
    search = simulate_beam_search(model, **batch, trie=trie, beam_width=2, eos_token_id=EOS, mask="before", tau=1.0)
    cfg = LossConfig(name="beamsim", beam_width=2, chunk_size=2)
    h, y, s = select_response(backbone_hidden_states(model, batch["input_ids"], batch["attention_mask"]),
                              batch["labels"], trie)  # fmt: skip
    with lm_head_context(model) as head:
        out = response_loss(h, head, y, s, trie, cfg, search=search)
    pure = beamsim_loss(model.lm_head(h), y, trie.allowed_mask(s, V), search, tau=cfg.tau, xi=cfg.xi, lam=cfg.lam)
    torch.testing.assert_close(out.loss, pure, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shared_prefix", [True, False])
@pytest.mark.parametrize("mask", ["before", "after"])
def test_search_from_the_training_forward_equals_its_own_prefill(shared_prefix, mask, monkeypatch):
    """beamsim starts its search from the training forward's KV cache of the (right-padded) rows:
    the same thresholds and verdicts as encoding the prompts again, on both cache paths."""
    import bear_ds.generation.beam as beam_module

    model = random_model(6, 5.0)
    titles, groups = random_catalog(6, 12)
    trie = TokenTrie.from_sequences(titles, V, groups)
    rng = random.Random(6)
    golds = [titles[rng.randrange(len(titles))] for _ in range(7)]
    prompts = [[rng.randrange(4, V) for _ in range(rng.randint(2, 9))] for _ in golds]
    batch = micro_batch(prompts, golds)
    if not shared_prefix:
        monkeypatch.setattr(beam_module, "_beam_cache", lambda *args: None)
    kwargs = dict(trie=trie, beam_width=3, eos_token_id=EOS, mask=mask, tau=1.2)
    own = simulate_beam_search(model, **batch, **kwargs)
    out = backbone_forward(model, batch["input_ids"], batch["attention_mask"],
                           prompt_ends(batch["attention_mask"], batch["labels"]))  # fmt: skip
    state = prompt_state_of_forward(batch["attention_mask"], batch["labels"], out.prompt_logits, out.cache)
    assert state is not None
    reused = simulate_beam_search(model, **batch, **kwargs, prompt_state=state)
    torch.testing.assert_close(reused.thresholds, own.thresholds, rtol=0, atol=1e-5)
    assert torch.equal(reused.pruned, own.pruned) and 0 < int(own.pruned.sum()) < len(golds)
    torch.testing.assert_close(out.hidden, backbone_hidden_states(model, batch["input_ids"], batch["attention_mask"]))


def test_restricted_log_probs_from_pairs_equal_the_dense_mask_before():
    from bear_ds.generation.beam import next_token_log_probs
    from bear_ds.masking import trie_log_softmax

    titles, groups = random_catalog(4, 14)
    trie = TokenTrie.from_sequences(titles, V, groups)
    torch.manual_seed(4)
    states = torch.randint(-1, trie.num_nodes, (40,))
    logits = torch.randn(40, V) * 4
    sparse = next_token_log_probs(logits, states, trie, "before")
    dense = trie_log_softmax(logits, "before", allowed=trie.allowed_mask(states, V))
    assert torch.equal(torch.isfinite(sparse), torch.isfinite(dense))
    torch.testing.assert_close(sparse[torch.isfinite(dense)], dense[torch.isfinite(dense)], rtol=0, atol=1e-6)
    assert bool((states == -1).any()) and bool(torch.isinf(sparse[states == -1]).all())
