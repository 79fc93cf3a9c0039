"""Keyword arguments of the random 2-layer Llama the unit tests build (CPU, milliseconds)."""

from __future__ import annotations

from typing import Any


def tiny_llama_kwargs(vocab_size: int, hidden_size: int = 16, **overrides: Any) -> dict[str, Any]:
    """For `LlamaConfig(**...)` (Qwen2Config takes the same); `overrides` win."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        **overrides,
    }
