"""Beam-search benchmark: our vectorised trie search vs transformers generate + a Python dict trie.

Same model, prompts and catalog for both: the Office dataset prepared by bear_ds.data, a BPE
trained on its titles and prompts, a tiny Llama (random, or trained for a few LML steps so that
next-token distributions are peaked and the top-10 comparison is meaningful). B = 10, mask after
(the Hugging Face default). Reports users/s of each and the agreement of their top-10 lists.
With --world-size 2 it also runs `bear-ds evaluate` under torchrun with 1 and 2 processes.

    python benchmarks/beam_search.py --data ../shared/data/Office --users 64 --train-steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import torch

from bear_ds.distributed import torchrun_command


def _build(args, device: torch.device):
    from transformers import LlamaForCausalLM

    from bear_ds.catalog import Catalog, encode_example, encode_prompts
    from bear_ds.config import load_config
    from bear_ds.data import load_catalog, load_split, load_stats, resolve_prepared
    from bear_ds.data.prompts import PromptBuilder
    from bear_ds.models import tiny_llama_config
    from bear_ds.tokenization import train_bpe_tokenizer

    out = Path(args.out)
    cfg = load_config(
        None,
        [f"output_dir={out}", f"data.path={args.data}", "data.source=bear_csv", "model.max_position_embeddings=1024"],
    )
    folder = resolve_prepared(cfg, out / "data")
    titles = load_catalog(folder)
    builder = PromptBuilder(cfg.prompt, load_stats(folder)["domain"])
    train = load_split(folder, "train").select(range(2000))
    test = load_split(folder, "test").select(range(args.users))

    def prompts_of(rows):
        return [builder.prompt([titles[h] for h in hist]) for hist in rows["history"]]

    train_prompts, test_prompts = prompts_of(train), prompts_of(test)
    tokenizer = train_bpe_tokenizer(
        [builder.response(t) for t in titles.values()] + train_prompts[:500], args.vocab_size
    )
    catalog = Catalog.build(titles, tokenizer, builder)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(cfg.model, tokenizer)).to(device)
    if args.train_steps:
        _train_lml(model, tokenizer, catalog, train_prompts, train["target"], args, encode_example, encode_prompts)
    model.eval()
    model_dir = out / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    catalog.save(model_dir)
    (model_dir / "config.yaml").write_text("loss: {name: lml}\n")  # mask=auto decodes as 'after'
    prompt_ids = encode_prompts(tokenizer, test_prompts)
    targets = [catalog.group_of_item(t) for t in test["target"]]
    return model, tokenizer, catalog, prompt_ids, targets, folder


def _train_lml(model, tokenizer, catalog, prompts, targets, args, encode_example, encode_prompts):
    """A few plain cross-entropy steps so that the model's next-token distributions are peaked."""
    prompt_ids = encode_prompts(tokenizer, prompts)
    examples = [
        encode_example(p, catalog.group_token_ids[catalog.group_of_item(t)])
        for p, t in zip(prompt_ids, targets, strict=False)
    ]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    g = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for step in range(args.train_steps):
        idx = torch.randint(len(examples), (16,), generator=g).tolist()
        width = max(len(examples[i][0]) for i in idx)
        ids = torch.full((16, width), tokenizer.pad_token_id)
        labels = torch.full((16, width), -100)
        attn = torch.zeros(16, width, dtype=torch.long)
        for r, i in enumerate(idx):
            x, y = examples[i]
            ids[r, : len(x)], labels[r, : len(y)], attn[r, : len(x)] = torch.tensor(x), torch.tensor(y), 1
        dev = model.device
        loss = model(input_ids=ids.to(dev), attention_mask=attn.to(dev), labels=labels.to(dev)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == args.train_steps - 1:
            print(f"  train step {step}: loss {loss.item():.3f} ({time.perf_counter() - started:.0f}s)", flush=True)


def _batches(prompt_ids, pad, size, device):
    from bear_ds.generation.beam import left_pad

    for s in range(0, len(prompt_ids), size):
        yield left_pad(prompt_ids[s : s + size], pad, device)


def _ours(model, catalog, ids, attn, args):
    from bear_ds.generation.beam import constrained_beam_search

    res = constrained_beam_search(
        model, ids, attn, catalog.trie, num_beams=args.num_beams, eos_token_id=catalog.eos_token_id, mask="after"
    )
    args.decode_steps += int(res.steps.max())
    return [
        [(a, b) for a, b in zip(g, sc, strict=False) if a >= 0]
        for g, sc in zip(res.groups.tolist(), res.scores.tolist(), strict=False)
    ]


def _prefill(model, ids, attn):
    """The prefill of `constrained_beam_search` alone (to report its share of the time)."""
    from bear_ds.generation.beam import _prefill

    with torch.no_grad():
        _prefill(model, ids, attn, share_prefix=True)
    if ids.is_cuda:
        torch.cuda.synchronize()


def _dict_trie(catalog):
    trie: dict = {}
    for ids in catalog.group_token_ids:
        node = trie
        for tok in ids:
            node = node.setdefault(tok, {})
    return trie


def _hf(model, catalog, trie, ids, attn, pad, args):
    """The released approach: generate with prefix_allowed_tokens_fn over a Python dict trie."""
    group = {tuple(t): g for g, t in enumerate(catalog.group_token_ids)}
    eos = catalog.eos_token_id
    width = ids.shape[1]

    def allowed(batch_id, sent):
        node = trie
        for tok in sent[width:].tolist():
            node = node.get(tok)
            if node is None:
                return [eos]
        return list(node) or [eos]

    out = model.generate(
        input_ids=ids,
        attention_mask=attn,
        num_beams=args.num_beams,
        num_return_sequences=args.num_beams,
        do_sample=False,
        prefix_allowed_tokens_fn=allowed,
        max_new_tokens=catalog.trie.max_depth,
        early_stopping=False,
        length_penalty=1.0,
        return_dict_in_generate=True,
        output_scores=True,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    gen, scores = out.sequences[:, width:].tolist(), out.sequences_scores.tolist()
    lists = []
    for u in range(ids.shape[0]):
        row = []
        for b in range(args.num_beams):
            seq, sc = gen[u * args.num_beams + b], scores[u * args.num_beams + b]
            if sc > -1e7 and eos in seq:  # HF pads missing beams with copies scored about -1e9
                row.append((group[tuple(seq[: seq.index(eos) + 1])], sc))
        lists.append(row)
    return lists


def _timed(fn, clock):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()  # both decoders return Python lists, so GPU work has finished here
    clock[0] += time.perf_counter() - wall
    clock[1] += time.process_time() - cpu
    return out


def _agreement(ours, ref):
    same = sum([g for g, _ in a] == [g for g, _ in b] for a, b in zip(ours, ref, strict=False))
    same_set = sum({g for g, _ in a} == {g for g, _ in b} for a, b in zip(ours, ref, strict=False))
    overlap = sum(
        len({g for g, _ in a} & {g for g, _ in b}) / max(len(b), 1) for a, b in zip(ours, ref, strict=False)
    ) / len(ref)
    diffs = [
        abs(x[1] - y[1]) for a, b in zip(ours, ref, strict=False) for x, y in zip(a, b, strict=False) if x[0] == y[0]
    ]
    return same, same_set, overlap, max(diffs, default=0.0)


# the search's phases, labelled for the profiler by wrapping them here (the library is not changed)
PHASES = {
    "prefill": ("_encode_prompts", "function"),
    "candidates: log-softmax over the trie, top-2B, trie advance": ("_Candidates.best", "classmethod"),
    "finished items (merge, top-B)": ("_Outcome.finish", "method"),
    "live beams (top-B)": ("_LiveBeams.of", "classmethod"),
    "stopping rule": ("_still_searching", "function"),
    "cache rows reordered": ("reorder_rows", "function"),
    "model forward (one token per beam)": ("shared_prefix_forward", "function"),
}


def _labelled(label, fn):
    def wrapper(*a, **k):
        with torch.profiler.record_function(label):
            return fn(*a, **k)

    return wrapper


def _wrap_phases():
    """Put a profiler label around each phase of `constrained_beam_search`; returns the undo."""
    import bear_ds.generation.beam as beam

    undo = []
    for label, (path, kind) in PHASES.items():
        owner_name, _, attr = path.rpartition(".")
        owner = getattr(beam, owner_name) if owner_name else beam
        original = owner.__dict__[attr]
        fn = original.__func__ if kind == "classmethod" else original
        wrapped = _labelled(label, fn)
        setattr(owner, attr, classmethod(wrapped) if kind == "classmethod" else wrapped)
        undo.append((owner, attr, original))
    return lambda: [setattr(o, a, v) for o, a, v in undo]


def _profile(model, catalog, batches, args) -> None:
    """Where a decoding step's time goes: CPU time per phase of our search (torch.profiler labels),
    per decoding step, and the operators that take most of the model forward."""
    from torch.profiler import ProfilerActivity, profile

    undo = _wrap_phases()
    try:
        args.decode_steps = 0
        wall = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for ids, attn in batches:
                with torch.profiler.record_function("search"):
                    _ours(model, catalog, ids, attn, args)
        wall = time.perf_counter() - wall
    finally:
        undo()
    events = {e.key: e for e in prof.key_averages()}
    steps = max(args.decode_steps, 1)
    total_ms = events["search"].cpu_time_total / 1000
    print()
    print(f"profile of ours ({len(batches)} batches, {steps} decoding steps; profiler on: {wall:.2f} s wall):")
    print("| phase | CPU ms | ms per decoding step | share of the search |")
    print("|---|---|---|---|")
    labelled = 0.0
    for label in PHASES:
        ms = events[label].cpu_time_total / 1000 if label in events else 0.0
        labelled += ms
        per_step = "-" if label == "prefill" else f"{ms / steps:.2f}"
        print(f"| {label} | {ms:.1f} | {per_step} | {100 * ms / total_ms:.0f}% |")
    rest = total_ms - labelled
    print(
        f"| the rest (Python between phases, outcome bookkeeping) | {rest:.1f} | {rest / steps:.2f} | {100 * rest / total_ms:.0f}% |"
    )
    print()
    print("operators by self CPU time over the whole search (top 12):")
    print("| operator | calls | self CPU ms | share of the search |")
    print("|---|---|---|---|")
    ops = sorted((e for e in events.values() if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total)
    for e in ops[:12]:
        ms = e.self_cpu_time_total / 1000
        print(f"| {e.key} | {e.count} | {ms:.1f} | {100 * ms / total_ms:.0f}% |")
    op_ms = sum(e.self_cpu_time_total for e in ops) / 1000
    print(
        f"all aten operators together: {op_ms:.1f} ms self CPU, {100 * op_ms / total_ms:.0f}% of the search; "
        "the remainder is Python (module calls, the cache classes, our glue)"
    )


def _evaluate_cli(args, folder, nproc):
    out = Path(args.out) / f"eval_ws{nproc}"
    cmd = torchrun_command(
        nproc, "-m", "bear_ds.cli", "evaluate", f"output_dir={out}", f"data.path={folder}", "data.source=prepared",
        f"model.path={Path(args.out) / 'model'}", f"eval.num_beams={args.num_beams}", f"eval.max_users={args.users}",
        f"eval.batch_users={args.batch_users}", "eval.top_k=[1,5,10]",
    )  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"bear-ds evaluate on {nproc} processes failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    preds = [json.loads(line)["predictions"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    return metrics, preds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "../shared/data/Office"))
    p.add_argument("--out", default="runs/bench_beam")
    p.add_argument("--users", type=int, default=64)
    p.add_argument("--num-beams", type=int, default=10)
    p.add_argument("--batch-users", type=int, default=16)
    p.add_argument(
        "--curve", type=int, nargs="*", default=[], help="also time ours alone at these batch sizes (users/CPU-s)"
    )
    p.add_argument("--vocab-size", type=int, default=2000)
    p.add_argument("--train-steps", type=int, default=60, help="LML steps before decoding (0: random model)")
    p.add_argument("--world-size", type=int, default=1, help="2: also compare `bear-ds evaluate` on 1 vs 2 processes")
    p.add_argument("--device", default="cpu", help="cuda: decode on the GPU; the speed-up is then on wall time")
    p.add_argument("--profile", action="store_true", help="also profile ours: CPU time per phase of a decoding step")
    args = p.parse_args()
    device = torch.device(args.device)

    print(f"building Office catalog, BPE and tiny Llama in {args.out} ...", flush=True)
    model, tokenizer, catalog, prompt_ids, targets, folder = _build(args, device)
    catalog.trie = catalog.trie.to(device)  # once, not per batch
    pad = tokenizer.pad_token_id
    print(
        f"catalog: {catalog.num_items} items, {catalog.num_groups} groups, trie depth {catalog.trie.max_depth}, "
        f"vocab {len(tokenizer)}; {len(prompt_ids)} users, mean prompt {sum(map(len, prompt_ids)) / len(prompt_ids):.0f} tokens; "
        f"B={args.num_beams}, {args.batch_users} users per batch, torch threads {torch.get_num_threads()}"
    )
    trie = _dict_trie(catalog)
    batches = list(_batches(prompt_ids, pad, args.batch_users, device))
    args.decode_steps = 0
    _ours(model, catalog, *batches[0], args)  # warm-up
    args.decode_steps = 0
    ours, ref, clock_ours, clock_hf, clock_prefill = [], [], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]
    for ids, attn in batches:  # interleaved, so that load from other processes hits both alike
        ours += _timed(lambda ids=ids, attn=attn: _ours(model, catalog, ids, attn, args), clock_ours)
        ref += _timed(lambda ids=ids, attn=attn: _hf(model, catalog, trie, ids, attn, pad, args), clock_hf)
        _timed(lambda ids=ids, attn=attn: _prefill(model, ids, attn), clock_prefill)
    same, same_set, overlap, max_diff = _agreement(ours, ref)
    n = len(prompt_ids)
    basis, basis_name = (0, "wall") if device.type == "cuda" else (1, "CPU")  # a GPU run is judged on wall time
    print()
    print(
        f"| decoder (B={args.num_beams}, {n} users) | wall s | users/s | CPU s | users per CPU-s | speed-up ({basis_name}) |"
    )
    print("|---|---|---|---|---|---|")
    for name, (wall, cpu) in (
        ("transformers generate + Python dict trie", clock_hf),
        ("bear_ds constrained_beam_search", clock_ours),
    ):
        print(
            f"| {name} | {wall:.2f} | {n / wall:.2f} | {cpu:.2f} | {n / cpu:.2f} | {clock_hf[basis] / (wall, cpu)[basis]:.2f}x |"
        )
    print()
    prefill_share = clock_prefill[basis] / clock_ours[basis]
    per_step_ms = 1000 * (clock_ours[basis] - clock_prefill[basis]) / max(args.decode_steps, 1)
    print(
        f"ours: prefill {100 * prefill_share:.0f}% of {basis_name} time; decoding {args.decode_steps} steps over "
        f"{len(batches)} batches, {per_step_ms:.1f} ms {basis_name} per step ({args.batch_users} users x {args.num_beams} beams)"
    )
    print(
        f"agreement of top-{args.num_beams} lists: identical order {same}/{n}, same set {same_set}/{n}, "
        f"mean overlap {overlap:.4f}, max |score diff| on matching items {max_diff:.2e}"
    )
    if args.curve:
        print()
        print(f"| users per batch | users per {basis_name}-s (ours) |")
        print("|---|---|")
        for size in args.curve:
            clock = [0.0, 0.0]
            for ids, attn in _batches(prompt_ids, pad, size, device):
                _timed(lambda ids=ids, attn=attn: _ours(model, catalog, ids, attn, args), clock)
            print(f"| {size} | {n / clock[basis]:.2f} |")
    if args.profile:
        _profile(model, catalog, batches, args)
    if args.world_size > 1:
        m1, p1 = _evaluate_cli(args, folder, 1)
        m2, p2 = _evaluate_cli(args, folder, args.world_size)
        print()
        print("| bear-ds evaluate | users/s (decoding) | hr@10 |")
        print("|---|---|---|")
        print(f"| world size 1 | {m1['users_per_second']:.2f} | {m1['hr@10']:.4f} |")
        print(f"| world size {args.world_size} | {m2['users_per_second']:.2f} | {m2['hr@10']:.4f} |")
        print(
            f"identical predictions across world sizes: {sum(a == b for a, b in zip(p1, p2, strict=False))}/{len(p1)}"
        )


if __name__ == "__main__":
    main()
