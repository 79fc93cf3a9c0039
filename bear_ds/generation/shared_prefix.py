"""A KV cache for many decoding rows that share a prompt: the prompt's keys/values are stored once
per prompt, each row holds only the tokens it generated, and one attention function reads both.

Use: `cache = shared_prefix_cache(prompt_cache, attention_mask, model)` (None where the model or
its cache does not allow it); before each forward choose the rows it continues (`reorder_rows`, or
`restore_generated` with a part saved by `generated_part`); run it with `shared_prefix_forward`.

Built on transformers' cache classes (`DynamicCache`, `DynamicLayer`) and its attention interface
(`AttentionInterface`, the model config's `_attn_implementation`); what depends on their private
parts is here, not in the beam search (`bear_ds.generation.beam`) nor in the exhaustive analysis
(`bear_ds.evaluation.exhaustive`), which use this module's functions.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache, DynamicLayer

SHARED_PREFIX_ATTENTION = "bear_ds_shared_prefix"


class SharedPrefixLayer(DynamicLayer):
    """One layer's KV cache for many decoding rows that share a prompt: the prompt's keys/values are
    stored once per prompt ([P, kv_heads, Lp, head_dim]); each row only holds the tokens it generated
    ([R, kv_heads, t, head_dim], R = P * rows_per_prompt, the rows of prompt p consecutive).

    Why: with the prompt copied into every beam, each decoding step reads B copies of it (attention
    on CPU and GPU is memory-bound at one query token), and reordering beams copies it again.
    Attention over the shared part is then one matrix product per prompt with all its rows as
    queries (`shared_prefix_attention`); `update` returns the generated part only, so this cache
    needs that attention function (`decoding_with_shared_prefix` switches the model to it).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.prefix_keys, self.prefix_values = keys, values  # [P, Hkv, Lp, D]
        self.prefix_bias = bias  # [P, 1, 1, Lp] 0 on real tokens, a large negative number on padding
        self.keys = keys.new_empty(0, keys.shape[1], 0, keys.shape[3])  # [R, Hkv, t, D] generated part
        self.values = self.keys
        self.pending_rows: torch.Tensor | None = None
        self.attended = False
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.pending_rows is not None:  # the reorder asked for by `select`, fused with the append
            rows, self.pending_rows = self.pending_rows, None
            if self.keys.shape[2] == 0:
                self.keys = self.keys.new_empty(rows.numel(), *self.keys.shape[1:])
                self.values = self.keys
            else:
                self.keys, self.values = self.keys.index_select(0, rows), self.values.index_select(0, rows)
        if self.keys.shape[0] != key_states.shape[0]:
            raise RuntimeError(f"shared-prefix cache holds {self.keys.shape[0]} rows, got {key_states.shape[0]}")
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.attended = False
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.prefix_keys.shape[2] + self.keys.shape[2]

    def select(self, rows: torch.Tensor, prompts: torch.Tensor | None) -> None:
        """Row r of the new cache = row rows[r] of the old; `prompts`: the prompts kept (None: all)."""
        self.pending_rows = rows
        if prompts is not None:
            self.prefix_keys = self.prefix_keys.index_select(0, prompts)
            self.prefix_values = self.prefix_values.index_select(0, prompts)
            self.prefix_bias = self.prefix_bias.index_select(0, prompts)


def shared_prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    shared_prefix_cache: DynamicCache | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of one new token per row over [its prompt's shared keys, its own generated keys].

    query [R, Hq, 1, D]; key/value [R, Hkv, t, D] (the generated part, the new token included).
    The model's `attention_mask` is unused: padding is in the prompt part only (`prefix_bias`).
    Returns ([R, 1, Hq, D], None) like the other Hugging Face attention functions.
    """
    if shared_prefix_cache is None:
        raise RuntimeError(
            f"{SHARED_PREFIX_ATTENTION} attention needs the `shared_prefix_cache` forward argument; "
            f"{type(module).__name__} did not pass it through"
        )
    layer = shared_prefix_cache.layers[module.layer_idx]
    rows, q_heads, q_len, dim = query.shape
    if q_len != 1:
        raise RuntimeError(f"shared-prefix attention decodes one token per row, got {q_len}")
    prompts, kv_heads, prefix_len, _ = layer.prefix_keys.shape
    groups, per_prompt = q_heads // kv_heads, rows // prompts
    # prompt part: all rows (and query heads sharing a kv head) of a prompt are one matmul's queries
    q_shared = query.view(prompts, per_prompt, kv_heads, groups, dim).transpose(1, 2)  # [P, Hkv, Rp, G, D]
    q_shared = q_shared.reshape(prompts, kv_heads, per_prompt * groups, dim)
    s_prefix = torch.matmul(q_shared, layer.prefix_keys.transpose(-1, -2)) * scaling  # [P, Hkv, Rp*G, Lp]
    s_prefix = s_prefix + layer.prefix_bias
    s_prefix = s_prefix.view(prompts, kv_heads, per_prompt, groups, prefix_len).transpose(1, 2)
    s_prefix = s_prefix.reshape(rows, kv_heads, groups, prefix_len)  # [R, Hkv, G, Lp]
    q_rows = query.view(rows, kv_heads, groups, dim)
    s_gen = torch.matmul(q_rows, key.transpose(-1, -2)) * scaling  # [R, Hkv, G, t]
    probs = torch.softmax(torch.cat([s_prefix, s_gen], dim=-1), dim=-1, dtype=torch.float32).to(query.dtype)
    p_prefix = probs[..., :prefix_len].reshape(prompts, per_prompt, kv_heads, groups, prefix_len)
    p_prefix = p_prefix.transpose(1, 2).reshape(prompts, kv_heads, per_prompt * groups, prefix_len)
    out = torch.matmul(p_prefix, layer.prefix_values)  # [P, Hkv, Rp*G, D]
    out = out.view(prompts, kv_heads, per_prompt, groups, dim).transpose(1, 2).reshape(rows, kv_heads, groups, dim)
    out = out + torch.matmul(probs[..., prefix_len:], value)  # [R, Hkv, G, D]
    layer.attended = True
    return out.reshape(rows, 1, q_heads, dim), None


def shared_prefix_cache(prompt_cache, attention_mask: torch.Tensor, model: torch.nn.Module) -> DynamicCache | None:
    """A `SharedPrefixLayer` cache over a prompt cache [P, ..., Lp, ...] (left padding given by
    `attention_mask` [P, Lp]); None when the model or its cache does not allow it (then callers
    copy the prompt per row with the cache's own `reorder_cache`)."""
    if not getattr(model, "_supports_attention_backend", False):
        return None
    if type(prompt_cache) is not DynamicCache or any(type(layer) is not DynamicLayer for layer in prompt_cache.layers):
        return None
    dtype = prompt_cache.layers[0].keys.dtype
    bias = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    bias = bias.masked_fill(attention_mask == 0, torch.finfo(dtype).min)[:, None, None, :]  # [P, 1, 1, Lp]
    cache = DynamicCache()
    cache.layers = [SharedPrefixLayer(layer.keys, layer.values, bias) for layer in prompt_cache.layers]
    return cache


class decoding_with_shared_prefix:  # noqa: N801 (a context manager, used like a function)
    """Within the block, `model` attends with `shared_prefix_attention` (its config is restored after).

    The attention function is registered with transformers for the block only (not at import): an
    entry already registered under the name (e.g. by a test) is used and left in place.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.config = model.config

    def __enter__(self) -> None:
        self.registered = SHARED_PREFIX_ATTENTION not in AttentionInterface._global_mapping
        if self.registered:
            AttentionInterface.register(SHARED_PREFIX_ATTENTION, shared_prefix_attention)
        self.saved = self.config._attn_implementation
        self.config._attn_implementation = SHARED_PREFIX_ATTENTION

    def __exit__(self, *exc) -> None:
        self.config._attn_implementation = self.saved
        if self.registered:
            AttentionInterface._global_mapping.pop(SHARED_PREFIX_ATTENTION, None)


def check_shared_prefix_used(cache: DynamicCache, model: torch.nn.Module) -> None:
    """Raise if a forward bypassed `shared_prefix_attention` (its result would ignore the prompt)."""
    if not all(layer.attended for layer in cache.layers):
        raise RuntimeError(
            f"{type(model).__name__} did not call the registered attention function in every layer; "
            "shared-prefix decoding is not possible for it"
        )


GeneratedPart = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [R, Hkv, t, D]


def reorder_rows(cache: DynamicCache, rows: torch.Tensor, prompts: torch.Tensor | None = None) -> None:
    """Row r of the next forward's cache = row rows[r] of the current one; `prompts`: the prompts
    kept, in order (None: all). The rows are gathered with the next forward's append."""
    for layer in cache.layers:
        layer.select(rows, prompts)


def generated_part(cache: DynamicCache) -> GeneratedPart:
    """The keys/values the rows generated so far (the prompts' part is not included), per layer."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def restore_generated(cache: DynamicCache, part: GeneratedPart, rows: torch.Tensor) -> None:
    """Continue from a saved `generated_part`: row r of the next forward's cache = its row rows[r]."""
    for layer, (keys, values) in zip(cache.layers, part, strict=True):
        layer.keys, layer.values = keys, values
    reorder_rows(cache, rows)


def shared_prefix_forward(
    model: torch.nn.Module, cache: DynamicCache, input_ids: torch.Tensor, position_ids: torch.Tensor, **model_kwargs
):
    """One decoding forward of every row ([R, 1] tokens at their positions) over `cache`; returns
    the model's output (`model_kwargs`: more forward arguments, e.g. output_hidden_states). Raises
    if the model bypassed the shared-prefix attention in some layer."""
    with decoding_with_shared_prefix(model):
        out = model(
            input_ids=input_ids,
            position_ids=position_ids,
            past_key_values=cache,
            shared_prefix_cache=cache,
            use_cache=True,
            **model_kwargs,
        )
    check_shared_prefix_used(cache, model)
    return out
