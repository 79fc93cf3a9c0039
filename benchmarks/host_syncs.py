"""Device-to-host synchronisations per micro-step of the real trainer, per loss, before and after.

Runs `bear_ds.training.train` (ZeRO stage 0, one process, the path `bear-ds train` takes) for a few
steps per loss and reads `host_syncs` from `train_log.jsonl` (what `bear_ds.training.host_syncs`
counts: scalar reads, data-dependent shapes, copies to the host; on a CPU the calls that WOULD wait
on a GPU). Two ways for each loss, on the same steps:
- `device walk`: the response positions and trie states found from the labels on the device, per
  micro-batch (the trainer's path before the states were computed at encoding);
- `encoded`: the trainer's path: positions, targets and trie states computed on the host from the
  encoded examples, masks sized on the host.
Prints one line per loss: syncs per micro-step both ways and whether the per-step losses are
identical; the target is <= 5 per micro-step. The per-step check of train.on_nonfinite=stop (one
read per optimiser step) is in the count.

    OMP_NUM_THREADS=1 python benchmarks/host_syncs.py                      # the tiny model on Office
    OMP_NUM_THREADS=1 python benchmarks/host_syncs.py --losses lml bear --steps 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

from bear_ds.config import load_config
from bear_ds.training import train, trainer


def _device_walk(load):
    """`load_micro_batch` without the host-side response positions (the loss then finds them on the device)."""

    def load_without_positions(*args, **kwargs):
        return dataclasses.replace(load(*args, **kwargs), response=None)

    return load_without_positions


def run(loss: str, args: argparse.Namespace, out: Path, device_walk: bool) -> list[dict]:
    overrides = [
        f"data.path={args.data}", f"output_dir={out}", "train.zero_stage=0", f"train.max_steps={args.steps}",
        f"train.global_batch={args.global_batch}", f"train.micro_batch={args.micro_batch}",
        "train.eval_every_epoch=false", f"loss.name={loss}", *args.overrides,
    ]  # fmt: skip
    load = trainer.load_micro_batch
    if device_walk:
        trainer.load_micro_batch = _device_walk(load)
    try:
        train(load_config(None, overrides))
    finally:
        trainer.load_micro_batch = load
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "../shared/data/Office"))
    p.add_argument("--losses", nargs="+", default=["lml", "msl", "bear"])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--out", default=None, help="run folders (default: a temporary folder)")
    p.add_argument("overrides", nargs="*", help="more config overrides (key=value)")
    args = p.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="host_syncs_"))
    micro_steps = args.global_batch // args.micro_batch
    lines = []
    for loss in args.losses:
        before = run(loss, args, root / f"{loss}_device_walk", device_walk=True)
        after = run(loss, args, root / f"{loss}_encoded", device_walk=False)
        per_micro = [sum(r["host_syncs"] for r in log) / (len(log) * micro_steps) for log in (before, after)]
        same = [r["loss"] for r in before] == [r["loss"] for r in after]
        lines.append(
            f"{loss:8s} host syncs per micro-step: device walk {per_micro[0]:.1f}, encoded {per_micro[1]:.1f} "
            f"(target <= 5); per-step losses {'identical' if same else 'DIFFER'}"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
