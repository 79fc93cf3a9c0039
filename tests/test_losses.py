"""Pure LML/MSL/BEAR losses against a naive float64 per-position reference, and their edge cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bear_ds.losses import bear_loss, lml_loss, loss_from_sums, loss_sums, msl_loss


# ------------------------------------------------------------------ naive reference (float64, one row at a time)
def naive_terms(z: torch.Tensor, y: torch.Tensor, valid: torch.Tensor | None, beam_width: int, tau: float):
    """Per-position (log p_gold, log beta, counted) by sorting each row's probabilities."""
    log_p_gold, log_beta, counted = [], [], []
    for t in range(z.shape[0]):
        row = z[t].double()
        ok = torch.ones_like(row, dtype=torch.bool) if valid is None else valid[t]
        masked = torch.where(ok, row, torch.tensor(float("-inf"), dtype=torch.float64))
        logp = masked / tau - torch.logsumexp(masked / tau, 0)
        p = logp.detach().exp()
        nonzero = sorted((float(v) for v in p if v > 0), reverse=True)
        beta = nonzero[-1] if len(nonzero) < beam_width else nonzero[beam_width - 1]
        log_p_gold.append(logp[y[t]])
        log_beta.append(math.log(beta))
        counted.append(bool(ok.sum() > 1))
    return torch.stack(log_p_gold), torch.tensor(log_beta, dtype=torch.float64), counted


def naive_bear(z, y, valid, beam_width=10, tau=1.0, xi=2.75, lam=0.25, form="reweight"):
    log_p, log_beta, counted = naive_terms(z, y, valid, beam_width, tau)
    idx = [t for t, c in enumerate(counted) if c]
    if not idx:
        return z.double().sum() * 0
    log_p, log_beta = log_p[idx], log_beta[idx]
    if form == "reweight":
        w = 1 + lam * torch.sigmoid((log_p.detach() - log_beta) / xi)
        w = w / (w.sum() + 1e-8)
        return (w * -log_p).sum()
    return (-log_p + lam * F.logsigmoid((log_beta - log_p) / xi)).mean()


def naive_msl(z, y, valid, tau=1.0):
    log_p, _, _ = naive_terms(z, y, valid, 1, tau)
    return -log_p.mean()


def random_case(n=12, v=40, density=0.3, seed=0, single_valid_rows=(3,)):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g) * 3
    y = torch.randint(0, v, (n,), generator=g)
    valid = torch.rand(n, v, generator=g) < density
    valid[torch.arange(n), y] = True
    for r in single_valid_rows:  # a position with one valid continuation (CE 0)
        valid[r] = False
        valid[r, y[r]] = True
    return z, y, valid


def grads_of(fn, z):
    z = z.clone().requires_grad_(True)
    loss = fn(z)
    (g,) = torch.autograd.grad(loss, z)
    return loss.detach(), g


# ------------------------------------------------------------------ values and gradients
def test_lml_matches_cross_entropy():
    z, y, _ = random_case()
    torch.testing.assert_close(lml_loss(z, y), F.cross_entropy(z, y))


@pytest.mark.parametrize("tau", [1.0, 4.5])
def test_msl_matches_naive_and_counts_single_valid_positions(tau):
    z, y, valid = random_case(single_valid_rows=(0, 5))
    got, g = grads_of(lambda x: msl_loss(x, y, valid, tau=tau), z)
    ref, g_ref = grads_of(lambda x: naive_msl(x, y, valid, tau=tau), z.double())
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-6)
    # mean over ALL positions: the single-valid rows add 0 to the numerator but count in N
    counted = valid.sum(-1) > 1
    ce = -torch.log_softmax(z.masked_fill(~valid, float("-inf")) / tau, -1).gather(1, y[:, None]).squeeze(1)
    assert float(ce[~counted].abs().max()) == 0.0
    torch.testing.assert_close(got, ce.sum() / len(y))


@pytest.mark.parametrize("form", ["reweight", "regularizer"])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("beam_width", [1, 3, 10, 50])
def test_bear_matches_naive(form, masked, beam_width):
    z, y, valid = random_case(n=16, v=40, seed=beam_width)
    valid = valid if masked else None
    kw = dict(beam_width=beam_width, tau=1.3, xi=2.75, lam=0.7, form=form)
    got, g = grads_of(lambda x: bear_loss(x, y, valid, **kw), z)
    ref, g_ref = grads_of(lambda x: naive_bear(x, y, valid, **kw), z.double())
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-6)


def test_bear_reweight_differs_from_msl_and_lam_zero_is_counted_mean():
    z, y, valid = random_case(single_valid_rows=(2,))
    counted = valid.sum(-1) > 1
    ce = -torch.log_softmax(z.masked_fill(~valid, float("-inf")), -1).gather(1, y[:, None]).squeeze(1)
    # lam = 0: equal weights over the counted positions only (unlike MSL's mean over all)
    torch.testing.assert_close(bear_loss(z, y, valid, lam=0.0), ce[counted].mean(), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(bear_loss(z, y, valid, lam=0.0), msl_loss(z, y, valid))
    assert not torch.allclose(bear_loss(z, y, valid, lam=2.0), ce[counted].mean())


def test_details_report_margin_outside_and_weights():
    z, y, valid = random_case(n=20, v=30, density=0.6, seed=4, single_valid_rows=(1,))
    loss, d = bear_loss(z, y, valid, beam_width=3, return_details=True)
    log_p, log_beta, counted = naive_terms(z, y, valid, 3, 1.0)
    torch.testing.assert_close(d.margin.double(), log_beta - log_p.detach(), rtol=1e-5, atol=1e-5)
    assert d.outside_topb.tolist() == (log_p.detach() < log_beta).tolist()
    assert d.counted.tolist() == counted
    assert 0 < int(d.outside_topb.sum()) < 20  # the case exercises both sides
    assert float(d.weights[~d.counted].abs().sum()) == 0.0
    torch.testing.assert_close(d.weights.sum(), torch.tensor(1.0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close((d.weights * d.ce).sum(), loss.detach())


# ------------------------------------------------------------------ edge cases
def test_beam_width_larger_than_valid_count_uses_smallest_valid_probability():
    z, y, valid = random_case(n=8, v=30, density=0.1, single_valid_rows=())
    assert int(valid.sum(-1).max()) < 10
    _, d = bear_loss(z, y, valid, beam_width=10, return_details=True)
    log_p = torch.log_softmax(z.masked_fill(~valid, float("-inf")), -1)
    smallest = log_p.masked_fill(~valid, float("inf")).min(-1).values
    torch.testing.assert_close(d.margin, smallest - log_p.gather(1, y[:, None]).squeeze(1))
    assert not bool(d.outside_topb.any())  # a beam wider than the choices keeps every token
    # beam_width beyond the vocabulary is the same (topk is capped at V)
    torch.testing.assert_close(bear_loss(z, y, valid, beam_width=10), bear_loss(z, y, valid, beam_width=1000))


def test_gold_tied_with_threshold_counts_as_inside():
    z = torch.tensor([[5.0, 4.0, 3.0, 3.0, 3.0, 1.0], [5.0, 4.0, 3.0, 3.0, 3.0, 1.0]])
    y = torch.tensor([4, 5])  # row 0: tied with the 3rd largest; row 1: below it
    _, d = bear_loss(z, y, beam_width=3, return_details=True)
    assert d.outside_topb.tolist() == [False, True]
    assert float(d.margin[0]) == 0.0
    assert float(d.margin[1]) == pytest.approx(2.0, abs=1e-6)


def test_gold_token_not_valid_is_a_clear_error():
    z, y, valid = random_case()
    valid[7, y[7]] = False
    with pytest.raises(ValueError, match=r"position 7 is not a valid"):
        bear_loss(z, y, valid)
    with pytest.raises(ValueError, match=r"position 7 is not a valid"):
        msl_loss(z, y, valid)
    with pytest.raises(ValueError, match=r"outside the vocabulary"):
        lml_loss(z, torch.full_like(y, -100))


@pytest.mark.parametrize("fn", ["bear", "bear_reg", "msl"])
def test_no_counted_position_gives_zero_loss_and_zero_grads(fn):
    z, y, _ = random_case(n=5, v=12)
    valid = F.one_hot(y, 12).bool()  # every position has a single continuation
    call = {
        "bear": lambda x: bear_loss(x, y, valid),
        "bear_reg": lambda x: bear_loss(x, y, valid, form="regularizer"),
        "msl": lambda x: msl_loss(x, y, valid),
    }[fn]
    loss, g = grads_of(call, z)
    assert float(loss) == 0.0
    assert torch.isfinite(g).all() and float(g.abs().max()) == 0.0


def test_empty_batch_gives_zero_with_graph():
    z = torch.zeros(0, 9, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long)
    for loss in (lml_loss(z, y), msl_loss(z, y, torch.zeros(0, 9, dtype=torch.bool)), bear_loss(z, y)):
        assert float(loss.detach()) == 0.0 and loss.requires_grad


def test_minus_inf_logits_are_excluded_from_the_beam_and_stay_finite():
    z, y, valid = random_case(n=6, v=20, density=1.0, single_valid_rows=())
    dead = torch.zeros_like(valid)
    dead[:, :15] = True
    dead[torch.arange(6), y] = False  # the gold logit stays finite
    z = z.masked_fill(dead, float("-inf"))  # at most 5 tokens per row have non-zero probability
    for form in ("reweight", "regularizer"):
        loss, g = grads_of(lambda x, form=form: bear_loss(x, y, valid, beam_width=10, form=form), z)
        ref = naive_bear(z.double(), y, valid, beam_width=10, form=form)
        assert torch.isfinite(loss) and torch.isfinite(g).all()
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
        assert float(g[dead].abs().max()) == 0.0
    _, d = bear_loss(z, y, valid, beam_width=10, return_details=True)
    assert not bool(d.outside_topb.any())  # fewer alive tokens than the beam


def test_bf16_inputs_compute_in_float32():
    z, y, valid = random_case()
    zb = z.bfloat16()
    for name, fn in {
        "lml": lambda x: lml_loss(x, y),
        "msl": lambda x: msl_loss(x, y, valid),
        "bear": lambda x: bear_loss(x, y, valid, beam_width=3),
    }.items():
        xb = zb.clone().requires_grad_(True)
        loss = fn(xb)
        loss.backward()
        assert loss.dtype == torch.float32, name
        assert xb.grad.dtype == torch.bfloat16, name
        torch.testing.assert_close(loss, fn(zb.float()), rtol=1e-6, atol=1e-6)


def test_argument_errors_name_the_problem():
    z, y, valid = random_case()
    with pytest.raises(ValueError, match="form"):
        bear_loss(z, y, valid, form="paper")
    with pytest.raises(ValueError, match="beam_width"):
        bear_loss(z, y, valid, beam_width=0)
    with pytest.raises(ValueError, match="shape of logits"):
        bear_loss(z, y, valid[:, :5])
    with pytest.raises(ValueError, match=r"targets must be \[N\]"):
        lml_loss(z, y[:3])


# ------------------------------------------------------------------ sum form: chunks combine exactly
@pytest.mark.parametrize(
    "name,form,masked",
    [
        ("lml", "reweight", False),
        ("msl", "reweight", True),
        ("bear", "reweight", True),
        ("bear", "regularizer", True),
        ("bear", "reweight", False),
    ],
)
def test_sums_of_chunks_equal_the_pure_loss(name, form, masked):
    z, y, valid = random_case(n=23, v=40, single_valid_rows=(0, 11))
    valid = valid if masked else None
    kw = dict(beam_width=4, tau=1.5, xi=2.0, lam=0.5)

    def chunked(x):
        total = None
        for s in range(0, 23, 5):
            part = loss_sums(x[s : s + 5], y[s : s + 5], None if valid is None else valid[s : s + 5], name=name, **kw)
            total = part if total is None else total + part
        return loss_from_sums(total, name=name, form=form, lam=kw["lam"])

    pure = {
        "lml": lambda x: lml_loss(x, y),
        "msl": lambda x: msl_loss(x, y, valid, tau=kw["tau"]),
        "bear": lambda x: bear_loss(x, y, valid, form=form, **kw),
    }[name]
    got, g = grads_of(chunked, z)
    ref, g_ref = grads_of(pure, z)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7)
