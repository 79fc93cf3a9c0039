"""A prefix trie over token sequences, stored as flat tensors.

The trie answers, for a *batch* of states (node ids), which next tokens are allowed and which
node each chosen token leads to, with tensor ops only (no per-token Python loop). It is used by
the MSL/BEAR losses (valid next tokens along each gold title) and by the constrained beam search.

Layout (E edges, S nodes, node 0 is the root):
    edge_key    int64 [E]   parent * vocab_size + token, sorted ascending (so grouped by parent,
                            tokens sorted within a parent)
    edge_token  int64 [E]   token of each edge
    edge_child  int64 [E]   child node of each edge
    child_start int64 [S+1] CSR offsets: the edges of node s are child_start[s]:child_start[s+1]
    terminal    int64 [S]   id of the sequence group that ends at this node, -1 if none

`advance` is a binary search of parent * V + token in `edge_key` (torch.searchsorted), so a step
costs O(log E) per state on any device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

INVALID = -1  # state id for "fell off the trie"


@dataclass
class TokenTrie:
    vocab_size: int
    edge_key: torch.Tensor
    edge_token: torch.Tensor
    edge_child: torch.Tensor
    child_start: torch.Tensor
    terminal: torch.Tensor
    max_depth: int

    root: int = 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_sequences(
        cls,
        sequences: Sequence[Sequence[int]],
        vocab_size: int,
        group_ids: Sequence[int] | None = None,
    ) -> TokenTrie:
        """Build the trie of `sequences`; `terminal[node]` = group id of the sequence ending there.

        Sequences that are identical must carry the same group id (they are one decoding target);
        by default sequence i has group i and duplicates are an error.
        """
        if group_ids is None:
            group_ids = list(range(len(sequences)))
        if len(group_ids) != len(sequences):
            raise ValueError("group_ids must have one entry per sequence")
        children: list[dict[int, int]] = [{}]
        terminal: list[int] = [INVALID]
        max_depth = 0
        for seq, gid in zip(sequences, group_ids, strict=True):
            gid = int(gid)
            if gid < 0:
                raise ValueError(f"group id {gid} is negative: group ids must be >= 0 ({INVALID} marks 'no terminal')")
            if len(seq) == 0:
                raise ValueError(f"sequence of group {gid} is empty: an empty title cannot be decoded")
            node = 0
            for tok in seq:
                tok = int(tok)
                if not 0 <= tok < vocab_size:
                    raise ValueError(f"token id {tok} of group {gid} is outside the vocabulary [0, {vocab_size})")
                nxt = children[node].get(tok)
                if nxt is None:
                    nxt = len(children)
                    children[node][tok] = nxt
                    children.append({})
                    terminal.append(INVALID)
                node = nxt
            if terminal[node] not in (INVALID, gid):
                raise ValueError(
                    f"groups {terminal[node]} and {gid} have the same token sequence; "
                    "give identical sequences the same group id"
                )
            terminal[node] = gid
            max_depth = max(max_depth, len(seq))
        return cls._from_children(children, terminal, vocab_size, max_depth)

    @classmethod
    def _from_children(
        cls, children: list[dict[int, int]], terminal: list[int], vocab_size: int, max_depth: int
    ) -> TokenTrie:
        counts = torch.tensor([len(c) for c in children], dtype=torch.int64)
        child_start = torch.zeros(len(children) + 1, dtype=torch.int64)
        child_start[1:] = torch.cumsum(counts, 0)
        tokens, childs, parents = [], [], []
        for parent, ch in enumerate(children):
            for tok in sorted(ch):
                tokens.append(tok)
                childs.append(ch[tok])
                parents.append(parent)
        edge_token = torch.tensor(tokens, dtype=torch.int64)
        edge_child = torch.tensor(childs, dtype=torch.int64)
        edge_key = torch.tensor(parents, dtype=torch.int64) * vocab_size + edge_token
        return cls(
            vocab_size=vocab_size,
            edge_key=edge_key,
            edge_token=edge_token,
            edge_child=edge_child,
            child_start=child_start,
            terminal=torch.tensor(terminal, dtype=torch.int64),
            max_depth=max_depth,
        )

    # ------------------------------------------------------------------ device / info
    @property
    def num_nodes(self) -> int:
        return int(self.terminal.numel())

    @property
    def device(self) -> torch.device:
        return self.edge_key.device

    def to(self, device: torch.device | str) -> TokenTrie:
        return TokenTrie(
            vocab_size=self.vocab_size,
            edge_key=self.edge_key.to(device),
            edge_token=self.edge_token.to(device),
            edge_child=self.edge_child.to(device),
            child_start=self.child_start.to(device),
            terminal=self.terminal.to(device),
            max_depth=self.max_depth,
        )

    # ------------------------------------------------------------------ queries (batched)
    def num_children(self, states: torch.Tensor) -> torch.Tensor:
        """Number of allowed next tokens per state; 0 for INVALID states. Shape of `states`."""
        safe = states.clamp(min=0)
        n = self.child_start[safe + 1] - self.child_start[safe]
        return torch.where(states >= 0, n, torch.zeros_like(n))

    def allowed_pairs(self, states: torch.Tensor, pairs: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Allowed next tokens as index lists: (row, token) with row indexing the flat `states`.

        Rows are in order and tokens sorted within a row. INVALID states allow nothing. `pairs`: the
        number of pairs when the caller knows it (the sum of `num_children`); without it the host
        reads it from the device (a wait on a GPU).
        """
        flat = states.reshape(-1)
        counts = self.num_children(flat)  # (S,)
        rows = torch.repeat_interleave(torch.arange(flat.numel(), device=flat.device), counts, output_size=pairs)
        # position of each edge inside its row: global index minus the row's first output index
        first_out = torch.cumsum(counts, 0) - counts
        within = torch.arange(rows.numel(), device=flat.device) - first_out[rows]
        edges = self.child_start[flat.clamp(min=0)][rows] + within
        return rows, self.edge_token[edges]

    def allowed_mask(
        self, states: torch.Tensor, vocab_size: int | None = None, pairs: int | None = None
    ) -> torch.Tensor:
        """Boolean mask of allowed next tokens, shape states.shape + (vocab_size,) (`pairs`: `allowed_pairs`)."""
        v = self.vocab_size if vocab_size is None else vocab_size
        if v < self.vocab_size:
            raise ValueError(f"mask width {v} is smaller than the trie vocabulary {self.vocab_size}")
        rows, tokens = self.allowed_pairs(states, pairs)
        mask = torch.zeros(states.numel(), v, dtype=torch.bool, device=states.device)
        mask[rows, tokens] = True
        return mask.reshape(*states.shape, v)

    def advance(self, states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Next state for each (state, token); INVALID where the token is not a child (or state INVALID)."""
        if self.edge_key.numel() == 0:
            shape = torch.broadcast_shapes(states.shape, tokens.shape)
            return torch.full(shape, INVALID, dtype=torch.int64, device=states.device)
        # int64 before multiplying: node * vocab overflows int32 (20k nodes x 128k tokens > 2^31)
        states, tokens = states.long(), tokens.long()
        key = states.clamp(min=0) * self.vocab_size + tokens
        idx = torch.searchsorted(self.edge_key, key).clamp(max=self.edge_key.numel() - 1)
        hit = (self.edge_key[idx] == key) & (states >= 0) & (tokens >= 0) & (tokens < self.vocab_size)
        return torch.where(hit, self.edge_child[idx], torch.full_like(states, INVALID))

    def terminal_group(self, states: torch.Tensor) -> torch.Tensor:
        """Group id of the sequence that ends at each state, -1 where none (or INVALID)."""
        g = self.terminal[states.clamp(min=0)]
        return torch.where(states >= 0, g, torch.full_like(g, INVALID))

    def states_along(self, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Trie state *before* each target token, for a batch of right-padded target sequences.

        targets: (batch, T) token ids, padded with `ignore_index`. Returns (batch, T) states: the
        node whose children are the valid choices at that position (root at position 0);
        `ignore_index` positions get INVALID. A target that leaves the trie raises ValueError,
        since the gold title must be a catalog title.
        """
        batch, length = targets.shape
        states = torch.full((batch, length), INVALID, dtype=torch.int64, device=targets.device)
        cur = torch.zeros(batch, dtype=torch.int64, device=targets.device)
        for t in range(length):  # loop over positions (~30), vectorised over the batch
            tok = targets[:, t]
            active = tok != ignore_index
            states[:, t] = torch.where(active, cur, torch.full_like(cur, INVALID))
            nxt = self.advance(cur, tok)  # negative tokens other than ignore_index give INVALID -> error
            bad = active & (nxt < 0)
            if bool(bad.any()):
                row = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"target row {row} token {int(tok[row])} at position {t} is not a trie continuation: "
                    "the gold response is not a catalog title"
                )
            cur = torch.where(active, nxt, cur)
        return states
