"""benchmarks/gpu_evidence.sh: its --help contract, and every step of its GPU path run on the CPU at a
tiny budget (--cpu-smoke), carried wheels (one split in two parts, as the model wheel travels) included."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_evidence.sh"


def _run(args: list[str], env: dict[str, str] | None = None, timeout: int = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def test_help_says_what_it_runs_and_how_long_it_takes() -> None:
    proc = _run(["--help"])
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for needed in ("SmolLM2-135M", "Office", "LML, MSL and BEAR", "seeds 1, 2 and 3", "whole test split",
                   "results.md", "paired", "8 minutes of device time", "--cpu-smoke", "--prepare"):  # fmt: skip
        assert needed in text, needed
    bad = _run(["--bogus"])
    assert bad.returncode == 2 and bad.stderr.strip() == "gpu_evidence.sh: unknown argument '--bogus' (see --help)"


def _wheel(folder: Path, name: str) -> Path:
    """A minimal pure-Python wheel holding one module `name` that sets MARK."""
    files = {
        f"{name}/__init__.py": b"MARK = 'installed from the carry'\n",
        f"{name}-0.1.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n".encode(),
        f"{name}-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}\n"
        for path, data in files.items()
    )
    path = folder / f"{name}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in files.items():
            archive.writestr(member, data)
        archive.writestr(f"{name}-0.1.dist-info/RECORD", record + f"{name}-0.1.dist-info/RECORD,,\n")
    return path


def _carry(root: Path) -> Path:
    """A carry as --prepare lays it out: part1/wheels, and a wheel split into part1/NAME.part1 + part2/NAME.part2."""
    (root / "part1" / "wheels").mkdir(parents=True)
    (root / "part2").mkdir()
    _wheel(root / "part1" / "wheels", "gev_probe_plain")
    split = _wheel(root, "gev_probe_split")
    data = split.read_bytes()
    (root / "part1" / f"{split.name}.part1").write_bytes(data[:100])
    (root / "part2" / f"{split.name}.part2").write_bytes(data[100:])
    split.unlink()
    return root


def test_receive_checks_that_the_first_part_arrived(tmp_path: Path) -> None:
    assert _run(["--receive"], {"CARRY": str(tmp_path / "none")}).returncode != 0
    carry = _carry(tmp_path / "carry")
    proc = _run(["--receive"], {"CARRY": str(carry)})
    assert proc.returncode == 0 and "make device call 2 now" in proc.stdout


@pytest.mark.slow
@pytest.mark.shared_data
def test_cpu_smoke_runs_every_step_and_writes_the_paired_statistics(tmp_path: Path, shared_data: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    env = {"PY": sys.executable, "OUT": str(out), "WORK": str(work), "CARRY": str(_carry(tmp_path / "carry")),
           "DATA": str(shared_data / "Office")}  # fmt: skip
    proc = _run(["--cpu-smoke"], env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = (out / "status.txt").read_text().splitlines()
    assert [line.split()[:2] for line in status] == [
        ["install", "ok"],
        ["model", "ok"],
        ["sweep", "ok"],
        ["report", "ok"],
    ]
    for name in ("gev_probe_plain", "gev_probe_split"):  # the split wheel was joined before the install
        assert (work / "site" / name / "__init__.py").is_file(), name
    assert len(list((work / "runs").glob("*/analysis/analysis.jsonl"))) == 6  # 3 methods x 2 seeds
    text = (out / "results.md").read_text()
    for method in ("msl", "bear"):
        assert re.search(
            rf"\*\*loss.name={method} vs loss.name=lml\*\*: pooled, over 2 seed\(s\) \([0-9]+ users\): NDCG@10 "
            r"difference [+-][0-9.]+ \(95% interval \[[+-][0-9.]+, [+-][0-9.]+\], p = [0-9.e-]+\)",
            text,
        ), method
    assert "### Pruned top-B positives, as in the paper's Figure 1" in text
