"""Training-step cost of S-DPO (K = 1, 3) against BEAR, and the one-off reference pass, side by side.

Same model, catalog and prompts as `benchmarks/train_step.py`. A BEAR step trains on B examples
(B sequences); an S-DPO step on the same B examples trains on B x (1 + K) sequences (the positive
and K random catalog negatives, sharing the prompt), through the chunked head with the trie mask,
against stored reference log-probabilities. The reference pass is the no-grad forward that
computes those log-probabilities once before training (`bear_ds.training.preference_pairs`); its cost
per example is printed next to the training step's, so pass / (one epoch of training) is their ratio.
Rounds interleave the methods so machine load hits all alike; medians are printed.

    OMP_NUM_THREADS=2 python benchmarks/preference_step.py               # CPU: small Llama
    python benchmarks/preference_step.py --device cuda --dtype bf16 --hidden 2048 --layers 16 --heads 32 \\
        --kv-heads 8 --intermediate 8192 --tie --vocab 128256 --micro-batch 8 --seq-len 512
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import add_model_arguments, llama_config, pad_rows, random_catalog  # noqa: E402

from bear_ds.config import LossConfig  # noqa: E402
from bear_ds.losses import (  # noqa: E402
    backbone_hidden_states,
    lm_head_context,
    preference_loss,
    response_loss,
    response_rows,
    select_response,
    sequence_logps,
    token_logps,
)
from bear_ds.trie import TokenTrie  # noqa: E402


def pair_batch(prompts: list[list[int]], items: list[list[list[int]]]) -> dict[str, torch.Tensor]:
    """Sequences prompt_i + item_ij at row i * (1 + K) + j (`train_step.pad_rows`)."""
    return pad_rows([(p, t) for p, ts in zip(prompts, items, strict=True) for t in ts])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--items", type=int, default=5000)
    p.add_argument("--title-len", type=int, default=14)
    p.add_argument("--seq-len", type=int, default=256, help="tokens per example (prompt + response)")
    p.add_argument("--micro-batch", type=int, default=8, help="examples per step")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--negatives", type=int, nargs="+", default=[1, 3])
    p.add_argument("--chunk-size", type=int, default=1024)
    args = p.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    titles = random_catalog(args.items, args.vocab, args.title_len, 2, gen)
    trie = TokenTrie.from_sequences(titles, args.vocab).to(device)
    kmax = max(args.negatives)
    pick = lambda: titles[int(torch.randint(0, len(titles), (1,), generator=gen))]  # noqa: E731
    examples = []
    for _ in range(args.micro_batch):
        items = [pick() for _ in range(1 + kmax)]
        examples.append((torch.randint(3, args.vocab, (args.seq_len - len(items[0]),), generator=gen).tolist(), items))
    config = llama_config(args, max(args.seq_len + 64, 512))
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    prompts = [e[0] for e in examples]
    bear_batch = {k: v.to(device) for k, v in pair_batch(prompts, [e[1][:1] for e in examples]).items()}
    pair_batches = {
        k: {n: v.to(device) for n, v in pair_batch(prompts, [e[1][: 1 + k] for e in examples]).items()}
        for k in args.negatives
    }
    bear_cfg = LossConfig(name="bear", chunk_size=args.chunk_size)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step(batch: dict[str, torch.Tensor], k: int | None) -> float:
        sync()
        start = time.perf_counter()
        hidden = backbone_hidden_states(model, batch["input_ids"], batch["attention_mask"])
        h, y, s = select_response(hidden, batch["labels"], trie)
        with lm_head_context(model) as head:
            if k is None:
                loss = response_loss(h, head, y, s, trie, bear_cfg).loss
            else:
                cfg = LossConfig(name="sdpo", num_negatives=k, chunk_size=args.chunk_size)
                ref = torch.zeros(args.micro_batch, 1 + k, device=device)  # stored values: a lookup in training
                loss = preference_loss(h, head, y, s, response_rows(batch["labels"]), ref, trie, cfg).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start

    def reference_pass(batch: dict[str, torch.Tensor], k: int) -> float:
        """What the one-off pass does per micro-batch: a no-grad forward and the item log-probabilities."""
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            hidden = backbone_hidden_states(model, batch["input_ids"], batch["attention_mask"])
            h, y, s = select_response(hidden, batch["labels"], trie)
            with lm_head_context(model) as head:
                logp, _, _ = token_logps(h, head, y, s, trie, masked=True, chunk_size=args.chunk_size)
            sequence_logps(logp, response_rows(batch["labels"]), args.micro_batch * (1 + k))
        sync()
        return time.perf_counter() - start

    methods: dict[str, tuple] = {"bear": (train_step, bear_batch, None)}
    for k in args.negatives:
        methods[f"sdpo K={k}"] = (train_step, pair_batches[k], k)
        methods[f"ref pass K={k}"] = (reference_pass, pair_batches[k], k)
    for fn, batch, k in methods.values():  # warm-up
        fn(batch, k)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, (fn, batch, k) in methods.items():
            times[name].append(fn(batch, k))
    median = {name: statistics.median(ts) for name, ts in times.items()}
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    n_params = sum(q.numel() for q in model.parameters())
    print(f"device {card}, {n_params / 1e6:.1f}M params, {args.dtype}, vocab {args.vocab}, {args.micro_batch} examples "
          f"x {args.seq_len} tokens per step, {len(titles)} titles, {args.rounds} rounds (medians)")  # fmt: skip
    print(f"{'method':>12} | {'sequences':>9} | {'median s':>9} | {'x BEAR step':>11}")
    for name, (_, batch, _) in methods.items():
        print(
            f"{name:>12} | {batch['input_ids'].shape[0]:9d} | {median[name]:9.4f} | {median[name] / median['bear']:11.2f}"
        )
    for k in args.negatives:
        ratio = median[f"ref pass K={k}"] / median[f"sdpo K={k}"]
        print(f"K={k}: the reference pass costs {ratio:.2f} of an S-DPO training epoch (per example: pass / step)")


if __name__ == "__main__":
    main()
