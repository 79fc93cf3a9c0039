"""Reading saved run folders (docs/architecture.md, "Run folder"), tolerant of missing pieces.

Every reader returns what it found plus human-readable notes about what it did not find or could
not read, so the report can say why a table cell or a plot is missing instead of crashing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bear_ds.errors import MissingPathError, RunStateError

# files whose presence makes a folder the root of a run (config.yaml alone is not enough: a
# prepared data folder has one too)
RUN_MARKERS: tuple[str, ...] = ("summary.json", "train_log.jsonl", "epochs.jsonl")
SWEEP_MANIFEST = "points.json"
SWEEP_CONFIG = "sweep.yaml"
SEED_KEY = "train.seed"
# always reported per point, whether or not the grid varies them
METHOD_KEYS: tuple[str, ...] = (
    "loss.name",
    "loss.lam",
    "loss.xi",
    "loss.tau",
    "loss.beam_width",
    "eval.num_beams",
    SEED_KEY,
)
POINT_CONFIGS = "point_configs"
CLAIMS = ".claims"  # CLAIMS/NAME/.lock: the process running point NAME
STAGE1_DIR = "stage1"  # a two-stage sweep's stage-1 sweep folder, inside its own (bear_ds/two_stage.py)
# subfolders of a run that never hold evaluate/analyze outputs
_NOT_OUTPUT_DIRS = {"checkpoints", "model", "data", "tokenizer", "plots"}


def read_jsonl(
    path: Path, check: Callable[[dict[str, Any]], str | None] | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Records of a JSON-lines file; malformed lines (e.g. a line cut by a crash) are reported, not
    kept. `check(record)` says what is wrong with a record that parsed (None: nothing); such a
    record is reported and not kept either."""
    records: list[dict[str, Any]] = []
    notes: list[str] = []
    with path.open() as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                notes.append(f"{path} line {line_no}: invalid JSON ({exc.msg}); line ignored")
                continue
            if not isinstance(record, dict):
                notes.append(f"{path} line {line_no}: not a JSON object; line ignored")
                continue
            problem = check(record) if check is not None else None
            if problem is not None:
                notes.append(f"{path} line {line_no}: {problem}; line ignored")
                continue
            records.append(record)
    return records, notes


def read_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """A JSON object file, or (None, why) when it is absent or unreadable."""
    if not path.is_file():
        return None, f"{path} does not exist"
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        return None, f"{path} line {exc.lineno}: invalid JSON ({exc.msg})"
    if not isinstance(data, dict):
        return None, f"{path}: top level is not a JSON object"
    return data, None


def read_config_yaml(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """A saved config.yaml as a plain dict (not validated: it only supplies labels and parameters)."""
    if not path.is_file():
        return None, f"{path} does not exist"
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        return None, f"{path}: invalid YAML ({exc})"
    if not isinstance(data, dict):
        return None, f"{path}: top level is not a mapping"
    return data, None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {dotted key: leaf value}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def find_output(run_dir: Path, filename: str) -> tuple[Path | None, str | None]:
    """`filename` in the run folder or one of its subfolders (evaluate/analyze write to their own
    output_dir, usually inside the run folder). Several candidates: the newest, with a note."""
    candidates = [run_dir / filename] if (run_dir / filename).is_file() else []
    if run_dir.is_dir():
        for sub in sorted(run_dir.iterdir()):
            if sub.is_dir() and sub.name not in _NOT_OUTPUT_DIRS and (sub / filename).is_file():
                candidates.append(sub / filename)
    if not candidates:
        return None, f"no {filename} in {run_dir} or its subfolders"
    if len(candidates) == 1:
        return candidates[0], None
    newest = max(candidates, key=lambda p: p.stat().st_mtime)
    others = ", ".join(str(p) for p in candidates if p != newest)
    return newest, f"{run_dir}: several {filename} found; used the newest, {newest} (also: {others})"


def is_run_dir(folder: Path) -> bool:
    return folder.is_dir() and any((folder / marker).is_file() for marker in RUN_MARKERS)


def is_sweep_dir(folder: Path) -> bool:
    return (folder / SWEEP_MANIFEST).is_file() and (folder / SWEEP_CONFIG).is_file()


@dataclass
class RunData:
    """What one run folder holds; absent parts are None with a note saying why."""

    name: str
    folder: Path
    config: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    train_log: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    eval_metrics: dict[str, Any] | None = None
    analysis: dict[str, Any] | None = None
    notes: dict[str, list[str]] = field(default_factory=dict)

    def note(self, topic: str, text: str) -> None:
        self.notes.setdefault(topic, []).append(text)

    def config_value(self, dotted: str) -> Any:
        return flatten(self.config).get(dotted) if self.config else None


def load_run(name: str, folder: Path) -> RunData:
    """Read every documented output of a run folder; never raises for missing or malformed files."""
    run = RunData(name=name, folder=folder)
    run.config, why = read_config_yaml(folder / "config.yaml")
    if why:
        run.note("config", why)
    run.summary, why = read_json(folder / "summary.json")
    if why:
        run.note("summary", why)
    for attr, filename in (("train_log", "train_log.jsonl"), ("epochs", "epochs.jsonl")):
        path = folder / filename
        if not path.is_file():
            run.note(attr, f"{path} does not exist")
            continue
        records, notes = read_jsonl(path)
        setattr(run, attr, records)
        for text in notes:
            run.note(attr, text)
        if not records:
            run.note(attr, f"{path} has no records")
    for attr, filename in (("eval_metrics", "metrics.json"), ("analysis", "analysis.json")):
        path, why = find_output(folder, filename)
        if path is None:
            run.note(attr, why or f"no {filename}")
            continue
        if why:
            run.note(attr, why)
        data, why = read_json(path)
        setattr(run, attr, data)
        if why:
            run.note(attr, why)
    return run


def discover_runs(folder: Path) -> tuple[str, dict[str, Path]]:
    """("sweep" | "run" | "runs", {name: run folder}) for a sweep, a run, or a folder of runs."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingPathError(f"{folder} is not a folder")
    if is_sweep_dir(folder):
        manifest, why = read_json(folder / SWEEP_MANIFEST)
        if manifest is None:
            raise RunStateError(f"sweep manifest unreadable: {why}")
        return "sweep", {p["name"]: folder / p["name"] for p in manifest.get("points", [])}
    if is_run_dir(folder):
        return "run", {folder.resolve().name: folder}
    runs = {sub.name: sub for sub in sorted(folder.iterdir()) if is_run_dir(sub)}
    if not runs:
        raise MissingPathError(
            f"{folder} holds no run: expected {' or '.join(RUN_MARKERS)} in it or in its subfolders, "
            f"or a sweep's {SWEEP_MANIFEST}"
        )
    return "runs", runs
