"""S-DPO through the chunked head == the formula written here from full logits (value and gradients)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bear_ds.config import LossConfig
from bear_ds.losses import (
    PreferenceSums,
    loss_sums,
    metrics_from_sums,
    preference_loss,
    response_rows,
    sdpo_loss,
    sdpo_terms,
    select_response,
)
from bear_ds.trie import TokenTrie

V, H = 40, 12
TITLES = [[3, 4, 2], [3, 5, 6, 2], [3, 5, 7, 2], [8, 2], [8, 9, 10, 2], [11, 4, 4, 2], [12, 2]]


def preference_batch(k: int, examples: int, seed: int = 0):
    """hidden [R, L, H] (leaf), labels [R, L] for R = examples * (1 + k) rows: prompt, then a title."""
    g = torch.Generator().manual_seed(seed)
    rows = examples * (1 + k)
    picks = [int(i) for i in torch.randint(0, len(TITLES), (rows,), generator=g)]
    prompt_lengths = [int(n) for n in torch.randint(2, 6, (examples,), generator=g)]
    width = max(prompt_lengths) + max(len(t) for t in TITLES) + 2
    labels = torch.full((rows, width), -100, dtype=torch.long)
    for r, title in enumerate(picks):
        start = prompt_lengths[r // (1 + k)]  # the rows of one example share the prompt
        labels[r, start : start + len(TITLES[title])] = torch.tensor(TITLES[title])
    hidden = torch.randn(rows, width, H, generator=g, requires_grad=True)
    weight = (0.5 * torch.randn(V, H, generator=g)).requires_grad_()
    return hidden, weight, labels


def valid_next(prefix: list[int]) -> list[int]:
    """Tokens that continue `prefix` along some title (the trie, written out)."""
    return sorted({t[len(prefix)] for t in TITLES if t[: len(prefix)] == prefix and len(t) > len(prefix)})


def plain_sdpo(hidden, weight, labels, ref, *, k, beta, tau, masked, sft_weight):
    """From full logits [R, L, V]: item log-probs by a loop over positions, then the S-DPO formula."""
    logits = hidden @ weight.T  # [R, L, V]: every position, as a plain implementation would
    rows = labels.shape[0]
    item_logp, pos_token_logp = [], []
    for r in range(rows):
        total, prefix = torch.zeros(()), []
        for p in range(labels.shape[1] - 1):
            y = int(labels[r, p + 1])
            if y == -100:
                continue
            z = logits[r, p]
            if masked:
                allowed = torch.full((V,), float("-inf"))
                allowed[valid_next(prefix)] = 0.0
                lp = F.log_softmax((z + allowed) / tau, dim=-1)[y]
            else:
                lp = F.log_softmax(z, dim=-1)[y]
            total = total + lp
            if r % (1 + k) == 0:
                pos_token_logp.append(lp)
            prefix.append(y)
        item_logp.append(total)
    pi = torch.stack(item_logp).view(-1, 1 + k)
    losses = []
    for b in range(pi.shape[0]):
        r_pos = beta * (pi[b, 0] - ref[b, 0])
        inner = sum(torch.exp(beta * (pi[b, j] - ref[b, j]) - r_pos) for j in range(1, 1 + k))
        losses.append(-torch.log(torch.sigmoid(-torch.log(inner))))
    loss = torch.stack(losses).mean()
    return loss + sft_weight * (-torch.stack(pos_token_logp).mean())


@pytest.mark.parametrize(
    ("k", "masked", "tau", "sft_weight", "chunk"),
    [(3, True, 1.7, 0.5, 5), (3, False, 1.0, 0.0, 4), (1, True, 1.0, 0.0, 1000), (2, True, 1.0, 1.0, 1)],
)
def test_chunked_sdpo_equals_full_logits_formula(k, masked, tau, sft_weight, chunk):
    trie = TokenTrie.from_sequences(TITLES, V)
    hidden, weight, labels = preference_batch(k, examples=3, seed=k)
    ref = -3.0 * torch.rand(3, 1 + k, generator=torch.Generator().manual_seed(9)) - 2.0
    cfg = LossConfig(
        name="sdpo", dpo_beta=0.7, masked=masked, tau=tau, sft_weight=sft_weight, chunk_size=chunk, beam_width=2
    )

    h, y, s = select_response(hidden, labels, trie)
    out = preference_loss(h, weight, y, s, response_rows(labels), ref, trie, cfg)
    got = torch.autograd.grad(out.loss, (hidden, weight))
    want_loss = plain_sdpo(hidden, weight, labels, ref, k=k, beta=0.7, tau=tau, masked=masked, sft_weight=sft_weight)
    want = torch.autograd.grad(want_loss, (hidden, weight))
    torch.testing.assert_close(out.loss, want_loss, rtol=1e-5, atol=1e-5)
    for g_got, g_want in zip(got, want, strict=True):
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-5)
    assert out.policy_logps.shape == (3, 1 + k)
    # the pruning-risk diagnostic over the positives' tokens is LML's (rank among the trie-valid tokens)
    positive = response_rows(labels) % (1 + k) == 0
    want_sums = loss_sums((h @ weight.T)[positive], y[positive], trie.allowed_mask(s[positive], V), name="lml",
                          beam_width=cfg.beam_width)  # fmt: skip
    assert float(out.sums.risk_positions) == float(want_sums.risk_positions) > 0
    assert float(out.sums.outside_topb) == float(want_sums.outside_topb)


def test_k1_is_the_dpo_formula():
    g = torch.Generator().manual_seed(3)
    pi, ref = torch.randn(6, 2, generator=g, requires_grad=True), torch.randn(6, 2, generator=g)
    beta = 0.3
    dpo = -F.logsigmoid(beta * ((pi[:, 0] - ref[:, 0]) - (pi[:, 1] - ref[:, 1]))).mean()
    got = sdpo_loss(pi, ref, beta=beta)
    torch.testing.assert_close(got, dpo, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(got, pi)[0], torch.autograd.grad(dpo, pi)[0])


def test_reward_metrics_and_sums():
    # rewards (beta 1, reference 0): positive 0; negatives -1, +2, 0 (a tie counts as wrong)
    pi = torch.tensor([[0.0, -1.0, 2.0, 0.0], [1.0, 0.0, 0.0, -5.0]])
    terms = sdpo_terms(pi, torch.zeros_like(pi), beta=1.0)
    assert terms.correct.tolist() == [[True, False, False], [True, True, True]]
    torch.testing.assert_close(terms.margin, torch.tensor([0.0 - 1.0 / 3, 1.0 + 5.0 / 3]))
    want = [math.log1p(math.exp(-1) + math.exp(2) + 1), math.log1p(2 * math.exp(-1) + math.exp(-6))]
    torch.testing.assert_close(terms.loss, torch.tensor(want))
    sums = PreferenceSums(
        pref=terms.loss.sum(), ce=torch.tensor(6.0), ce_positions=torch.tensor(4.0), examples=torch.tensor(2.0),
        margin=terms.margin.sum(), correct=terms.correct.sum().float(), negatives=torch.tensor(6.0),
        risk_positions=torch.tensor(3.0), outside_topb=torch.tensor(1.0),
    )  # fmt: skip
    metrics = sums.metrics()
    assert metrics["reward_accuracy"] == pytest.approx(4 / 6)
    assert metrics["ce"] == pytest.approx(1.5) and metrics["pref_loss"] == pytest.approx(sum(want) / 2)
    assert float(sums.loss(sft_weight=2.0)) == pytest.approx(sum(want) / 2 + 2.0 * 1.5)
    token = metrics_from_sums(sums.token_sums(), name="sdpo")  # what the trainer logs as ce, frac_outside_topb
    assert token["ce"] == pytest.approx(1.5) and token["frac_outside_topb"] == pytest.approx(1 / 3)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"\[B, 1 \+ K\] with K >= 1"):
        sdpo_loss(torch.zeros(3, 1), torch.zeros(3, 1), beta=0.1)
    with pytest.raises(ValueError, match="must have the shape of policy_logps"):
        sdpo_loss(torch.zeros(3, 2), torch.zeros(2, 2), beta=0.1)
