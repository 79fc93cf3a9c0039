"""The loss head under real DeepSpeed ZeRO-3 on 2 CPU ranks (gloo) equals a single-process reference.

Each rank runs a tiny LlamaForCausalLM (tied embeddings) built partitioned under zero.Init, with a
different number of response tokens per rank (step 1: 4 examples vs 1 short one; step 2: rank 1
has no response token at all). The per-rank losses and the gathered gradients after backward
must equal a plain single-process computation (gradients: the mean over ranks).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama_kwargs

from bear_ds.config import LossConfig
from bear_ds.distributed import torchrun_command
from bear_ds.losses import backbone_hidden_states, lm_head_context, response_loss, select_response
from bear_ds.trie import TokenTrie

V, H = 40, 16
TITLES = [[3, 4, 5, 2], [3, 4, 6, 2], [3, 7, 2], [8, 9, 2], [8, 4, 5, 6, 2], [10, 2], [3, 4, 5, 6, 2]]
LOSS = dict(name="bear", beam_width=2, lam=0.5, chunk_size=3)

WORKER = r"""
import json, os, sys

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

sys.path.insert(0, os.environ["BEAR_TEST_DIR"])
from test_losses_zero3 import LOSS, TITLES, V, case_batches, tiny_config  # noqa: E402
from zero3_worker import partitioned_engine  # noqa: E402

from bear_ds.config import LossConfig
from bear_ds.losses import backbone_hidden_states, lm_head_context, response_loss, select_response
from bear_ds.trie import TokenTrie

work = sys.argv[1]
engine, rank, partitioned = partitioned_engine(tiny_config(), os.path.join(work, "weights.pt"))
trie = TokenTrie.from_sequences(TITLES, V)
cfg = LossConfig(**LOSS)
result = {"partitioned": partitioned, "steps": []}
for step, batches in enumerate(case_batches()):
    ids, mask, labels = (torch.tensor(x) for x in batches[rank])
    hidden = backbone_hidden_states(engine, ids, mask)
    h, y, s = select_response(hidden, labels, trie)
    with lm_head_context(engine) as head:
        out = response_loss(h, head, y, s, trie, cfg)
        engine.backward(out.loss)
    grads = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()}
    result["steps"].append({
        "loss": float(out.loss.detach()),
        "tokens": int(y.numel()),
        "grads": {n: g.tolist() for n, g in grads.items()} if rank == 0 else {},
    })
    engine.zero_grad()
    engine.optimizer.zero_grad()
with open(os.path.join(work, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
dist.barrier()
"""


def tiny_config() -> dict:
    return tiny_llama_kwargs(V, H, tie_word_embeddings=True)


def _example(prompt: list[int], title: list[int]) -> tuple[list[int], list[int]]:
    return prompt + title, [-100] * len(prompt) + title


def _batch(examples: list[tuple[list[int], list[int]]]) -> list[list[list[int]]]:
    width = max(len(ids) for ids, _ in examples)
    ids = [e[0] + [0] * (width - len(e[0])) for e in examples]
    labels = [e[1] + [-100] * (width - len(e[1])) for e in examples]
    mask = [[1] * len(e[0]) + [0] * (width - len(e[0])) for e in examples]
    return [ids, mask, labels]


def case_batches() -> list[list[list[list[list[int]]]]]:
    """Per step, per rank: [input_ids, attention_mask, labels] as nested lists."""
    many = _batch(
        [
            _example([20, 21, 22], TITLES[0]),
            _example([23, 24], TITLES[4]),
            _example([25, 26, 27, 28], TITLES[6]),
            _example([29], TITLES[2]),
        ]
    )
    few = _batch([_example([30, 31, 32, 33, 34, 35], TITLES[5])])  # 2 response tokens, 1 counted
    none = _batch([_example([30, 31, 32, 33], [])])  # a prompt without response tokens
    return [[many, few], [few, none]]


def _reference(weights: dict, step_batches) -> tuple[list[float], dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**tiny_config()))
    model.load_state_dict(weights, strict=False)  # lm_head.weight is tied to embed_tokens
    trie = TokenTrie.from_sequences(TITLES, V)
    losses = []
    for ids, mask, labels in step_batches:
        ids, mask, labels = (torch.tensor(x) for x in (ids, mask, labels))
        h, y, s = select_response(backbone_hidden_states(model, ids, mask), labels, trie)
        with lm_head_context(model) as head:
            out = response_loss(h, head, y, s, trie, LossConfig(**LOSS))
        (out.loss / len(step_batches)).backward()  # ZeRO averages gradients over ranks
        losses.append(float(out.loss.detach()))
    return losses, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.slow
def test_zero3_two_ranks_match_single_process(tmp_path: Path):
    pytest.importorskip("deepspeed")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    weights = LlamaForCausalLM(LlamaConfig(**tiny_config())).state_dict()
    torch.save(weights, tmp_path / "weights.pt")
    (tmp_path / "worker.py").write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", BEAR_TEST_DIR=str(Path(__file__).parent))
    cmd = torchrun_command(2, str(tmp_path / "worker.py"), str(tmp_path))
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"2-rank ZeRO-3 run timed out (hang?); output tail:\n{(exc.stdout or '')[-3000:]}{(exc.stderr or '')[-3000:]}"
        )
    assert proc.returncode == 0, f"2-rank run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["partitioned"] for r in ranks), "the model was not ZeRO-3 partitioned"

    for step, batches in enumerate(case_batches()):
        ref_losses, ref_grads = _reference(weights, batches)
        tokens = [ranks[r]["steps"][step]["tokens"] for r in range(2)]
        assert tokens[0] > tokens[1], tokens  # unequal response counts per rank
        for r in range(2):
            assert ranks[r]["steps"][step]["loss"] == pytest.approx(ref_losses[r], rel=1e-5, abs=1e-7)
        got = ranks[0]["steps"][step]["grads"]
        assert set(got) == set(ref_grads)
        for name, g in ref_grads.items():
            torch.testing.assert_close(
                torch.tensor(got[name]), g, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
            )
    assert ranks[1]["steps"][1]["tokens"] == 0
