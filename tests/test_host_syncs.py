"""Host synchronisations: the counter, and a training micro-step that waits on the device at most 5 times."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from train_data import write_prepared

from bear_ds.config import load_config
from bear_ds.training.host_syncs import count_host_syncs, not_counted


def test_counter_counts_what_would_wait_on_a_gpu():
    x = torch.randn(10, requires_grad=True)
    with count_host_syncs() as syncs:
        positive = x > 0
        picked = x[positive].sum()  # a bool mask: the output size is read (and again in the backward)
        bool(positive.any())
        int(x.argmax())
        float(picked)
        x.detach().tolist()
        x.detach().numpy()
        torch.repeat_interleave(torch.tensor([1, 2]))  # output size from the values
        torch.repeat_interleave(torch.tensor([1, 2]), output_size=3)  # given: no wait
        x.nonzero()
        picked.backward()
        x.detach()[torch.tensor([0, 3])].sum()  # integer indices: no wait
        with not_counted():
            picked.item()
    assert dict(syncs.by_kind) == {"scalar_read": 3, "data_dependent_shape": 4, "to_host": 2}
    assert syncs.total == 9
    x.detach().tolist()  # outside a counter: counted nowhere
    assert syncs.total == 9


def test_nested_counters_both_count():
    with count_host_syncs() as outer:
        torch.ones(2).sum().item()
        with count_host_syncs() as inner:
            torch.ones(2).sum().item()
    assert (outer.total, inner.total) == (2, 1)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["lml", "msl", "bear"])
def test_a_training_micro_step_waits_at_most_5_times_with_the_same_losses(tmp_path, monkeypatch, loss):
    """The trainer's micro-step (host-side response positions and trie states) against the micro-batch
    without them (positions and trie walk found on the device): same per-step losses, at most 5
    synchronisations per micro-step where the device path needs several per micro-batch."""
    from bear_ds.training import train, trainer

    prepared = write_prepared(tmp_path / "data", varied_titles=True)

    def run(name: str) -> list[dict]:
        out = tmp_path / name
        train(load_config(None, [
            f"data.path={prepared}", f"output_dir={out}", "train.zero_stage=0", "train.max_steps=2",
            "train.global_batch=16", "train.micro_batch=8", "train.eval_every_epoch=false", f"loss.name={loss}",
        ]))  # fmt: skip
        return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]

    encoded = run("encoded")
    load = trainer.load_micro_batch
    monkeypatch.setattr(trainer, "load_micro_batch", lambda *a, **k: dataclasses.replace(load(*a, **k), response=None))
    device_walk = run("device_walk")
    assert [r["loss"] for r in encoded] == [r["loss"] for r in device_walk]
    assert all(np.isfinite(r["loss"]) for r in encoded)
    # every step line has both keys; a CPU run knows no peak, so no MFU
    assert all(r["mfu"] is None and isinstance(r["host_syncs"], int) for r in encoded + device_walk)
    micro_steps = 2
    assert all(r["host_syncs"] <= 5 * micro_steps for r in encoded), encoded
    assert all(r["host_syncs"] >= 5 * micro_steps for r in device_walk), device_walk


@pytest.mark.parametrize("name", ["lml", "msl", "bear"])
def test_response_loss_with_host_child_counts_is_the_same_loss_without_waiting(name):
    from test_losses_head import H, V, response_batch

    from bear_ds.config import LossConfig
    from bear_ds.losses import response_loss

    trie, targets, states = response_batch(9)
    hidden, weight = torch.randn(len(targets), H, requires_grad=True), torch.randn(V, H)
    cfg = LossConfig(name=name, beam_width=2, chunk_size=7)  # several chunks, each sized on the host
    reference = response_loss(hidden, weight, targets, states, trie, cfg)
    children = trie.num_children(states).numpy()
    with count_host_syncs() as syncs:
        out = response_loss(hidden, weight, targets, states, trie, cfg, children=children)
        out.loss.backward()  # the chunks are recomputed in the backward: sized on the host too
    assert syncs.total == 0, dict(syncs.by_kind)
    assert torch.equal(out.loss.detach(), reference.loss.detach())
    assert out.metrics == reference.metrics
    assert torch.equal(trie.allowed_mask(states, V, pairs=int(children.sum())), trie.allowed_mask(states, V))
