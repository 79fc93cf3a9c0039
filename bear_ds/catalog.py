"""The item catalog as decoding targets: item -> title -> response token ids, groups, the trie.

A *group* is one decoding target: the items whose responses have the same token ids (in practice,
items sharing a title; the Amazon catalogs have a few). Beam search returns group ids (the trie's
terminal ids); an item is recommended when its group is.

Why prompt and response are tokenised separately. The trie is built from the response ids
exactly as the model must generate them after the prompt: `tokenizer('"title"',
add_special_tokens=False) + [eos]`. Training examples are `prompt_ids + response_ids`, built from
the same two lists, so every teacher-forced response is a path of the trie and the positions the
losses see are the tokens beam search decodes. Tokenising `prompt + response` as one string could
merge tokens across the boundary, or tokenise the title's first characters differently
(SentencePiece tokenizers, for instance, add a "▁" prefix to a string's first word, so `"` at the
start of a response is not the `"` after "\\n"): the gold sequence would then not be a trie path.
For the byte-level BPE of `bear_ds.tokenization` the choice changes nothing in practice: its
pre-tokenizer splits "\\n" from the opening quote, so `ids(prompt + response) == ids(prompt) +
ids(response)` for prompts ending in "\\n" (checked on the Office catalog in the tests). For other
tokenizers the separate tokenisation is what keeps training, the trie and decoding consistent;
the cost is that a pretrained SentencePiece model (Llama-2, Mistral) sees '▁"' as the first
response token where running text would have '"' after the newline. `Catalog.build` counts such
responses on a sample (`count_context_dependent`) and logs a warning; byte-level BPEs (ours, GPT-2,
Llama-3, SmolLM2, Qwen) split at the newline and are unaffected.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from transformers import PreTrainedTokenizerBase

from bear_ds.errors import MissingPathError
from bear_ds.outputs import write_text_atomic
from bear_ds.trie import TokenTrie

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of positions that carry no loss (the prompt, padding)
CATALOG_FILE = "catalog.json"
CATALOG_FORMAT = 1
PROMPT_TAIL = "### Response:\n"  # how every prompt ends (bear_ds.data.prompts.PromptBuilder)
CONTEXT_CHECK_SAMPLE = 256  # responses checked for prompt-dependent tokenisation at build time


class ResponseBuilder(Protocol):
    """What the catalog needs from `bear_ds.data.prompts.PromptBuilder`."""

    def response(self, title: str) -> str: ...


@dataclass(eq=False)  # compare fields explicitly: the trie holds tensors
class Catalog:
    """Items, their groups (decoding targets) and the trie over the groups' response ids.

    Per item (parallel lists, catalog order): `item_ids`, `titles`, `item_group`.
    Per group (index = trie terminal id): `group_titles` (the title of its first item),
    `group_token_ids` (response ids ending with `eos_token_id`).
    """

    item_ids: list[str]
    titles: list[str]
    item_group: list[int]
    group_titles: list[str]
    group_token_ids: list[list[int]]
    trie: TokenTrie
    eos_token_id: int
    vocab_size: int
    tokenizer_name: str
    _group_index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._group_index = dict(zip(self.item_ids, self.item_group, strict=True))

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls, items: dict[str, str], tokenizer: PreTrainedTokenizerBase, prompt_builder: ResponseBuilder
    ) -> Catalog:
        """Tokenise every distinct response once (one batched call), group items, build the trie.

        An empty title is an item like any other (its response is `""`). Raises ValueError naming
        the item ids when a title is not a string, when a response tokenises to nothing, or when it
        contains the EOS id (e.g. a title with the literal text "</s>"), which
        would end decoding early.
        """
        if not items:
            raise ValueError("the catalog is empty: no items to decode")
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos token: responses must end with one")
        not_text = [item_id for item_id, title in items.items() if not isinstance(title, str)]
        if not_text:
            raise ValueError(f"{len(not_text)} items have a title that is not a string: {_preview(not_text)}")

        item_ids = list(items)
        titles = [items[i] for i in item_ids]
        unique_titles = list(dict.fromkeys(titles))  # first-appearance order: deterministic groups
        responses = [prompt_builder.response(t) for t in unique_titles]
        encoded = tokenizer(responses, add_special_tokens=False)["input_ids"]
        title_ids = dict(zip(unique_titles, encoded, strict=True))

        first_item = dict(zip(reversed(titles), reversed(item_ids), strict=True))  # title -> its first item id
        bad_empty = [first_item[t] for t, ids in title_ids.items() if len(ids) == 0]
        if bad_empty:
            raise ValueError(f"the responses of items {_preview(bad_empty)} tokenise to no tokens")
        bad_eos = [first_item[t] for t, ids in title_ids.items() if eos in ids]
        if bad_eos:
            raise ValueError(
                f"the responses of items {_preview(bad_eos)} contain the eos token id {eos} "
                f"({tokenizer.eos_token!r} in the title?): decoding would stop inside the title"
            )

        # Group by token ids, not title text: two titles a lossy tokenizer maps to the same ids
        # are one decoding target (they cannot be told apart); counted and logged.
        group_of_ids: dict[tuple[int, ...], int] = {}
        group_titles: list[str] = []
        group_token_ids: list[list[int]] = []
        title_group: dict[str, int] = {}
        collisions = 0
        for title in unique_titles:
            key = tuple(title_ids[title])
            group = group_of_ids.get(key)
            if group is None:
                group = group_of_ids[key] = len(group_titles)
                group_titles.append(title)
                group_token_ids.append([*key, eos])
            else:
                collisions += 1
            title_group[title] = group
        if collisions:
            logger.warning(
                "%d distinct titles tokenise to the same ids as another title: merged into its group", collisions
            )
        dependent = count_context_dependent(tokenizer, responses[:CONTEXT_CHECK_SAMPLE])
        if dependent:
            logger.warning(
                "tokenizer %s tokenises %d of %d sampled responses differently after the prompt than alone; "
                "the catalog uses the standalone ids everywhere (training, trie, decoding), so they stay consistent",
                tokenizer.name_or_path,
                dependent,
                min(len(responses), CONTEXT_CHECK_SAMPLE),
            )
        vocab_size = len(tokenizer)
        trie = TokenTrie.from_sequences(group_token_ids, vocab_size, list(range(len(group_token_ids))))
        return cls(
            item_ids=item_ids,
            titles=titles,
            item_group=[title_group[t] for t in titles],
            group_titles=group_titles,
            group_token_ids=group_token_ids,
            trie=trie,
            eos_token_id=int(eos),
            vocab_size=vocab_size,
            tokenizer_name=str(tokenizer.name_or_path or type(tokenizer).__name__),
        )

    # ------------------------------------------------------------------ queries
    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_groups(self) -> int:
        return len(self.group_titles)

    @property
    def num_shared_title_items(self) -> int:
        """Items whose title another item also has."""
        counts: dict[str, int] = {}
        for title in self.titles:
            counts[title] = counts.get(title, 0) + 1
        return sum(n for n in counts.values() if n > 1)

    def group_of_item(self, item_id: str) -> int | None:
        """Group (trie terminal id) of an item; None when the item is not in the catalog."""
        return self._group_index.get(item_id)

    def check_tokenizer(
        self, tokenizer: PreTrainedTokenizerBase, response_builder: ResponseBuilder | None = None
    ) -> None:
        """Raise ValueError when `tokenizer` is not the one the catalog was built with: eos id or size
        differ, or (with `response_builder`) a title's response tokenises to other ids than the
        catalog's. Every distinct title is checked, in one batched call; the message names an item."""
        problems = []
        if tokenizer.eos_token_id != self.eos_token_id:
            problems.append(f"eos id {tokenizer.eos_token_id} != {self.eos_token_id}")
        if len(tokenizer) != self.vocab_size:
            problems.append(f"vocabulary size {len(tokenizer)} != {self.vocab_size}")
        if not problems and response_builder is not None:
            first_item = {}
            for item_id, title, group in zip(self.item_ids, self.titles, self.item_group, strict=True):
                first_item.setdefault(title, (item_id, group))
            titles = list(first_item)
            encoded = tokenizer([response_builder.response(t) for t in titles], add_special_tokens=False)["input_ids"]
            wrong = [
                (t, ids) for t, ids in zip(titles, encoded, strict=True)
                if [*ids, self.eos_token_id] != self.group_token_ids[first_item[t][1]]
            ]  # fmt: skip
            if wrong:
                title, ids = wrong[0]
                item_id, group = first_item[title]
                problems.append(
                    f"{len(wrong)} of {len(titles)} titles tokenise to other ids, e.g. item {item_id!r} "
                    f"({title!r}): {[*ids, self.eos_token_id][:12]} here, {self.group_token_ids[group][:12]} in the catalog"
                )
        if problems:
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r} does not match the catalog's ({self.tokenizer_name!r}): "
                + "; ".join(problems)
            )

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | Path) -> Path:
        """Write `catalog.json`: metadata and, per item, item_id, title, group, token_ids."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        payload: dict[str, Any] = {
            "format": CATALOG_FORMAT,
            "eos_token_id": self.eos_token_id,
            "vocab_size": self.vocab_size,
            "tokenizer_name": self.tokenizer_name,
            "num_items": self.num_items,
            "num_groups": self.num_groups,
            "num_shared_title_items": self.num_shared_title_items,
            "items": [
                {"item_id": i, "title": t, "group": g, "token_ids": self.group_token_ids[g]}
                for i, t, g in zip(self.item_ids, self.titles, self.item_group, strict=True)
            ],
        }
        # a reader never sees a half-written catalog
        return write_text_atomic(folder / CATALOG_FILE, json.dumps(payload, ensure_ascii=False))

    @classmethod
    def load(cls, folder: str | Path) -> Catalog:
        """Read `catalog.json` written by `save`; the trie is rebuilt identically (same group order)."""
        path = Path(folder) / CATALOG_FILE
        if not path.is_file():
            raise MissingPathError(f"{path} does not exist (write it with Catalog.save)")
        try:
            payload = json.loads(path.read_text())
            if payload.get("format") != CATALOG_FORMAT:
                raise ValueError(f"format {payload.get('format')!r}, expected {CATALOG_FORMAT}")
            eos, vocab_size = int(payload["eos_token_id"]), int(payload["vocab_size"])
            rows = payload["items"]
            item_ids = [str(r["item_id"]) for r in rows]
            titles = [str(r["title"]) for r in rows]
            item_group = [int(r["group"]) for r in rows]
            num_groups = max(item_group, default=-1) + 1
            group_titles: list[str | None] = [None] * num_groups
            group_token_ids: list[list[int] | None] = [None] * num_groups
            for row_number, (row, group) in enumerate(zip(rows, item_group, strict=True)):
                ids = [int(t) for t in row["token_ids"]]
                if group < 0:
                    raise ValueError(f"item {row['item_id']!r} (row {row_number}) has negative group {group}")
                if group_token_ids[group] is None:
                    group_titles[group], group_token_ids[group] = row["title"], ids
                elif group_token_ids[group] != ids:
                    raise ValueError(
                        f"item {row['item_id']!r} (row {row_number}): token ids differ within group {group}"
                    )
                if not ids or ids[-1] != eos:
                    raise ValueError(f"item {row['item_id']!r} (row {row_number}): token ids must end with eos {eos}")
        except KeyError as exc:
            raise ValueError(f"{path} is not a valid catalog: missing key {exc}") from exc
        except (TypeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"{path} is not a valid catalog: {exc}") from exc
        if not item_ids:
            raise ValueError(f"{path} is not a valid catalog: it has no items")
        missing = [g for g, ids in enumerate(group_token_ids) if ids is None]
        if missing:
            raise ValueError(f"{path} is not a valid catalog: groups {_preview(missing)} have no items")
        if len(set(item_ids)) != len(item_ids):
            raise ValueError(f"{path} is not a valid catalog: duplicate item ids")
        trie = TokenTrie.from_sequences(group_token_ids, vocab_size, list(range(num_groups)))
        return cls(
            item_ids=item_ids,
            titles=titles,
            item_group=item_group,
            group_titles=[str(t) for t in group_titles],
            group_token_ids=[list(ids) for ids in group_token_ids if ids is not None],
            trie=trie,
            eos_token_id=eos,
            vocab_size=vocab_size,
            tokenizer_name=str(payload.get("tokenizer_name", "")),
        )


def count_context_dependent(
    tokenizer: PreTrainedTokenizerBase, responses: list[str], prompt_tail: str = PROMPT_TAIL
) -> int:
    """How many responses tokenise differently after `prompt_tail` than alone (0 = context-free).

    A response is context-free when ids(prompt_tail + response) == ids(prompt_tail) + ids(response).
    """
    if not responses:
        return 0
    tail_ids = tokenizer(prompt_tail, add_special_tokens=False)["input_ids"]
    alone = tokenizer(responses, add_special_tokens=False)["input_ids"]
    joint = tokenizer([prompt_tail + r for r in responses], add_special_tokens=False)["input_ids"]
    return sum(1 for a, j in zip(alone, joint, strict=True) if list(j) != [*tail_ids, *a])


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt (one batched call, with the tokenizer's special tokens, e.g. bos)."""
    return [list(ids) for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]]


@dataclass
class FittedPrompts:
    prompts: list[str]
    prompt_ids: list[list[int]]
    truncated_examples: int  # rows that lost history items
    truncated_items: int  # history items dropped in total


def fit_prompts(
    history_titles: Sequence[Sequence[str]],
    tokenizer: PreTrainedTokenizerBase,
    prompt_builder: Any,
    budgets: int | Sequence[int],
    *,
    truncate: bool,
    what: str = "row",
    option: str = "train.truncate_history",
) -> FittedPrompts:
    """Each row's prompt ids, within its token budget (one int for all rows, or one per row).

    A prompt over budget loses its oldest history items one at a time when `truncate` (counted),
    else it is an error naming the row and `option`. Training budgets leave room for the row's
    response; evaluation budgets for the longest title, since any title may be decoded.
    """
    rows = len(history_titles)
    limits = [budgets] * rows if isinstance(budgets, int) else list(budgets)
    prompts = [prompt_builder.prompt(list(h)) for h in history_titles]
    prompt_ids = encode_prompts(tokenizer, prompts)
    truncated_examples = truncated_items = 0
    for row in range(rows):
        kept = list(history_titles[row])
        while len(prompt_ids[row]) > limits[row]:
            if not truncate:
                raise ValueError(
                    f"{what} {row}: its prompt ({len(prompt_ids[row])} tokens) leaves too little of the model context "
                    f"(budget {limits[row]} tokens); set {option}=true or lower data.max_history"
                )
            if len(kept) <= 1:
                raise ValueError(
                    f"{what} {row}: even with one history item the prompt needs {len(prompt_ids[row])} tokens "
                    f"> its budget of {limits[row]} in the model context"
                )
            kept = kept[1:]  # drop the oldest item
            truncated_items += 1
            prompts[row] = prompt_builder.prompt(kept)
            prompt_ids[row] = encode_prompts(tokenizer, [prompts[row]])[0]
        truncated_examples += len(kept) < len(history_titles[row])
    return FittedPrompts(prompts, prompt_ids, truncated_examples, truncated_items)


def encode_example(prompt_ids: Sequence[int], response_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one training example: the loss is on the response tokens only."""
    if len(response_ids) == 0:
        raise ValueError("empty response: every example needs at least the eos token as a target")
    input_ids = [*prompt_ids, *response_ids]
    labels = [IGNORE_INDEX] * len(prompt_ids) + list(response_ids)
    return input_ids, labels


def _preview(values: Sequence[Any], limit: int = 5) -> str:
    shown = ", ".join(repr(v) for v in values[:limit])
    return shown + (f" (and {len(values) - limit} more)" if len(values) > limit else "")
