"""Thin orchestration of whole experiments: one run point, the embedded demo, sweeps.

A run point = train (with per-epoch validation and test, epoch selected on valid) -> pruning
analysis of the exported model on the test split -> summary. Points whose `summary.json` and
`analysis/analysis.json` exist are skipped, so a crashed demo or sweep restarts where it stopped.
The demo's six tasks (three trainings, then their analyses) are shared by `demo.workers` processes
through claims, as a sweep's points are.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from bear_ds.config import Config, ConfigError, with_overrides
from bear_ds.data import resolve_prepared
from bear_ds.errors import BearDsError, report_user_error
from bear_ds.evaluation.analysis import analyze
from bear_ds.folders import check_output_dir
from bear_ds.locks import RunFolderBusyError, RunFolderLock
from bear_ds.outputs import check_writable_folder, write_json_atomic, write_text_atomic
from bear_ds.reports import report
from bear_ds.sweeps import CLAIMS, run_sweep, sweep_base
from bear_ds.training import train
from bear_ds.two_stage import stage_one

METHODS = ("lml", "msl", "bear")
DEMO_CONFIG = "demo.yaml"  # the resolved config of the demo, in its folder


def point_finished(out_dir: Path) -> bool:
    return (out_dir / "summary.json").is_file() and (out_dir / "analysis" / "analysis.json").is_file()


def trained(out_dir: Path) -> bool:
    return (out_dir / "summary.json").is_file()


def train_point(cfg: Config, out_dir: Path) -> None:
    """Train one configuration into `out_dir` (resume=auto: a crashed training continues from its
    last checkpoint)."""
    train(with_overrides(cfg, [f"output_dir={out_dir}", "train.resume=auto"]))


def analyze_point(cfg: Config, out_dir: Path) -> None:
    """The pruning analysis of the model trained into `out_dir`, on its test users."""
    analyze(
        with_overrides(
            cfg,
            [
                f"model.path={out_dir / 'model'}",
                f"output_dir={out_dir / 'analysis'}",
                "eval.split=test",  # analyze.max_users caps the (costly) exhaustive ranking
            ],
        )
    )


def run_point(cfg: Config, out_dir: Path) -> None:
    """Train one configuration into `out_dir`, then run the pruning analysis on its test users."""
    out_dir = Path(out_dir)
    if not trained(out_dir):
        train_point(cfg, out_dir)
    analyze_point(cfg, out_dir)


def demo_workers(cfg: Config) -> int:
    """`demo.workers`, with auto resolved: two one-thread processes ran the demo 1.08x faster than one
    two-thread process on 2 idle cores (docs/results.md section 1); a GPU is one device."""
    if cfg.demo.workers != "auto":
        return cfg.demo.workers
    import torch

    return 1 if torch.cuda.is_available() else max(1, min(2, os.cpu_count() or 1))


# The demo's tasks in the order a free worker takes them: the trainings first, so that the analyses
# (each after its own training) fill the time the last training leaves the other worker.
DEMO_TASKS = [("train", m) for m in METHODS] + [("analyze", m) for m in METHODS]


def _task_done(out: Path, kind: str, method: str) -> bool:
    return trained(out / method) if kind == "train" else point_finished(out / method)


def _run_task(cfg: Config, out: Path, data_dir: Path, kind: str, method: str) -> None:
    point = with_overrides(cfg, [f"loss.name={method}", f"data.path={data_dir}", "data.source=prepared"])
    print(f"[demo] {method}: {'training into' if kind == 'train' else 'analysing'} {out / method}", flush=True)
    (train_point if kind == "train" else analyze_point)(point, out / method)


def work_on_demo(cfg: Config, out: Path, data_dir: Path) -> None:
    """Run demo tasks until none is left: each one claimed (out/.claims/<task>) so that no two workers
    run it, an analysis only once its training is done. A task whose worker died is released with it
    (flock) and taken over, resuming from the training's last checkpoint."""
    while True:
        left = [(kind, m) for kind, m in DEMO_TASKS if not _task_done(out, kind, m)]
        if not left:
            return
        for kind, method in left:
            if kind == "analyze" and not trained(out / method):
                continue
            claim = RunFolderLock(out / CLAIMS / f"{kind}-{method}")
            try:
                claim.acquire()
            except RunFolderBusyError:
                continue
            with claim:
                if not _task_done(out, kind, method):
                    _run_task(cfg, out, data_dir, kind, method)
            break
        else:  # no task this worker can start now
            if all(_claimed(out, kind, m) or (kind == "analyze" and _claimed(out, "train", m)) for kind, m in left):
                return  # the other workers hold all that is left (the worker of a training then analyses it)
            time.sleep(1.0)


def _claimed(out: Path, kind: str, method: str) -> bool:
    """Whether another process holds the claim of this task now."""
    claim = RunFolderLock(out / CLAIMS / f"{kind}-{method}")
    try:
        claim.acquire()
    except RunFolderBusyError:
        return True
    claim.release()
    return False


def _demo_worker(cfg: Config, out: Path, data_dir: Path, share: Any, ready: Any, index: int) -> None:
    """One demo worker process (spawned): its torch threads (`share.value`), logging, then `work_on_demo`.

    On SIGUSR1 it takes `share.value` threads again: the parent raises them when another worker has
    finished, so that the last training and analysis use the cores the others left (a one-thread
    training ran at 0.60 of a two-thread one here). The handler runs in this main thread, between
    two operations; the demo's metrics were the same to the last digit with 1 and 2 threads on the
    development machine, though other CPUs need not give bit-identical sums."""
    import torch

    from bear_ds.runtime import configure_logging, run_scope

    torch.set_num_threads(share.value)
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, lambda *_: torch.set_num_threads(share.value))
        ready[index] = 1  # before this, SIGUSR1 would end the process: the parent only signals ready workers
    configure_logging()
    try:
        with run_scope():
            work_on_demo(cfg, out, data_dir)
    except BearDsError as err:
        raise SystemExit(report_user_error("bear-ds demo", err)) from None
    finally:  # a late signal must not end a finished worker: Python's exit resets handlers, not SIG_IGN
        if hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _run_demo_workers(cfg: Config, out: Path, data_dir: Path, workers: int) -> None:
    """`workers` spawned processes share the demo's tasks and the torch threads of this one; each time
    one finishes, the others get its threads (`_demo_worker`)."""
    import torch

    total = torch.get_num_threads()
    threads = max(1, total // workers)
    print(f"[demo] {workers} worker processes, {threads} torch thread(s) each", flush=True)
    spawn = multiprocessing.get_context("spawn")  # torch's thread pools do not survive a fork
    share, ready = spawn.Value("i", threads), spawn.Array("b", workers)
    procs = [spawn.Process(target=_demo_worker, args=(cfg, out, data_dir, share, ready, i)) for i in range(workers)]
    for proc in procs:
        proc.start()
    running = list(procs)
    while running:
        multiprocessing.connection.wait([proc.sentinel for proc in running])
        running = [proc for proc in running if proc.is_alive()]
        if running and hasattr(signal, "SIGUSR1") and total // len(running) > share.value:
            share.value = total // len(running)
            raised = [proc for i, proc in enumerate(procs) if proc in running and ready[i]]
            for proc in raised:
                with contextlib.suppress(ProcessLookupError):  # it may have ended since
                    os.kill(proc.pid, signal.SIGUSR1)
            if raised:
                print(
                    f"[demo] a worker finished: {len(raised)} other(s) now use {share.value} torch threads", flush=True
                )
    failed = [proc.exitcode for proc in procs if proc.exitcode != 0]
    if failed:
        raise BearDsError(
            f"a demo worker stopped with exit status {failed[0]} (its message is above); run the same "
            f"command again to resume from {out}"
        )


def demo(cfg: Config) -> Path:
    """The embedded default: LML, MSL and BEAR on the same data and seed, then results.md and plots."""
    out = check_output_dir(cfg.output_dir, "demo")
    started = time.perf_counter()
    # the demo's resolved config; it also tells a demo folder (bear_ds.folders) from the start
    write_text_atomic(check_writable_folder(out) / DEMO_CONFIG, yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    data_dir = resolve_prepared(cfg, out / "data")  # once: every method sees the same splits
    for method in METHODS:
        if point_finished(out / method):
            print(f"[demo] {method}: already finished in {out / method}, skipped")
    workers = demo_workers(cfg)
    if workers == 1:
        work_on_demo(cfg, out, data_dir)
    else:
        _run_demo_workers(cfg, out, data_dir, workers)
    print(report(out).read_text())
    write_json_atomic(out / "demo_time.json", {"wall_s": round(time.perf_counter() - started, 1), "workers": workers})
    return out


def sweep(cfg: Config, overrides: Sequence[str] = ()) -> Path:
    """Run (or write job scripts for) every grid point of `cfg.sweep`, then aggregate and report.

    A two-stage sweep (`sweep.stage1`, bear_ds/two_stage.py) runs its stage-1 sweep first, in
    OUT/stage1, with `overrides` (the command line's) applied there too."""
    out = check_output_dir(cfg.output_dir, "sweep")
    first = stage_one(cfg, overrides)
    if first is not None:
        if cfg.sweep.mode == "scripts":
            raise ConfigError("sweep.mode=scripts does not run two-stage sweeps (sweep.stage1): use sweep.mode=run")
        sweep(first.cfg)  # the stage-1 points no other process holds; the rest are waited for below
    # once, from the data the points use (a sweep.base file's, if set): every point sees the same
    # splits; a second process on the same sweep waits for the first one's preparation
    with RunFolderLock(out / CLAIMS / "data").acquire(wait=True):
        data_dir = resolve_prepared(sweep_base(cfg), out / "data")
    prepared = [f"data.path={data_dir}", "data.source=prepared"]
    if first is None:
        outcome = run_sweep(cfg, run_point, is_done=point_finished, base_overrides=prepared)
    else:

        def after_stage_one(point: Config, point_dir: Path) -> None:
            first.wait_for(point.train.seed, run_point, point_finished)
            run_point(point, point_dir)

        outcome = run_sweep(cfg, after_stage_one, point_finished, prepared, resolve=first.link)
        if outcome.complete:
            sweep(first.cfg)  # every stage-1 point is done: its aggregate and report
    if outcome.complete:  # run mode, every point done (by this process or others): the report
        report(out)
    return out
