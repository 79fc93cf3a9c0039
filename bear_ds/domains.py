"""The prompt domains: each domain's instruction and history phrase, and the names `data.domain`
accepts. A leaf module: the config checks a domain here without loading the data layer, and the
prompts (`bear_ds.data.prompts`) take their wording from here.
"""

from __future__ import annotations

import re

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
