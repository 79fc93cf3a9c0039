"""The flat CSR TokenTrie against a plain dict-of-dicts reference trie, on random sequence sets."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bear_ds.trie import INVALID, TokenTrie

# ---------------------------------------------------------------------------- reference trie


class RefNode:
    """One node of the reference trie: children by token, the group ending here (or None)."""

    def __init__(self) -> None:
        self.children: dict[int, RefNode] = {}
        self.group: int | None = None


def ref_build(sequences: list[list[int]], groups: list[int]) -> RefNode:
    root = RefNode()
    for seq, group in zip(sequences, groups, strict=True):
        node = root
        for tok in seq:
            node = node.children.setdefault(tok, RefNode())
        node.group = group
    return root


def ref_nodes(root: RefNode) -> list[tuple[tuple[int, ...], RefNode]]:
    """Every node with the token path from the root (root first)."""
    out, stack = [], [((), root)]
    while stack:
        path, node = stack.pop()
        out.append((path, node))
        stack.extend((path + (tok,), child) for tok, child in node.children.items())
    return out


def flat_state(trie: TokenTrie, path: tuple[int, ...]) -> int:
    state = torch.tensor([trie.root])
    for tok in path:
        state = trie.advance(state, torch.tensor([tok]))
    return int(state[0])


# ---------------------------------------------------------------------------- strategies


@st.composite
def sequence_sets(draw: st.DrawFn) -> tuple[int, list[list[int]], list[int]]:
    """(vocab, sequences, groups): shared prefixes, prefix sequences, duplicates, top-of-vocab tokens."""
    vocab = draw(st.sampled_from([7, 300, 65536, 128256]))
    # a small alphabet makes shared prefixes likely; bias it to both ends of the vocabulary
    token = st.one_of(
        st.integers(0, min(3, vocab - 1)), st.integers(max(0, vocab - 4), vocab - 1), st.integers(0, vocab - 1)
    )
    alphabet = draw(st.lists(token, min_size=1, max_size=5, unique=True))
    seqs = draw(st.lists(st.lists(st.sampled_from(alphabet), min_size=1, max_size=6), min_size=1, max_size=10))
    # add prefixes of some sequences (one sequence a prefix of another) and exact duplicates
    extra = []
    for seq in seqs:
        if len(seq) > 1 and draw(st.booleans()):
            extra.append(seq[: draw(st.integers(1, len(seq) - 1))])
        if draw(st.integers(0, 3)) == 0:
            extra.append(list(seq))
    seqs = seqs + extra
    order = draw(st.permutations(range(len(seqs))))
    seqs = [seqs[i] for i in order]
    # one group per distinct sequence, with non-contiguous ids; duplicates share it
    distinct = list(dict.fromkeys(tuple(s) for s in seqs))
    ids = draw(st.lists(st.integers(0, 10_000), min_size=len(distinct), max_size=len(distinct), unique=True))
    group_of = dict(zip(distinct, ids, strict=True))
    return vocab, seqs, [group_of[tuple(s)] for s in seqs]


# ---------------------------------------------------------------------------- properties


@settings(max_examples=100, deadline=None)
@given(sequence_sets())
def test_flat_trie_matches_reference(case: tuple[int, list[list[int]], list[int]]) -> None:
    vocab, seqs, groups = case
    trie = TokenTrie.from_sequences(seqs, vocab, groups)
    ref = ref_build(seqs, groups)
    nodes = ref_nodes(ref)
    assert trie.num_nodes == len(nodes)
    assert trie.max_depth == max(len(s) for s in seqs)

    states = torch.tensor([flat_state(trie, path) for path, _ in nodes])
    assert bool((states >= 0).all()), "every reference path must be a trie path"
    assert len(set(states.tolist())) == len(nodes), "distinct paths must be distinct states"

    want_children = [sorted(node.children) for _, node in nodes]
    want_terminal = [INVALID if node.group is None else node.group for _, node in nodes]
    assert trie.num_children(states).tolist() == [len(c) for c in want_children]
    assert trie.terminal_group(states).tolist() == want_terminal

    rows, tokens = trie.allowed_pairs(states)
    got_pairs = list(zip(rows.tolist(), tokens.tolist(), strict=True))
    assert got_pairs == [(r, t) for r, c in enumerate(want_children) for t in c]

    mask = trie.allowed_mask(states)
    assert mask.shape == (len(nodes), vocab)
    for r, children in enumerate(want_children):
        assert mask[r].nonzero().flatten().tolist() == children

    # advance: every child token leads to the child's state; a non-child token falls off
    state_of = {path: s for (path, _), s in zip(nodes, states.tolist(), strict=True)}
    for (path, node), s in zip(nodes, states.tolist(), strict=True):
        for tok in node.children:
            assert int(trie.advance(torch.tensor(s), torch.tensor(tok))) == state_of[path + (tok,)]
        absent = [t for t in (0, 1, vocab // 2, vocab - 2, vocab - 1) if t not in node.children and t >= 0]
        if absent:
            assert trie.advance(torch.full((len(absent),), s), torch.tensor(absent)).tolist() == [INVALID] * len(absent)

    # states_along on the padded sequences: the state before each token is its prefix's node
    length = max(len(s) for s in seqs) + 2
    targets = torch.full((len(seqs), length), -100, dtype=torch.int64)
    for i, seq in enumerate(seqs):
        targets[i, : len(seq)] = torch.tensor(seq)
    along = trie.states_along(targets)
    for i, seq in enumerate(seqs):
        want = [state_of[tuple(seq[:t])] for t in range(len(seq))] + [INVALID] * (length - len(seq))
        assert along[i].tolist() == want


@settings(max_examples=60, deadline=None)
@given(sequence_sets(), st.data())
def test_batched_queries_any_shape_and_invalid_states(
    case: tuple[int, list[list[int]], list[int]], data: st.DataObject
) -> None:
    """Every query on states of any shape (INVALID and int32 included) equals the per-state answer."""
    vocab, seqs, groups = case
    trie = TokenTrie.from_sequences(seqs, vocab, groups)
    pool = list(range(trie.num_nodes)) + [INVALID]
    shape = tuple(data.draw(st.lists(st.integers(1, 3), min_size=0, max_size=3), label="shape"))
    numel = 1
    for n in shape:
        numel *= n
    flat = data.draw(st.lists(st.sampled_from(pool), min_size=numel, max_size=numel), label="states")
    dtype = data.draw(st.sampled_from([torch.int64, torch.int32]), label="dtype")
    states = torch.tensor(flat, dtype=dtype).reshape(shape)
    tokens = torch.tensor(
        data.draw(st.lists(st.integers(0, vocab - 1), min_size=numel, max_size=numel), label="tokens"), dtype=dtype
    ).reshape(shape)

    one = [torch.tensor([s]) for s in flat]
    num = trie.num_children(states)
    term = trie.terminal_group(states)
    nxt = trie.advance(states, tokens)
    mask = trie.allowed_mask(states, vocab + 3)  # a mask wider than the trie vocabulary is allowed
    assert num.shape == term.shape == nxt.shape == shape
    assert mask.shape == (*shape, vocab + 3)
    assert not bool(mask[..., vocab:].any())
    for i, s in enumerate(flat):
        idx = torch.unravel_index(torch.tensor(i), shape) if shape else ()
        assert int(num[idx]) == int(trie.num_children(one[i])[0])
        assert int(term[idx]) == int(trie.terminal_group(one[i])[0])
        assert int(nxt[idx]) == int(trie.advance(one[i], tokens.reshape(-1)[i : i + 1])[0])
        assert torch.equal(mask[idx][:vocab], trie.allowed_mask(one[i])[0])
        if s == INVALID:
            assert int(num[idx]) == 0 and int(term[idx]) == INVALID and int(nxt[idx]) == INVALID
            assert not bool(mask[idx].any())
    rows, toks = trie.allowed_pairs(states)
    assert int(rows.numel()) == int(num.sum())
    rebuilt = torch.zeros(numel, vocab + 3, dtype=torch.bool)
    rebuilt[rows, toks] = True
    assert torch.equal(rebuilt.reshape(*shape, vocab + 3), mask)


# ---------------------------------------------------------------------------- explicit cases


def test_prefix_sequence_is_terminal_and_internal() -> None:
    trie = TokenTrie.from_sequences([[5, 6], [5], [5, 6, 7]], vocab_size=8)
    after5 = trie.advance(torch.tensor([0]), torch.tensor([5]))
    after56 = trie.advance(after5, torch.tensor([6]))
    assert trie.terminal_group(after5).tolist() == [1]
    assert trie.terminal_group(after56).tolist() == [0]
    assert trie.num_children(after56).tolist() == [1]


def test_top_of_large_vocabulary() -> None:
    vocab = 128256
    trie = TokenTrie.from_sequences([[vocab - 1, vocab - 2], [vocab - 1, 0], [0, vocab - 1]], vocab)
    s = trie.advance(torch.tensor([0, 0]), torch.tensor([vocab - 1, 0]))
    assert trie.allowed_mask(s).nonzero().tolist() == [[0, 0], [0, vocab - 2], [1, vocab - 1]]
    # a token id past the vocabulary never aliases another node's edge (key = node * V + token)
    assert trie.advance(torch.tensor([0]), torch.tensor([vocab])).tolist() == [INVALID]
    assert trie.advance(torch.tensor([1]), torch.tensor([-1])).tolist() == [INVALID]


def test_int32_states_do_not_overflow() -> None:
    vocab = 128256  # 20,000 nodes x 128,256 tokens > 2**31: keys must be computed in int64
    trie = TokenTrie.from_sequences([[i, vocab - 1] for i in range(20_000)], vocab)
    mid = trie.advance(torch.tensor([0], dtype=torch.int32), torch.tensor([19_999], dtype=torch.int32))
    end = trie.advance(mid.int(), torch.tensor([vocab - 1], dtype=torch.int32))
    assert trie.terminal_group(end).tolist() == [19_999]


def test_empty_trie() -> None:
    trie = TokenTrie.from_sequences([], vocab_size=10)
    assert trie.num_nodes == 1
    assert trie.advance(torch.zeros(2, 3, dtype=torch.int64), torch.ones(3, dtype=torch.int64)).shape == (2, 3)
    assert not bool(trie.allowed_mask(torch.tensor([0])).any())


def test_to_device_keeps_answers() -> None:
    trie = TokenTrie.from_sequences([[1, 2], [1, 3]], vocab_size=4)
    moved = trie.to("cpu")
    s = torch.tensor([0, 1, INVALID])
    assert torch.equal(moved.allowed_mask(s), trie.allowed_mask(s))


@pytest.mark.parametrize(
    ("seqs", "vocab", "groups", "message"),
    [
        ([[1, 10]], 10, None, "outside the vocabulary"),
        ([[-1]], 10, None, "outside the vocabulary"),
        ([[1], []], 10, None, "empty"),
        ([[1, 2], [1, 2]], 10, None, "same token sequence"),
        ([[1, 2], [1, 2]], 10, [0, 1], "same token sequence"),
        ([[1, 2], [3]], 10, [0], "one entry per sequence"),
        ([[1, 2]], 10, [-1], "negative"),
    ],
)
def test_construction_errors(seqs: list[list[int]], vocab: int, groups: list[int] | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TokenTrie.from_sequences(seqs, vocab, groups)


def test_duplicates_with_same_group_are_one_target() -> None:
    trie = TokenTrie.from_sequences([[1, 2], [1, 2], [3]], vocab_size=4, group_ids=[7, 7, 8])
    assert trie.num_nodes == 4
    end = trie.advance(trie.advance(torch.tensor([0]), torch.tensor([1])), torch.tensor([2]))
    assert trie.terminal_group(end).tolist() == [7]


def test_states_along_errors_and_padding() -> None:
    trie = TokenTrie.from_sequences([[1, 2, 3], [1, 4]], vocab_size=5)
    with pytest.raises(ValueError, match="row 1 token 3 at position 1"):
        trie.states_along(torch.tensor([[1, 2, 3], [1, 3, -100]]))
    with pytest.raises(ValueError, match="position 2"):  # continues past a leaf
        trie.states_along(torch.tensor([[1, 4, 4]]))
    with_zero = TokenTrie.from_sequences([[1, 0]], vocab_size=5)
    with pytest.raises(ValueError, match="token -5"):  # a negative id that is not the padding is not token 0
        with_zero.states_along(torch.tensor([[1, -5]]))
    states = trie.states_along(torch.tensor([[1, 4, -100], [-100, -100, -100]]))
    assert states[1].tolist() == [INVALID] * 3
    assert states[0, 2].item() == INVALID and states[0, 0].item() == trie.root


def test_mask_narrower_than_vocabulary_is_an_error() -> None:
    trie = TokenTrie.from_sequences([[1, 2]], vocab_size=5)
    with pytest.raises(ValueError, match="smaller than the trie vocabulary"):
        trie.allowed_mask(torch.tensor([0]), vocab_size=4)
