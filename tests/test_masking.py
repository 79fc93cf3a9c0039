"""The trie-restricted log-softmax: dense and pair forms agree, both mask modes, tau, empty rows."""

from __future__ import annotations

import pytest
import torch

from bear_ds.masking import check_mask_mode, trie_log_softmax


@pytest.mark.parametrize("mask", ["after", "before"])
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_pairs_equal_the_dense_form_and_the_definition(mask, tau):
    torch.manual_seed(0)
    logits = torch.randn(5, 11, dtype=torch.float64)
    allowed = torch.rand(5, 11) < 0.4
    allowed[:, 3] = True  # every row has a valid token
    dense = trie_log_softmax(logits, mask, allowed=allowed, tau=tau)
    z = logits / tau
    if mask == "after":
        expected = z - torch.logsumexp(z, -1, keepdim=True)
    else:
        expected = z - torch.logsumexp(z.masked_fill(~allowed, float("-inf")), -1, keepdim=True)
    torch.testing.assert_close(dense[allowed], expected[allowed].float())
    assert torch.isneginf(dense[~allowed]).all()
    rows, tokens = allowed.nonzero(as_tuple=True)
    pairs = trie_log_softmax(logits, mask, pairs=(rows, tokens), tau=tau)
    torch.testing.assert_close(pairs, dense[rows, tokens])
    if mask == "before":  # renormalised: each row sums to 1 over its valid tokens
        torch.testing.assert_close(dense.exp().sum(-1), torch.ones(5))


def test_a_row_without_valid_tokens_is_minus_inf_not_nan():
    allowed = torch.zeros(2, 4, dtype=torch.bool)
    allowed[0, 1] = True
    out = trie_log_softmax(torch.randn(2, 4), "before", allowed=allowed)
    assert out[0, 1] == 0 and torch.isneginf(out[1]).all() and not out.isnan().any()


def test_unknown_mask_mode_is_refused():
    with pytest.raises(ValueError, match="'after' or 'before', got 'middle'"):
        check_mask_mode("middle")
    with pytest.raises(ValueError, match="got 'auto'"):
        trie_log_softmax(torch.zeros(1, 2), "auto")
