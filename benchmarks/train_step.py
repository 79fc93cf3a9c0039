"""Whole training-step cost of LML vs MSL vs BEAR vs beamsim, measured side by side in one process.

One optimiser step = backbone forward (hidden states only) -> response positions -> chunked loss
head (trie-masked for MSL/BEAR) -> backward -> AdamW step, on the same random batches for every
loss, interleaved round by round so that machine load hits all of them alike. Prints the median
step time, tokens/s, peak memory and the ratios BEAR/MSL and BEAR/LML (the target:
BEAR <= 1.05x MSL on a whole step); on a GPU also model FLOPs utilisation.
beamsim (the direct beam-search objective) runs once per width in --beam-widths (lines
`beamsim-B`), as the trainer runs it: the same forward (also keeping its KV cache), the simulated
beam search of width B started from it (no gradient, mask before the softmax), then the same
head/backward; its line also gives the search's share of the step, and beamsim/BEAR is printed per
width. `--beamsim-own-prefill` makes the search encode the prompts again (the path without reuse).
`--clock cpu` times with this process's CPU time (use OMP_NUM_THREADS=1): on a CPU machine shared
with other jobs, wall time mostly measures the others.

    OMP_NUM_THREADS=2 python benchmarks/train_step.py                       # CPU: small Llama
    python benchmarks/train_step.py --device cuda --hidden 2048 --layers 16 --heads 32 --kv-heads 8 \\
        --intermediate 8192 --tie --vocab 128256 --micro-batch 16 --seq-len 512  # Llama-3.2-1B shape, bf16

Model FLOPs utilisation counts what the step has to compute, as in the PaLM appendix: 6 x tokens x
(non-embedding parameters) for the transformer body, 6 x N x V x H for the head on the N response
positions only (the full-vocabulary logits of the other positions are never formed), and
6 x layers x H x L per token for causal attention scores and values (12 x layers x H x L halved).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bear_ds.config import LossConfig
from bear_ds.generation.survival import prompt_ends, prompt_state_of_forward, simulate_beam_search
from bear_ds.losses import (
    backbone_forward,
    backbone_hidden_states,
    lm_head_context,
    response_loss,
    select_response,
)
from bear_ds.trie import TokenTrie

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, from the vendors' sheets


def random_catalog(num_items: int, vocab: int, mean_len: int, eos: int, gen: torch.Generator) -> list[list[int]]:
    """Titles as random token sequences sharing a few leading tokens (like '"The ...'), each ending in EOS."""
    prefixes = torch.randint(3, vocab, (max(num_items // 50, 1), 2), generator=gen)
    titles, seen = [], set()
    while len(titles) < num_items:
        length = int(torch.randint(max(mean_len - 4, 2), mean_len + 5, (1,), generator=gen))
        head = prefixes[int(torch.randint(0, prefixes.shape[0], (1,), generator=gen))].tolist()
        seq = tuple(head + torch.randint(3, vocab, (length - 2,), generator=gen).tolist() + [eos])
        if seq not in seen:
            seen.add(seq)
            titles.append(list(seq))
    return titles


def pad_rows(rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask [R, L] of prompt + title rows; labels on the titles."""
    length = max(len(p) + len(t) for p, t in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, (p, t) in enumerate(rows):
        ids = p + t
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, len(p) : len(ids)] = torch.tensor(t)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def make_batches(titles, args, gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
    batches = []
    for _ in range(args.batches):
        rows = []
        for _ in range(args.micro_batch):
            title = titles[int(torch.randint(0, len(titles), (1,), generator=gen))]
            prompt = torch.randint(3, args.vocab, (args.seq_len - len(title),), generator=gen).tolist()
            rows.append((prompt, title))
        batches.append(pad_rows(rows))
    return batches


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The device, dtype and Llama shape options (shared with `preference_step.py`)."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16" if torch.cuda.is_available() else "fp32")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, help="grouped-query attention (default: --heads)")
    p.add_argument("--intermediate", type=int, help="MLP width (default: 2.6875 x hidden)")
    p.add_argument("--tie", action="store_true", help="tie the input embedding and the head, as Llama-3.2-1B")
    p.add_argument("--vocab", type=int, default=32000)


def llama_config(args: argparse.Namespace, max_positions: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads or args.heads,
        intermediate_size=args.intermediate or int(args.hidden * 2.6875),
        max_position_embeddings=max_positions, tie_word_embeddings=args.tie,
    )  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--items", type=int, default=5000, help="catalog titles in the trie")
    p.add_argument("--title-len", type=int, default=14, help="mean response tokens (quoted title + EOS)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per example (prompt + response)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=4, help="distinct batches cycled through")
    p.add_argument("--rounds", type=int, default=6, help="timed rounds (each runs every loss once)")
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--beam-widths", type=int, nargs="*", default=[5, 10, 20], help="beamsim search widths B")
    p.add_argument("--beamsim-own-prefill", action="store_true", help="beamsim's search encodes the prompts again")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: process CPU time (CPU runs)")
    p.add_argument("--profile", metavar="LOSS", help="after the timing, profile one step of this loss (torch.profiler)")
    args = p.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    eos = 2
    titles = random_catalog(args.items, args.vocab, args.title_len, eos, gen)
    trie = TokenTrie.from_sequences(titles, args.vocab).to(device)
    batches = [{k: v.to(device) for k, v in b.items()} for b in make_batches(titles, args, gen)]
    config = llama_config(args, max(args.seq_len, 512))
    torch.manual_seed(0)
    with device:  # initialise on the device: a 1B model's random init on the host takes tens of seconds
        model = LlamaForCausalLM._from_config(config, attn_implementation=args.attn, dtype=dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    n_params = sum(p.numel() for p in model.parameters())
    n_body = n_params - model.get_input_embeddings().weight.numel()
    if not args.tie:
        n_body -= model.get_output_embeddings().weight.numel()
    losses = {name: LossConfig(name=name, chunk_size=args.chunk_size) for name in ("lml", "msl", "bear")}
    for width in args.beam_widths:
        losses[f"beamsim-{width}"] = LossConfig(name="beamsim", beam_width=width, chunk_size=args.chunk_size)
    search_times: dict[str, list[float]] = {name: [] for name in losses}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    def step(name: str, batch: dict[str, torch.Tensor]) -> float:
        cfg = losses[name]
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        sync()
        start = clock()
        search = None
        if cfg.name == "beamsim":
            reuse = not args.beamsim_own_prefill
            out = backbone_forward(model, ids, mask, prompt_ends(mask, labels) if reuse else None)
            hidden = out.hidden
            sync()
            started = clock()
            search = simulate_beam_search(
                model, ids, mask, labels, trie, beam_width=cfg.beam_width, eos_token_id=eos, mask="before",
                tau=cfg.tau, prompt_state=prompt_state_of_forward(mask, labels, out.prompt_logits, out.cache)
                if reuse else None,
            )  # fmt: skip
            del out
            sync()
            search_times[name].append(clock() - started)
        else:
            hidden = backbone_hidden_states(model, ids, mask)  # [B, L, H]
        h, y, s = select_response(hidden, batch["labels"], trie)  # [N, H], [N], [N]
        with lm_head_context(model) as head:
            out = response_loss(h, head, y, s, trie, cfg, search=search)
            out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return clock() - start

    for name in losses:  # warm-up (allocator, kernels)
        step(name, batches[0])
    search_times = {name: [] for name in losses}
    times: dict[str, list[float]] = {name: [] for name in losses}
    peak: dict[str, float] = {}
    for r in range(args.rounds):
        for name in losses:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times[name].append(step(name, batches[r % len(batches)]))
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)

    tokens = sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)
    positions = sum(int((b["labels"] != -100).sum()) for b in batches) / len(batches)  # response positions N
    step_flops = (
        6 * tokens * (n_body + args.layers * args.hidden * args.seq_len) + 6 * positions * args.vocab * args.hidden
    )
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in card), None)
    print(f"device {card}, {n_params / 1e6:.1f}M params, {args.dtype}, vocab {args.vocab}, micro-batch "
          f"{args.micro_batch} x {args.seq_len} tokens, {len(titles)} titles, {args.rounds} rounds, "
          f"{args.clock} clock")  # fmt: skip
    print(
        f"{'loss':>10} | {'median step s':>13} | {'tokens/s':>9} | {'peak GiB':>8} | {'MFU':>6} | {'search share':>12}"
    )
    median = {name: statistics.median(ts) for name, ts in times.items()}
    for name in losses:
        mfu = "-"
        if peak_tflops and dtype == torch.bfloat16:
            mfu = f"{step_flops / median[name] / (peak_tflops * 1e12):.1%}"
        mem = f"{peak[name]:.2f}" if name in peak else "-"
        # the search's share of the step, round by round (median of search_s / step_s)
        share = (
            f"{statistics.median(a / b for a, b in zip(search_times[name], times[name], strict=True)):.1%}"
            if search_times[name]
            else "-"
        )
        print(f"{name:>10} | {median[name]:13.4f} | {tokens / median[name]:9.0f} | {mem:>8} | {mfu:>6} | {share:>12}")
    print(f"BEAR/MSL step time {median['bear'] / median['msl']:.3f}x; BEAR/LML {median['bear'] / median['lml']:.3f}x")
    for width in args.beam_widths:
        name = f"beamsim-{width}"
        # per round (same batch, same machine load), then the median of the ratios
        ratio = statistics.median(a / b for a, b in zip(times[name], times["bear"], strict=True))
        rest = statistics.median(
            (a - s) / b for a, s, b in zip(times[name], search_times[name], times["bear"], strict=True)
        )
        print(
            f"beamsim/BEAR at B={width}: {median[name] / median['bear']:.3f}x (median of per-round ratios "
            f"{ratio:.3f}x; without the search {rest:.3f}x)"
        )

    if args.profile:  # after the timing: where one step's time goes, and (beamsim) its search alone
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            step(args.profile, batches[0])
        print(f"profile of one {args.profile} step:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        if losses[args.profile].name == "beamsim":
            cfg, batch = losses[args.profile], batches[0]
            ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
            with torch.no_grad():
                out = backbone_forward(model, ids, mask, prompt_ends(mask, labels))
            state = prompt_state_of_forward(mask, labels, out.prompt_logits, out.cache)
            with profile(activities=activities) as prof:
                search = simulate_beam_search(model, ids, mask, labels, trie, beam_width=cfg.beam_width,
                                              eos_token_id=eos, mask="before", tau=cfg.tau, prompt_state=state)  # fmt: skip
            print(f"profile of its search alone ({search.steps} decoding steps):")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
