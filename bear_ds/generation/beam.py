"""Trie-constrained beam search over a causal LM, vectorised over users and beams, with a KV cache.

Semantics are those of Hugging Face `generate(num_beams=B, num_return_sequences=B, do_sample=False,
prefix_allowed_tokens_fn=<trie>)` (transformers 5.x `_beam_search`, `early_stopping=False`):

- step t scores every trie-valid continuation of every live beam by its cumulative log-prob;
  mask="after": log-softmax over the whole vocabulary, then restrict to the trie (HF default);
  mask="before": restrict, then log-softmax over the valid tokens (HF `renormalize_logits=True`,
  the released MSL/BEAR decoding).
- the 2B best candidates per user are taken; EOS candidates among the first B of them become
  finished items scored sum(log p) / (generated tokens incl. EOS) ** length_penalty (an EOS
  candidate ranked beyond B is dropped); the B best non-EOS candidates stay live.
- a user stops when all B finished slots are filled and the best live beam, divided by the current
  length ** length_penalty, cannot beat the worst finished item; or at `max_new_tokens`.

HF pads beams that do not exist (fewer than B valid continuations) with copies scored about -1e9;
here they are dead beams scored -inf, so results differ only in those padding entries, which are
reported as group -1.

The search's phases: `_encode_prompts` (the prefill, or the caller's `PromptState`), then per step
`_Candidates.best` (the 2B best continuations), `_Outcome.finish` (finished items), `_LiveBeams.of`
(the beams kept), `_still_searching` (the stopping rule) and `_BeamCache.decode` (the next forward).
Only the decoding-step loop is Python; users done early are dropped from the batch (and the cache).
Where the model uses the Hugging Face attention interface and a plain DynamicCache, a user's prompt
keys/values are stored once, not per beam, and all its beams attend to them in one matrix product
(`bear_ds.generation.shared_prefix`); the prefix common to all prompts of a batch (the
template's instruction) is encoded once (`_prefill`); the prefill applies the output layer to the
last position only. Otherwise the cache's own `reorder_cache` copies the prompt per beam.
With `synced=True` (ZeRO-3 partitioned weights) every rank runs the same number of forwards: a
"still working" flag is all-reduced each step and finished ranks run dummy forwards.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from transformers.cache_utils import DynamicCache

from bear_ds.generation.shared_prefix import reorder_rows, shared_prefix_cache, shared_prefix_forward
from bear_ds.masking import NEG_INF, check_mask_mode, trie_log_softmax
from bear_ds.trie import INVALID, TokenTrie


@dataclass
class BeamResult:
    """Per user: finished trie items best first.

    groups: int64 [U, B] trie terminal ids (-1 where fewer than B items finished).
    scores: float32 [U, B] sum log p / length ** length_penalty (-inf where group is -1).
    steps:  int64 [U] decoding steps run for each user.
    live_states: with `return_trace`, one int64 [U, B] tensor per step: the trie state of each live
        beam after that step's selection (-1 for dead beams and users already stopped).
    live_thresholds, candidate_thresholds: with `return_thresholds`, float32 [U, S] (S = the step
        limit): at each step, the cumulative log-prob (no length penalty) of the B-th best of the
        step's unfinished candidates (the live beams kept), resp. of all its candidates (EOS ones
        included); the lowest finite one where fewer than B are finite, -inf where none is, NaN at
        steps the user's search did not run (it had stopped).
    """

    groups: torch.Tensor
    scores: torch.Tensor
    steps: torch.Tensor
    live_states: list[torch.Tensor] | None = field(default=None)
    live_thresholds: torch.Tensor | None = field(default=None)
    candidate_thresholds: torch.Tensor | None = field(default=None)


@dataclass
class PromptState:
    """Prompts already encoded by another forward (the training forward, for beamsim), in place of
    the search's own prefill: logits [U, V] at each prompt's last position, the model's KV cache
    [U, ..., L, ...] and its attention mask [U, L] with 1 exactly on the prompt's positions (other
    columns, e.g. a response after a right-padded prompt, are masked out). The prompt of row u must
    sit at positions 0 .. (mask[u].sum() - 1), as in a right-padded forward."""

    logits: torch.Tensor
    cache: object
    attention_mask: torch.Tensor


def lowest_of_best(sorted_scores: torch.Tensor, k: int) -> torch.Tensor:
    """[A, C] scores sorted best first -> [A]: the k-th, or the lowest finite one among the first k
    when fewer are finite; -inf when none is."""
    head = sorted_scores[:, :k]
    lowest = head.masked_fill(~torch.isfinite(head), float("inf")).min(dim=1).values  # [A]
    return torch.where(torch.isfinite(lowest), lowest, NEG_INF)


def next_token_log_probs(logits: torch.Tensor, states: torch.Tensor, trie: TokenTrie, mask: str) -> torch.Tensor:
    """Log-probs of the next token restricted to trie-valid continuations; -inf elsewhere.

    logits [N, V] (any float dtype), states [N] trie states -> float32 [N, V].
    mask="after": log_softmax over V, then restrict; "before": restrict, then log_softmax, computed
    from the trie-valid (row, token) pairs only (`trie_log_softmax`'s pair form: the normaliser is a
    sum over a few valid tokens per row instead of an exp over the whole vocabulary, which was 15% of
    beamsim's training-time search). The beam search and the analysis both call this, so their
    scores agree to the bit. States with no valid continuation (INVALID) give an all -inf row.
    """
    if mask != "before":
        return trie_log_softmax(logits, mask, allowed=trie.allowed_mask(states, logits.shape[-1]))  # [N, V]
    rows, tokens = trie.allowed_pairs(states)  # [P]
    out = torch.full(logits.shape, NEG_INF, dtype=torch.float32, device=logits.device)  # [N, V]
    out[rows, tokens] = trie_log_softmax(logits, "before", pairs=(rows, tokens))
    return out


def _beam_cache(prompt_cache, attention_mask: torch.Tensor, model: torch.nn.Module) -> DynamicCache | None:
    # the one place the search builds its shared-prefix cache (tests replace it to force the other path)
    return shared_prefix_cache(prompt_cache, attention_mask, model)


def last_logits_only(model: torch.nn.Module) -> dict[str, int]:
    """`logits_to_keep=1` where the model's forward takes it: the prefill then applies the output
    layer to the last position only (not to every prompt position)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}


MIN_SHARED_PROMPT_PREFIX = 16  # tokens; below this, encoding the common prefix once is not worth a forward


def common_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """Length of the longest token prefix shared by all left-padded prompts, kept shorter than the
    shortest prompt (so every prompt has a token after it)."""
    lengths = attention_mask.long().sum(-1)  # [U]
    width, shortest = input_ids.shape[1], int(lengths.min())
    starts = width - lengths  # [U] first real column
    cols = torch.arange(shortest - 1, device=input_ids.device)
    aligned = input_ids.gather(1, starts[:, None] + cols[None, :])  # [U, shortest-1] prompts left-aligned
    differs = (aligned != aligned[:1]).any(dim=0)  # [shortest-1]
    return int(differs.nonzero()[0, 0]) if bool(differs.any()) else shortest - 1


def _prefill(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, share_prefix: bool):
    """Encode U left-padded prompts: -> (last-position logits [U, V], cache, cache attention mask).

    Prompts built from one template share a prefix (the instruction); it is encoded once and its
    keys/values copied to every user, then the rest of each prompt is encoded on top of it. Exact:
    prefix tokens attend only to the prefix and have the same positions in every prompt. The
    returned mask [U, L] marks real cache positions (padding then sits between prefix and rest).
    `share_prefix=False` (synced ranks, which must run equally many forwards): one forward.
    """
    shared = common_prefix_length(input_ids, attention_mask) if share_prefix and input_ids.shape[0] > 1 else 0
    if shared < MIN_SHARED_PROMPT_PREFIX:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=_left_pad_positions(attention_mask),
            use_cache=True,
            **last_logits_only(model),
        )
        return out.logits[:, -1, :], out.past_key_values, attention_mask
    num_users, width = input_ids.shape
    first = int((attention_mask[0] == 0).sum())  # row 0's first real column
    prefix = input_ids[:1, first : first + shared]  # [1, c]
    cache = model(input_ids=prefix, use_cache=True, **last_logits_only(model)).past_key_values
    cache.reorder_cache(torch.zeros(num_users, dtype=torch.int64, device=input_ids.device))  # [U] copies
    rest_mask = attention_mask[:, : width - shared]  # [U, L-c]: row u's pads, then its tokens after the prefix
    rest_ids = input_ids[:, shared:].masked_fill(rest_mask == 0, 0)  # row u's tokens after the prefix
    cache_mask = torch.cat([attention_mask.new_ones(num_users, shared), rest_mask], dim=1)  # [U, L]
    out = model(
        input_ids=rest_ids,
        attention_mask=cache_mask,
        position_ids=shared + _left_pad_positions(rest_mask),
        past_key_values=cache,
        use_cache=True,
        **last_logits_only(model),
    )
    return out.logits[:, -1, :], out.past_key_values, cache_mask


def left_pad(
    sequences: Sequence[Sequence[int]], pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded [U, L] input ids and attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.int64)
    attn = torch.zeros(len(sequences), width, dtype=torch.int64)
    for i, s in enumerate(sequences):
        if len(s) == 0:
            raise ValueError(f"prompt {i} of the batch is empty")
        ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.int64)
        attn[i, width - len(s) :] = 1
    return ids.to(device), attn.to(device)


def _left_pad_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    # position ids as HF computes them for left padding: real tokens count 0.., pads get 1 (masked anyway)
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def _others_still_working(working: bool, device: torch.device) -> bool:
    """All-reduce (MAX) of this rank's flag: True while any rank still has decoding to do."""
    flag = torch.tensor([1 if working else 0], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _dummy_forward(model: torch.nn.Module, device: torch.device) -> None:
    # one-token forward so partitioned (ZeRO-3) weights are gathered as many times as on busy ranks
    model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)


def _validate(input_ids, attention_mask, trie, num_beams, eos_token_id, mask, length_penalty, max_new_tokens):
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [users, length], got shape {tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}"
        )
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    check_mask_mode(mask)
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1 or None, got {max_new_tokens}")
    if not 0 <= eos_token_id < trie.vocab_size:
        raise ValueError(f"eos_token_id {eos_token_id} is outside the trie vocabulary [0, {trie.vocab_size})")
    if input_ids.shape[0] > 0 and input_ids.shape[1] > 0 and bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("prompts must be left-padded: attention_mask[:, -1] must be 1 for every row")
    if trie.edge_key.numel() == 0:
        raise ValueError("the trie is empty: the catalog has no titles to decode")


@torch.no_grad()
def constrained_beam_search(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: TokenTrie,
    *,
    num_beams: int,
    eos_token_id: int,
    mask: str = "after",
    length_penalty: float = 1.0,
    max_new_tokens: int | None = None,
    synced: bool = False,
    return_trace: bool = False,
    temperature: float = 1.0,
    return_thresholds: bool = False,
    prompt_state: PromptState | None = None,
) -> BeamResult:
    """Beam search of width `num_beams` over the titles in `trie`, for U left-padded prompts at once.

    input_ids, attention_mask: [U, L] left-padded. `max_new_tokens` defaults to `trie.max_depth`
    (a smaller value makes longer titles unreachable). Returns `BeamResult` (see its docstring).
    With `synced=True` every rank of the default process group must call this the same number of
    times (U may be 0 on a rank that has run out of users).
    `temperature` scales the logits (z / temperature) before the mask and the log-softmax (the
    scoring of the MSL/BEAR/beamsim losses with loss.tau); `return_thresholds` fills the
    per-step thresholds of `BeamResult` (what the beamsim loss compares the gold prefix with).
    `prompt_state` replaces the prefill (input_ids, attention_mask then only give U and are
    checked); with `synced`, every rank must then pass one.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _validate(input_ids, attention_mask, trie, num_beams, eos_token_id, mask, length_penalty, max_new_tokens)
    device = input_ids.device
    if trie.device != device:
        trie = trie.to(device)
    max_steps = trie.max_depth if max_new_tokens is None else min(max_new_tokens, trie.max_depth)
    outcome = _Outcome.empty(input_ids.shape[0], num_beams, max_steps, device, return_trace, return_thresholds)
    if input_ids.shape[0] > 0:
        logits, cache, cache_mask = _encode_prompts(model, input_ids, attention_mask, prompt_state, synced)
        if logits.shape[-1] < trie.vocab_size:
            raise ValueError(
                f"model vocabulary {logits.shape[-1]} is smaller than the trie vocabulary {trie.vocab_size}"
            )
        search = _SearchSettings(num_beams, eos_token_id, mask, length_penalty, temperature, max_steps, synced)
        _decode(logits, _BeamCache(model, cache, cache_mask), trie, outcome, search)
    elif synced and prompt_state is None:
        _dummy_forward(model, device)  # the prefill every other rank runs
    if synced:
        # this rank finished its steps; keep serving forwards while other ranks decode
        while _others_still_working(False, device):
            _dummy_forward(model, device)
    return outcome.result()


def _encode_prompts(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_state: PromptState | None,
    synced: bool,
) -> tuple[torch.Tensor, object, torch.Tensor]:
    """(last-position logits [U, V], cache, cache attention mask [U, L]) of the prompts: each prompt
    encoded once (beams are created from its cache after the first step), or `prompt_state`'s."""
    if prompt_state is None:
        return _prefill(model, input_ids, attention_mask, share_prefix=not synced)
    num_users = input_ids.shape[0]
    if prompt_state.logits.shape[0] != num_users or prompt_state.attention_mask.shape[0] != num_users:
        raise ValueError(f"prompt_state holds {prompt_state.logits.shape[0]} prompts, input_ids {num_users}")
    return prompt_state.logits, prompt_state.cache, prompt_state.attention_mask


@dataclass(frozen=True)
class _SearchSettings:
    beams: int
    eos_token_id: int
    mask: str
    length_penalty: float
    temperature: float
    max_steps: int
    synced: bool


@dataclass
class _Outcome:
    """What the search returns, filled in step by step for the users still searching (`active`)."""

    fin_scores: torch.Tensor  # [U, B] finished items, best first
    fin_groups: torch.Tensor  # [U, B]
    steps_run: torch.Tensor  # [U]
    trace: list[torch.Tensor] | None  # with return_trace
    live_thr: torch.Tensor | None  # [U, S] with return_thresholds
    cand_thr: torch.Tensor | None

    @classmethod
    def empty(
        cls, num_users: int, beams: int, max_steps: int, device: torch.device, trace: bool, thresholds: bool
    ) -> _Outcome:
        live_thr = cand_thr = None
        if thresholds:
            live_thr = torch.full((num_users, max_steps), float("nan"), dtype=torch.float32, device=device)
            cand_thr = torch.full_like(live_thr, float("nan"))
        return cls(
            fin_scores=torch.full((num_users, beams), NEG_INF, dtype=torch.float32, device=device),
            fin_groups=torch.full((num_users, beams), INVALID, dtype=torch.int64, device=device),
            steps_run=torch.zeros(num_users, dtype=torch.int64, device=device),
            trace=[] if trace else None,
            live_thr=live_thr,
            cand_thr=cand_thr,
        )

    def result(self) -> BeamResult:
        return BeamResult(self.fin_groups, self.fin_scores, self.steps_run, self.trace, self.live_thr, self.cand_thr)

    def finish(self, active: torch.Tensor, cand: _Candidates, groups: torch.Tensor, norm: float) -> torch.Tensor:
        """Merge this step's finished items: EOS candidates among the first B of the 2B (HF's
        top_num_beam_mask), scored / norm (= length ** length_penalty); `groups` [A, 2B] their trie
        terminals. Returns the B finished scores [A, B] of the active users, best first."""
        beams = self.fin_scores.shape[1]
        rank = torch.arange(cand.scores.shape[1], device=cand.scores.device)[None, :]
        new_fin = cand.is_eos & (rank < beams)
        new_scores = torch.where(new_fin, cand.scores / norm, NEG_INF)
        new_groups = torch.where(new_fin, groups, INVALID)
        merged_scores = torch.cat([self.fin_scores[active], new_scores], dim=1)  # [A, B + 2B]
        merged_groups = torch.cat([self.fin_groups[active], new_groups], dim=1)
        kept_scores, kept_idx = merged_scores.topk(beams, dim=1)
        self.fin_scores[active] = kept_scores
        self.fin_groups[active] = merged_groups.gather(1, kept_idx)
        return kept_scores

    def record(self, active: torch.Tensor, step: int, live: _LiveBeams, cand: _Candidates) -> None:
        """Steps run; with return_trace the live beams' states; with return_thresholds the B-th best
        live and candidate scores."""
        num_users, beams = self.fin_scores.shape
        self.steps_run[active] = step + 1
        if self.trace is not None:
            snapshot = torch.full((num_users, beams), INVALID, dtype=torch.int64, device=active.device)
            snapshot[active, : live.scores.shape[1]] = live.states
            self.trace.append(snapshot)
        if self.live_thr is not None and self.cand_thr is not None:
            self.live_thr[active, step] = lowest_of_best(live.scores, beams)
            self.cand_thr[active, step] = lowest_of_best(cand.scores, beams)


@dataclass
class _Candidates:
    """One step's 2B best continuations per active user, best first: [A, C], C = min(2B, Bc * V)."""

    scores: torch.Tensor  # cumulative log-prob
    parent: torch.Tensor  # the live beam (0 .. Bc-1) extended
    token: torch.Tensor
    child: torch.Tensor  # trie state after the token
    is_eos: torch.Tensor

    @classmethod
    def best(
        cls,
        logits: torch.Tensor,
        beam_scores: torch.Tensor,
        beam_states: torch.Tensor,
        trie: TokenTrie,
        search: _SearchSettings,
    ) -> _Candidates:
        """logits [A*Bc, V] of the live beams, their scores and trie states [A, Bc]."""
        n_active, cur_beams = beam_scores.shape
        vocab = logits.shape[-1]
        if search.temperature != 1.0:
            logits = logits.float() / search.temperature
        logp = next_token_log_probs(logits, beam_states.reshape(-1), trie, search.mask)  # [A*Bc, V]
        cand = (logp.view(n_active, cur_beams, vocab) + beam_scores[..., None]).view(n_active, cur_beams * vocab)
        top_scores, top_idx = cand.topk(min(2 * search.beams, cur_beams * vocab), dim=1)  # [A, 2B], best first
        parent = top_idx // vocab
        token = top_idx % vocab
        child = trie.advance(beam_states.gather(1, parent), token)  # [A, 2B]
        is_eos = torch.isfinite(top_scores) & (token == search.eos_token_id)
        return cls(top_scores, parent, token, child, is_eos)


@dataclass
class _LiveBeams:
    """The B best non-EOS candidates of a step, [A, B] (fewer columns when there are fewer candidates)."""

    scores: torch.Tensor
    parent: torch.Tensor
    token: torch.Tensor
    states: torch.Tensor  # INVALID for dead beams (score -inf)

    @classmethod
    def of(cls, cand: _Candidates, beams: int) -> _LiveBeams:
        run_scores = cand.scores.masked_fill(cand.is_eos, NEG_INF)
        live_scores, live_idx = run_scores.topk(min(beams, run_scores.shape[1]), dim=1)  # [A, B]
        states = torch.where(torch.isfinite(live_scores), cand.child.gather(1, live_idx), INVALID)
        return cls(live_scores, cand.parent.gather(1, live_idx), cand.token.gather(1, live_idx), states)


def _still_searching(finished: torch.Tensor, live: _LiveBeams, norm: float) -> torch.Tensor:
    """bool [A]: HF's early_stopping=False heuristic: a user stops once B items are finished and the
    best live beam, at the current length (norm = length ** length_penalty), cannot beat the worst."""
    all_filled = torch.isfinite(finished).all(dim=1)
    can_improve = live.scores[:, 0] / norm > finished[:, -1]
    return torch.isfinite(live.scores[:, 0]) & ~(all_filled & ~can_improve)


class _BeamCache:
    """The live beams' KV cache, one row per beam: from the first decoding step on the shared-prefix
    cache (each prompt stored once) where the model allows it, else the model's own cache with the
    prompt copied per beam by `reorder_cache` (with an attention mask grown by one column per step)."""

    def __init__(self, model: torch.nn.Module, cache, attention_mask: torch.Tensor) -> None:
        self.model, self.cache, self.prompt_mask = model, cache, attention_mask
        self.row_mask = attention_mask.long()  # [A*Bc, L+t] (model's own cache only)
        self.row_pos = attention_mask.long().sum(-1)  # [A*Bc] position of the next token
        self.shared: bool | None = None  # decided at the first decoding step

    def decode(self, rows: torch.Tensor, users_left: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
        """Row r continues cache row rows[r] with tokens [R]; `users_left`: the prompts kept (None:
        all). Returns the next logits [R, V]."""
        if self.shared is None:
            shared = _beam_cache(self.cache, self.prompt_mask, self.model)
            self.shared = shared is not None
            if shared is not None:
                self.cache = shared
        self.row_pos = self.row_pos[rows]
        if self.shared:
            reorder_rows(self.cache, rows, users_left)
            out = shared_prefix_forward(self.model, self.cache, tokens.reshape(-1, 1), self.row_pos[:, None])
        else:
            self.cache.reorder_cache(rows)
            self.row_mask = torch.cat([self.row_mask[rows], self.row_mask.new_ones(rows.numel(), 1)], dim=1)
            out = self.model(
                input_ids=tokens.reshape(-1, 1),
                attention_mask=self.row_mask,
                position_ids=self.row_pos[:, None],
                past_key_values=self.cache,
                use_cache=True,
            )
        self.row_pos = self.row_pos + 1
        self.cache = out.past_key_values
        return out.logits[:, -1, :]


def _decode(logits: torch.Tensor, cache: _BeamCache, trie: TokenTrie, outcome: _Outcome, search: _SearchSettings):
    """The decoding steps, from the prompts' last logits [U, V] until every user stops."""
    num_users, device = logits.shape[0], logits.device
    active = torch.arange(num_users, device=device)  # [A] users still searching
    beam_scores = torch.zeros(num_users, 1, device=device)  # [A, Bc] (Bc = 1 before the first step)
    beam_states = torch.zeros(num_users, 1, dtype=torch.int64, device=device)  # root
    for step in range(search.max_steps):
        cand = _Candidates.best(logits, beam_scores, beam_states, trie, search)
        norm = float(step + 1) ** search.length_penalty  # generated tokens including EOS
        finished = outcome.finish(active, cand, trie.terminal_group(cand.child), norm)
        live = _LiveBeams.of(cand, search.beams)
        outcome.record(active, step, live, cand)
        still = _still_searching(finished, live, norm)  # [A]
        if step + 1 >= search.max_steps or not bool(still.any()):
            break
        if search.synced:
            _others_still_working(True, device)  # pairs with the flag of ranks that are done
        keep = still.nonzero().squeeze(1)  # [A'] local indices of users that go on
        rows = (keep[:, None] * beam_scores.shape[1] + live.parent[keep]).reshape(-1)  # [A'*B] cache rows
        users_left = None if keep.numel() == active.numel() else keep
        active, beam_scores, beam_states = active[keep], live.scores[keep], live.states[keep]
        logits = cache.decode(rows, users_left, live.token[keep])
