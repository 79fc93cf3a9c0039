"""Tiny inputs for the evaluator tests: random Llama, random trie, a prepared folder + model folder."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tiny_models import tiny_llama_kwargs
from transformers import LlamaConfig, LlamaForCausalLM

from bear_ds.trie import TokenTrie

PAD, BOS, EOS = 0, 1, 2


def tiny_llama(vocab_size: int, seed: int = 0, logit_scale: float = 8.0, max_positions: int = 256) -> LlamaForCausalLM:
    """A random 2-layer Llama; the output layer is scaled so next-token distributions are peaked
    (score gaps well above float32 noise, so rankings are not decided by rounding)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        **tiny_llama_kwargs(vocab_size, 32, num_attention_heads=4, max_position_embeddings=max_positions),
        tie_word_embeddings=False, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    return model


def random_titles(n: int, vocab_size: int, seed: int = 0, alphabet: int = 12, max_len: int = 7) -> list[list[int]]:
    """n distinct token sequences ending in EOS, over a small alphabet so that prefixes are shared."""
    rng = random.Random(seed)
    tokens = rng.sample(range(4, vocab_size), alphabet)
    seqs: set[tuple[int, ...]] = set()
    while len(seqs) < n:
        seqs.add(tuple(rng.choice(tokens) for _ in range(rng.randint(1, max_len))) + (EOS,))
    return [list(s) for s in sorted(seqs)]


def random_prompts(num_users: int, vocab_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts of unequal lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 12, (num_users,), generator=g)
    width = int(lengths.max())
    ids = torch.full((num_users, width), PAD)
    mask = torch.zeros(num_users, width, dtype=torch.long)
    for u in range(num_users):
        n = int(lengths[u])
        ids[u, width - n :] = torch.randint(4, vocab_size, (n,), generator=g)
        mask[u, width - n :] = 1
    return ids, mask


def hf_constrained_beam(model, input_ids, attention_mask, titles, *, num_beams, length_penalty=1.0, mask="after"):
    """Reference: transformers generate with a Python dict trie in prefix_allowed_tokens_fn (the
    released approach). Returns per user [(group, score)] best first, HF's -1e9 padding beams dropped."""
    allowed: dict[tuple[int, ...], set[int]] = {}
    for s in titles:
        for i in range(len(s)):
            allowed.setdefault(tuple(s[:i]), set()).add(s[i])
    allowed_lists = {k: sorted(v) for k, v in allowed.items()}
    group = {tuple(s): g for g, s in enumerate(titles)}
    width = input_ids.shape[1]

    def prefix_fn(batch_id, sent):
        return allowed_lists.get(tuple(sent[width:].tolist()), [EOS])

    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        num_beams=num_beams,
        num_return_sequences=num_beams,
        do_sample=False,
        prefix_allowed_tokens_fn=prefix_fn,
        max_new_tokens=max(len(s) for s in titles),
        length_penalty=length_penalty,
        early_stopping=False,
        renormalize_logits=mask == "before",
        return_dict_in_generate=True,
        output_scores=True,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    gen = out.sequences[:, width:].tolist()
    scores = out.sequences_scores.tolist()
    result = []
    for u in range(input_ids.shape[0]):
        row = []
        for b in range(num_beams):
            seq, score = gen[u * num_beams + b], scores[u * num_beams + b]
            if score < -1e7:  # HF's padding beams (started from the -1e9 copies)
                continue
            row.append((group[tuple(seq[: seq.index(EOS) + 1])], score))
        result.append(row)
    return result


def trie_of(titles: list[list[int]], vocab_size: int) -> TokenTrie:
    return TokenTrie.from_sequences(titles, vocab_size)


# ---------------------------------------------------------------------- end-to-end folders
WORDS = "red blue green pen paper stapler clip desk lamp ink folder marker tape box chair note pad binder".split()


def write_prepared(folder: Path, num_items: int = 30, num_users: int = 13, seed: int = 0) -> dict[str, str]:
    """A prepared dataset folder (the `bear-ds prepare` contract) with random office-like titles."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    titles: dict[str, str] = {}
    while len(titles) < num_items:
        t = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))).title()
        if t not in titles.values():
            titles[f"I{len(titles)}"] = t
    items = list(titles)
    pq.write_table(
        pa.table(
            {"item_id": items, "title": [titles[i] for i in items]},
            schema=pa.schema([("item_id", pa.string()), ("title", pa.string())]),
        ),
        folder / "catalog.parquet",
    )
    schema = pa.schema(
        [
            ("user_id", pa.string()),
            ("history", pa.list_(pa.string())),
            ("target", pa.string()),
            ("timestamp", pa.int64()),
        ]
    )
    for split in ("train", "valid", "test"):
        rows = {"user_id": [], "history": [], "target": [], "timestamp": []}
        for u in range(num_users):
            rows["user_id"].append(f"U{u}")
            rows["history"].append(rng.sample(items, rng.randint(1, 6)))
            rows["target"].append(rng.choice(items) if u != 3 else "NOT_IN_CATALOG")
            rows["timestamp"].append(1000 + u)
        pq.write_table(pa.table(rows, schema=schema), folder / f"{split}.parquet")
    (folder / "stats.json").write_text(json.dumps({"source": "test", "domain": "office", "users": num_users}))
    return titles


def write_model_folder(folder: Path, titles: dict[str, str], seed: int = 0) -> None:
    """A Hugging Face model folder: a BPE trained on the titles and a random tiny Llama (no catalog.json)."""
    from bear_ds.tokenization import train_bpe_tokenizer

    tok = train_bpe_tokenizer(list(titles.values()) * 3 + ["The user has used the following office products"], 400)
    model = tiny_llama(len(tok), seed=seed, logit_scale=4.0, max_positions=512)
    model.config.pad_token_id = tok.pad_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.config.bos_token_id = tok.bos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def folder_snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes under `folder` but a lock's (which names its last owner: train takes it
    before its launch checks), to check that a refused command changed nothing."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }
