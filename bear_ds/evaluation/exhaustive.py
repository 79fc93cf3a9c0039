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
from bear_ds.generation.beam import _left_pad_positions, _prefill, last_logits_only, left_pad, next_token_log_probs
from bear_ds.generation.shared_prefix import (
    GeneratedPart,
    generated_part,
    restore_generated,
    shared_prefix_cache,
    shared_prefix_forward,
)
from bear_ds.losses.head import LMHead
from bear_ds.losses.model import lm_head_context
from bear_ds.masking import check_mask_mode, pair_log_softmax, trie_log_softmax
from bear_ds.models import is_zero3_partitioned
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
    holds no group that matters; its subtree is skipped. A narrow probe walk first finds good groups
    and their totals (`_SubtreeFilter.probe`), so the exact walk starts near the true B-th best;
    `candidates` (teacher-forced where the probe did not reach them) can add more.

    `rank_cap` (>= num_beams): the target's rank is needed exactly only below it (HR@K for K <= cap);
    a target below the cap-th best then no longer keeps the subtrees above its own total, and its
    reported rank is a lower bound, still >= rank_cap. None: the rank is always exact."""

    target_group: int | None
    candidates: Sequence[int]
    num_beams: int
    slack: float = 1e-3  # nats: float noise between two computations of a total (walks, teacher forcing)
    rank_cap: int | None = None


TOTALS_BATCH = 64  # sequences per forward when teacher-forcing the bound's first totals


def _bound_groups(bound: PruneBound) -> list[int]:
    """The groups whose totals start a bounded walk: the candidates, then the target (no repeats)."""
    target = bound.target_group
    return list(dict.fromkeys([*bound.candidates, *([target] if target is not None else [])]))


def _teacher_forced_totals(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], groups: Sequence[Sequence[int]],
    targets: CatalogTargets, trie: TokenTrie, mask: str,
) -> list[list[float]]:  # fmt: skip
    """Total log p of `groups[u]` given `prompts[u]` (the bound's first estimates): prompt + title
    teacher-forced, every (user, group) pair of the batch left-padded into a few forwards, the
    output layer applied to the title positions only."""
    device = targets.tokens.device
    pairs = [(u, g) for u, gs in enumerate(groups) for g in gs]
    totals: list[list[float]] = [[] for _ in prompts]
    for start in range(0, len(pairs), TOTALS_BATCH):
        chunk = pairs[start : start + TOTALS_BATCH]
        lengths = [int(targets.lengths[g]) for _, g in chunk]
        seqs = [[*prompts[u], *targets.tokens[g, : n - 1].tolist()] for (u, g), n in zip(chunk, lengths, strict=True)]
        ids, attn = left_pad(seqs, 0, device)
        width = max(lengths)  # the last `width` positions predict every title's tokens
        keep = {"logits_to_keep": width} if last_logits_only(model) else {}
        out = model(input_ids=ids, attention_mask=attn, position_ids=_left_pad_positions(attn), **keep)
        logits = out.logits[:, -width:]  # [N, width, V]
        for i, ((u, g), n) in enumerate(zip(chunk, lengths, strict=True)):
            logp = next_token_log_probs(logits[i, width - n :], targets.states[g, :n], trie, mask)  # [n, V]
            totals[u].append(float(logp.gather(1, targets.tokens[g, :n, None]).sum()))
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
    """Exact log p of every group's response given one prompt (`exhaustive_scores_batch` of one)."""
    return exhaustive_scores_batch(
        model, [prompt_ids], targets, trie, mask=mask, batch_items=batch_items, bounds=[bound]
    )[0]


@torch.no_grad()
def exhaustive_scores_batch(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    targets: CatalogTargets,
    trie: TokenTrie,
    *,
    mask: str = "after",
    batch_items: int = 256,
    bounds: Sequence[PruneBound | None] | None = None,
    probe: bool = True,
) -> list[ExhaustiveScores]:
    """Exact log p of every group's response given each of `prompts`, one `ExhaustiveScores` each.

    The prompts are encoded together once; then the trie is walked level by level: each user's
    nodes with children at that depth are one forward row each, attending to that user's prompt
    (stored once) and to the node's ancestors' keys, and the rows of every user of the batch go
    through the same forwards (at most `batch_items` rows each). The walk's cost is its rows (a
    bounded walk of the demo's model keeps a few hundred nodes per user and level); sharing
    forwards lets `batch_items` be large (2048 in the demo) and the larger matrix products are
    cheaper per row. The per-edge log p and sibling rank are read from each row's logits.
    With `bounds[u]`, subtrees that cannot hold user u's target's better nor a top-B group are
    skipped for that user (the walk runs twice: a narrow probe finds good groups and their totals,
    then the exact walk starts its bound from them; `probe=False`: from the bounds' candidates only,
    teacher-forced, as before the probe): the groups in them get total_logp -inf (and token_logp -inf, token_rank
    -1 on unscored tokens); the target's rank and the top-B (with their scores) are those of the
    full walk. Each user's result is the one it gets alone (within float tolerance).
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt")
    check_mask_mode(mask)
    bounds = list(bounds) if bounds is not None else [None] * len(prompts)
    if len(bounds) != len(prompts):
        raise ValueError(f"{len(bounds)} bounds for {len(prompts)} prompts")
    device = next(model.parameters()).device
    targets = targets.to(device)
    trie = trie.to(device) if trie.device != device else trie
    input_ids, attention_mask = left_pad(prompts, 0, device)
    first_logits, prompt_cache, cache_mask = _prefill(model, input_ids, attention_mask, share_prefix=True)
    cache = shared_prefix_cache(prompt_cache, cache_mask, model)
    if cache is None:
        return [_teacher_forced_scores(model, p, targets, trie, mask=mask, batch_items=batch_items) for p in prompts]
    walk = _BatchWalk(model, cache, trie, mask, batch_items, attention_mask.sum(-1), first_logits)
    keeps: list[_SubtreeFilter | None] = [None] * len(prompts)
    if any(b is not None for b in bounds):
        probes: list[_SubtreeFilter | None] = [None] * len(prompts)
        if probe:
            probes = [_SubtreeFilter.probe(targets, trie, b) if b is not None else None for b in bounds]
            walk.run(probes)
        keeps = _start_filters(model, prompts, targets, trie, mask, bounds, probes)
    edge_logp, edge_rank = walk.run(keeps)
    return [_scores_of(edge_logp[u], edge_rank[u], targets, trie, keeps[u]) for u in range(len(prompts))]


def _start_filters(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], targets: CatalogTargets, trie: TokenTrie, mask: str,
    bounds: Sequence[PruneBound | None], probes: Sequence[_SubtreeFilter | None],
) -> list[_SubtreeFilter | None]:  # fmt: skip
    """Each bounded user's exact walk state, starting from the groups its probe walk finished (with
    their walked totals) and the candidates the probe did not reach, teacher-forced for the whole
    batch at once."""
    known = [p.finished if p is not None else {} for p in probes]
    groups = [
        [g for g in _bound_groups(b) if g not in k] if b is not None else [] for b, k in zip(bounds, known, strict=True)
    ]  # fmt: skip
    totals = _teacher_forced_totals(model, prompts, groups, targets, trie, mask) if any(groups) else [[]] * len(groups)
    return [
        _SubtreeFilter.start(targets, trie, b, {**k, **dict(zip(g, t, strict=True))}) if b is not None else None
        for b, k, g, t in zip(bounds, known, groups, totals, strict=True)
    ]


def _level_children(
    level_nodes: torch.Tensor, trie: TokenTrie, keep: _SubtreeFilter | None, edge_logp: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One user's next rows: (edges [n] into its children with children that the bound keeps, their
    parents' indices [n] in `level_nodes`, the children [n])."""
    edges = _edges_of(level_nodes, trie)  # [E_d] the edges leaving this level, parents in order
    parent_row = torch.repeat_interleave(
        torch.arange(level_nodes.numel(), device=level_nodes.device), trie.num_children(level_nodes)
    )
    child = trie.edge_child[edges]
    has_children = trie.num_children(child) > 0
    if keep is not None:
        has_children &= keep.update(level_nodes, parent_row, edges, child, has_children, edge_logp)
    return edges[has_children], parent_row[has_children], child[has_children]


class _BatchWalk:
    """The forwards of a batched trie walk. The rows of a level are laid out user-major, each user
    padded to the level's widest user (`SharedPrefixLayer` pairs P prompts with P equal blocks of
    rows); padding rows repeat a real row of their user and their logits are not read. `run` walks
    the whole trie from the root; it can be run again over the same prompt cache."""

    def __init__(
        self, model: torch.nn.Module, cache, trie: TokenTrie, mask: str, batch_items: int, prompt_lengths: torch.Tensor,
        first_logits: torch.Tensor,
    ) -> None:  # fmt: skip
        self.model, self.cache, self.trie, self.mask = model, cache, trie, mask
        self.num_users = prompt_lengths.numel()
        self.slots_per_forward = max(1, batch_items // self.num_users)
        self.prompt_lengths = prompt_lengths  # [P] a user's first response position
        self.first_logits = first_logits  # [P, V] the prompts' next-token logits (the root's row)
        self.empty = generated_part(cache)  # nothing generated yet: where every walk starts
        # mask "before" reads the children's logits only: the forward stops at the last hidden
        # states (no [rows, V] projection, the largest matrix product of a small model's row)
        self.head: LMHead | None = None
        self.forward_kwargs: dict = {}
        if mask == "before" and last_logits_only(model) and not is_zero3_partitioned(model):
            with lm_head_context(model) as head:  # a no-op without ZeRO-3: the tensors stay valid after it
                self.head = head
            self.forward_kwargs = {"output_hidden_states": True, "logits_to_keep": torch.zeros(0, dtype=torch.int64)}

    def run(self, keeps: Sequence[_SubtreeFilter | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Walk the trie level by level, user u's subtrees filtered by `keeps[u]` (None: all);
        -> the stats of the edges scored, edge_logp float32 / edge_rank int64 [P, E] (0 elsewhere)."""
        trie, users, device = self.trie, self.num_users, self.prompt_lengths.device
        num_edges = trie.edge_key.numel()
        edge_logp = torch.zeros(users, num_edges, device=device)
        edge_rank = torch.zeros(users, num_edges, dtype=torch.int64, device=device)
        root = torch.zeros(users, dtype=torch.int64, device=device)
        offset = torch.arange(users, device=device) * num_edges  # row u writes edge e at u * E + e
        _edge_stats(self.first_logits, root, trie, self.mask, edge_logp.view(-1), edge_rank.view(-1), offset)
        self.keys, self.width = self.empty, 1  # per layer [P * width, Hkv, d, D]; rows per user in `keys`
        level_nodes = [root[:1] for _ in range(users)]  # per user: its nodes with children at this depth
        for depth in range(trie.max_depth - 1):
            level = [_level_children(level_nodes[u], trie, keeps[u], edge_logp[u]) for u in range(users)]
            if all(child.numel() == 0 for _, _, child in level):
                break
            self.score_level(level, depth, edge_logp, edge_rank)
            level_nodes = [child for _, _, child in level]
        return edge_logp, edge_rank

    def score_level(
        self,
        level: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        depth: int,
        edge_logp: torch.Tensor,
        edge_rank: torch.Tensor,
    ) -> None:
        """Forward every user's rows of one level (`_level_children` per user); fill the stats of
        the edges leaving them into `edge_logp` / `edge_rank` [P, E]; keep their keys for the next."""
        device, users = self.prompt_lengths.device, self.num_users
        width = max(child.numel() for _, _, child in level)
        token = torch.zeros(users, width, dtype=torch.int64, device=device)
        parent = torch.zeros(users, width, dtype=torch.int64, device=device)
        node = torch.zeros(users, width, dtype=torch.int64, device=device)
        real = torch.zeros(users, width, dtype=torch.bool, device=device)
        for u, (edges, parent_row, child) in enumerate(level):
            n = child.numel()
            parent[u] = u * self.width  # padding: the user's first row of the level before
            token[u, :n], parent[u, :n] = self.trie.edge_token[edges], u * self.width + parent_row
            node[u, :n], real[u, :n] = child, True
        position = (self.prompt_lengths + depth)[:, None]  # [P, 1]
        num_edges = edge_logp.shape[1]
        offset = (torch.arange(users, device=device) * num_edges)[:, None].expand(users, width)
        parts: list[GeneratedPart] = []
        for start in range(0, width, self.slots_per_forward):
            cols = slice(start, start + self.slots_per_forward)
            restore_generated(self.cache, self.keys, parent[:, cols].reshape(-1))
            step = token[:, cols].shape[1]
            out = shared_prefix_forward(
                self.model, self.cache, token[:, cols].reshape(-1, 1), position.expand(users, step).reshape(-1, 1),
                **self.forward_kwargs,
            )  # fmt: skip
            logits = out.logits[:, -1, :] if self.head is None else out.hidden_states[-1][:, -1, :]  # [P*step, V|H]
            parts.append([(k.view(users, step, *k.shape[1:]), v.view(users, step, *v.shape[1:]))
                          for k, v in generated_part(self.cache)])  # fmt: skip
            rows = real[:, cols].reshape(-1)
            _edge_stats(
                logits[rows], node[:, cols].reshape(-1)[rows], self.trie, self.mask,
                edge_logp.view(-1), edge_rank.view(-1), offset[:, cols].reshape(-1)[rows], self.head,
            )  # fmt: skip
        self.keys = [
            (torch.cat([p[i][0] for p in parts], 1).flatten(0, 1), torch.cat([p[i][1] for p in parts], 1).flatten(0, 1))
            for i in range(len(parts[0]))
        ]  # fmt: skip
        self.width = width


def _scores_of(
    edge_logp: torch.Tensor, edge_rank: torch.Tensor, targets: CatalogTargets, trie: TokenTrie,
    keep: _SubtreeFilter | None,
) -> ExhaustiveScores:  # fmt: skip
    """One user's per-token and total scores from its edge stats [E]."""
    num_edges = edge_logp.numel()
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


# a probe walk keeps this many nodes per user and trie level (best prefix log p first) per group it
# must find (num_beams, or rank_cap if larger): on the demo's models, about 3 walked the fewest rows
# of probe and exact walk together (B = 10, rows per user LML / MSL: 818 / 332 at 32 nodes, 1645 /
# 567 at 16, 703 / 431 at 64; 2519 / 755 without a probe)
PROBE_WIDTH_PER_GROUP = 3


@dataclass
class _SubtreeFilter:
    """State of a bounded walk: each node's prefix log p, which edges were scored, the threshold.

    A probe (`width` set) also keeps at most `width` nodes per level, the best prefix log p first
    (and the target's path): a cheap beam-like walk whose finished groups, with their walked totals,
    start the exact walk's threshold near the true B-th best. Beam search's B groups, the earlier
    start, are often far below it (a model whose beam search prunes most top-B groups), and the
    exact walk then keeps every node above a low threshold until the walk reaches the top groups'
    depths: on the demo's models the probe cut the rows walked 2.3-3x, its own included
    (`benchmarks/exhaustive_analysis.py --run`, docs/results.md section 7.6)."""

    node_logp: torch.Tensor  # float32 [num_nodes]
    edge_scored: torch.Tensor  # bool [E]
    on_target_path: torch.Tensor  # bool [num_nodes]
    target_total: float  # -inf without a target
    finished: dict[int, float]  # group -> total: the known ones at the start, then the walk's
    num_beams: int
    slack: float
    trie: TokenTrie
    rank_cap: int | None
    width: int | None = None  # a probe's nodes per level

    @classmethod
    def start(
        cls, targets: CatalogTargets, trie: TokenTrie, bound: PruneBound, known: dict[int, float],
        width: int | None = None,
    ) -> _SubtreeFilter:  # fmt: skip
        """`known`: groups with their totals (the target's among them, if it is to bound the walk)."""
        device = targets.tokens.device
        target = bound.target_group
        on_path = torch.zeros(trie.num_nodes, dtype=torch.bool, device=device)
        if target is not None:
            length = int(targets.lengths[target])
            on_path[targets.states[target, :length]] = True
        edge_scored = torch.zeros(trie.edge_key.numel(), dtype=torch.bool, device=device)
        edge_scored[_edges_of(torch.zeros(1, dtype=torch.int64, device=device), trie)] = True
        return cls(
            node_logp=torch.zeros(trie.num_nodes, device=device),
            edge_scored=edge_scored,
            on_target_path=on_path,
            target_total=known.get(target, float("-inf")) if target is not None else float("-inf"),
            finished=dict(known),
            num_beams=bound.num_beams,
            slack=bound.slack,
            trie=trie,
            rank_cap=bound.rank_cap,
            width=width,
        )

    @classmethod
    def probe(cls, targets: CatalogTargets, trie: TokenTrie, bound: PruneBound) -> _SubtreeFilter:
        """A probe walk's state: nothing known yet, a few nodes per level (PROBE_WIDTH_PER_GROUP per
        group it must find; its threshold, from the groups it finishes, prunes too); it walks the
        target's path whole, so the target's total is among its `finished`."""
        width = PROBE_WIDTH_PER_GROUP * max(bound.num_beams, bound.rank_cap or 0)
        return cls.start(targets, trie, bound, {}, width=width)

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
        on_path = self.on_target_path[child]
        kept = (self.node_logp[child] >= self.threshold()) | on_path
        if self.width is not None:  # a probe: the `width` best of the rest
            logp = self.node_logp[child].masked_fill(~(kept & has_children & ~on_path), float("-inf"))
            best = torch.zeros_like(kept)
            best[torch.topk(logp, min(self.width, logp.numel())).indices] = True
            kept = (kept & best & (logp > float("-inf"))) | on_path
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
    edge_offset: torch.Tensor | None = None,
    head: LMHead | None = None,
) -> None:
    """Fill `edge_logp` / `edge_rank` [E] for the edges leaving `nodes` [n], given their logits [n, V]:
    log p of the edge token (per mask mode) and its rank among the node's children (strictly greater).
    `edge_offset` [n]: row i writes edge e at edge_offset[i] + e (several users' stats in one array).
    `head` (mask "before" only): `logits` are the rows' last hidden states [n, H] and only the
    children's logits are projected (the rest of the vocabulary does not enter a "before" softmax)."""
    counts = trie.num_children(nodes)
    row = torch.repeat_interleave(torch.arange(nodes.numel(), device=nodes.device), counts)  # [P]
    edges = _edges_of(nodes, trie)  # [P]
    tokens = trie.edge_token[edges]  # [P]
    slots = edges if edge_offset is None else edges + edge_offset[row]  # [P] where each edge's stats go
    if head is None:
        logits = logits.float()
        vals = logits[row, tokens]  # [P]
        edge_logp[slots] = trie_log_softmax(logits, mask, pairs=(row, tokens))
    else:
        vals = head.pair_logits(logits, row, tokens)
        edge_logp[slots] = pair_log_softmax(vals, row, nodes.numel())
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
    edge_rank[slots[order]] = run_start - node_start[sorted_row]


@torch.no_grad()
def _teacher_forced_scores(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    targets: CatalogTargets,
    trie: TokenTrie,
    *,
    mask: str = "after",
    batch_items: int = 256,
) -> ExhaustiveScores:
    """`exhaustive_scores` for models without the shared-prefix cache: every title teacher-forced
    on a copy of the prompt cache, `batch_items` titles per forward."""
    device = targets.tokens.device
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.int64, device=device)  # [1, Lp]
    out = model(input_ids=prompt, use_cache=True, **last_logits_only(model))
    prompt_cache, first_logits, plen = out.past_key_values, out.logits[:, -1, :], prompt.shape[1]  # [1, V]
    del out
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
