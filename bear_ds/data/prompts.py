"""Alpaca-style prompts of the BEAR paper: a per-domain instruction and history phrase.

builder = PromptBuilder(cfg.prompt, "office")
builder.prompt(["HP 12C Financial Calculator", "DYMO Labeling Tape"])   # ends with "### Response:\\n"
builder.response("HP 12C Financial Calculator")                         # '"HP 12C Financial Calculator"'
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from bear_ds.config import PromptConfig
from bear_ds.errors import ConfigError

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PLACEHOLDERS = ("{instruction}", "{input}")

# domain -> (instruction, history phrase); wording as in the released BEAR/MSL code
DOMAIN_PROMPTS: dict[str, tuple[str, str]] = {
    "office": (
        "Given a list of office products the user has used before, please recommend a new office product that the user likes to the user.",
        "The user has used the following office products before: ",
    ),
    "clothing": (
        "Given a list of clothing the user has worn before, please recommend a new clothing that the user likes to the user.",
        "The user has worn the following clothing before: ",
    ),
    "toy": (
        "Given a list of toys the user has played before, please recommend a new toy that the user likes to the user.",
        "The user has played the following toys before: ",
    ),
    "book": (
        "Given a list of books the user has read before, please recommend a new book that the user likes to the user.",
        "The user has read the following books before: ",
    ),
    "beauty": (
        "Given a list of beauty products the user has used before, please recommend a new beauty product that the user likes to the user.",
        "The user has used the following beauty products before: ",
    ),
    "games": (
        "Given a list of video games the user has played before, please recommend a new video game that the user likes to the user.",
        "The user has played the following video games before: ",
    ),
    "music": (
        "Given a list of CDs the user has listened before, please recommend a new CD that the user likes to the user.",
        "The user has listened the following CDs before: ",
    ),
    "movies": (
        "Given a list of movies the user has watched before, please recommend a new movie that the user likes to the user.",
        "The user has watched the following movies before: ",
    ),
    "items": (
        "Given a list of items the user has interacted with before, please recommend a new item that the user likes to the user.",
        "The user has interacted with the following items before: ",
    ),
}
GENERIC_DOMAIN = "items"
DOMAIN_ALIASES = {
    "toys": "toy",
    "books": "book",
    "game": "games",
    "video_games": "games",
    "cds": "music",
    "cds_and_vinyl": "music",
    "movie": "movies",
    "ml100k": "movies",
    "ml-100k": "movies",
    "office_products": "office",
}


def resolve_domain(domain: str) -> str | None:
    """The DOMAIN_PROMPTS key of a domain name or alias (case, spaces and hyphens ignored), or None."""
    for key in (domain.strip().lower(), re.sub(r"[\s-]+", "_", domain.strip().lower())):
        key = DOMAIN_ALIASES.get(key, key)
        if key in DOMAIN_PROMPTS:
            return key
    return None


def known_domains() -> list[str]:
    """Every domain name `data.domain` accepts: the domains, then the aliases."""
    return [*DOMAIN_PROMPTS, *DOMAIN_ALIASES]


def canonical_domain(domain: str | None) -> str:
    """A domain name as known to DOMAIN_PROMPTS, or the generic `items` (a source's folder name
    such as `mydata` is not an error; a `data.domain` the user sets is checked in the config)."""
    if not domain:
        return GENERIC_DOMAIN
    return resolve_domain(domain) or GENERIC_DOMAIN


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
