"""Model FLOPs utilisation of a training step: the FLOPs the step had to compute over what the
devices could have computed in its time.

FLOP count (PaLM, appendix B; nanoGPT's `estimate_mfu` uses the same 6N rule), per micro-batch:
- the transformer body: 2 x (forward) + 2 x (gradient of the inputs) FLOPs per weight and token,
  + 2 x (gradient of the weight) for trainable weights: 6N for a full fine-tune, 4N + 2N_trainable
  with LoRA; N = the body's parameters (input embeddings, a lookup, excluded), over the real
  (unpadded) tokens: padding is work the step did not need;
- causal attention, scores and values: 6 x layers x hidden FLOPs per token and per earlier token,
  i.e. 6 x layers x hidden x length^2 per example (12 x ... halved for the causal mask);
- the loss head: 6 x V x hidden per response position (4 x when the head is frozen), since only
  the response positions are projected to the vocabulary (`bear_ds/losses/head.py`).
Recomputation (activation checkpointing, the chunked head) is not counted: that is hardware FLOPs
utilisation, not model FLOPs utilisation.

Peak: `train.peak_flops` (FLOP/s per device) when set, else the dense bf16 peak of a known GPU
(`PEAK_BF16_FLOPS`, vendors' sheets, without sparsity) for a bf16 run; otherwise unknown (None), e.g. on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bear_ds.models import full_numel, unwrap_model

# dense bf16 tensor-core FLOP/s per device; the first name found in the device's name wins
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10", 125e12),
)


def peak_flops(device: torch.device, precision: str, override: float | None = None) -> float | None:
    """FLOP/s of one device for this run: `override` (train.peak_flops), else the table's bf16 peak
    of a known GPU in a bf16 run, else None (unknown: the MFU is left empty)."""
    if override is not None:
        return float(override)
    if device.type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


@dataclass(frozen=True)
class FlopModel:
    """What the FLOP count of a step needs to know about the model."""

    body_params: int  # transformer body parameters (embeddings and the lm_head excluded)
    body_trainable: int  # of those, the trainable ones
    layers: int
    hidden: int
    vocab: int
    head_trainable: bool

    @classmethod
    def of(cls, model: Any) -> FlopModel:
        """From a Hugging Face causal LM (a peft or DeepSpeed wrapper unwrapped first, or not)."""
        hf = unwrap_model(model)
        config = hf.config
        skip = {id(p) for m in (hf.get_input_embeddings(), hf.get_output_embeddings()) if m is not None
                for p in m.parameters()}  # fmt: skip
        body = [p for p in hf.parameters() if id(p) not in skip]
        head = hf.get_output_embeddings()
        return cls(
            body_params=sum(full_numel(p) for p in body),
            body_trainable=sum(full_numel(p) for p in body if p.requires_grad),
            layers=int(config.num_hidden_layers),
            hidden=int(config.hidden_size),
            vocab=int(config.vocab_size),
            head_trainable=head is not None and any(p.requires_grad for p in head.parameters()),
        )

    def step_flops(self, lengths: np.ndarray, response_positions: int) -> float:
        """Model FLOPs of examples of these real `lengths` with `response_positions` in all (module docstring)."""
        tokens = float(np.sum(lengths))
        body = (4 * self.body_params + 2 * self.body_trainable) * tokens
        attention = 6.0 * self.layers * self.hidden * float(np.sum(np.asarray(lengths, dtype=np.float64) ** 2))
        head = (6 if self.head_trainable else 4) * float(self.vocab) * self.hidden * response_positions
        return body + attention + head


def mfu(flops: float, seconds: float, world_size: int, peak: float | None) -> float | None:
    """The step's model FLOPs over what `world_size` devices of `peak` FLOP/s could do in `seconds`."""
    if peak is None or seconds <= 0:
        return None
    return flops / (seconds * world_size * peak)


def mean_mfu(records: Sequence[dict[str, Any]]) -> float | None:
    """Mean of the logged steps' MFU (None when none has one)."""
    values = [r["mfu"] for r in records if isinstance(r.get("mfu"), (int, float))]
    return sum(values) / len(values) if values else None


__all__ = ["PEAK_BF16_FLOPS", "FlopModel", "mean_mfu", "mfu", "peak_flops"]
