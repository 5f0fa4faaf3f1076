"""Tests of immune_trainer.data: formats, response masks, pairs, collators, errors and Hub loaders.

All fixtures are synthetic and innocuous: the "harmful" side is stood in for by ordinary answers.
"""

from __future__ import annotations

import logging

import datasets
import pytest
import torch

from immune_trainer.data import (
    BENIGN_DATASETS,
    DEFAULT_REFUSALS,
    FORMATS,
    HARMFUL_DATASETS,
    PAIR_COLUMNS,
    PairedCollator,
    SupervisedCollator,
    build_pairs,
    check_tokenizer,
    detect_format,
    formats,
    load_hub_dataset,
    pair_datasets,
    prompts_for_generation,
    render_prompt,
    split_by_category,
    split_prompt_response,
    tokenize_example,
    tokenize_supervised,
    train_eval_split,
)
from immune_trainer.errors import ConfigError, DataError
from immune_trainer.testing import tiny_tokenizer

PROMPTS = [
    "How do I bake bread at home?",
    "What is the capital of France?",
    "Please write a short poem about the sea.",
    "Give me three tips for studying.",
]
ANSWERS = [
    "Mix flour, water, salt and yeast, knead, let it rise and bake it.",
    "The capital of France is Paris.",
    "The sea is wide and blue and calm tonight.",
    "Sleep well, take breaks, and review your notes often.",
]
END_OF_TURN = "<|im_end|>\n"  # what the ChatML template writes after an assistant message


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def plain_tok():
    return tiny_tokenizer(chat_template=False)


def prompt_completion_ds(n: int = 4) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"prompt": PROMPTS[:n], "completion": ANSWERS[:n]})


def conversational_ds() -> datasets.Dataset:
    return datasets.Dataset.from_list(
        [
            {
                "prompt": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": p},
                ],
                "completion": [{"role": "assistant", "content": a}],
            }
            for p, a in zip(PROMPTS, ANSWERS)
        ]
    )


def messages_ds() -> datasets.Dataset:
    # Multi-turn: the earlier assistant turn belongs to the prompt, only the LAST one is the response.
    return datasets.Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": "Hello!"},
                    {"role": "assistant", "content": "Hi, how can I help?"},
                    {"role": "user", "content": p},
                    {"role": "assistant", "content": a},
                ]
            }
            for p, a in zip(PROMPTS, ANSWERS)
        ]
    )


def labelled_text(tokenizer, example, prefix: str = "") -> str:
    labels = example[prefix + "labels"]
    ids = [i for i, label in zip(example[prefix + "input_ids"], labels) if label != -100]
    # the labels are exactly the input ids where they are not masked
    assert ids == [label for label in labels if label != -100]
    # and the masked part is one contiguous prompt prefix
    first = next(i for i, label in enumerate(labels) if label != -100)
    assert all(label == -100 for label in labels[:first])
    assert all(label != -100 for label in labels[first:])
    return tokenizer.decode(ids, skip_special_tokens=False)


# ------------------------------------------------------------------------------------------------
# formats and masks
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "fmt"),
    [
        (prompt_completion_ds, "prompt_completion"),
        (conversational_ds, "conversational_prompt_completion"),
        (messages_ds, "messages"),
    ],
)
def test_every_format_labels_exactly_the_response(tok, make, fmt):
    ds = make()
    assert detect_format(ds) == fmt
    out = tokenize_supervised(ds, tok, max_length=256)
    assert out.column_names == ["input_ids", "attention_mask", "labels"]
    assert len(out) == len(ds)
    for example, answer in zip(out, ANSWERS):
        assert labelled_text(tok, example) == answer + END_OF_TURN
        assert example["attention_mask"] == [1] * len(example["input_ids"])
        # the unlabelled part is the rendered prompt with its generation prompt
        prompt_ids = [i for i, label in zip(example["input_ids"], example["labels"]) if label == -100]
        assert tok.decode(prompt_ids).endswith("<|im_start|>assistant\n")


def test_messages_format_masks_earlier_assistant_turns(tok):
    out = tokenize_supervised(messages_ds(), tok, max_length=256)
    prompt_ids = [i for i, label in zip(out[0]["input_ids"], out[0]["labels"]) if label == -100]
    assert "Hi, how can I help?" in tok.decode(prompt_ids)


def test_plain_format_without_chat_template(plain_tok, caplog):
    formats._warned_plain_format.clear()
    with caplog.at_level(logging.WARNING, logger="immune_trainer.data.formats"):
        out = tokenize_supervised(prompt_completion_ds(), plain_tok, max_length=256)
        tokenize_supervised(prompt_completion_ds(), plain_tok, max_length=256)
    warnings = [r for r in caplog.records if "no chat template" in r.getMessage()]
    assert len(warnings) == 1  # warned once, not per row or per call
    for example, prompt, answer in zip(out, PROMPTS, ANSWERS):
        assert labelled_text(plain_tok, example) == " " + answer + plain_tok.eos_token
        assert plain_tok.decode(example["input_ids"]) == f"User: {prompt}\n\nAssistant: {answer}<|im_end|>"
    assert render_prompt([{"role": "user", "content": "Hi"}], plain_tok) == "User: Hi\n\nAssistant:"


def test_render_prompt_uses_chat_template(tok):
    messages = [{"role": "user", "content": "Hi"}]
    assert render_prompt(messages, tok) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_split_prompt_response_per_format():
    prompt, response = split_prompt_response({"prompt": "a", "completion": "b"}, "prompt_completion")
    assert prompt == [{"role": "user", "content": "a"}] and response == "b"
    conv = conversational_ds()[0]
    prompt, response = split_prompt_response(conv, "conversational_prompt_completion")
    assert [m["role"] for m in prompt] == ["system", "user"] and response == ANSWERS[0]
    prompt, response = split_prompt_response(messages_ds()[1], "messages")
    assert [m["role"] for m in prompt] == ["user", "assistant", "user"] and response == ANSWERS[1]
    with pytest.raises(DataError, match="no assistant turn"):
        split_prompt_response({"messages": [{"role": "user", "content": "x"}]}, "messages")
    with pytest.raises(DataError, match="unknown format"):
        split_prompt_response({}, "text")
    assert set(FORMATS) == {"prompt_completion", "conversational_prompt_completion", "messages"}


def test_long_response_is_truncated_and_long_prompt_raises_with_row(tok):
    out = tokenize_example([{"role": "user", "content": PROMPTS[0]}], " ".join(ANSWERS * 5), tok, 40)
    assert len(out["input_ids"]) == len(out["labels"]) == 40
    assert any(label != -100 for label in out["labels"])

    long_prompt = " ".join(PROMPTS * 10)
    ds = datasets.Dataset.from_dict({"prompt": PROMPTS[:2] + [long_prompt], "completion": ANSWERS[:3]})
    n_tokens = len(
        tok(render_prompt([{"role": "user", "content": long_prompt}], tok), add_special_tokens=False)[
            "input_ids"
        ]
    )
    with pytest.raises(DataError) as info:
        tokenize_supervised(ds, tok, max_length=64)
    message = str(info.value)
    assert "row 2" in message and f"{n_tokens} tokens" in message and "max_length=64" in message


def test_template_whose_prompt_is_not_a_prefix_raises():
    tok = tiny_tokenizer()
    # a template that writes a different header when the assistant answer follows
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>bot: {{ m['content'] }}<|im_end|>"
        "{% else %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant:{% endif %}"
    )
    with pytest.raises(DataError, match="not a prefix"):
        tokenize_supervised(prompt_completion_ds(), tok, max_length=128)


def test_template_that_rejects_messages_gives_data_error():
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tokenize_supervised(prompt_completion_ds(), tok)  # no system turn: fine
    with pytest.raises(DataError, match=r"row 0: .*rejected messages with roles \['system', 'user'\]"):
        tokenize_supervised(conversational_ds(), tok)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def test_empty_dataset(tok):
    empty = datasets.Dataset.from_dict({"prompt": [], "completion": []})
    with pytest.raises(DataError, match="is empty"):
        detect_format(empty)
    with pytest.raises(DataError, match="dataset 'mine' is empty"):
        detect_format(empty, name="mine")


def test_missing_columns_names_found_and_expected(tok):
    ds = datasets.Dataset.from_dict({"question": ["q"], "answer": ["a"]})
    with pytest.raises(DataError) as info:
        tokenize_supervised(ds, tok)
    message = str(info.value)
    assert "'question'" in message and "'answer'" in message
    assert (
        "'prompt'" in message
        and "'completion'" in message
        and "'messages'" in message
        and "column_map" in message
    )


@pytest.mark.parametrize(
    "rows",
    [
        {"prompt": [1], "completion": ["a"]},
        {"prompt": ["q"], "completion": [[{"role": "assistant", "content": "a"}]]},
        {"messages": [["just text"]]},
        {"messages": [[{"role": "user", "content": 5}]]},
    ],
)
def test_wrong_types(tok, rows):
    with pytest.raises(DataError):
        tokenize_supervised(datasets.Dataset.from_dict(rows), tok)


def test_wrong_type_in_a_later_row_names_the_row(tok):
    ds = datasets.Dataset.from_list(
        [
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        ]
    )
    with pytest.raises(DataError, match="row 1: .*no assistant turn"):
        tokenize_supervised(ds, tok)


def test_not_a_dataset(tok):
    with pytest.raises(DataError, match="Dataset.from_list"):
        detect_format([{"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError, match="pass one split"):
        detect_format(datasets.DatasetDict({"train": prompt_completion_ds()}))


def test_no_pad_token():
    tok = tiny_tokenizer(pad_token=False)
    with pytest.raises(DataError, match=r"tokenizer\.pad_token = tokenizer\.eos_token"):
        check_tokenizer(tok)
    with pytest.raises(DataError, match="pad token"):
        tokenize_supervised(prompt_completion_ds(), tok)
    with pytest.raises(DataError, match="pad token"):
        SupervisedCollator(tok)
    tok.pad_token = tok.eos_token
    check_tokenizer(tok)  # the suggested fix works


# ------------------------------------------------------------------------------------------------
# column_map
# ------------------------------------------------------------------------------------------------


def test_column_map(tok):
    ds = datasets.Dataset.from_dict(
        {"prompt": PROMPTS, "response": ANSWERS, "category": ["a", "b", "a", "c"]}
    )
    with pytest.raises(DataError, match="column_map"):
        tokenize_supervised(ds, tok)  # never guessed
    out = tokenize_supervised(ds, tok, column_map={"response": "completion"})
    assert labelled_text(tok, out[1]) == ANSWERS[1] + END_OF_TURN
    with pytest.raises(DataError, match="does not have"):
        tokenize_supervised(ds, tok, column_map={"answer": "completion"})
    clash = ds.add_column("completion", ANSWERS)
    with pytest.raises(DataError, match="already has"):
        tokenize_supervised(clash, tok, column_map={"response": "completion"})


# ------------------------------------------------------------------------------------------------
# pairs
# ------------------------------------------------------------------------------------------------


def test_build_pairs_masks_both_sides(tok):
    ds = datasets.Dataset.from_dict({"prompt": PROMPTS, "response": ANSWERS, "category": ["x"] * 4})
    pairs = build_pairs(ds, tok, max_length=256, column_map={"response": "completion"}, seed=3)
    assert pairs.column_names == list(PAIR_COLUMNS)
    for example, answer in zip(pairs, ANSWERS):
        assert labelled_text(tok, example, "harmful_") == answer + END_OF_TURN
        refusal = labelled_text(tok, example, "harmless_")
        assert refusal[: -len(END_OF_TURN)] in DEFAULT_REFUSALS and refusal.endswith(END_OF_TURN)
        # same prompt tokens on both sides
        n_harmful = example["harmful_labels"].count(-100)
        n_harmless = example["harmless_labels"].count(-100)
        assert n_harmful == n_harmless
        assert example["harmful_input_ids"][:n_harmful] == example["harmless_input_ids"][:n_harmless]


def test_refusals_drawn_deterministically_by_seed(tok):
    ds = datasets.Dataset.from_dict({"prompt": PROMPTS * 5, "completion": ANSWERS * 5})

    def refusals(seed):
        pairs = build_pairs(ds, tok, max_length=256, seed=seed)
        return [labelled_text(tok, example, "harmless_") for example in pairs]

    first = refusals(0)
    assert refusals(0) == first
    assert refusals(1) != first
    assert len(set(first)) > 3  # drawn, not one fixed string
    custom = build_pairs(ds.select(range(2)), tok, refusals=["No thanks."])
    assert labelled_text(tok, custom[0], "harmless_") == "No thanks." + END_OF_TURN
    with pytest.raises(DataError, match="refusals"):
        build_pairs(ds, tok, refusals=[])


def test_build_pairs_refusal_column(tok):
    ds = conversational_ds().add_column("refusal", [f"Refusal number {i}." for i in range(4)])
    pairs = build_pairs(ds, tok, refusal_column="refusal", max_length=256)
    assert pairs.column_names == list(PAIR_COLUMNS)
    assert labelled_text(tok, pairs[2], "harmless_") == "Refusal number 2." + END_OF_TURN
    assert labelled_text(tok, pairs[2], "harmful_") == ANSWERS[2] + END_OF_TURN
    with pytest.raises(DataError, match="refusal_column 'nope'"):
        build_pairs(ds, tok, refusal_column="nope")


def test_pair_datasets(tok):
    harmful = prompt_completion_ds()
    harmless = datasets.Dataset.from_dict({"prompt": PROMPTS, "completion": [f"No {i}." for i in range(4)]})
    pairs = pair_datasets(harmful, harmless, tok, max_length=256)
    assert pairs.column_names == list(PAIR_COLUMNS)
    assert labelled_text(tok, pairs[3], "harmful_") == ANSWERS[3] + END_OF_TURN
    assert labelled_text(tok, pairs[3], "harmless_") == "No 3." + END_OF_TURN

    with pytest.raises(DataError) as info:
        pair_datasets(harmful, harmless.select(range(3)), tok)
    assert "4 rows" in str(info.value) and "3" in str(info.value)

    shuffled = datasets.Dataset.from_dict(
        {"prompt": [PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[3]], "completion": ["n"] * 4}
    )
    with pytest.raises(DataError, match="row 1: .*prompts differ"):
        pair_datasets(harmful, shuffled, tok)


# ------------------------------------------------------------------------------------------------
# collators
# ------------------------------------------------------------------------------------------------


def test_supervised_collator_right_pads(tok):
    out = tokenize_supervised(prompt_completion_ds(), tok, max_length=256)
    examples = [dict(e, category="extra", idx=i) for i, e in enumerate(out)]  # extra keys are dropped
    lengths = [len(e["input_ids"]) for e in examples]
    batch = SupervisedCollator(tok)(examples)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(v.dtype == torch.long and v.shape == (4, max(lengths)) for v in batch.values())
    for row, example, n in zip(range(4), examples, lengths):
        assert batch["input_ids"][row, :n].tolist() == example["input_ids"]
        assert batch["labels"][row, :n].tolist() == example["labels"]
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()
        assert (batch["labels"][row, n:] == -100).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)

    padded = SupervisedCollator(tok, pad_to_multiple_of=16)(examples)
    assert padded["input_ids"].shape[1] % 16 == 0 and padded["labels"].shape[1] >= max(lengths)
    tensors = out.with_format("torch")
    assert torch.equal(
        SupervisedCollator(tok)([tensors[0], tensors[1]])["labels"],
        SupervisedCollator(tok)([out[0], out[1]])["labels"],
    )


def test_collator_pads_right_even_for_left_padding_tokenizer(tok):
    left = tiny_tokenizer()
    left.padding_side = "left"
    out = tokenize_supervised(prompt_completion_ds(), left, max_length=256)
    batch = SupervisedCollator(left)(list(out))
    assert (batch["attention_mask"][:, 0] == 1).all()


def test_paired_collator_pads_each_side(tok):
    ds = datasets.Dataset.from_dict({"prompt": PROMPTS, "completion": ANSWERS})
    pairs = build_pairs(ds, tok, max_length=256, refusals=["No."])
    examples = [dict(e, note="x") for e in pairs]
    batch = PairedCollator(tok)(examples)
    assert set(batch) == set(PAIR_COLUMNS)
    harmful_len = max(len(e["harmful_input_ids"]) for e in examples)
    harmless_len = max(len(e["harmless_input_ids"]) for e in examples)
    assert harmless_len < harmful_len  # short refusal: sides padded separately
    assert batch["harmful_input_ids"].shape == (4, harmful_len)
    assert batch["harmless_input_ids"].shape == (4, harmless_len)
    for i, example in enumerate(examples):
        n = len(example["harmless_labels"])
        assert batch["harmless_labels"][i, :n].tolist() == example["harmless_labels"]
        assert (batch["harmless_labels"][i, n:] == -100).all()
        assert batch["harmless_attention_mask"][i].sum().item() == n


# ------------------------------------------------------------------------------------------------
# prompts, splits
# ------------------------------------------------------------------------------------------------


def test_prompts_for_generation(tok):
    rendered = prompts_for_generation(conversational_ds(), tok, limit=2)
    assert len(rendered) == 2
    assert rendered[1].startswith("<|im_start|>system\n") and rendered[1].endswith("<|im_start|>assistant\n")
    assert PROMPTS[1] in rendered[1] and ANSWERS[1] not in rendered[1]
    prompt_only = datasets.Dataset.from_dict({"question": PROMPTS})
    rendered = prompts_for_generation(prompt_only, tok, column_map={"question": "prompt"})
    assert rendered == [render_prompt([{"role": "user", "content": p}], tok) for p in PROMPTS]
    from_messages = prompts_for_generation(messages_ds(), tok)
    assert ANSWERS[0] not in from_messages[0] and "Hi, how can I help?" in from_messages[0]


def test_split_by_category_and_train_eval_split():
    ds = datasets.Dataset.from_dict({"prompt": PROMPTS, "category": ["food", "geo", "art", "food"]})
    in_domain, cross = split_by_category(ds, "category", ["food"])
    assert in_domain["category"] == ["geo", "art"] and cross["category"] == ["food", "food"]
    multi = datasets.Dataset.from_dict({"prompt": PROMPTS[:3], "category": [["a", "b"], ["c"], ["b"]]})
    in_domain, cross = split_by_category(multi, "category", ["b"])
    assert in_domain["prompt"] == [PROMPTS[1]] and len(cross) == 2
    with pytest.raises(DataError, match="found"):
        split_by_category(ds, "category", ["space"])
    with pytest.raises(DataError, match="no column"):
        split_by_category(ds, "topic", ["food"])

    big = datasets.Dataset.from_dict({"x": list(range(20))})
    train, evaluation = train_eval_split(big, 5, seed=1)
    assert len(train) == 15 and len(evaluation) == 5
    assert sorted(list(train["x"]) + list(evaluation["x"])) == list(range(20))
    assert train_eval_split(big, 5, seed=1)[1]["x"] == evaluation["x"]
    assert len(train_eval_split(big, 0.25)[1]) == 5
    with pytest.raises(DataError):
        train_eval_split(big, 20)


# ------------------------------------------------------------------------------------------------
# Hub loaders (no network: datasets.load_dataset is replaced by an in-memory fake)
# ------------------------------------------------------------------------------------------------


def test_registries_are_complete():
    for name in ("beavertails", "beavertails_refusals", "advbench", "harmbench", "hex_phi", "do_not_answer"):
        assert name in HARMFUL_DATASETS
    for name in ("alpaca", "sst2", "ag_news", "gsm8k"):
        assert name in BENIGN_DATASETS
    beavertails = HARMFUL_DATASETS["beavertails"]
    assert beavertails.hub_id == "PKU-Alignment/BeaverTails"
    assert beavertails.splits == {"train": "30k_train", "test": "30k_test"}
    assert beavertails.keep == {"is_safe": False}
    for spec in {**HARMFUL_DATASETS, **BENIGN_DATASETS}.values():
        assert spec.license and spec.citation.startswith("@")


def test_unknown_hub_name():
    with pytest.raises(ConfigError, match="beavertails"):
        load_hub_dataset("beavertales")


def test_beavertails_conversion(monkeypatch, tok):
    calls = []

    def fake_load_dataset(path, name=None, split=None, cache_dir=None, **kwargs):
        calls.append((path, name, split))
        flags = [
            {"animal_abuse": False, "privacy_violation": True},
            {"animal_abuse": True, "privacy_violation": False},
        ]
        return datasets.Dataset.from_dict(
            {
                "prompt": ["q0", "q1", "q2", "q3"],
                "response": ["r0", "r1", "r2", "r3"],
                "category": [flags[0], flags[1], flags[0], flags[1]],
                "is_safe": [False, True, False, False],
            }
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_hub_dataset("beavertails", split="test")
    assert calls == [("PKU-Alignment/BeaverTails", None, "30k_test")]
    assert ds["prompt"] == ["q0", "q2", "q3"]  # the safe row is gone
    assert ds["completion"] == ["r0", "r2", "r3"]
    assert ds["category"] == [["privacy_violation"], ["privacy_violation"], ["animal_abuse"]]
    assert detect_format(ds) == "prompt_completion"
    only = load_hub_dataset("beavertails", categories=["animal_abuse"])
    assert only["prompt"] == ["q3"]
    assert len(load_hub_dataset("beavertails", limit=2)) == 2
    # and it feeds straight into pairs
    pairs = build_pairs(ds, tok, max_length=64)
    assert pairs.column_names == list(PAIR_COLUMNS) and len(pairs) == 3


def test_beavertails_refusals_feed_build_pairs(monkeypatch, tok):
    def fake_load_dataset(path, data_files=None, split=None, cache_dir=None, **kwargs):
        assert path == "json" and data_files["train"].endswith("beavertails_with_refusals_train.json")
        return datasets.Dataset.from_dict(
            {
                "prompt": ["q0", "q1"],
                "response": ["r0", "r1"],
                "refusal": ["I can't do q0.", "I can't do q1."],
                "category": [{"privacy_violation": True}, {"privacy_violation": True}],
                "is_safe": [False, False],
            }
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_hub_dataset("beavertails_refusals")
    pairs = build_pairs(ds, tok, max_length=64, refusal_column="refusal")
    assert labelled_text(tok, pairs[1], "harmful_") == "r1" + END_OF_TURN
    assert labelled_text(tok, pairs[1], "harmless_") == "I can't do q1." + END_OF_TURN


def test_benign_conversion_with_labels_and_template(monkeypatch):
    def fake_load_dataset(path, name=None, split=None, cache_dir=None, **kwargs):
        if path == "stanfordnlp/sst2":
            assert split == "validation"
            return datasets.Dataset.from_dict(
                {"idx": [0, 1], "sentence": ["good film", "dull"], "label": [1, 0]}
            )
        assert path == "tatsu-lab/alpaca"
        return datasets.Dataset.from_dict(
            {
                "instruction": ["Add.", "Greet."],
                "input": ["2 and 3", ""],
                "output": ["5", "Hello"],
                "text": ["", ""],
            }
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    sst2 = load_hub_dataset("sst2", split="test")
    assert sst2["completion"] == ["positive", "negative"] and sst2.column_names == ["completion", "prompt"]
    assert sst2["prompt"][0].endswith("good film")
    alpaca = load_hub_dataset("alpaca")
    assert alpaca["prompt"] == ["Add.\n\n2 and 3", "Greet."] and alpaca["completion"] == ["5", "Hello"]


def test_hex_phi_loads_each_category_file(monkeypatch, tok):
    seen = []

    def fake_load_dataset(path, data_files=None, split=None, cache_dir=None, **kwargs):
        assert path == "csv" and kwargs == {"column_names": ["prompt"]}
        seen.append(data_files["train"])
        return datasets.Dataset.from_dict({"prompt": [f"prompt from {data_files['train'][-6:]}"] * 2})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_hub_dataset("hex_phi", categories=["malware", "privacy_violation"])
    assert seen[0].endswith("category_4.csv") and seen[1].endswith("category_10.csv")
    assert ds["category"] == ["malware"] * 2 + ["privacy_violation"] * 2
    assert len(prompts_for_generation(ds, tok)) == 4
    with pytest.raises(ConfigError, match="no categories"):
        load_hub_dataset("hex_phi", categories=["nonsense"])
