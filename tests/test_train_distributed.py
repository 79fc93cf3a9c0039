"""Real DeepSpeed ZeRO-3 with 2 CPU ranks (gloo), launched as users launch it.

One 2-rank reference run (module fixture) is compared against: 1 rank with accumulation 2 (same
losses: global-batch invariance), the `deepspeed` launcher, a two-"node" loopback launch, and
DeepSpeed's own zero_to_fp32 consolidation of its checkpoint (same weights as the export). Every
launch has an outer timeout and a short process-group timeout.

Each launch here guards what one process cannot show: gradients averaged over ranks, parameters
partitioned across ranks, the environment each launcher gives its ranks. Checked elsewhere, in
cheaper tests: kill and resume with 2 ranks (test_train_epochs.py, killed twice, mid-epoch), the
non-finite-loss stop (test_train_single.py, in one process; every 2-rank step runs its all-reduce).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launching import BIN, REPO, logged, run_ok
from launching import launch_env as _env
from train_data import write_prepared

from bear_ds.distributed import free_port

pytestmark = pytest.mark.slow

YAML = REPO / "launchers" / "accelerate" / "cpu_zero3.yaml"
STEPS = 24
COMMON = [
    "model.name=tiny",
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "tokenizer.vocab_size=300",
    "loss.name=bear",
    "train.global_batch=8",
    "train.micro_batch=4",
    "train.lr=3e-3",
    "train.warmup_steps=2",
    "train.schedule=constant",  # per-step losses of a prefix do not depend on train.max_steps
    "train.eval_every_epoch=false",
    "train.pg_timeout_s=30",
]


def _accelerate(overrides: list[str], extra: list[str] | None = None) -> list[str]:
    return [str(BIN / "accelerate"), "launch", "--config_file", str(YAML), "--main_process_port", str(free_port()),
            *(extra or []), "-m", "bear_ds.train", *COMMON, *overrides]  # fmt: skip


def _losses(out: Path) -> list[float]:
    return logged(out, "loss")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("data") / "prepared")


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    run_ok(
        _accelerate([f"data.path={prepared}", f"train.max_steps={STEPS}", "train.save_every=8", f"output_dir={out}"])
    )
    return out


def test_log_and_loss_decreases(reference):
    """Alone guards: a real 2-rank ZeRO-3 run learns (the loss falls), rank 0 logs every step with
    world_size 2, and checkpoints of partitioned states rotate (keep_last)."""
    rows = [json.loads(line) for line in (reference / "train_log.jsonl").read_text().splitlines()]
    assert len(rows) == STEPS
    for key in ("step", "epoch", "loss", "ce", "weight_mean", "frac_outside_topb", "lr", "grad_norm",
                "tokens_per_s", "padded_frac", "world_size", "zero_stage", "elapsed_s"):  # fmt: skip
        assert key in rows[0], key
    assert {(r["world_size"], r["zero_stage"]) for r in rows} == {(2, 3)}
    losses = [r["loss"] for r in rows]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.75 * first, f"loss did not decrease: first steps {losses[:4]}, last {losses[-4:]}"
    assert sorted(p.name for p in (reference / "checkpoints").iterdir()) == ["step_16", "step_24"]  # keep_last=2


def test_export_equals_zero_to_fp32_and_loads_with_transformers(reference):
    """Alone guards: the export gathered from 2 ranks' partitions equals DeepSpeed's own consolidation
    of the per-rank checkpoint shards (one process has a single shard)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    exported = load_file(reference / "model" / "model.safetensors")
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(reference / "checkpoints" / f"step_{STEPS}"))
    assert set(exported) <= set(consolidated)
    for key, value in exported.items():
        torch.testing.assert_close(value, consolidated[key], rtol=0, atol=0, msg=key)
    model = AutoModelForCausalLM.from_pretrained(reference / "model", local_files_only=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, consolidated[key], rtol=0, atol=0, msg=key)
    for name in ("catalog.json", "config.yaml", "tokenizer.json"):
        assert (reference / "model" / name).is_file(), name
    assert json.loads((reference / "model" / "export_info.json").read_text())["dtype"] == ["float32"]


def test_one_rank_with_accumulation_matches_two_ranks(prepared, reference, tmp_path):
    """Alone guards: gradients all-reduced over 2 ranks equal 1 rank accumulating 2 micro-batches
    (global-batch invariance across world sizes)."""
    out = tmp_path / "one_rank"
    steps = 10
    cmd = [sys.executable, "-m", "bear_ds.train", *COMMON, f"data.path={prepared}", f"train.max_steps={steps}",
           f"output_dir={out}", "train.ds_config=ds_configs/zero3_cpu.json"]  # fmt: skip
    run_ok(cmd)
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {(r["world_size"], r["zero_stage"]) for r in rows} == {(1, 3)}
    one, two = _losses(out), _losses(reference)[:steps]
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < 1e-5, (one, two)


def test_deepspeed_launcher(prepared, reference, tmp_path):
    """Alone guards: the environment the `deepspeed` launcher gives its ranks (no --local_rank
    argument, its own rank variables) is read as accelerate's is: the same losses."""
    out = tmp_path / "ds_launcher"
    steps = 6
    cmd = [str(BIN / "deepspeed"), "--num_nodes", "1", "--num_gpus", "2", "--no_local_rank",
           "--master_port", str(free_port()), "--module", "bear_ds.train", *COMMON, f"data.path={prepared}",
           f"train.max_steps={steps}", f"output_dir={out}", "train.zero_stage=3"]  # fmt: skip
    run_ok(cmd)
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {(r["world_size"], r["zero_stage"]) for r in rows} == {(2, 3)}
    got, ref = _losses(out), _losses(reference)[:steps]
    assert max(abs(a - b) for a, b in zip(got, ref, strict=True)) < 1e-5, (got, ref)


def test_two_node_loopback(prepared, reference, tmp_path):
    """Alone guards: a multi-node launch (two launcher invocations, machine_rank 0 and 1, one rank
    each) forms one process group and trains as one node of 2 ranks does."""
    out = tmp_path / "two_nodes"
    steps = 6
    port = str(free_port())
    procs = []
    for machine_rank in (0, 1):
        cmd = _accelerate(
            [f"data.path={prepared}", f"train.max_steps={steps}", f"output_dir={out}"],
            [
                "--num_machines",
                "2",
                "--num_processes",
                "2",
                "--machine_rank",
                str(machine_rank),
                "--main_process_ip",
                "127.0.0.1",
                "--deepspeed_multinode_launcher",
                "standard",
            ],  # fmt: skip
        )
        cmd[cmd.index("--main_process_port") + 1] = port
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      start_new_session=True))  # fmt: skip
    try:
        for proc in procs:
            if proc.wait(timeout=240) != 0:
                raise AssertionError(proc.stderr.read()[-3000:])
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    got, ref = _losses(out), _losses(reference)[:steps]
    assert max(abs(a - b) for a, b in zip(got, ref, strict=True)) < 1e-5, (got, ref)


def test_lora_under_zero3_trains_only_adapters_and_exports_merged(prepared, reference, tmp_path):
    """Alone guards: LoRA over base weights partitioned across ranks: only the adapters train, and
    the export gathers and merges them (test_train_single.py covers LoRA in one process)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    shutil.copytree(reference / "model", base)
    out = tmp_path / "lora"
    run_ok(_accelerate([f"data.path={prepared}", "train.max_steps=4", f"output_dir={out}", "model.name=hf",
                      f"model.path={base}", "model.lora.enabled=true", "train.lr=1e-2"]))  # fmt: skip
    assert json.loads((out / "model" / "export_info.json").read_text())["kind"] == "lora_merged"
    before, after = load_file(base / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed), changed
    AutoModelForCausalLM.from_pretrained(out / "model", local_files_only=True)


PARTITION_SCRIPT = r"""
import json, sys, torch
from bear_ds.config import load_config
from bear_ds.models import build_model
from bear_ds.tokenization import train_bpe_tokenizer
from bear_ds.training.accelerator import build_accelerator

cfg = load_config(None, ["train.global_batch=4", "train.micro_batch=2", "model.hidden_size=64",
                         "model.intermediate_size=128", "train.pg_timeout_s=30"])
accelerator, plan, stage = build_accelerator(cfg.train)
tok = train_bpe_tokenizer(["a red stapler", "blue pen", "green desk lamp"] * 50, 300)
model = build_model(cfg.model, tok)
params = list(model.named_parameters())
report = {
    "rank": accelerator.process_index, "world": accelerator.num_processes, "stage": stage,
    "all_ds": all(hasattr(p, "ds_id") for _, p in params),
    "empty_outside_gather": all(p.numel() == 0 for _, p in params),
    "enough": all(p.ds_tensor.numel() * accelerator.num_processes >= p.ds_numel for _, p in params),
    "held": sum(p.ds_tensor.numel() for _, p in params),
    "total": sum(p.ds_numel for _, p in params),
}
with open(sys.argv[1] + f"/rank{accelerator.process_index}.json", "w") as f:
    json.dump(report, f)
accelerator.wait_for_everyone()
torch.distributed.destroy_process_group()  # a rank leaving while gloo still talks aborts the other
# and leave as a bear-ds command does: the partitioned model outlives the group, and freeing it in
# interpreter finalization aborted a rank once ("terminate called without an active exception")
from bear_ds.runtime import exit_process
exit_process(0)
"""


def test_params_partitioned_on_creation(tmp_path):
    """Alone guards: bear_ds's model builder under `accelerate launch` creates every parameter
    partitioned across the ranks (about half each), never a full copy on one rank."""
    script = tmp_path / "partition.py"
    script.write_text(PARTITION_SCRIPT)
    run_ok([str(BIN / "accelerate"), "launch", "--config_file", str(YAML), "--main_process_port", str(free_port()),
          str(script), str(tmp_path)])  # fmt: skip
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rep in reports:
        assert rep["world"] == 2 and rep["stage"] == 3
        assert rep["all_ds"] and rep["empty_outside_gather"] and rep["enough"], rep
        assert rep["held"] <= 0.55 * rep["total"], rep  # about half each, padding aside


def test_per_epoch_evaluation_selects_and_exports_the_best_epoch(prepared, tmp_path):
    """Alone guards: per-epoch evaluation inside a 2-rank ZeRO-3 run (users sharded over ranks,
    decoding synced over partitioned weights), the selection of the best epoch and its export
    (test_train_single.py covers the selection in one process)."""
    out = tmp_path / "epochs"
    run_ok(_accelerate([f"data.path={prepared}", "train.epochs=2", "train.global_batch=32", f"output_dir={out}",
                      "train.eval_every_epoch=true", "eval.num_beams=5", "eval.top_k=[1,5]",
                      "train.select_metric=ndcg@5", "train.eval_max_users=8"]))  # fmt: skip
    epochs = [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in epochs] == [(0, 8), (1, 16)]
    assert all(r["valid"]["users"] == 8 and r["test"]["users"] == 16 for r in epochs)
    # the partitioned weights were gathered once per evaluation (a tiny model fits), not at every forward
    assert all(r[s]["decoding"]["gather"] == "once" and r[s]["decoding"]["zero3_partitioned"]
               for r in epochs for s in ("valid", "test")), epochs  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    best = max(epochs, key=lambda r: r["valid"]["ndcg@5"])  # first best on ties, as the trainer
    assert summary["selected_epoch"] == best["epoch"] and summary["test"] == best["test"]
    assert "released" in summary["test_max_over_epochs"]["protocol"]
    assert summary["test_max_over_epochs"]["ndcg@5"] == max(r["test"]["ndcg@5"] for r in epochs)
    assert (summary["steps"], summary["world_size"]) == (16, 2)
    assert json.loads((out / "model" / "export_info.json").read_text())["epoch"] == best["epoch"]
    assert json.loads((out / "model_final" / "export_info.json").read_text())["step"] == 16
