"""Loss-head benchmark: the released approach vs our chunked head, forward + backward.

Both start from the same synthetic last hidden states [B, L, H] of B sequences of L tokens whose
last `--response-len` tokens are the response (a catalog title), N = B x response-len:
  released: logits for every position [B, L, V] in float32, a dense [T, V] bool mask per example
            (built at preprocessing, collated per step), masked softmax over the full tensor, then
            the loss on the response positions;
  ours:     `select_response` -> [N, H], `response_loss` in chunks of --chunk-size positions with
            the trie mask built per chunk (O(C x V) peak).
Every case runs in a fresh subprocess. Peak memory: torch.cuda.max_memory_allocated on GPU; on CPU
the increase of the resident set size during one step after a warm-up step, sampled by a thread.

    python benchmarks/loss_head.py                      # CPU defaults: a few minutes on 2 cores
    python benchmarks/loss_head.py --vocab 32000 128000 --positions 2048 8192 --hidden 2048  # GPU sizes

Defaults: on CUDA V in {32k, 128k}, N in {2k, 8k}, H = 2048, bf16; on CPU V in {8k, 32k},
N in {256, 512}, H = 256, float32 (the released approach needs ~5 float32 [B*L, V] tensors).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

from bear_ds.config import LossConfig
from bear_ds.losses import bear_loss, lml_loss, msl_loss, response_loss, select_response
from bear_ds.trie import TokenTrie


def build_case(vocab: int, positions: int, hidden: int, seq_len: int, response_len: int, device, dtype, seed=0):
    """Trie over random titles; hidden [B, L, H], labels [B, L] (-100 on the prompt), head weight [V, H]."""
    g = torch.Generator().manual_seed(seed)
    n_titles, examples = 2000, positions // response_len
    # branchy first tokens (a few hundred title starts), random continuations; the last token is EOS = 2
    first = torch.randint(3, 3 + 300, (n_titles, 2), generator=g)
    rest = torch.randint(3, vocab, (n_titles, response_len - 3), generator=g)
    titles = torch.cat([first, rest, torch.full((n_titles, 1), 2)], 1).unique(dim=0)
    trie = TokenTrie.from_sequences(titles.tolist(), vocab)
    picks = torch.randint(0, titles.shape[0], (examples,), generator=g)
    labels = torch.full((examples, seq_len), -100, dtype=torch.long)
    labels[:, seq_len - response_len :] = titles[picks]
    hidden_all = torch.randn(examples, seq_len, hidden, generator=g).to(device, dtype)
    weight = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(device, dtype)
    return trie.to(device), hidden_all, labels.to(device), weight


def released_masks(trie, labels: torch.Tensor, vocab: int) -> list[torch.Tensor]:
    """Preprocessing of the release: a dense [T, V] bool mask per example (kept in the dataset)."""
    out = []
    for row in labels:
        resp = row[row != -100][None]  # [1, T]
        out.append(trie.allowed_mask(trie.states_along(resp), vocab)[0].cpu())  # [T, V]
    return out


def released_step(name, hidden_all, labels, weight, masks, cfg):
    b, seq, _ = hidden_all.shape
    vocab = weight.shape[0]
    logits = (hidden_all @ weight.T).float()[:, :-1]  # [B, L-1, V]: every position
    target = labels[:, 1:]  # [B, L-1]
    keep = target != -100
    if name == "lml":
        return lml_loss(logits[keep], target[keep])
    dense = torch.ones(b, seq - 1, vocab, dtype=torch.bool, device=logits.device)  # collate: [B, L-1, V]
    for i, m in enumerate(masks):
        dense[i, seq - 1 - m.shape[0] :] = m.to(logits.device)
    masked = logits.masked_fill(~dense, float("-inf"))  # [B, L-1, V]
    if name == "msl":
        return msl_loss(masked[keep], target[keep], dense[keep], tau=cfg.tau)
    return bear_loss(
        masked[keep], target[keep], dense[keep], beam_width=cfg.beam_width, tau=cfg.tau, xi=cfg.xi, lam=cfg.lam
    )


def ours_step(name, hidden_all, labels, weight, trie, cfg):
    h, y, s = select_response(hidden_all, labels, trie)  # [N, H], [N], [N]
    return response_loss(h, weight, y, s, trie, cfg.model_copy(update={"name": name})).loss


def run_case(args) -> dict:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    trie, hidden_all, labels, weight = build_case(
        args.case_vocab, args.case_positions, args.hidden, args.seq_len, args.response_len, device, dtype
    )
    cfg = LossConfig(chunk_size=args.chunk_size)
    masks = released_masks(trie, labels, args.case_vocab) if args.case_approach == "released" else None

    def step():
        h = hidden_all.detach().requires_grad_(True)
        w = weight.detach().requires_grad_(True)
        if args.case_approach == "released":
            loss = released_step(args.case_loss, h, labels, w, masks, cfg)
        else:
            loss = ours_step(args.case_loss, h, labels, w, trie, cfg)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    step()  # warm-up: lazy initialisation, allocator pools
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = step()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        with RssPeak() as rss:
            loss = step()
        peak = rss.peak - rss.before
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"loss": loss, "time_s": statistics.median(times), "peak_mib": peak / 2**20}


class RssPeak:
    """Peak resident set size while the block runs, sampled every 0.5 ms by a thread (CPU only).

    Run under MALLOC_MMAP_THRESHOLD_ (set by the parent) so that large tensors are mmapped and
    their memory leaves the RSS as soon as they are freed; the warm-up step then does not hide the
    measured step's peak, as getrusage's lifetime maximum would.
    """

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.before = self.peak = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.0005)

    def __enter__(self) -> RssPeak:
        self.before = self.peak = self._rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 128000] if cuda else [8192, 32768])
    p.add_argument(
        "--positions",
        type=int,
        nargs="+",
        default=[2048, 8192] if cuda else [256, 512],
        help="response positions N per micro-batch",
    )
    p.add_argument("--hidden", type=int, default=2048 if cuda else 256)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16" if cuda else "fp32")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (prompt + response)")
    p.add_argument("--response-len", type=int, default=32, help="response tokens per sequence (title + EOS)")
    p.add_argument("--chunk-size", type=int, default=1024, help="loss.chunk_size of our head")
    p.add_argument("--repeats", type=int, default=3, help="timed steps (median) after the warm-up and memory steps")
    p.add_argument("--losses", nargs="+", default=["lml", "msl", "bear"])
    p.add_argument("--case-approach", help=argparse.SUPPRESS)
    p.add_argument("--case-loss", help=argparse.SUPPRESS)
    p.add_argument("--case-vocab", type=int, help=argparse.SUPPRESS)
    p.add_argument("--case-positions", type=int, help=argparse.SUPPRESS)
    args, _ = p.parse_known_args()
    if args.case_approach:
        print(json.dumps(run_case(args)))
        return

    print(
        f"device={args.device} dtype={args.dtype} hidden={args.hidden} seq_len={args.seq_len} "
        f"response_len={args.response_len} chunk_size={args.chunk_size} repeats={args.repeats}",
        flush=True,
    )
    results: dict[tuple, dict] = {}
    for vocab in args.vocab:
        for n in args.positions:
            for loss in args.losses:
                for approach in ("released", "ours"):
                    cmd = [
                        sys.executable,
                        __file__,
                        *sys.argv[1:],
                        "--case-approach",
                        approach,
                        "--case-loss",
                        loss,
                        "--case-vocab",
                        str(vocab),
                        "--case-positions",
                        str(n),
                    ]
                    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # see RssPeak
                    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                    if proc.returncode != 0:
                        results[(vocab, n, loss, approach)] = {"error": proc.stderr.strip().splitlines()[-1:]}
                    else:
                        results[(vocab, n, loss, approach)] = json.loads(proc.stdout.strip().splitlines()[-1])
    header = f"{'V':>7} {'N':>6} {'loss':>5} | {'released s':>10} {'MiB':>8} | {'ours s':>8} {'MiB':>7} | {'mem x':>6} {'time x':>6}"
    print(header)
    print("-" * len(header))
    for vocab in args.vocab:
        for n in args.positions:
            for loss in args.losses:
                rel, ours = results[(vocab, n, loss, "released")], results[(vocab, n, loss, "ours")]
                if "error" in rel or "error" in ours:  # show the side that ran, and why the other did not
                    cells = []
                    for r in (rel, ours):
                        why = "".join(r.get("error", [""]))
                        short = "OOM" if "OutOfMemory" in why or "MemoryError" in why else why[:40]
                        cells.append(f"{short:>19}" if why else f"{r['time_s']:>8.3f} {r['peak_mib']:>8.0f}")
                    print(f"{vocab:>7} {n:>6} {loss:>5} | {cells[0]} | {cells[1]} |")
                    continue
                if abs(rel["loss"] - ours["loss"]) > 1e-3 * max(1.0, abs(rel["loss"])):
                    print(f"  WARNING: losses differ: released {rel['loss']:.6f} ours {ours['loss']:.6f}")
                print(
                    f"{vocab:>7} {n:>6} {loss:>5} | {rel['time_s']:>10.3f} {rel['peak_mib']:>8.0f} | "
                    f"{ours['time_s']:>8.3f} {ours['peak_mib']:>7.0f} | "
                    f"{rel['peak_mib'] / max(ours['peak_mib'], 1e-9):>6.1f} {rel['time_s'] / ours['time_s']:>6.1f}"
                )
            row = {
                k: results[(vocab, n, k, "ours")] for k in ("lml", "msl", "bear") if (vocab, n, k, "ours") in results
            }
            if {"lml", "msl", "bear"} <= set(row) and not any("error" in r for r in row.values()):
                b = row["bear"]
                print(
                    f"{'':>7} {'':>6} ours BEAR/LML time {b['time_s'] / row['lml']['time_s']:.2f} "
                    f"mem {b['peak_mib'] / max(row['lml']['peak_mib'], 1e-9):.2f}; BEAR/MSL time "
                    f"{b['time_s'] / row['msl']['time_s']:.2f} mem {b['peak_mib'] / max(row['msl']['peak_mib'], 1e-9):.2f}"
                )


if __name__ == "__main__":
    main()
