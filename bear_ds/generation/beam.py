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

Only the decoding-step loop is Python; users done early are dropped from the batch (and the cache).
With `synced=True` (ZeRO-3 partitioned weights) every rank runs the same number of forwards: a
"still working" flag is all-reduced each step and finished ranks run dummy forwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

from bear_ds.trie import INVALID, TokenTrie

NEG_INF = float("-inf")


@dataclass
class BeamResult:
    """Per user: finished trie items best first.

    groups: int64 [U, B] trie terminal ids (-1 where fewer than B items finished).
    scores: float32 [U, B] sum log p / length ** length_penalty (-inf where group is -1).
    steps:  int64 [U] decoding steps run for each user.
    live_states: with `return_trace`, one int64 [U, B] tensor per step: the trie state of each live
        beam after that step's selection (-1 for dead beams and users already stopped).
    """

    groups: torch.Tensor
    scores: torch.Tensor
    steps: torch.Tensor
    live_states: list[torch.Tensor] | None = field(default=None)


def next_token_log_probs(logits: torch.Tensor, states: torch.Tensor, trie: TokenTrie, mask: str) -> torch.Tensor:
    """Log-probs of the next token restricted to trie-valid continuations; -inf elsewhere.

    logits [N, V] (any float dtype), states [N] trie states -> float32 [N, V].
    mask="after": log_softmax over V, then restrict; "before": restrict, then log_softmax.
    States with no valid continuation (INVALID) give an all -inf row.
    """
    logits = logits.float()
    allowed = trie.allowed_mask(states, logits.shape[-1])  # [N, V]
    if mask == "after":
        return F.log_softmax(logits, dim=-1).masked_fill(~allowed, NEG_INF)
    if mask == "before":
        restricted = logits.masked_fill(~allowed, NEG_INF)
        lse = torch.logsumexp(restricted, dim=-1, keepdim=True)  # [N, 1], -inf on empty rows
        return torch.where(allowed, restricted - lse, torch.full_like(restricted, NEG_INF))
    raise ValueError(f"mask must be 'after' or 'before', got {mask!r}")


class _BeamLayer(DynamicLayer):
    """One layer's KV cache in a preallocated [rows, heads, prompt + max_steps, head_dim] buffer.

    Why: HF's DynamicLayer concatenates the whole cache at every step and beam reordering copies it
    again, so each step moves the prompt's keys/values of every beam twice. Here a new token is
    written in place, and reordering beams of the same users moves only the generated positions
    (a user's beams share the prompt part); the whole buffer is re-indexed only when users leave.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        super().__init__()
        rows, heads, length, dim = keys.shape
        self.kbuf = keys.new_empty(rows, heads, capacity, dim)
        self.vbuf = values.new_empty(rows, heads, capacity, dim)
        self.kbuf[:, :, :length] = keys
        self.vbuf[:, :, :length] = values
        self.prompt_len = self.length = length
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._views()

    def _views(self) -> None:
        self.keys = self.kbuf[:, :, : self.length]
        self.values = self.vbuf[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[-2]
        if self.length + n > self.kbuf.shape[2]:
            raise RuntimeError(f"beam cache full: {self.length} + {n} > {self.kbuf.shape[2]} positions")
        self.kbuf[:, :, self.length : self.length + n] = key_states
        self.vbuf[:, :, self.length : self.length + n] = value_states
        self.length += n
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def select_rows(self, rows: torch.Tensor, same_users: bool) -> None:
        """Row r of the new cache = row rows[r] of the old; `same_users`: row r keeps its user."""
        if same_users:
            gen = slice(self.prompt_len, self.length)
            self.kbuf[:, :, gen] = self.kbuf[rows, :, gen]
            self.vbuf[:, :, gen] = self.vbuf[rows, :, gen]
        else:
            self.kbuf = self.kbuf.index_select(0, rows)
            self.vbuf = self.vbuf.index_select(0, rows)
        self._views()


def _beam_cache(prompt_cache, rows: torch.Tensor, capacity: int):
    """A cache of `rows` copies of prompt rows in preallocated buffers; None if the model's cache is
    not a plain DynamicCache (then the generic `reorder_cache` path is used)."""
    if type(prompt_cache) is not DynamicCache or any(type(layer) is not DynamicLayer for layer in prompt_cache.layers):
        return None
    cache = DynamicCache()
    cache.layers = [
        _BeamLayer(layer.keys.index_select(0, rows), layer.values.index_select(0, rows), capacity)
        for layer in prompt_cache.layers
    ]
    return cache


def _left_pad_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    # position ids as HF computes them for left padding: real tokens count 0.., pads get 1 (masked anyway)
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def _others_still_working(working: bool, device: torch.device) -> bool:
    """All-reduce (MAX) of this rank's flag: True while any rank still has decoding to do."""
    import torch.distributed as dist

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
    if mask not in ("after", "before"):
        raise ValueError(f"mask must be 'after' or 'before', got {mask!r}")
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
) -> BeamResult:
    """Beam search of width `num_beams` over the titles in `trie`, for U left-padded prompts at once.

    input_ids, attention_mask: [U, L] left-padded. `max_new_tokens` defaults to `trie.max_depth`
    (a smaller value makes longer titles unreachable). Returns `BeamResult` (see its docstring).
    With `synced=True` every rank of the default process group must call this the same number of
    times (U may be 0 on a rank that has run out of users).
    """
    _validate(input_ids, attention_mask, trie, num_beams, eos_token_id, mask, length_penalty, max_new_tokens)
    device = input_ids.device
    if trie.device != device:
        trie = trie.to(device)
    num_users = input_ids.shape[0]
    beams = num_beams
    max_steps = trie.max_depth if max_new_tokens is None else min(max_new_tokens, trie.max_depth)

    fin_scores = torch.full((num_users, beams), NEG_INF, dtype=torch.float32, device=device)
    fin_groups = torch.full((num_users, beams), INVALID, dtype=torch.int64, device=device)
    steps_run = torch.zeros(num_users, dtype=torch.int64, device=device)
    trace: list[torch.Tensor] | None = [] if return_trace else None

    if num_users == 0:
        if synced:
            _dummy_forward(model, device)  # the prefill every other rank runs
            while _others_still_working(False, device):
                _dummy_forward(model, device)
        return BeamResult(fin_groups, fin_scores, steps_run, trace)

    # prefill: each prompt encoded once; beams are created from its cache after the first step
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=_left_pad_positions(attention_mask),
        use_cache=True,
    )
    logits = out.logits[:, -1, :]  # [U, V]
    cache = out.past_key_values
    del out
    vocab = logits.shape[-1]
    if vocab < trie.vocab_size:
        raise ValueError(f"model vocabulary {vocab} is smaller than the trie vocabulary {trie.vocab_size}")

    active = torch.arange(num_users, device=device)  # [A] users still searching
    beam_scores = torch.zeros(num_users, 1, device=device)  # [A, Bc] (Bc = 1 before the first step)
    beam_states = torch.zeros(num_users, 1, dtype=torch.int64, device=device)  # root
    row_mask = attention_mask.long()  # [A*Bc, L+t] attention mask of each cache row
    row_pos = attention_mask.long().sum(-1)  # [A*Bc] position of the next token

    for step in range(max_steps):
        n_active, cur_beams = beam_scores.shape
        logp = next_token_log_probs(logits, beam_states.reshape(-1), trie, mask)  # [A*Bc, V]
        cand = (logp.view(n_active, cur_beams, vocab) + beam_scores[..., None]).view(n_active, cur_beams * vocab)
        n_cand = min(2 * beams, cur_beams * vocab)
        top_scores, top_idx = cand.topk(n_cand, dim=1)  # [A, 2B], best first
        parent = top_idx // vocab
        token = top_idx % vocab
        child = trie.advance(beam_states.gather(1, parent), token)  # [A, 2B]
        is_eos = torch.isfinite(top_scores) & (token == eos_token_id)

        # finished items: EOS candidates among the first B of the 2B (HF's top_num_beam_mask)
        length = float(step + 1)  # generated tokens including EOS
        rank = torch.arange(n_cand, device=device)[None, :]
        new_fin = is_eos & (rank < beams)
        new_scores = torch.where(new_fin, top_scores / length**length_penalty, NEG_INF)
        new_groups = torch.where(new_fin, trie.terminal_group(child), INVALID)
        merged_scores = torch.cat([fin_scores[active], new_scores], dim=1)  # [A, B + 2B]
        merged_groups = torch.cat([fin_groups[active], new_groups], dim=1)
        kept_scores, kept_idx = merged_scores.topk(beams, dim=1)
        fin_scores[active] = kept_scores
        fin_groups[active] = merged_groups.gather(1, kept_idx)

        # live beams: the B best non-EOS candidates
        run_scores = top_scores.masked_fill(is_eos, NEG_INF)
        n_live = min(beams, n_cand)
        live_scores, live_idx = run_scores.topk(n_live, dim=1)  # [A, B]
        live_parent = parent.gather(1, live_idx)
        live_token = token.gather(1, live_idx)
        live_states = torch.where(torch.isfinite(live_scores), child.gather(1, live_idx), INVALID)
        steps_run[active] = step + 1
        if trace is not None:
            snapshot = torch.full((num_users, beams), INVALID, dtype=torch.int64, device=device)
            snapshot[active, :n_live] = live_states
            trace.append(snapshot)

        # HF early_stopping=False heuristic: stop once B items are finished and the best live beam,
        # at the current length, cannot beat the worst of them
        all_filled = torch.isfinite(kept_scores).all(dim=1)
        best_live = live_scores[:, 0] / length**length_penalty
        can_improve = best_live > kept_scores[:, -1]
        still = torch.isfinite(live_scores[:, 0]) & ~(all_filled & ~can_improve)  # [A]

        if step + 1 >= max_steps or not bool(still.any()):
            break
        if synced:
            _others_still_working(True, device)  # pairs with the flag of ranks that are done

        keep = still.nonzero().squeeze(1)  # [A'] local indices of users that go on
        rows = (keep[:, None] * cur_beams + live_parent[keep]).reshape(-1)  # [A'*B] cache rows to copy
        if step == 0:
            beam_cache = _beam_cache(cache, rows, input_ids.shape[1] + max_steps)
            if beam_cache is None:
                cache.reorder_cache(rows)
            else:
                cache = beam_cache
        elif isinstance(cache.layers[0], _BeamLayer):
            same_users = keep.numel() == n_active
            for layer in cache.layers:
                layer.select_rows(rows, same_users)
        else:
            cache.reorder_cache(rows)
        row_mask = torch.cat([row_mask[rows], row_mask.new_ones(rows.numel(), 1)], dim=1)
        row_pos = row_pos[rows]
        active = active[keep]
        beam_scores = live_scores[keep]
        beam_states = live_states[keep]
        out = model(
            input_ids=live_token[keep].reshape(-1, 1),
            attention_mask=row_mask,
            position_ids=row_pos[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        row_pos = row_pos + 1
        logits = out.logits[:, -1, :]
        cache = out.past_key_values
        del out

    if synced:
        # this rank finished its steps; keep serving forwards while other ranks decode
        while _others_still_working(False, device):
            _dummy_forward(model, device)
    return BeamResult(fin_groups, fin_scores, steps_run, trace)
