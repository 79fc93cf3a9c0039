"""Alpaca-style prompts of the BEAR paper: a per-domain instruction and history phrase.

builder = PromptBuilder(cfg.prompt, "office")
builder.prompt(["HP 12C Financial Calculator", "DYMO Labeling Tape"])   # ends with "### Response:\\n"
builder.response("HP 12C Financial Calculator")                         # '"HP 12C Financial Calculator"'
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from bear_ds.config import PromptConfig
from bear_ds.domains import DOMAIN_PROMPTS, canonical_domain
from bear_ds.errors import ConfigError

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PLACEHOLDERS = ("{instruction}", "{input}")


class PromptBuilder:
    """Builds prompt and response strings; `prompt.*` config keys override the domain's defaults."""

    def __init__(self, prompt_cfg: PromptConfig, domain: str | None) -> None:
        self.domain = canonical_domain(domain)
        instruction, history_phrase = DOMAIN_PROMPTS[self.domain]
        self.template = prompt_cfg.template if prompt_cfg.template is not None else ALPACA_TEMPLATE
        missing = [p for p in PLACEHOLDERS if p not in self.template]
        if missing:
            raise ConfigError(f"prompt.template must contain {' and '.join(missing)} (got {self.template!r})")
        self.instruction = prompt_cfg.instruction if prompt_cfg.instruction is not None else instruction
        self.history_phrase = prompt_cfg.history_phrase if prompt_cfg.history_phrase is not None else history_phrase

    def prompt(self, history_titles: Sequence[str]) -> str:
        history = ", ".join(self.response(t) for t in history_titles)
        values = {"{instruction}": self.instruction, "{input}": self.history_phrase + history}
        # one pass, so braces inside titles or the instruction are never re-substituted
        return re.sub(r"\{instruction\}|\{input\}", lambda m: values[m.group(0)], self.template)

    @staticmethod
    def response(title: str) -> str:
        return '"' + title + '"'
