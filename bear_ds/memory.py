"""Per-GPU training memory estimates (docs/scaling.md), and what they decide: activation
checkpointing under `model.gradient_checkpointing=auto`, and ZeRO's "auto" bucket sizes.

Model states, bytes per GPU (the formulas of DeepSpeed's `estimate_zero2_model_states_mem_needs` /
`estimate_zero3_model_states_mem_needs`, which `launchers/estimate_memory.py` prints as tables; a
test checks they agree):
- full fine-tune, ZeRO-2: 2P + 18P/world; ZeRO-3: 4 x largest layer + 18P/world; stage 0 (no
  DeepSpeed: fp32 weights, gradients and AdamW moments): 16P;
- LoRA with A adapter parameters: ZeRO-2 2P + 2A + 16A/world; ZeRO-3 2P/world + 2 x largest +
  16A/world; stage 0 (fp32 frozen weights) 4P + 16A.
Activations (Korthikanti et al. 2022, flash/SDPA attention, bf16): 34 x B x L x H bytes per layer;
with checkpointing each layer keeps its input (2 x B x L x H) plus one layer's activations during
its recomputation. Read as lower bounds: the decision adds 25% to the activations (docs/scaling.md
measured 23.4 GB against 19 GB estimated on an H100). The loss head: three fp32 [C, V] blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

ACTIVATION_BYTES_PER_LAYER = 34  # x B x L x H, bf16
CHECKPOINTED_BYTES_PER_LAYER = 2  # x B x L x H: the layer's input
ACTIVATION_MARGIN = 1.25


@dataclass(frozen=True)
class TrainingShape:
    """What the memory of a training step depends on."""

    params: int  # all parameters
    trainable: int  # trainable parameters (all of them in a full fine-tune, the adapters with LoRA)
    largest_layer: int  # parameters of the largest single tensor (usually the embedding matrix)
    hidden: int
    layers: int
    vocab: int
    micro_batch: int
    seq_len: int  # the longest training example, in tokens
    zero_stage: int  # 0 (no DeepSpeed), 2 or 3
    world_size: int
    chunk_size: int = 1024  # loss.chunk_size


def model_states_bytes(shape: TrainingShape) -> float:
    """Weights, gradients and optimiser states per GPU (module docstring)."""
    p, a, world = shape.params, shape.trainable, shape.world_size
    if a >= p:  # full fine-tune
        return {0: 16.0 * p, 2: 2.0 * p + 18.0 * p / world, 3: 4.0 * shape.largest_layer + 18.0 * p / world}[
            shape.zero_stage
        ]
    return {
        0: 4.0 * p + 16.0 * a,
        2: 2.0 * p + 2.0 * a + 16.0 * a / world,
        3: 2.0 * p / world + 2.0 * shape.largest_layer + 16.0 * a / world,
    }[shape.zero_stage]


def activation_bytes(shape: TrainingShape, checkpointing: bool) -> float:
    """Activations of one micro-batch kept for the backward (module docstring)."""
    per_layer = float(shape.micro_batch) * shape.seq_len * shape.hidden
    if checkpointing:
        return (CHECKPOINTED_BYTES_PER_LAYER * shape.layers + ACTIVATION_BYTES_PER_LAYER) * per_layer
    return ACTIVATION_BYTES_PER_LAYER * shape.layers * per_layer


def head_bytes(shape: TrainingShape) -> float:
    """The chunked loss head: logits, softmax and gradient of one fp32 [C, V] chunk."""
    return 3.0 * 4 * min(shape.chunk_size, shape.micro_batch * shape.seq_len) * shape.vocab


def checkpointing_needed(shape: TrainingShape, device_bytes: float | None) -> bool:
    """`model.gradient_checkpointing=auto`: on when the states, the head and the activations kept
    without checkpointing (plus 25%) would not fit `device_bytes`; off when they fit, or on a CPU
    (`device_bytes` None: host memory is not the limit checkpointing relieves)."""
    if device_bytes is None:
        return False
    need = model_states_bytes(shape) + head_bytes(shape) + ACTIVATION_MARGIN * activation_bytes(shape, False)
    return need > device_bytes


def zero_bucket_sizes(hidden: int | None) -> dict[str, int | float]:
    """ZeRO's "auto" bucket sizes, filled from the hidden size as Accelerate's DeepSpeed integration
    fills them (reduce_bucket_size = h*h, stage3_prefetch_bucket_size = 0.9*h*h,
    stage3_param_persistence_threshold = 10*h); an unknown hidden size (a GGUF model, converted
    later) keeps the fixed sizes the shipped configs held before (5e8, 5e8, 1e5)."""
    if hidden is None:
        return {
            "reduce_bucket_size": 5e8,
            "stage3_prefetch_bucket_size": 5e8,
            "stage3_param_persistence_threshold": 1e5,
        }
    return {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }


__all__ = [
    "TrainingShape",
    "activation_bytes",
    "checkpointing_needed",
    "head_bytes",
    "model_states_bytes",
    "zero_bucket_sizes",
]
