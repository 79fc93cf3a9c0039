"""The two entry points (`bear-ds ...`, `python -m bear_ds.train`): errors, logging, import side effects."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bear_ds import cli
from bear_ds import train as train_entry
from bear_ds.errors import BearDsError, ConfigError, DataError, MissingPathError, ModelInputError, RunStateError

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "BEAR_DS_TRACEBACK"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_every_tool_error_derives_from_one_base():
    from bear_ds.config import ConfigError as FromConfig
    from bear_ds.data import DataError as FromData
    from bear_ds.sweeps import SweepError
    from bear_ds.training.trainer import NonFiniteLossError

    assert FromConfig is ConfigError and FromData is DataError
    for cls in (
        ConfigError,
        DataError,
        ModelInputError,
        RunStateError,
        MissingPathError,
        SweepError,
        NonFiniteLossError,
    ):
        assert issubclass(cls, BearDsError), cls
    # callers that caught the built-in types keep working
    assert issubclass(ConfigError, ValueError) and issubclass(MissingPathError, FileNotFoundError)


def test_cli_prints_a_tool_error_as_one_line_and_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("BEAR_DS_TRACEBACK", raising=False)
    missing = tmp_path / "no_such_dataset"
    assert cli.main(["prepare", f"data.path={missing}", f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bear-ds prepare: error: ") and str(missing) in err
    # several bad keys: still one line, naming each
    assert cli.main(["prepare", "data.sorce=x", "loss.lam=-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.sorce" in err and "loss.lam" in err


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    def broken(cfg):
        raise ZeroDivisionError("a bug, not bad input")

    monkeypatch.setitem(cli.RUNNERS, "prepare", broken)
    with pytest.raises(ZeroDivisionError):  # not swallowed into an exit status: Python prints it, exit 1
        cli.main(["prepare"])
    import bear_ds.training

    monkeypatch.setattr(bear_ds.training, "train", broken)
    with pytest.raises(ZeroDivisionError):
        train_entry.main(["train.zero_stage=0"])


def test_train_module_prints_a_tool_error_as_one_line_and_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("BEAR_DS_TRACEBACK", raising=False)
    assert train_entry.main(["train.epochs=0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m bear_ds.train: error: ") and "train.epochs" in err

    import bear_ds.training

    def refuses(cfg):
        raise RunStateError(f"{cfg.output_dir}/checkpoints holds checkpoints of an earlier run")

    monkeypatch.setattr(bear_ds.training, "train", refuses)
    assert train_entry.main([f"output_dir={tmp_path}"]) == 2
    assert f"{tmp_path}/checkpoints holds" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("module", ["bear_ds", "bear_ds.train"])
def test_entry_point_processes_exit_2_without_traceback(tmp_path, module):
    """Alone guards (the in-process tests see only `main`'s return value): a real interpreter run
    through the module's `__main__` exits 2 with one error line and prints no traceback at exit."""
    missing = tmp_path / "no_such_dataset"
    command = ["prepare"] if module == "bear_ds" else []
    proc = subprocess.run(
        [sys.executable, "-m", module, *command, f"data.path={missing}", "train.zero_stage=0",
         f"output_dir={tmp_path / 'out'}"],
        capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and str(missing) in errors[0], proc.stderr[-3000:]


EXIT_PROBE = """
import atexit, sys
from bear_ds.runtime import exit_process
atexit.register(lambda: print("|finalized"))
print("written", end="")  # buffered: a pipe is not a terminal
exit_process(3)
"""


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_a_rank_among_several_exits_without_finalization(world_size):
    """Alone guards: the process's real exit through exit_process: output flushed, finalization run
    for a lone process and skipped for a rank of several."""
    # one rank of several skips interpreter finalization (gloo may abort there), output flushed first
    env = {**_env(), "WORLD_SIZE": world_size}
    proc = subprocess.run([sys.executable, "-c", EXIT_PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert proc.stdout == ("written|finalized\n" if world_size == "1" else "written")


def test_module_entry_point_runs_the_cli_as_one_rank_of_several():
    """Alone guards: `python -m bear_ds` as one rank of several runs its command and exits 0."""
    proc = subprocess.run(
        [sys.executable, "-m", "bear_ds", "config", "loss.lam=0.3"],
        capture_output=True, text=True, env={**_env(), "WORLD_SIZE": "2"}, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0 and "lam: 0.3" in proc.stdout, proc.stderr[-3000:]


IMPORT_PROBE = r"""
import json, logging, os, pkgutil, sys, warnings, importlib
# the libraries bear_ds builds on, first: their own import-time effects are not ours
import torch, transformers, accelerate, deepspeed, peft, datasets, matplotlib, pandas, pyarrow
import transformers.cache_utils, transformers.integrations, peft.tuners.lora, accelerate.utils
from transformers import AttentionInterface

def snapshot():
    return {
        "environ": dict(os.environ),
        "warnings": [repr(f) for f in warnings.filters],
        "root_handlers": [repr(h) for h in logging.getLogger().handlers],
        "root_level": logging.getLogger().level,
        "bear_ds_level": logging.getLogger("bear_ds").level,
        "attention": sorted(AttentionInterface._global_mapping),
        "mpl_backend": matplotlib.rcParams._get_backend_or_none(),
        "pyplot": "matplotlib.pyplot" in sys.modules,
    }

before = snapshot()
import bear_ds
names = [m.name for m in pkgutil.walk_packages(bear_ds.__path__, "bear_ds.") if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
after = snapshot()
changed = {k: {"before": before[k], "after": after[k]} for k in before if before[k] != after[k]}
print(json.dumps({"modules": names, "changed": changed}))
"""


@pytest.mark.slow
def test_importing_any_bear_ds_module_changes_no_global_state():
    """Needs a fresh interpreter: in the test process the modules are already imported, so their
    import-time effects would not show."""
    import json

    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"bear_ds.cli", "bear_ds.generation.beam", "bear_ds.reports.plots", "bear_ds.training.trainer"} <= set(
        result["modules"]
    )
    assert result["changed"] == {}


@pytest.mark.slow
def test_analyze_and_sweep_messages_show_without_a_training(tmp_path):
    """Alone guards: a fresh `python -m bear_ds` process configures logging itself, so INFO messages
    reach stderr without a training having set anything up."""
    # logging is configured by the entry point: a sweep writing job scripts reports it on stderr
    from train_data import write_prepared

    prepared = write_prepared(tmp_path / "data")
    proc = subprocess.run(
        [sys.executable, "-m", "bear_ds", "sweep", "sweep.mode=scripts", "sweep.grid.train.seed=[1,2]",
         "data.source=prepared", f"data.path={prepared}", f"output_dir={tmp_path / 'sweep'}"],
        capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "INFO bear_ds.sweeps: wrote 2 job scripts" in proc.stderr, proc.stderr[-3000:]


def test_missing_paper_data_says_where_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("BEAR_DS_TRACEBACK", raising=False)
    monkeypatch.chdir(tmp_path)  # no data/bear/ here
    assert cli.main(["prepare", "--config", str(REPO / "configs" / "office" / "bear.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.path data/bear/Office does not exist" in err
    assert "https://github.com/Tiny-Snow/BEAR-SIGIR-2026 (MIT)" in err and "data/README.md" in err
