"""Coupling of the loss head to a Hugging Face causal LM: hidden states without the lm_head, and
the lm_head's tensors (gathered once per step under ZeRO-3).

Use (one optimiser micro-step; backward INSIDE the context, because under ZeRO-3 the chunks'
recomputation in backward needs the gathered weight):

    hidden = backbone_hidden_states(model, input_ids, attention_mask)     # [B, L, H]
    h, y, s = select_response(hidden, labels, trie)                      # [N, H], [N], [N]
    with lm_head_context(model) as head:
        out = response_loss(h, head, y, s, trie, cfg.loss)
        accelerator.backward(out.loss)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from bear_ds.losses.head import LMHead
from bear_ds.models import is_zero3_partitioned, unwrap_model


def backbone_hidden_states(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Last hidden states [B, L, H] (after the final norm) through the model's own forward.

    `model` may be a plain *ForCausalLM, a PeftModel, a DDP wrapper or a DeepSpeed engine: the
    call goes through the wrapper on purpose. The engine's forward arms the backward prologue that
    ZeRO uses to accumulate gradients across micro-steps (calling the unwrapped backbone keeps only
    the last micro-step's gradient when accumulation > 1), and DDP's forward arms its reducer.
    `logits_to_keep=1` limits the output projection to one position ([B, 1, V]); the loss head
    projects only the response positions itself.
    """
    return backbone_forward(model, input_ids, attention_mask).hidden


@dataclass
class BackboneOutput:
    hidden: torch.Tensor  # [B, L, H] last hidden states (with gradient)
    prompt_logits: torch.Tensor | None = None  # [B, V] detached logits at `prompt_ends`
    cache: Any = None  # the model's KV cache of the whole rows (None when the model gave none)


def backbone_forward(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    prompt_ends: torch.Tensor | None = None,
) -> BackboneOutput:
    """`backbone_hidden_states`, plus (with `prompt_ends` [B], each row's last prompt position) the
    logits there and the KV cache of the same forward: what a beam search over the prompts starts
    from (beamsim), without encoding the prompts a second time. The logits at one position per row
    are the model's own (`logits_to_keep` as a [B, 1] index, so softcaps and scales apply)."""
    keep: int | torch.Tensor = 1 if prompt_ends is None else prompt_ends.long()[:, None]
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        output_hidden_states=True,
        logits_to_keep=keep,
        use_cache=prompt_ends is not None,
    )
    hidden = out.hidden_states[-1]  # transformers records the normed final output last
    if prompt_ends is None:
        return BackboneOutput(hidden)
    return BackboneOutput(hidden, out.logits[:, -1, :].detach(), getattr(out, "past_key_values", None))


def _output_projection(model: torch.nn.Module) -> torch.nn.Module:
    proj = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if proj is None:
        raise TypeError(f"{type(model).__name__} has no output embeddings (lm_head)")
    if hasattr(proj, "base_layer"):  # peft wraps adapted modules; only the plain lm_head is supported
        if getattr(proj, "merged", False) or not getattr(proj, "active_adapters", None):
            return proj.base_layer
        raise ValueError(
            "the lm_head carries an active LoRA adapter (lora.target_modules includes it): the loss head "
            "reads the plain weight; remove lm_head from lora.target_modules"
        )
    if hasattr(proj, "original_module") and hasattr(proj, "modules_to_save"):  # peft ModulesToSaveWrapper
        active = getattr(proj, "active_adapter", None)
        active = active[0] if isinstance(active, (list, tuple)) else active
        return proj.modules_to_save[active] if active in proj.modules_to_save else proj.original_module
    if not isinstance(getattr(proj, "weight", None), torch.Tensor):
        raise TypeError(f"the output projection {type(proj).__name__} has no weight tensor")
    return proj


def logit_transform(config: Any) -> tuple[float, float | None]:
    """(scale, softcap) applied after the output projection, read from the model config.

    Cohere: logits * logit_scale; Granite: logits / logits_scaling; Gemma-2/3:
    cap * tanh(logits / cap) with cap = final_logit_softcapping. Defaults: (1.0, None).
    """
    scale = 1.0
    logit_scale = getattr(config, "logit_scale", None)
    if isinstance(logit_scale, (int, float)) and not isinstance(logit_scale, bool):
        scale *= float(logit_scale)
    logits_scaling = getattr(config, "logits_scaling", None)
    if isinstance(logits_scaling, (int, float)) and not isinstance(logits_scaling, bool) and logits_scaling != 0:
        scale /= float(logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    softcap = float(softcap) if isinstance(softcap, (int, float)) and softcap else None
    return scale, softcap


@contextlib.contextmanager
def lm_head_context(model: Any) -> Iterator[LMHead]:
    """Yield the output projection as an `LMHead` (weight [V, H], bias, scale, softcap).

    Under ZeRO-3 the weight (tied to the input embeddings or not) is partitioned: it is gathered
    here once, on every rank (`deepspeed.zero.GatheredParameters(modifier_rank=None)`), and
    partitioned again on exit; every rank must enter the context once per micro-step, whatever
    its number of response tokens. Run the backward inside the context. Without ZeRO-3 it is a
    no-op. deepspeed is imported only when the parameters are partitioned.
    """
    hf_model = unwrap_model(model)
    proj = _output_projection(hf_model)
    weight = proj.weight
    bias = getattr(proj, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    scale, softcap = logit_transform(getattr(hf_model, "config", None))
    params = [p for p in (weight, bias) if p is not None]
    if is_zero3_partitioned(params):
        import deepspeed  # deferred: DeepSpeed is heavy and needed under ZeRO-3 only

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield LMHead(weight, bias, scale, softcap)
    else:
        yield LMHead(weight, bias, scale, softcap)
