"""Launching training as users do, in subprocesses with outer timeouts, and killing it mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def launch_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")  # launchers start `deepspeed`/`torchrun` by name
    return env


def run_ok(cmd: list[str], timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    # the outer timeout only catches a hang: 85 s was too short for a 6-step ZeRO-3 launch on a
    # 2-core machine that ran two trainings and the demo beside the suite
    proc = subprocess.run(cmd, cwd=REPO, env={**launch_env(), **env}, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def newest_checkpoint_step(out: Path) -> int:
    steps = [int(p.name[5:]) for p in (out / "checkpoints").glob("step_*") if (p / "trainer_state.json").is_file()]
    return max(steps, default=0)


def kill_after_checkpoint(cmd: list[str], out: Path, step: int, timeout: float = 240) -> int:
    """Start `cmd`, SIGKILL it (the launcher and every rank) once a complete checkpoint of `step` or
    later exists; return the newest complete checkpoint's step after the kill."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    deadline = time.time() + timeout
    try:
        while newest_checkpoint_step(out) < step:
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"run ended or timed out before checkpoint {step}:\n{proc.stderr.read()[-3000:]}")
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    return newest_checkpoint_step(out)


def logged(out: Path, key: str) -> list:
    """`key` of every train_log.jsonl line, checking there is one line per optimiser step, in order."""
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)), "one line per optimiser step, in order"
    return [r[key] for r in rows]
