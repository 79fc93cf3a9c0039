"""Run logs on rank 0: `train_log.jsonl` (one line per optimiser step), `epochs.jsonl`, a tqdm bar."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from bear_ds.errors import RunStateError
from bear_ds.outputs import write_text_atomic

logger = logging.getLogger(__name__)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class JsonlLog:
    """Append-only JSON-lines file; `truncate_after(step)` drops lines a killed run wrote past its checkpoint."""

    def __init__(self, path: str | Path, enabled: bool) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """The records. A last line cut short by a crash (no newline, not JSON) is left out with a
        warning, so that the resume's `truncate_after` rewrites the file whole; any other bad line
        is an error naming it."""
        if not self.path.is_file():
            return []
        text = self.path.read_text()
        lines = text.splitlines()
        records = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                if number == len(lines) and not text.endswith("\n"):
                    logger.warning("%s line %d was cut short by a crash (%s): left out", self.path, number, exc.msg)
                    continue
                raise RunStateError(f"{self.path} line {number}: not valid JSON ({exc.msg})") from exc
        return records

    def truncate_after(self, step: int, key: str = "step") -> None:
        if not self.enabled or not self.path.is_file():
            return
        kept = [r for r in self.read() if r.get(key, 0) <= step]
        # all at once: a kill here must not leave the log cut short of the resumed step
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))


class ProgressBar:
    """tqdm on rank 0 showing step, loss, tokens/s and ETA; a no-op elsewhere."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
