"""The consolidated export: a plain Hugging Face model folder any `from_pretrained` can load.

Under ZeRO-3 no rank holds the whole model; `accelerator.get_state_dict` gathers it (collective,
`stage3_gather_16bit_weights_on_model_save` must be on) and returns the full state on rank 0.
The weights keep the training dtype: bf16 runs export bf16 ("16-bit"), fp32 runs (CPU tests)
export fp32; `export_info.json` records which.

LoRA: `model.lora.export=merged` folds each adapter into its base weight on rank 0,
W <- W + scaling * B @ A (scaling = alpha / r, as peft's merge), and saves a plain model;
`adapter` does the same (so that `bear-ds evaluate` and `analyze` load the folder like any other)
and also saves the peft adapter in `adapter/` (adapter_config.json + weights, for use with peft on
top of the base model).

The folder is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from bear_ds.config import Config, save_config
from bear_ds.models import unwrap_model

PEFT_PREFIX = "base_model.model."


def merge_lora_state_dict(state_dict: dict[str, torch.Tensor], scalings: dict[str, float]) -> dict[str, torch.Tensor]:
    """peft state dict (full, with lora_A/lora_B/base_layer keys) -> the merged base model's state dict.

    scalings: module path (as in the state dict, without the adapter name) -> alpha / r.
    """
    merged: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if ".lora_A." in key or ".lora_B." in key or ".lora_dropout" in key:
            continue
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        merged[name.replace(".base_layer.", ".")] = value
    for module, scaling in scalings.items():
        a_key = next((k for k in state_dict if k.startswith(f"{module}.lora_A.") and k.endswith(".weight")), None)
        b_key = next((k for k in state_dict if k.startswith(f"{module}.lora_B.") and k.endswith(".weight")), None)
        if a_key is None or b_key is None:
            raise KeyError(f"LoRA weights of {module} are missing from the consolidated state dict")
        base_name = module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module
        weight = merged[f"{base_name}.weight"]
        lora_a = state_dict[a_key].float()  # [r, in]
        lora_b = state_dict[b_key].float()  # [out, r]
        merged[f"{base_name}.weight"] = (weight.float() + scaling * (lora_b @ lora_a)).to(weight.dtype)  # [out, in]
    return merged


def _lora_scalings(peft_model) -> dict[str, float]:
    from peft.tuners.lora import LoraLayer  # deferred: peft is needed with model.lora only

    scalings = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            adapter = module.active_adapters[0]
            scalings[name] = float(module.scaling[adapter])
    return scalings


def _replace_folder(tmp: Path, final: Path) -> None:
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def export_model(
    accelerator, model, folder: str | Path, *, tokenizer, catalog, cfg: Config, extra: dict[str, Any] | None = None
) -> Path:
    """Collective: write the consolidated model, tokenizer, catalog.json and config.yaml to `folder`."""
    folder = Path(folder)
    state_dict = accelerator.get_state_dict(model)  # every rank takes part; full dict on rank 0
    if accelerator.is_main_process:
        unwrapped = unwrap_model(model, keep_peft=True)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        is_peft = hasattr(unwrapped, "peft_config")
        export_kind = "full"
        if is_peft and cfg.model.lora.export == "adapter":
            # peft filters the adapter weights out of the full state dict; a copy: save may consume it
            unwrapped.save_pretrained(tmp / "adapter", state_dict=dict(state_dict))
        if is_peft:
            state_dict = merge_lora_state_dict(state_dict, _lora_scalings(unwrapped))
            base = unwrapped.get_base_model()
            export_kind = "lora_merged+adapter" if cfg.model.lora.export == "adapter" else "lora_merged"
        else:
            base = unwrapped
        # transformers 5.x save_pretrained(state_dict=...) empties the dict it is given: pass a copy
        base.save_pretrained(tmp, state_dict=dict(state_dict), safe_serialization=True)
        dtypes = sorted({str(t.dtype).replace("torch.", "") for t in state_dict.values() if t.is_floating_point()})
        tokenizer.save_pretrained(tmp)
        catalog.save(tmp)
        save_config(cfg, tmp)
        info = {"kind": export_kind, "dtype": dtypes, **(extra or {})}
        (tmp / "export_info.json").write_text(json.dumps(info, indent=1))
        _replace_folder(tmp, folder)
    accelerator.wait_for_everyone()
    return folder
