"""What a wheel installed outside the checkout needs: package data, version, entry point."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import bear_ds
from bear_ds.cli import main
from bear_ds.training.accelerator import DS_CONFIG_DIR, resolve_ds_config_path

REPO = Path(__file__).resolve().parents[1]


def test_default_deepspeed_configs_are_package_data():
    package_dir = Path(bear_ds.__file__).parent / "ds_configs"
    assert DS_CONFIG_DIR.resolve() == package_dir.resolve()
    from bear_ds.config import load_config

    for stage in (2, 3):
        assert resolve_ds_config_path(load_config(None, [f"train.zero_stage={stage}"]).train).is_file()
    # the checkout's ds_configs/ (what the launchers' yaml files name) is the same files, not a copy that can drift
    top = REPO / "ds_configs"
    assert sorted(p.name for p in top.glob("*.json")) == sorted(p.name for p in package_dir.glob("*.json"))
    for path in top.glob("*.json"):
        assert path.read_bytes() == (package_dir / path.name).read_bytes(), path.name


def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"bear-ds {bear_ds.__version__}"


@pytest.mark.slow
def test_wheel_holds_the_package_data_and_the_entry_point(tmp_path):
    """Alone guards (pip builds it in a subprocess): what the built wheel holds, as an install
    outside the checkout sees it."""
    # built from a copy of what the wheel is made of: an in-tree build would leave build/ in the checkout
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "bear_ds", source / "bear_ds", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("bear_ds-*.whl")
    assert wheel.name.startswith(f"bear_ds-{bear_ds.__version__}-")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        package_dir = REPO / "bear_ds" / "ds_configs"
        for path in package_dir.glob("*.json"):
            assert zf.read(f"bear_ds/ds_configs/{path.name}") == path.read_bytes()
        assert "bear_ds/py.typed" in names
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        assert "bear-ds = bear_ds.cli:console_main" in zf.read(f"{dist_info}/entry_points.txt").decode()
        metadata = zf.read(f"{dist_info}/METADATA").decode()
    assert f"Version: {bear_ds.__version__}" in metadata
    assert "Requires-Dist: transformers<6,>=4.57" in metadata
    assert "Provides-Extra: tensorboard" in metadata
    assert not any(n.startswith(("tests/", "ds_configs/", "configs/")) for n in names)
