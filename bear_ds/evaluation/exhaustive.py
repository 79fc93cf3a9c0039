"""Exhaustive ranking of the whole catalog for one prompt: the exact log-probability of every
catalog group.

The prompt is encoded once, then the trie is walked level by level, each trie node getting one
forward row (its next-token distribution is shared by every title through it) that attends to the
prompt's cache, stored once (`bear_ds.generation.shared_prefix`), and to its own ancestors. This
gives the true top-K by total probability; a `PruneBound` skips the subtrees that cannot change what
the pruning analysis (`bear_ds.evaluation.pruning`) reads from it.

The per-token rank is taken among trie-valid tokens; it is the same in both mask modes, since
renormalising a row does not change its order. The log-probabilities follow `mask`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bear_ds.catalog import IGNORE_INDEX
from bear_ds.generation.beam import last_logits_only, next_token_log_probs
from bear_ds.generation.shared_prefix import (
    GeneratedPart,
    generated_part,
    join_generated,
    restore_generated,
    shared_prefix_cache,
    shared_prefix_forward,
)
from bear_ds.masking import check_mask_mode, trie_log_softmax
from bear_ds.trie import TokenTrie


@dataclass
class CatalogTargets:
    """Every group's response ids as a right-padded tensor, with the trie states along each."""

    tokens: torch.Tensor  # int64 [G, T], padded with IGNORE_INDEX
    states: torch.Tensor  # int64 [G, T], trie state before each token (INVALID on padding)
    lengths: torch.Tensor  # int64 [G], tokens incl. EOS

    @classmethod
    def build(cls, group_token_ids: Sequence[Sequence[int]], trie: TokenTrie) -> CatalogTargets:
        if len(group_token_ids) == 0:
            raise ValueError("the catalog is empty: nothing to rank")
        lengths = torch.tensor([len(ids) for ids in group_token_ids], dtype=torch.int64)
        tokens = torch.full((len(group_token_ids), int(lengths.max())), IGNORE_INDEX, dtype=torch.int64)
        for g, ids in enumerate(group_token_ids):
            tokens[g, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return cls(tokens=tokens, states=trie.states_along(tokens, IGNORE_INDEX), lengths=lengths)

    def to(self, device: torch.device) -> CatalogTargets:
        return CatalogTargets(self.tokens.to(device), self.states.to(device), self.lengths.to(device))


@dataclass
class ExhaustiveScores:
    """Teacher-forced scores of every group for one prompt."""

    token_logp: torch.Tensor  # float32 [G, T] log p of each gold token (0 on padding)
    token_rank: torch.Tensor  # int64 [G, T] rank of the gold token among trie-valid tokens (-1 on padding)
    total_logp: torch.Tensor  # float32 [G] sum of token_logp
    lengths: torch.Tensor  # int64 [G]

    def beam_scores(self, length_penalty: float) -> torch.Tensor:
        """Scores as beam search ranks finished items: total log p / length ** length_penalty."""
        return self.total_logp / self.lengths.float() ** length_penalty


@dataclass
class PruneBound:
    """What the pruning analysis needs exactly from a user's exhaustive ranking: the target's rank
    (groups scoring above it) and the top `num_beams` groups. Log-probabilities only fall along a
    trie path, so a node whose prefix log p is below both the target's total and the B-th best total
    holds no group that matters; its subtree is skipped. `candidates` (e.g. beam search's groups)
    give a first B-th best total before any group is finished.

    `rank_cap` (>= num_beams): the target's rank is needed exactly only below it (HR@K for K <= cap);
    a target below the cap-th best then no longer keeps the subtrees above its own total, and its
    reported rank is a lower bound, still >= rank_cap. None: the rank is always exact."""

    target_group: int | None
    candidates: Sequence[int]
    num_beams: int
    slack: float = 1e-3  # nats: float noise between a teacher-forced total and the walk's
    rank_cap: int | None = None


def _teacher_forced_totals(
    model: torch.nn.Module, prompt_ids: Sequence[int], groups: Sequence[int], targets: CatalogTargets,
    trie: TokenTrie, mask: str,
) -> list[float]:  # fmt: skip
    """Total log p of `groups` by one plain forward over prompt + title each (the bound's estimate)."""
    device = targets.tokens.device
    totals = []
    for g in groups:
        length = int(targets.lengths[g])
        title = targets.tokens[g, :length]
        ids = torch.cat([torch.tensor(list(prompt_ids), dtype=torch.int64, device=device), title[:-1]])[None]
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 :]  # [T, V]
        logp = next_token_log_probs(logits, targets.states[g, :length], trie, mask)
        totals.append(float(logp.gather(1, title[:, None]).sum()))
    return totals


def _gold_stats(
    logits: torch.Tensor, states: torch.Tensor, gold: torch.Tensor, trie: TokenTrie, mask: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gold-token log p (per mask mode) and rank among trie-valid tokens.

    logits [N, V], states [N] (valid, not INVALID), gold [N] -> (logp [N] float32, rank [N] int64).
    Works on the (row, allowed token) pairs only, so no [N, V] boolean mask is built.
    """
    logits = logits.float()
    rows, toks = trie.allowed_pairs(states)  # [P], [P]
    vals = logits[rows, toks]  # [P]
    gold_val = logits.gather(1, gold[:, None]).squeeze(1)  # [N]
    rank = torch.zeros_like(gold).index_add_(0, rows, (vals > gold_val[rows]).long())  # [N]
    pair_logp = trie_log_softmax(logits, mask, pairs=(rows, toks))  # [P]
    is_gold = toks == gold[rows]  # [P]: one pair per row (the gold token is a child of its state)
    logp = torch.zeros_like(gold_val).index_put_((rows[is_gold],), pair_logp[is_gold])  # [N]
    return logp, rank


@torch.no_grad()
def exhaustive_scores(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    targets: CatalogTargets,
    trie: TokenTrie,
    *,
    mask: str = "after",
    batch_items: int = 256,
    bound: PruneBound | None = None,
) -> ExhaustiveScores:
    """Exact log p of every group's response given one prompt.

    The prompt is encoded once; then each trie node with children is one forward row (at most
    `batch_items` rows per forward), level by level, attending to the shared prompt cache and to its
    ancestors' keys; the per-edge log p and sibling rank are read from its logits.
    With `bound`, subtrees that cannot hold the target's better nor a top-B group are skipped: the
    groups in them get total_logp -inf (and token_logp -inf, token_rank -1 on unscored tokens);
    the target's rank and the top-B (with their scores) are those of the full walk.
    """
    if len(prompt_ids) == 0:
        raise ValueError("empty prompt")
    check_mask_mode(mask)
    device = next(model.parameters()).device
    targets = targets.to(device)
    trie = trie.to(device) if trie.device != device else trie
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.int64, device=device)  # [1, Lp]
    out = model(input_ids=prompt, use_cache=True, **last_logits_only(model))
    prompt_cache = out.past_key_values
    first_logits = out.logits[:, -1, :]  # [1, V] predicts the first response token
    del out
    plen = prompt.shape[1]
    cache = shared_prefix_cache(prompt_cache, torch.ones_like(prompt), model)
    if cache is None:
        return _teacher_forced_scores(
            model, prompt_cache, first_logits, plen, targets, trie, mask=mask, batch_items=batch_items
        )
    num_edges = trie.edge_key.numel()
    edge_logp = torch.zeros(num_edges, device=device)
    edge_rank = torch.zeros(num_edges, dtype=torch.int64, device=device)
    _edge_stats(first_logits, torch.zeros(1, dtype=torch.int64, device=device), trie, mask, edge_logp, edge_rank)
    keep = _SubtreeFilter.start(model, prompt_ids, targets, trie, mask, bound) if bound is not None else None
    # one level: the nodes with children at depth d ([n]), their parents' rows and generated keys
    level_nodes = torch.zeros(1, dtype=torch.int64, device=device)
    level_keys = generated_part(cache)  # per layer [n, Hkv, d, D]
    for depth in range(trie.max_depth - 1):
        edges = _edges_of(level_nodes, trie)  # [E_d] the edges leaving this level, parents in order
        parent_row = torch.repeat_interleave(
            torch.arange(level_nodes.numel(), device=device), trie.num_children(level_nodes)
        )
        child = trie.edge_child[edges]
        has_children = trie.num_children(child) > 0
        if keep is not None:
            has_children &= keep.update(level_nodes, parent_row, edges, child, has_children, edge_logp)
        edges, parent_row, child = edges[has_children], parent_row[has_children], child[has_children]
        if child.numel() == 0:
            break
        next_keys: list[GeneratedPart] = []
        for start in range(0, child.numel(), batch_items):
            rows = slice(start, start + batch_items)
            restore_generated(cache, level_keys, parent_row[rows])
            n = parent_row[rows].numel()
            logits = shared_prefix_forward(
                model,
                cache,
                trie.edge_token[edges[rows]][:, None],  # [n, 1]
                torch.full((n, 1), plen + depth, dtype=torch.int64, device=device),
            ).logits[:, -1, :]  # [n, V]
            next_keys.append(generated_part(cache))
            _edge_stats(logits, child[rows], trie, mask, edge_logp, edge_rank)
        level_keys = join_generated(next_keys)
        level_nodes = child
    valid = targets.tokens != IGNORE_INDEX  # [G, T]
    key = targets.states.clamp(min=0) * trie.vocab_size + targets.tokens.clamp(min=0)
    edge = torch.searchsorted(trie.edge_key, key).clamp(max=num_edges - 1)  # [G, T] the edge of each token
    token_logp = torch.where(valid, edge_logp[edge], torch.zeros_like(edge_logp[edge]))
    token_rank = torch.where(valid, edge_rank[edge], torch.full_like(edge, -1))
    if keep is not None:  # tokens whose edge was never scored (a skipped subtree)
        unscored = valid & ~keep.edge_scored[edge]
        token_logp = token_logp.masked_fill(unscored, float("-inf"))
        token_rank = token_rank.masked_fill(unscored, -1)
    return ExhaustiveScores(
        token_logp=token_logp.cpu(),
        token_rank=token_rank.cpu(),
        total_logp=token_logp.sum(dim=1).cpu(),
        lengths=targets.lengths.cpu(),
    )


@dataclass
class _SubtreeFilter:
    """State of a bounded walk: each node's prefix log p, which edges were scored, the threshold."""

    node_logp: torch.Tensor  # float32 [num_nodes]
    edge_scored: torch.Tensor  # bool [E]
    on_target_path: torch.Tensor  # bool [num_nodes]
    target_total: float  # -inf without a target
    finished: dict[int, float]  # group -> total: the candidates' (teacher-forced), then the walk's
    num_beams: int
    slack: float
    trie: TokenTrie
    rank_cap: int | None

    @classmethod
    def start(
        cls, model, prompt_ids: Sequence[int], targets: CatalogTargets, trie: TokenTrie, mask: str, bound: PruneBound
    ) -> _SubtreeFilter:
        device = targets.tokens.device
        target = bound.target_group
        groups = list(dict.fromkeys([*bound.candidates, *([target] if target is not None else [])]))
        totals = _teacher_forced_totals(model, prompt_ids, groups, targets, trie, mask) if groups else []
        on_path = torch.zeros(trie.num_nodes, dtype=torch.bool, device=device)
        target_total = float("-inf")
        if target is not None:
            length = int(targets.lengths[target])
            on_path[targets.states[target, :length]] = True
            target_total = totals[groups.index(target)]
        edge_scored = torch.zeros(trie.edge_key.numel(), dtype=torch.bool, device=device)
        edge_scored[_edges_of(torch.zeros(1, dtype=torch.int64, device=device), trie)] = True
        return cls(
            node_logp=torch.zeros(trie.num_nodes, device=device),
            edge_scored=edge_scored,
            on_target_path=on_path,
            target_total=target_total,
            finished=dict(zip(groups, totals, strict=True)),
            num_beams=bound.num_beams,
            slack=bound.slack,
            trie=trie,
            rank_cap=bound.rank_cap,
        )

    def threshold(self) -> float:
        """Nodes below it hold no group above the target (within the rank cap) nor in the top-B."""
        best = sorted(self.finished.values(), reverse=True)

        def kth(k: int) -> float:  # a lower bound of the k-th best total
            return best[k - 1] if len(best) >= k else float("-inf")

        target = self.target_total if self.rank_cap is None else max(self.target_total, kth(self.rank_cap))
        return min(kth(self.num_beams), target) - self.slack

    def update(
        self,
        level_nodes: torch.Tensor,
        parent_row: torch.Tensor,
        edges: torch.Tensor,
        child: torch.Tensor,
        has_children: torch.Tensor,
        edge_logp: torch.Tensor,
    ) -> torch.Tensor:
        """Prefix log p of this level's children, finished groups' totals; -> bool [E_d] children kept."""
        self.node_logp[child] = self.node_logp[level_nodes[parent_row]] + edge_logp[edges]
        leaves = child[~has_children]
        self.finished.update(
            zip(self.trie.terminal_group(leaves).tolist(), self.node_logp[leaves].tolist(), strict=True)
        )
        kept = (self.node_logp[child] >= self.threshold()) | self.on_target_path[child]
        self.edge_scored[_edges_of(child[has_children & kept], self.trie)] = True  # scored by this level's rows
        return kept


def _edges_of(nodes: torch.Tensor, trie: TokenTrie) -> torch.Tensor:
    """Edge ids leaving `nodes` [n], grouped by node in order (CSR ranges concatenated) -> [E]."""
    counts = trie.num_children(nodes)
    first = trie.child_start[nodes.clamp(min=0)]
    offsets = torch.cumsum(counts, 0) - counts
    row = torch.repeat_interleave(torch.arange(nodes.numel(), device=nodes.device), counts)
    return first[row] + torch.arange(row.numel(), device=nodes.device) - offsets[row]


def _edge_stats(
    logits: torch.Tensor,
    nodes: torch.Tensor,
    trie: TokenTrie,
    mask: str,
    edge_logp: torch.Tensor,
    edge_rank: torch.Tensor,
) -> None:
    """Fill `edge_logp` / `edge_rank` [E] for the edges leaving `nodes` [n], given their logits [n, V]:
    log p of the edge token (per mask mode) and its rank among the node's children (strictly greater)."""
    logits = logits.float()
    counts = trie.num_children(nodes)
    row = torch.repeat_interleave(torch.arange(nodes.numel(), device=nodes.device), counts)  # [P]
    edges = _edges_of(nodes, trie)  # [P]
    vals = logits[row, trie.edge_token[edges]]  # [P]
    edge_logp[edges] = trie_log_softmax(logits, mask, pairs=(row, trie.edge_token[edges]))
    # rank: sort each node's children by value (descending); a child's rank is where its run of
    # equal values starts, relative to the node's first position
    order = torch.argsort(vals, descending=True, stable=True)
    order = order[torch.argsort(row[order], stable=True)]  # grouped by node, descending within
    sorted_vals, sorted_row = vals[order], row[order]
    pos = torch.arange(order.numel(), device=vals.device)
    new_run = torch.ones_like(pos, dtype=torch.bool)
    new_run[1:] = (sorted_vals[1:] != sorted_vals[:-1]) | (sorted_row[1:] != sorted_row[:-1])
    run_start = torch.cummax(torch.where(new_run, pos, torch.zeros_like(pos)), 0).values
    node_start = torch.cumsum(counts, 0) - counts
    edge_rank[edges[order]] = run_start - node_start[sorted_row]


@torch.no_grad()
def _teacher_forced_scores(
    model: torch.nn.Module,
    prompt_cache,
    first_logits: torch.Tensor,
    plen: int,
    targets: CatalogTargets,
    trie: TokenTrie,
    *,
    mask: str = "after",
    batch_items: int = 256,
) -> ExhaustiveScores:
    """`exhaustive_scores` for models without the shared-prefix cache: every title teacher-forced
    on a copy of the prompt cache, `batch_items` titles per forward."""
    device = first_logits.device
    num_groups, width = targets.tokens.shape
    token_logp = torch.zeros(num_groups, width, device=device)
    token_rank = torch.full((num_groups, width), -1, dtype=torch.int64, device=device)
    for start in range(0, num_groups, batch_items):
        tok = targets.tokens[start : start + batch_items]  # [b, T]
        states = targets.states[start : start + batch_items]
        b = tok.shape[0]
        valid = tok != IGNORE_INDEX  # [b, T]
        if width > 1:
            cache = copy.deepcopy(prompt_cache)
            cache.reorder_cache(torch.zeros(b, dtype=torch.int64, device=device))  # [b] copies of the prompt
            feed = tok[:, :-1].clamp(min=0)  # [b, T-1] tokens that predict positions 1..T-1
            attn = torch.cat([torch.ones(b, plen, dtype=torch.int64, device=device), valid[:, :-1].long()], dim=1)
            pos = (plen + torch.arange(width - 1, device=device)).expand(b, -1)
            rest = model(input_ids=feed, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True)
            logits = torch.cat([first_logits.expand(b, 1, -1), rest.logits], dim=1)  # [b, T, V]
            del rest, cache
        else:
            logits = first_logits.expand(b, 1, -1)
        flat_valid = valid.reshape(-1)
        logp, rank = _gold_stats(
            logits.reshape(b * width, -1)[flat_valid],
            states.reshape(-1)[flat_valid],
            tok.reshape(-1)[flat_valid],
            trie,
            mask,
        )
        block_logp = torch.zeros(b * width, device=device)
        block_rank = torch.full((b * width,), -1, dtype=torch.int64, device=device)
        block_logp[flat_valid] = logp
        block_rank[flat_valid] = rank
        token_logp[start : start + b] = block_logp.view(b, width)
        token_rank[start : start + b] = block_rank.view(b, width)
    return ExhaustiveScores(
        token_logp=token_logp.cpu(),
        token_rank=token_rank.cpu(),
        total_logp=token_logp.sum(dim=1).cpu(),
        lengths=targets.lengths.cpu(),
    )
