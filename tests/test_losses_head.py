"""Chunked loss head == pure losses (value and gradients), and its coupling to HF models."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama_kwargs

from bear_ds.config import LossConfig
from bear_ds.losses import (
    LMHead,
    LossSums,
    backbone_hidden_states,
    bear_loss,
    lm_head_context,
    lml_loss,
    metrics_from_sums,
    msl_loss,
    response_loss,
    select_response,
)
from bear_ds.trie import TokenTrie

V, H = 48, 16


def tiny_trie(seed: int = 0, n_titles: int = 30) -> tuple[TokenTrie, list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    titles: list[list[int]] = []
    seen = set()
    while len(titles) < n_titles:
        length = int(torch.randint(2, 7, (1,), generator=g))
        seq = [int(t) for t in torch.randint(3, 12, (length,), generator=g)] + [2]  # few tokens: branchy trie
        if tuple(seq) not in seen:
            seen.add(tuple(seq))
            titles.append(seq)
    return TokenTrie.from_sequences(titles, V), titles


def response_batch(n_examples: int, seed: int = 0):
    """targets [N] and states [N] of n_examples gold titles, concatenated."""
    trie, titles = tiny_trie(seed)
    g = torch.Generator().manual_seed(seed + 1)
    picks = torch.randint(0, len(titles), (n_examples,), generator=g).tolist()
    width = max(len(titles[i]) for i in picks)
    padded = torch.full((n_examples, width), -100, dtype=torch.long)
    for r, i in enumerate(picks):
        padded[r, : len(titles[i])] = torch.tensor(titles[i])
    states = trie.states_along(padded)
    keep = padded != -100
    return trie, padded[keep], states[keep]


def pure_reference(hidden, weight, bias, targets, states, trie, cfg: LossConfig, scale=1.0, softcap=None):
    logits = hidden @ weight.T + (0 if bias is None else bias)  # [N, V]
    logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    valid = trie.allowed_mask(states, weight.shape[0])
    if cfg.name == "lml":
        return lml_loss(logits, targets)
    if cfg.name == "msl":
        return msl_loss(logits, targets, valid, tau=cfg.tau)
    return bear_loss(
        logits,
        targets,
        valid if cfg.masked else None,
        beam_width=cfg.beam_width,
        tau=cfg.tau,
        xi=cfg.xi,
        lam=cfg.lam,
        form=cfg.form,
    )


CONFIGS = {
    "lml": dict(name="lml"),
    "msl": dict(name="msl", tau=2.0),
    "bear": dict(name="bear", beam_width=3, lam=0.5, xi=1.5),
    "bear_reg": dict(name="bear", beam_width=3, lam=0.5, xi=1.5, form="regularizer"),
    "bear_full": dict(name="bear", beam_width=5, masked=False),
}


@pytest.mark.parametrize("chunk", [1, 5, 13, 1000])  # N = 39: 13 divides it, 5 does not, 1000 = one chunk
@pytest.mark.parametrize("loss", list(CONFIGS))
def test_chunked_head_equals_pure_loss(loss, chunk):
    trie, targets, states = response_batch(9)
    assert len(targets) == 39  # the chunk sizes above were chosen for this N
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(len(targets), H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    bias = torch.randn(V, generator=g) * 0.1
    cfg = LossConfig(chunk_size=chunk, **CONFIGS[loss])

    def run(fn):
        h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
        value = fn(h, w, b)
        value.backward()
        return value.detach(), h.grad, w.grad, b.grad

    got = run(lambda h, w, b: response_loss(h, LMHead(w, b, 1.5, 8.0), targets, states, trie, cfg).loss)
    ref = run(lambda h, w, b: pure_reference(h, w, b, targets, states, trie, cfg, 1.5, 8.0))
    for a, b_ in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-7)


def test_metrics_are_micro_batch_means():
    trie, targets, states = response_batch(12)
    hidden, weight = torch.randn(len(targets), H), torch.randn(V, H)
    out = response_loss(hidden, weight, targets, states, trie, LossConfig(chunk_size=5, beam_width=2))
    logits = hidden @ weight.T
    _, d = bear_loss(logits, targets, trie.allowed_mask(states, V), beam_width=2, return_details=True)
    c = d.counted
    assert out.metrics["counted"] == int(c.sum()) and out.metrics["positions"] == len(targets)
    assert out.metrics["ce"] == pytest.approx(float(d.ce[c].mean()), rel=1e-5)
    assert out.metrics["frac_outside_topb"] == pytest.approx(float(d.outside_topb[c].float().mean()), rel=1e-6)
    assert "weight_mean" in out.metrics and 1.0 <= out.metrics["weight_mean"] <= 1.25
    reg = response_loss(hidden, weight, targets, states, trie, LossConfig(form="regularizer")).metrics
    assert reg["reg"] < 0 and "weight_mean" not in reg


def test_sums_of_two_micro_batches_give_token_weighted_metrics():
    """What the trainer logs per step: the LossSums vectors of its micro-batches added, read once."""
    trie, targets, states = response_batch(12)
    hidden, weight = torch.randn(len(targets), H), torch.randn(V, H)
    cfg = LossConfig(chunk_size=4, beam_width=2)
    halves = [response_loss(hidden[s], weight, targets[s], states[s], trie, cfg) for s in (slice(0, 5), slice(5, None))]
    whole = response_loss(hidden, weight, targets, states, trie, cfg)
    added = LossSums.from_tensor(halves[0].sums.as_tensor() + halves[1].sums.as_tensor())
    assert metrics_from_sums(added, name="bear") == pytest.approx(whole.metrics, rel=1e-5)
    with pytest.raises(ValueError, match=r"expected a \[9\] vector"):
        LossSums.from_tensor(torch.zeros(8))


def test_no_response_tokens_still_reaches_every_parameter():
    trie, _, _ = response_batch(2)
    h = torch.randn(0, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    b = torch.randn(V, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.long)
    out = response_loss(h, (w, b), empty, empty, trie, LossConfig())
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0
    assert w.grad is not None and float(w.grad.abs().sum()) == 0.0 and b.grad is not None


def test_bad_positions_are_named():
    trie, targets, states = response_batch(3)
    hidden, weight = torch.randn(len(targets), H), torch.randn(V, H)
    bad_states = states.clone()
    bad_states[4] = -1
    with pytest.raises(ValueError, match="position 4 .*off the trie"):
        response_loss(hidden, weight, targets, bad_states, trie, LossConfig())
    bad_targets = targets.clone()
    bad_targets[1] = 40  # never a title token
    with pytest.raises(ValueError, match="position 1 is not a trie continuation"):
        response_loss(hidden, weight, bad_targets, states, trie, LossConfig())
    with pytest.raises(ValueError, match=r"lm_head weight must be \[V, 16\]"):
        response_loss(hidden, weight[:, :4], targets, states, trie, LossConfig())


# ------------------------------------------------------------------ HF model coupling
def _tiny_models():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = tiny_llama_kwargs(V, H)
    return {
        "llama_tied": lambda: LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True)),
        "llama_untied": lambda: LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False)),
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=H, n_layer=2, n_head=2, n_positions=64)),
    }


def batch_with_prompts(trie_titles, n=3, seed=0):
    """input_ids, attention_mask, labels: a random prompt then a title, right-padded (pad 0)."""
    g = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for i in range(n):
        prompt = torch.randint(12, V, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
        title = trie_titles[i % len(trie_titles)]
        rows.append(prompt + title)
        labels.append([-100] * len(prompt) + title)
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask, lab


@pytest.mark.parametrize("family", ["llama_tied", "llama_untied", "qwen2", "gpt2"])
def test_response_loss_on_a_model_equals_loss_on_full_logits(family):
    torch.manual_seed(0)
    model = _tiny_models()[family]().eval()
    trie, titles = tiny_trie()
    ids, mask, labels = batch_with_prompts(titles, n=4)
    cfg = LossConfig(chunk_size=4, beam_width=3)

    hidden = backbone_hidden_states(model, ids, mask)  # [B, L, H]
    h, y, s = select_response(hidden, labels, trie)
    with lm_head_context(model) as head:
        out = response_loss(h, head, y, s, trie, cfg)
        out.loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # [B, L-1, V]
    shifted = labels[:, 1:]
    keep = shifted != -100
    ref = bear_loss(logits[keep], shifted[keep], trie.allowed_mask(trie.states_along(shifted)[keep], V), beam_width=3)
    ref.backward()
    torch.testing.assert_close(out.loss.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_peft_lora_model_and_logit_softcap_from_config():
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(0)
    base = _tiny_models()["llama_tied"]()
    base.config.final_logit_softcapping = 3.0
    model = get_peft_model(base, PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trie, titles = tiny_trie()
    ids, mask, labels = batch_with_prompts(titles, n=2)
    h, y, s = select_response(backbone_hidden_states(model, ids, mask), labels, trie)
    with lm_head_context(model) as head:
        assert head.softcap == 3.0
        assert head.weight is base.get_input_embeddings().weight  # tied
        out = response_loss(h, head, y, s, trie, LossConfig(name="lml"))
    ref_logits = torch.tanh(base.lm_head(h) / 3.0) * 3.0
    torch.testing.assert_close(out.loss, lml_loss(ref_logits, y), rtol=1e-5, atol=1e-6)
    out.loss.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None and float(g.abs().sum()) > 0 for g in lora_grads)


def test_pruning_risk_is_measured_alike_for_every_loss():
    # LML's loss is unmasked, but its diagnostic ranks the gold token among the trie-valid tokens,
    # over positions with a choice, exactly as for MSL and BEAR: the three curves are comparable.
    trie, targets, states = response_batch(12)
    hidden, weight = torch.randn(len(targets), H), torch.randn(V, H)
    logits = hidden @ weight.T
    _, d = bear_loss(logits, targets, trie.allowed_mask(states, V), beam_width=2, return_details=True)
    expected = float(d.outside_topb[d.counted].float().mean())
    assert 0.0 < expected < 1.0
    for name in ("lml", "msl", "bear"):
        out = response_loss(hidden, weight, targets, states, trie, LossConfig(name=name, beam_width=2, chunk_size=5))
        assert out.metrics["frac_outside_topb"] == pytest.approx(expected, rel=1e-6), name


def test_select_response_matches_a_walk_over_every_position():
    # prompts of different lengths (left and right padding), responses of different lengths
    trie, titles = tiny_trie(3)
    g = torch.Generator().manual_seed(7)
    rows, length = 6, 40
    labels = torch.full((rows, length), -100, dtype=torch.long)
    for r in range(rows):
        title = titles[int(torch.randint(0, len(titles), (1,), generator=g))]
        start = int(torch.randint(1, length - len(title), (1,), generator=g))
        labels[r, start : start + len(title)] = torch.tensor(title)
    hidden = torch.randn(rows, length, H)
    h, y, s = select_response(hidden, labels, trie)
    shifted = labels[:, 1:]
    keep = shifted != -100
    torch.testing.assert_close(h, hidden[:, :-1][keep])
    assert torch.equal(y, shifted[keep])
    assert torch.equal(s, trie.states_along(shifted)[keep])  # the unpacked walk over all positions
