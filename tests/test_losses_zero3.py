"""The losses under real DeepSpeed ZeRO-3 on 2 CPU ranks (gloo) equal a single process.

One torchrun launch (the module fixture) builds a tiny Llama (tied embeddings, a peaked lm_head so
that searches prune and stop early) partitioned under zero.Init and runs two cases on it; each test
compares what the ranks wrote with a plain single-process computation on the same micro-batches.

- The loss head (BEAR), with a different number of response tokens per rank (step 1: 4 examples
  vs 1 short one; step 2: rank 1 has no response token at all).
- beamsim: each rank runs, as the trainer does, the forward, the simulated beam search started
  from that forward's KV cache and the loss on its own micro-batch, twice: with the weights gathered
  at every forward (synced: the rank that stops decoding first runs dummy forwards) and gathered
  once for the search (hooks off, unsynced); the reference encodes the prompts again. Step 1: rank 0
  has three long titles and rank 1 one short title that stops early; step 2 the other way round.

Per rank, the loss (and beamsim's theta and verdicts) must equal the reference, and the gathered
gradient the mean over ranks. Alone guards, as no single process can: parameters partitioned
across ranks are gathered for the loss head and for every search step while the ranks do unequal
work (fewer tokens, none, an earlier stop), without a hang or a wrong gradient.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from launching import launch_env
from tiny_models import tiny_llama_kwargs

from bear_ds.config import LossConfig
from bear_ds.distributed import torchrun_command
from bear_ds.generation.survival import prompt_ends, prompt_state_of_forward, simulate_beam_search
from bear_ds.generation.zero3_gather import decoding_weights
from bear_ds.losses import (
    backbone_forward,
    backbone_hidden_states,
    lm_head_context,
    response_loss,
    select_response,
)
from bear_ds.trie import TokenTrie

V, H, EOS = 40, 16, 2
TITLES = [[3, 4, 5, 2], [3, 4, 6, 2], [3, 7, 2], [8, 9, 2], [8, 4, 5, 6, 11, 12, 2], [10, 2], [3, 4, 5, 6, 13, 2]]
HEAD_LOSS = dict(name="bear", beam_width=2, lam=0.5, chunk_size=3)
BEAMSIM_LOSS = dict(name="beamsim", beam_width=2, lam=0.5, xi=0.8, chunk_size=3)
GATHERS = ("per_step", "once")  # eval.gather of the partitioned search, as the trainer's beamsim loss passes it

WORKER = r"""
import json, os, sys

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

sys.path.insert(0, os.environ["BEAR_TEST_DIR"])
from test_losses_zero3 import (  # noqa: E402
    GATHERS, TITLES, V, beamsim_batches, head_batches, run_beamsim, run_head, tiny_config,
)
from zero3_worker import partitioned_engine  # noqa: E402

from bear_ds.trie import TokenTrie

work = sys.argv[1]
engine, rank, partitioned = partitioned_engine(tiny_config(), os.path.join(work, "weights.pt"))
trie = TokenTrie.from_sequences(TITLES, V)


def gathered_grads():
    grads = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()}  # collective
    engine.zero_grad()
    engine.optimizer.zero_grad()
    return {n: g.tolist() for n, g in grads.items()} if rank == 0 else {}


result = {"partitioned": partitioned, "head": [], **{gather: [] for gather in GATHERS}}
for batches in head_batches():
    ids, mask, labels = (torch.tensor(x) for x in batches[rank])
    loss, tokens = run_head(engine, ids, mask, labels, trie, backward=engine.backward)
    result["head"].append({"loss": float(loss.detach()), "tokens": tokens, "grads": gathered_grads()})
for gather in GATHERS:  # the same micro-batches with the weights gathered per step, then once per search
    for batches in beamsim_batches():
        ids, mask, labels = (torch.tensor(x) for x in batches[rank])
        loss, search, gathered = run_beamsim(engine, engine.module, ids, mask, labels, trie, synced=True,
                                             backward=engine.backward, reuse=True, gather=gather)
        result[gather].append({
            "loss": float(loss.detach()),
            "theta": search.thresholds.tolist(),
            "pruned": search.pruned.tolist(),
            "search_steps": search.steps,
            "gathered": gathered,
            "grads": gathered_grads(),
        })
with open(os.path.join(work, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
dist.barrier()
"""


def tiny_config() -> dict:
    return tiny_llama_kwargs(V, H, tie_word_embeddings=True)


def _batch(examples: list[tuple[list[int], list[int]]]) -> list[list[list[int]]]:
    """[input_ids, attention_mask, labels] right-padded, as the trainer's collate gives them."""
    width = max(len(p) + len(t) for p, t in examples)
    ids = [p + t + [0] * (width - len(p) - len(t)) for p, t in examples]
    labels = [[-100] * len(p) + t + [-100] * (width - len(p) - len(t)) for p, t in examples]
    mask = [[1] * (len(p) + len(t)) + [0] * (width - len(p) - len(t)) for p, t in examples]
    return [ids, mask, labels]


def head_batches() -> list[list[list[list[list[int]]]]]:
    """Per step, per rank: [input_ids, attention_mask, labels] as nested lists."""
    many = _batch([([20, 21, 22], TITLES[0]), ([23, 24], TITLES[4]), ([25, 26, 27, 28], TITLES[6]), ([29], TITLES[2])])
    few = _batch([([30, 31, 32, 33, 34, 35], TITLES[5])])  # 2 response tokens, 1 counted
    none = _batch([([30, 31, 32, 33], [])])  # a prompt without response tokens
    return [[many, few], [few, none]]


def beamsim_batches() -> list[list[list[list[list[int]]]]]:
    """Per step, per rank: [input_ids, attention_mask, labels] as nested lists."""
    long = _batch([([20, 21, 22], TITLES[4]), ([23, 24], TITLES[6]), ([25, 26, 27, 28, 29], TITLES[0])])
    short = _batch([([30, 31, 32, 33, 34, 35, 36], TITLES[5])])
    return [[long, short], [short, long]]


def run_head(model, ids, mask, labels, trie, *, backward) -> tuple[torch.Tensor, int]:
    """The loss head on a micro-batch: hidden states, the chunked BEAR loss, backward; (loss, tokens)."""
    h, y, s = select_response(backbone_hidden_states(model, ids, mask), labels, trie)
    with lm_head_context(model) as head:
        out = response_loss(h, head, y, s, trie, LossConfig(**HEAD_LOSS))
        backward(out.loss)
    return out.loss, int(y.numel())


def run_beamsim(model, net, ids, mask, labels, trie, *, synced: bool, backward, reuse: bool, gather: str = "per_step"):
    """A beamsim micro-batch: forward, search (no gradient), chunked loss, backward. reuse=True: the
    trainer's way, the search starts from the forward's KV cache; False: it encodes the prompts.
    gather="once": a partitioned model's weights gathered for the search, unsynced (the trainer's way).
    Returns (loss, search, the gathering that ran: None for a full model)."""
    cfg = LossConfig(**BEAMSIM_LOSS)
    if reuse:
        out = backbone_forward(model, ids, mask, prompt_ends(mask, labels))
        hidden, state = out.hidden, prompt_state_of_forward(mask, labels, out.prompt_logits, out.cache)
        assert state is not None
    else:
        hidden, state = backbone_hidden_states(model, ids, mask), None
    with decoding_weights(model, gather, ids.device) as gathered:
        search = simulate_beam_search(net, ids, mask, labels, trie, beam_width=cfg.beam_width, eos_token_id=EOS,
                                      mask="before", tau=cfg.tau, synced=synced and gathered != "once",
                                      prompt_state=state)  # fmt: skip
    h, y, s = select_response(hidden, labels, trie)
    with lm_head_context(model) as head:
        out = response_loss(h, head, y, s, trie, cfg, search=search)
        backward(out.loss)
    return out.loss, search, gathered


def _reference(weights: dict) -> tuple:
    """(a plain single-process model holding `weights`, the trie of TITLES)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**tiny_config()))
    model.load_state_dict(weights, strict=False)  # lm_head.weight is tied to embed_tokens
    return model, TokenTrie.from_sequences(TITLES, V)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[dict, list[dict]]:
    """(the weights, what each of the 2 ranks wrote)."""
    pytest.importorskip("deepspeed")
    from transformers import LlamaConfig, LlamaForCausalLM

    work = tmp_path_factory.mktemp("zero3")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**tiny_config()))
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # tied: peaked distributions, so the searches prune and stop early
    weights = model.state_dict()
    torch.save(weights, work / "weights.pt")
    (work / "worker.py").write_text(WORKER)
    env = dict(launch_env(), BEAR_TEST_DIR=str(Path(__file__).parent))  # this checkout's bear_ds
    cmd = torchrun_command(2, str(work / "worker.py"), str(work))
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"2-rank ZeRO-3 run timed out (hang?):\n{(exc.stdout or '')[-3000:]}{(exc.stderr or '')[-3000:]}")
    assert proc.returncode == 0, f"2-rank run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    ranks = [json.loads((work / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["partitioned"] for r in ranks), "the model was not ZeRO-3 partitioned"
    return weights, ranks


def _assert_gradients(got: dict, model) -> None:
    assert set(got) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(torch.tensor(got[name]), p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_zero3_two_ranks_match_single_process(two_ranks):
    weights, ranks = two_ranks
    model, trie = _reference(weights)
    for step, batches in enumerate(head_batches()):
        got = [ranks[r]["head"][step] for r in range(2)]
        assert got[0]["tokens"] > got[1]["tokens"], [g["tokens"] for g in got]  # unequal response counts
        model.zero_grad()
        for r in range(2):
            ids, mask, labels = (torch.tensor(x) for x in batches[r])
            loss, tokens = run_head(model, ids, mask, labels, trie, backward=lambda loss: (loss / 2).backward())
            assert got[r]["tokens"] == tokens
            assert got[r]["loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
        _assert_gradients(got[0]["grads"], model)  # ZeRO averages gradients over ranks
    assert ranks[1]["head"][1]["tokens"] == 0


@pytest.mark.slow
def test_zero3_two_ranks_with_uneven_searches_match_one_process(two_ranks):
    weights, ranks = two_ranks
    model, trie = _reference(weights)
    for step, batches in enumerate(beamsim_batches()):
        steps = [ranks[r]["per_step"][step]["search_steps"] for r in range(2)]
        assert steps[0] != steps[1], f"step {step}: both ranks decoded {steps} steps; the case is not uneven"
        model.zero_grad()
        for r in range(2):
            ids, mask, labels = (torch.tensor(x) for x in batches[r])
            loss, search, gathered = run_beamsim(model, model, ids, mask, labels, trie, synced=False,
                                                 backward=lambda loss: (loss / 2).backward(), reuse=False)  # fmt: skip
            assert gathered is None  # a full model: nothing to gather
            for gather in GATHERS:  # weights gathered per step and once per search: the same results
                got = ranks[r][gather][step]
                assert got["gathered"] == gather
                torch.testing.assert_close(torch.tensor(got["theta"]), search.thresholds, rtol=0, atol=1e-6)
                assert got["pruned"] == search.pruned.tolist()
                assert abs(got["loss"] - loss.item()) < 1e-6, (gather, step, r, got["loss"], loss.item())
        for gather in GATHERS:
            _assert_gradients(ranks[0][gather][step]["grads"], model)
    verdicts = [v for r in range(2) for step in ranks[r]["per_step"] for v in step["pruned"]]
    assert any(verdicts) and not all(verdicts), verdicts  # both a pruned and a returned gold
