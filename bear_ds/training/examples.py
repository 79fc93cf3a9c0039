"""Training examples: prompt ids + the target's catalog response ids, labels -100 on the prompt.

Prompts that do not fit the model's context lose their oldest history items one at a time
(train.truncate_history=true, counted and logged) or stop the run naming the row (false). The
response is never truncated: it is the decoding target, a full path of the trie. A loss that scores
other titles than the target after the prompt (S-DPO's negatives) fits every prompt against the
longest title instead (`response_room`), as evaluation does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from bear_ds.catalog import IGNORE_INDEX, Catalog, encode_example, fit_prompts
from bear_ds.errors import DataError, ModelInputError

logger = logging.getLogger(__name__)


def check_titles_fit(catalog: Catalog, max_length: int, groups: Sequence[int] | None = None) -> None:
    """Refuse titles whose response leaves no position of the model context for a prompt, naming the item.

    groups: the title groups that must fit (None: every title of the catalog).
    """
    candidates = range(catalog.num_groups) if groups is None else sorted(set(groups))
    too_long = [g for g in candidates if len(catalog.group_token_ids[g]) >= max_length]
    if not too_long:
        return
    group = max(too_long, key=lambda g: len(catalog.group_token_ids[g]))
    item = catalog.item_ids[catalog.item_group.index(group)]
    title = catalog.group_titles[group]
    shown = title if len(title) <= 80 else title[:77] + "..."
    raise DataError(
        f"{len(too_long)} titles are too long for the model context of {max_length} positions, e.g. item {item!r} "
        f"(title {shown!r}: {len(catalog.group_token_ids[group])} tokens as a response); shorten or drop them "
        "in the data, or use a model with a longer context"
    )


@dataclass
class EncodedExamples:
    input_ids: list[list[int]]
    labels: list[list[int]]
    lengths: np.ndarray  # int64 [N], tokens per example
    truncated_examples: int  # examples that lost history items
    truncated_items: int  # history items dropped in total
    # per example: the trie state before each response token, and that state's number of children;
    # a target's states depend only on its title, so they are walked once per title, here
    response_states: list[np.ndarray]
    response_children: list[np.ndarray]


def response_trie_states(catalog: Catalog, groups: Sequence[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{group: (trie state before each of its response tokens, that state's number of children)},
    walked once for all the distinct groups together on the host (`TokenTrie.states_along`)."""
    distinct = sorted(set(groups))
    if not distinct:
        return {}
    responses = [catalog.group_token_ids[g] for g in distinct]
    packed = torch.full((len(distinct), max(map(len, responses))), IGNORE_INDEX, dtype=torch.int64)
    for row, response in enumerate(responses):
        packed[row, : len(response)] = torch.tensor(response)
    trie = catalog.trie.to("cpu")
    states = trie.states_along(packed)  # [G, T], INVALID on the padding
    children = trie.num_children(states)
    return {
        g: (states[row, : len(r)].numpy().copy(), children[row, : len(r)].numpy().copy())
        for row, (g, r) in enumerate(zip(distinct, responses, strict=True))
    }


def encode_training_examples(
    histories: Sequence[Sequence[str]],
    targets: Sequence[str],
    titles: dict[str, str],
    catalog: Catalog,
    tokenizer,
    prompt_builder,
    *,
    max_length: int,
    truncate_history: bool,
    split_name: str = "train",
    response_room: int | None = None,
) -> EncodedExamples:
    """Encode rows (history item ids oldest first, target item id) into (input_ids, labels).

    response_room: tokens every prompt leaves free after it (e.g. the longest title, when any title
    may follow the prompt); None leaves room for the row's own response only.
    """
    responses: list[list[int]] = []
    target_groups: list[int] = []
    for row, target in enumerate(targets):
        group = catalog.group_of_item(target)
        if group is None:
            raise DataError(f"{split_name} row {row}: target item {target!r} is not in the catalog")
        target_groups.append(group)
        responses.append(catalog.group_token_ids[group])
    walked = response_trie_states(catalog, target_groups)
    history_titles = []
    for row, history in enumerate(histories):
        missing = [i for i in history if i not in titles]
        if missing:
            raise DataError(f"{split_name} row {row}: history items {missing[:5]} are not in the catalog")
        history_titles.append([titles[i] for i in history])
    check_titles_fit(catalog, max_length, None if response_room is not None else target_groups)
    budgets = [max_length - (len(r) if response_room is None else response_room) for r in responses]
    try:
        fitted = fit_prompts(
            history_titles, tokenizer, prompt_builder, budgets,
            truncate=truncate_history, what=f"{split_name} row", option="train.truncate_history",
        )  # fmt: skip
    except ValueError as exc:  # a prompt that cannot fit: the row and the option to change are named
        raise ModelInputError(str(exc)) from None
    truncated_examples, truncated_items = fitted.truncated_examples, fitted.truncated_items
    input_ids: list[list[int]] = []
    labels: list[list[int]] = []
    for prompt_ids, response_ids in zip(fitted.prompt_ids, responses, strict=True):
        ids, lab = encode_example(prompt_ids, response_ids)
        input_ids.append(ids)
        labels.append(lab)
    if truncated_examples:
        room = "" if response_room is None else f" with room for the longest title ({response_room} tokens)"
        logger.warning(
            "%s: %d examples exceeded the context of %d tokens%s and lost %d oldest history items in total",
            split_name,
            truncated_examples,
            max_length,
            room,
            truncated_items,
        )
    lengths = np.array([len(x) for x in input_ids], dtype=np.int64)
    return EncodedExamples(
        input_ids, labels, lengths, truncated_examples, truncated_items,
        response_states=[walked[g][0] for g in target_groups],
        response_children=[walked[g][1] for g in target_groups],
    )  # fmt: skip
