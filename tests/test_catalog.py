"""Catalog: response ids, shared-title groups, the trie, save/load, example encoding."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from bear_ds.catalog import (
    CATALOG_FILE,
    IGNORE_INDEX,
    PROMPT_TAIL,
    Catalog,
    count_context_dependent,
    encode_example,
    encode_prompts,
    fit_prompts,
)
from bear_ds.tokenization import train_bpe_tokenizer
from bear_ds.trie import INVALID


class QuotedResponse:
    """Stand-in for bear_ds.data.prompts.PromptBuilder: only `.response` is used by the catalog."""

    def response(self, title: str) -> str:
        return f'"{title}"'


ITEMS = {
    "i1": "Stapler, Black",
    "i2": "Gel Pens 12-Pack",
    "i3": "Stapler, Black",
    "i4": "Stapler",  # its response is not a prefix of "Stapler, Black" (closing quote), but shares one
    "i5": "Stapler, Black",
    "i6": "Sticky Notes &quot;Canary&quot;",
}


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    texts = [f'"{t}"' for t in ITEMS.values()] + [f"Some prompt text\n{PROMPT_TAIL}"] * 2
    return train_bpe_tokenizer(texts, vocab_size=320)


@pytest.fixture(scope="module")
def catalog(tok: PreTrainedTokenizerFast) -> Catalog:
    return Catalog.build(ITEMS, tok, QuotedResponse())


def test_groups_and_response_ids(catalog: Catalog, tok: PreTrainedTokenizerFast) -> None:
    assert catalog.item_ids == list(ITEMS) and catalog.titles == list(ITEMS.values())
    assert catalog.item_group == [0, 1, 0, 2, 0, 3]
    assert catalog.group_titles == ["Stapler, Black", "Gel Pens 12-Pack", "Stapler", "Sticky Notes &quot;Canary&quot;"]
    assert catalog.num_shared_title_items == 3
    assert catalog.num_items == 6 and catalog.num_groups == 4
    assert catalog.eos_token_id == tok.eos_token_id and catalog.vocab_size == len(tok)
    for group, title in enumerate(catalog.group_titles):
        ids = catalog.group_token_ids[group]
        assert ids == tok(f'"{title}"', add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ids.count(tok.eos_token_id) == 1
    assert [catalog.group_of_item(i) for i in ("i3", "i4", "i6")] == [0, 2, 3]
    assert catalog.group_of_item("not-an-item") is None


def test_trie_decodes_every_group(catalog: Catalog) -> None:
    trie = catalog.trie
    length = max(len(ids) for ids in catalog.group_token_ids)
    targets = torch.full((catalog.num_groups, length), IGNORE_INDEX)
    for g, ids in enumerate(catalog.group_token_ids):
        targets[g, : len(ids)] = torch.tensor(ids)
    states = trie.states_along(targets)  # raises if a response is not a trie path
    last = torch.tensor([len(ids) - 1 for ids in catalog.group_token_ids])
    before_eos = states[torch.arange(catalog.num_groups), last]
    end = trie.advance(before_eos, torch.full_like(before_eos, catalog.eos_token_id))
    assert trie.terminal_group(end).tolist() == list(range(catalog.num_groups))
    # only complete responses (ending with eos) are terminal
    assert trie.terminal_group(before_eos).tolist() == [INVALID] * catalog.num_groups


def test_distinct_responses_are_tokenised_in_one_batch(tok: PreTrainedTokenizerFast) -> None:
    calls: list[object] = []

    class Spy:
        def __getattr__(self, name: str) -> object:
            return getattr(tok, name)

        def __len__(self) -> int:
            return len(tok)

        def __call__(self, text: object, **kwargs: object) -> object:
            calls.append(text)
            return tok(text, **kwargs)

    Catalog.build(ITEMS, Spy(), QuotedResponse())  # type: ignore[arg-type]
    distinct = [f'"{t}"' for t in dict.fromkeys(ITEMS.values())]
    assert calls[0] == distinct  # every distinct response, once, in one call
    assert all(c != [f'"{t}"'] for c in calls for t in ITEMS.values())  # never one title at a time


def test_build_errors(tok: PreTrainedTokenizerFast) -> None:
    empty = Catalog.build({"a": "x", "b": ""}, tok, QuotedResponse())  # an empty title is an item
    assert empty.group_titles[empty.group_of_item("b")] == ""
    with pytest.raises(ValueError, match="not a string: 'n'"):
        Catalog.build({"a": "x", "n": None}, tok, QuotedResponse())  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="catalog is empty"):
        Catalog.build({}, tok, QuotedResponse())

    class NoQuotes:
        def response(self, title: str) -> str:
            return "" if title == "gone" else title

    with pytest.raises(ValueError, match="items 'z' tokenise to no tokens"):
        Catalog.build({"y": "kept", "z": "gone"}, tok, NoQuotes())
    with pytest.raises(ValueError, match=r"items 'q' contain the eos token id 2 \('</s>' in the title\?\)"):
        Catalog.build({"p": "fine", "q": "Box </s> of pens"}, tok, QuotedResponse())


def _word_level(with_eos: bool) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, '"': 2, "pen": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>" if with_eos else None)


def test_tokenizer_without_eos_is_an_error() -> None:
    with pytest.raises(ValueError, match="has no eos token"):
        Catalog.build({"a": "pen"}, _word_level(with_eos=False), QuotedResponse())


def test_titles_a_lossy_tokenizer_cannot_tell_apart_share_a_group(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="bear_ds.catalog"):
        cat = Catalog.build({"a": "pen", "b": "cup", "c": "mug"}, _word_level(with_eos=True), QuotedResponse())
    assert cat.item_group == [0, 1, 1]  # "cup" and "mug" are both <unk>: one decoding target
    assert cat.group_titles == ["pen", "cup"]
    assert cat.num_shared_title_items == 0  # no title text is shared
    assert "1 distinct titles tokenise to the same ids" in caplog.text


def test_save_load_round_trip(catalog: Catalog, tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    path = catalog.save(tmp_path)
    assert path == tmp_path / CATALOG_FILE
    saved = json.loads(path.read_text())
    assert saved["eos_token_id"] == tok.eos_token_id and saved["vocab_size"] == len(tok)
    assert saved["items"][2] == {
        "item_id": "i3", "title": "Stapler, Black", "group": 0, "token_ids": catalog.group_token_ids[0]
    }  # fmt: skip
    loaded = Catalog.load(tmp_path)
    for name in ("item_ids", "titles", "item_group", "group_titles", "group_token_ids", "eos_token_id", "vocab_size"):
        assert getattr(loaded, name) == getattr(catalog, name), name
    assert loaded.num_shared_title_items == catalog.num_shared_title_items
    for name in ("edge_key", "edge_token", "edge_child", "child_start", "terminal"):
        assert torch.equal(getattr(loaded.trie, name), getattr(catalog.trie, name)), name
    assert loaded.trie.max_depth == catalog.trie.max_depth
    assert loaded.group_of_item("i5") == 0
    loaded.check_tokenizer(tok)
    with pytest.raises(ValueError, match="vocabulary size 4 != "):
        loaded.check_tokenizer(_word_level(with_eos=True))


def test_load_errors(catalog: Catalog, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="catalog.json does not exist"):
        Catalog.load(tmp_path)
    path = catalog.save(tmp_path)
    good = json.loads(path.read_text())

    def load_with(change: dict) -> None:
        path.write_text(json.dumps({**good, **change}))
        Catalog.load(tmp_path)

    other = [dict(r) for r in good["items"]]
    other[2]["token_ids"] = other[1]["token_ids"]  # item i3 in group 0 with another group's ids
    with pytest.raises(ValueError, match="'i3' \\(row 2\\): token ids differ within group 0"):
        load_with({"items": other})
    no_eos = [dict(r) for r in good["items"]]
    no_eos[1]["token_ids"] = no_eos[1]["token_ids"][:-1]
    with pytest.raises(ValueError, match="'i2' \\(row 1\\): token ids must end with eos"):
        load_with({"items": no_eos})
    path.write_text(json.dumps({k: v for k, v in good.items() if k != "eos_token_id"}))
    with pytest.raises(ValueError, match="missing key 'eos_token_id'"):
        Catalog.load(tmp_path)
    with pytest.raises(ValueError, match="duplicate item ids"):
        load_with({"items": good["items"] + good["items"][:1]})
    with pytest.raises(ValueError, match="has no items"):
        load_with({"items": []})
    skipped = [dict(r) for r in good["items"]]
    for row in skipped:
        row["group"] = {0: 0, 1: 1, 2: 3, 3: 4}[row["group"]]  # group 2 has no item
    with pytest.raises(ValueError, match="groups 2 have no items"):
        load_with({"items": skipped})
    with pytest.raises(ValueError, match="format 99, expected 1"):
        load_with({"format": 99})
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not a valid catalog"):
        Catalog.load(tmp_path)


def test_encode_example_and_prompts(tok: PreTrainedTokenizerFast, catalog: Catalog) -> None:
    prompts = ["Some prompt text\n" + PROMPT_TAIL, PROMPT_TAIL]
    prompt_ids = encode_prompts(tok, prompts)
    assert [ids[0] for ids in prompt_ids] == [tok.bos_token_id] * 2
    assert prompt_ids[1] == [tok.bos_token_id, *tok(PROMPT_TAIL, add_special_tokens=False)["input_ids"]]
    response = catalog.group_token_ids[0]
    input_ids, labels = encode_example(prompt_ids[0], response)
    assert input_ids == prompt_ids[0] + response
    assert labels == [IGNORE_INDEX] * len(prompt_ids[0]) + response
    with pytest.raises(ValueError, match="empty response"):
        encode_example(prompt_ids[0], [])


def test_trained_bpe_responses_do_not_depend_on_the_prompt(tok: PreTrainedTokenizerFast) -> None:
    responses = [f'"{t}"' for t in ITEMS.values()] + ["\"'quoted' 3\"", '" leading space"', '"\nnewline"']
    assert count_context_dependent(tok, responses) == 0
    assert count_context_dependent(tok, responses, prompt_tail='history: "a", "b"\n### Response:\n') == 0


# ---------------------------------------------------------------------------- real data


@pytest.mark.shared_data
def test_office_catalog(shared_data: Path, tmp_path: Path) -> None:
    items = json.loads((shared_data / "Office" / "id2name4Rec.json").read_text())
    responses = [f'"{t}"' for t in items.values()]
    tok = train_bpe_tokenizer(responses, vocab_size=2000)
    cat = Catalog.build(items, tok, QuotedResponse())
    # the README counts 3 duplicate titles: 3 titles held by 2 items each
    assert cat.num_items == 2414 and cat.num_groups == 2411
    assert cat.num_shared_title_items == 6
    sizes = Counter(cat.item_group)
    assert sorted(sizes.values())[-4:] == [1, 2, 2, 2]
    # every Office response tokenises the same after the prompt as alone (see the module docstring)
    assert count_context_dependent(tok, responses) == 0
    cat.save(tmp_path)
    assert torch.equal(Catalog.load(tmp_path).trie.edge_key, cat.trie.edge_key)


class ListPrompt:
    def prompt(self, history: list[str]) -> str:
        return "History: " + ", ".join(f'"{t}"' for t in history) + f"\n{PROMPT_TAIL}"


def test_fit_prompts_drops_oldest_history_items_and_counts(tok: PreTrainedTokenizerFast) -> None:
    histories = [["Stapler", "Gel Pens 12-Pack", "Stapler, Black"], ["Stapler"]]
    full = fit_prompts(histories, tok, ListPrompt(), 10**6, truncate=True)
    assert (full.truncated_examples, full.truncated_items) == (0, 0)
    assert full.prompt_ids == encode_prompts(tok, [ListPrompt().prompt(h) for h in histories])
    budget = len(full.prompt_ids[0]) - 1  # row 0 is one token over, row 1 fits
    cut = fit_prompts(histories, tok, ListPrompt(), budget, truncate=True)
    assert cut.truncated_examples == 1 and cut.truncated_items >= 1
    assert len(cut.prompt_ids[0]) <= budget and cut.prompt_ids[1] == full.prompt_ids[1]
    assert cut.prompts[0] == ListPrompt().prompt(histories[0][cut.truncated_items :])  # the oldest went first
    with pytest.raises(ValueError, match=r"user 0: .*eval.truncate_history"):
        fit_prompts(histories, tok, ListPrompt(), budget, truncate=False, what="user", option="eval.truncate_history")
    with pytest.raises(ValueError, match="row 1: even with one history item"):
        fit_prompts(histories, tok, ListPrompt(), [10**6, 3], truncate=True)


def test_check_tokenizer_compares_every_titles_token_ids(
    catalog: Catalog, tok: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    catalog.save(tmp_path)
    Catalog.load(tmp_path).check_tokenizer(tok, QuotedResponse())  # the tokenizer it was built with
    # a catalog built by another tokenizer of the same size and eos: only the ids tell them apart
    payload = json.loads((tmp_path / CATALOG_FILE).read_text())
    group = next(item["group"] for item in payload["items"] if item["item_id"] == "i3")
    for item in payload["items"]:
        if item["group"] == group:
            item["token_ids"] = [t + 1 if t != tok.eos_token_id else t for t in item["token_ids"]]
    (tmp_path / CATALOG_FILE).write_text(json.dumps(payload))
    other = Catalog.load(tmp_path)
    other.check_tokenizer(tok)  # eos and size alone pass
    with pytest.raises(ValueError, match=r"titles tokenise to other ids, e.g. item 'i\d' \('Stapler, Black'\)"):
        other.check_tokenizer(tok, QuotedResponse())
