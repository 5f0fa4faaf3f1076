"""Datasets for immunization: formats, tokenization with response masks, harmful/harmless pairs, loaders.

A user's :class:`datasets.Dataset` enters here in one of the formats trl users already have, and
leaves as tokenized columns a trainer or an attack can batch:

* ``"prompt_completion"``: columns ``prompt`` (str) and ``completion`` (str);
* ``"conversational_prompt_completion"``: ``prompt`` is a list of ``{"role", "content"}`` messages and
  ``completion`` a list holding the assistant message(s);
* ``"messages"``: ``messages`` is a list of ``{"role", "content"}``; the response is the LAST assistant
  turn and everything before it is the prompt.

Other column names are accepted through an explicit ``column_map`` (``{"response": "completion"}``
for BeaverTails), never guessed.

Tokenized supervised examples have ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on every
token but the response's, which end with the chat template's end-of-turn, or the eos token when the
tokenizer has no chat template). Paired examples (the same prompt with a harmful and a harmless
response) have the six columns ``harmful_input_ids``, ``harmful_attention_mask``, ``harmful_labels``,
``harmless_input_ids``, ``harmless_attention_mask``, ``harmless_labels``.

Real harmful data is never shipped with this package: :func:`load_hub_dataset` fetches the field's
standard sets from the Hugging Face Hub into the user's cache.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets

from ..errors import ConfigError, DataError

logger = logging.getLogger(__name__)

__all__ = [
    "BENIGN_DATASETS",
    "PAIR_COLUMNS",
    "SUPERVISED_COLUMNS",
    "apply_column_map",
    "DEFAULT_REFUSALS",
    "FORMATS",
    "HARMFUL_DATASETS",
    "PLAIN_ROLE_NAMES",
    "HubDatasetSpec",
    "PairedCollator",
    "SupervisedCollator",
    "build_pairs",
    "check_tokenizer",
    "detect_format",
    "load_hub_dataset",
    "pair_datasets",
    "prompts_for_generation",
    "render_plain",
    "render_prompt",
    "split_by_category",
    "split_prompt_response",
    "tokenize_example",
    "tokenize_supervised",
    "train_eval_split",
]

FORMATS = ("prompt_completion", "conversational_prompt_completion", "messages")

PAIR_COLUMNS = (
    "harmful_input_ids",
    "harmful_attention_mask",
    "harmful_labels",
    "harmless_input_ids",
    "harmless_attention_mask",
    "harmless_labels",
)
SUPERVISED_COLUMNS = ("input_ids", "attention_mask", "labels")
IGNORE_INDEX = -100

# A short, varied set of refusals for the harmless side of a pair when the user has none. They are
# generic (no topic), polite and of different lengths and phrasings, so a defense does not learn one
# fixed string. Written for this library.
DEFAULT_REFUSALS: tuple[str, ...] = (
    "I can't help with that.",
    "I'm sorry, but I can't assist with that request.",
    "I won't be able to help with this.",
    "Sorry, that's not something I can help with.",
    "I can't provide that information.",
    "I'm not able to help with that, but I'm happy to help with something else.",
    "I must decline this request.",
    "I'm sorry, I can't do that.",
    "That's not something I'm willing to help with.",
    "I can't assist with this, as it could cause harm.",
    "I'm unable to help with that request.",
    "I'd rather not help with that. Is there something else I can do for you?",
    "Sorry, I can't support this request.",
    "I can't help with that, because it could put people at risk.",
    "No, I won't help with that.",
    "I'm sorry, but this is a request I have to refuse.",
    "I can't give guidance on that.",
    "Unfortunately, I can't help with this one.",
    "I'm not going to help with that, but I can point you to safe and legal resources.",
    "I apologize, but I cannot comply with that request.",
)

# The plain prompt format used when a tokenizer has no chat template (base models). It is defined
# here and only here: turns are "<Role>: <content>" separated by a blank line, the generation prompt
# is "Assistant:", and the response follows after one space and ends with the eos token:
#
#     System: You are helpful.
#
#     User: What is the capital of France?
#
#     Assistant: Paris.</s>
PLAIN_ROLE_NAMES: dict[str, str] = {"system": "System", "user": "User", "assistant": "Assistant"}
_PLAIN_TURN_SEPARATOR = "\n\n"
_PLAIN_RESPONSE_PREFIX = " "

_warned_plain_format: set[str] = set()


# --------------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------------


def _dataset_name(dataset: Any, name: str | None = None) -> str:
    if name:
        return name
    info = getattr(dataset, "info", None)
    for attr in ("dataset_name", "builder_name"):
        value = getattr(info, attr, None) if info is not None else None
        if value:
            return str(value)
    return "dataset"


def _require_dataset(dataset: Any, name: str) -> None:
    if isinstance(dataset, datasets.DatasetDict):
        raise DataError(
            f"{name!r} is a DatasetDict with splits {list(dataset)}; pass one split, e.g. dataset['train']."
        )
    if not isinstance(dataset, datasets.Dataset):
        raise DataError(
            f"{name!r} is a {type(dataset).__name__}, expected a datasets.Dataset; build one with "
            "datasets.Dataset.from_list(rows) or Dataset.from_dict(columns)."
        )


def _is_message_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, Mapping) for m in value)


def _check_messages(value: Any, what: str) -> list[dict]:
    """Validate a list of chat messages and return it as plain dicts {role, content}."""
    if not isinstance(value, list) or not value:
        raise DataError(
            f"{what} must be a non-empty list of {{'role', 'content'}} messages, got {_short(value)}."
        )
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise DataError(
                f"{what}[{i}] must be a dict with 'role' and 'content' keys, got {_short(message)}."
            )
        if not isinstance(message["role"], str) or not isinstance(message["content"], str):
            raise DataError(
                f"{what}[{i}] must have a str 'role' and a str 'content', got role "
                f"{type(message['role']).__name__} and content {type(message['content']).__name__}."
            )
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def detect_format(dataset: datasets.Dataset, *, name: str | None = None) -> str:
    """Return which of :data:`FORMATS` ``dataset`` is in, judged from its columns and first row.

    Raises:
        DataError: the dataset is empty, lacks the columns of every format (the message names the
            columns found and those expected), or its first row has the wrong types.
    """
    name = _dataset_name(dataset, name)
    _require_dataset(dataset, name)
    columns = set(dataset.column_names)
    if len(dataset) == 0:
        raise DataError(f"dataset {name!r} is empty; it needs at least one row.")
    row = dataset[0]
    if "messages" in columns and not {"prompt", "completion"} <= columns:
        _check_messages(row["messages"], f"{name!r} row 0 column 'messages'")
        return "messages"
    if {"prompt", "completion"} <= columns:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return "prompt_completion"
        if _is_message_list(prompt) and _is_message_list(completion):
            _check_messages(prompt, f"{name!r} row 0 column 'prompt'")
            _check_messages(completion, f"{name!r} row 0 column 'completion'")
            return "conversational_prompt_completion"
        raise DataError(
            f"dataset {name!r}: 'prompt' and 'completion' must both be str (prompt/completion format) or "
            f"both lists of {{'role', 'content'}} messages (conversational format); row 0 has prompt "
            f"{type(prompt).__name__} and completion {type(completion).__name__}."
        )
    raise DataError(
        f"dataset {name!r} has columns {sorted(columns)}; expected 'prompt' and 'completion' (str or "
        "chat messages) or 'messages' (chat messages). Rename other columns with column_map, e.g. "
        "column_map={'response': 'completion'}."
    )


def apply_column_map(
    dataset: datasets.Dataset, column_map: Mapping[str, str] | None, *, name: str | None = None
) -> datasets.Dataset:
    """Rename columns ``{dataset column: canonical name}`` (canonical: prompt, completion, messages...).

    Raises:
        DataError: a source column is missing, or the target name already exists and is not renamed away.
    """
    if not column_map:
        return dataset
    name = _dataset_name(dataset, name)
    _require_dataset(dataset, name)
    columns = set(dataset.column_names)
    missing = [src for src in column_map if src not in columns]
    if missing:
        raise DataError(
            f"column_map names columns {missing} that dataset {name!r} does not have; it has {sorted(columns)}."
        )
    clashes = [
        dst for src, dst in column_map.items() if dst != src and dst in columns and dst not in column_map
    ]
    if clashes:
        raise DataError(
            f"column_map renames into {clashes}, which dataset {name!r} already has; drop those columns first "
            "(dataset.remove_columns) or map them elsewhere too."
        )
    return dataset.rename_columns({src: dst for src, dst in column_map.items() if src != dst})


def check_tokenizer(tokenizer: Any) -> None:
    """Check that ``tokenizer`` can pad batches.

    Raises:
        DataError: the tokenizer has no pad token.
    """
    if tokenizer is None or not callable(tokenizer):
        raise DataError(f"expected a transformers tokenizer, got {type(tokenizer).__name__}.")
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise DataError(
            "the tokenizer has no pad token, so batches cannot be padded; set one, e.g. "
            "`tokenizer.pad_token = tokenizer.eos_token`."
        )


def split_prompt_response(example: Mapping[str, Any], fmt: str) -> tuple[list[dict], str]:
    """Split one row of format ``fmt`` into the prompt as chat messages and the response text.

    * prompt/completion: ``[{"role": "user", "content": prompt}]`` and ``completion``;
    * conversational: the prompt messages plus all but the last completion message, and the last
      completion message's content (which must be an assistant turn);
    * messages: every message before the last assistant turn, and that turn's content.

    Raises:
        DataError: wrong types, no assistant turn, or an unknown format.
    """
    if fmt == "prompt_completion":
        prompt, completion = example.get("prompt"), example.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise DataError(
                f"prompt_completion rows need str 'prompt' and 'completion', got "
                f"{type(prompt).__name__} and {type(completion).__name__}."
            )
        return [{"role": "user", "content": prompt}], completion
    if fmt == "conversational_prompt_completion":
        prompt = _check_messages(example.get("prompt"), "column 'prompt'")
        completion = _check_messages(example.get("completion"), "column 'completion'")
        if completion[-1]["role"] != "assistant":
            raise DataError(
                f"the last message of 'completion' must have role 'assistant', got {completion[-1]['role']!r}."
            )
        return prompt + completion[:-1], completion[-1]["content"]
    if fmt == "messages":
        messages = _check_messages(example.get("messages"), "column 'messages'")
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise DataError(
                "column 'messages' has no assistant turn; the response is the last assistant turn."
            )
        if last == 0:
            raise DataError(
                "column 'messages' starts with the assistant turn, so there is no prompt before it."
            )
        return messages[:last], messages[last]["content"]
    raise DataError(f"unknown format {fmt!r}; expected one of {FORMATS}.")


def _prompt_messages(example: Mapping[str, Any], fmt: str) -> list[dict]:
    """The prompt of a row; rows with only a prompt (str or messages) are accepted."""
    if fmt == "prompt_only":
        prompt = example["prompt"]
        if isinstance(prompt, str):
            return [{"role": "user", "content": prompt}]
        return _check_messages(prompt, "column 'prompt'")
    if fmt == "messages_prompt":
        messages = _check_messages(example["messages"], "column 'messages'")
        if messages[-1]["role"] == "assistant":
            return split_prompt_response(example, "messages")[0]
        return messages
    return split_prompt_response(example, fmt)[0]


# --------------------------------------------------------------------------------------------------
# Rendering and tokenization
# --------------------------------------------------------------------------------------------------


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_plain(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """Render messages in the plain format used for tokenizers without a chat template.

    Turns are ``"<Role>: <content>"`` joined by a blank line (roles named by :data:`PLAIN_ROLE_NAMES`,
    others capitalised); the generation prompt is a final ``"Assistant:"`` turn.
    """
    parts = [f"{PLAIN_ROLE_NAMES.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages]
    if add_generation_prompt:
        parts.append(f"{PLAIN_ROLE_NAMES['assistant']}:")
    return _PLAIN_TURN_SEPARATOR.join(parts)


def _warn_plain_format(tokenizer: Any) -> None:
    key = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if key not in _warned_plain_format:
        _warned_plain_format.add(key)
        logger.warning(
            "Tokenizer %r has no chat template; prompts are rendered in immune_trainer's plain format "
            "('User: ...\\n\\nAssistant:'). Set tokenizer.chat_template to use the model's own format.",
            key,
        )


def _apply_template(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> str:
    from jinja2.exceptions import TemplateError

    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as error:
        roles = [m["role"] for m in messages]
        raise DataError(
            f"the tokenizer's chat template rejected messages with roles {roles}: {error}. Some templates "
            "refuse a 'system' turn or need alternating user/assistant turns; adapt the data to the template."
        ) from None
    if not isinstance(text, str):
        raise DataError(f"the chat template returned {type(text).__name__}, expected the rendered str.")
    return text


def render_prompt(messages: list[dict], tokenizer: Any) -> str:
    """Render prompt messages as the text a model sees before it answers.

    With a chat template: ``apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``.
    Without one: :func:`render_plain` (logged once per tokenizer).
    """
    messages = _check_messages(messages, "messages")
    if _has_chat_template(tokenizer):
        return _apply_template(tokenizer, messages, add_generation_prompt=True)
    _warn_plain_format(tokenizer)
    return render_plain(messages, add_generation_prompt=True)


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def tokenize_example(
    prompt_messages: list[dict], response: str, tokenizer: Any, max_length: int
) -> dict[str, list[int]]:
    """Tokenize a prompt and its response with labels on the response tokens only.

    The prompt is rendered with its generation prompt (:func:`render_prompt`), the full conversation
    with the response as the final assistant turn; the response tokens are everything the full
    rendering adds after the prompt (the response and the template's end-of-turn; without a chat
    template, the response and the eos token). With a chat template the text is tokenized without
    adding special tokens (the template writes them); without one the tokenizer's own special tokens
    (e.g. BOS) are added. If the tokens of the full text do not start with the prompt's tokens (a merge
    across the boundary), the remainder is tokenized on its own and appended, which is exactly what the
    model sees when it generates after the prompt.

    Returns:
        ``{"input_ids", "attention_mask", "labels"}``; ``labels`` is ``-100`` on every prompt token.
        Responses longer than ``max_length`` minus the prompt are truncated.

    Raises:
        DataError: the prompt alone has ``max_length`` tokens or more, or the chat template renders the
            prompt differently inside the full conversation (so no boundary can be drawn).
    """
    if not isinstance(response, str):
        raise DataError(f"the response must be a str, got {type(response).__name__}.")
    if not isinstance(max_length, int) or max_length < 2:
        raise DataError(f"max_length must be an int >= 2, got {max_length!r}.")
    prompt_messages = _check_messages(prompt_messages, "prompt messages")
    if _has_chat_template(tokenizer):
        prompt_text = _apply_template(tokenizer, prompt_messages, add_generation_prompt=True)
        full_text = _apply_template(
            tokenizer,
            prompt_messages + [{"role": "assistant", "content": response}],
            add_generation_prompt=False,
        )
        if not full_text.startswith(prompt_text):
            raise DataError(
                "the chat template renders the prompt differently when the assistant's answer follows "
                "(the prompt with add_generation_prompt=True is not a prefix of the full conversation), so "
                "the response tokens cannot be located. Use a template whose generation prompt is a prefix "
                f"of the rendered conversation. Prompt: {_short(prompt_text)}; full: {_short(full_text)}."
            )
        add_special = False
    else:
        _warn_plain_format(tokenizer)
        prompt_text = render_plain(prompt_messages, add_generation_prompt=True)
        eos = tokenizer.eos_token or ""
        full_text = prompt_text + _PLAIN_RESPONSE_PREFIX + response + eos
        add_special = True
    prompt_ids = _encode(tokenizer, prompt_text, add_special)
    if len(prompt_ids) >= max_length:
        raise DataError(
            f"the prompt has {len(prompt_ids)} tokens, which leaves no room for the response within "
            f"max_length={max_length}; raise max_length or shorten or filter out long prompts."
        )
    full_ids = _encode(tokenizer, full_text, add_special)
    if full_ids[: len(prompt_ids)] == prompt_ids:
        response_ids = full_ids[len(prompt_ids) :]
    else:
        response_ids = _encode(tokenizer, full_text[len(prompt_text) :], False)
    response_ids = response_ids[: max_length - len(prompt_ids)]
    input_ids = prompt_ids + response_ids
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + list(response_ids),
    }


def _with_row(error: DataError, index: int, name: str) -> DataError:
    where = f"row {index}" if name == "dataset" else f"{name!r} row {index}"
    return DataError(f"{where}: {error}")


def tokenize_supervised(
    dataset: datasets.Dataset,
    tokenizer: Any,
    max_length: int = 512,
    column_map: Mapping[str, str] | None = None,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Tokenize a dataset in any of :data:`FORMATS` into ``input_ids``, ``attention_mask``, ``labels``.

    Every other column is removed. Errors name the offending row.

    Raises:
        DataError: see :func:`detect_format`, :func:`check_tokenizer` and :func:`tokenize_example`.
    """
    check_tokenizer(tokenizer)
    name = _dataset_name(dataset)
    dataset = apply_column_map(dataset, column_map, name=name)
    fmt = detect_format(dataset, name=name)

    def _tokenize(example: dict, index: int) -> dict:
        try:
            prompt, response = split_prompt_response(example, fmt)
            return tokenize_example(prompt, response, tokenizer, max_length)
        except DataError as error:
            raise _with_row(error, index, name) from None

    return dataset.map(
        _tokenize,
        with_indices=True,
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        desc="Tokenizing",
    )


# --------------------------------------------------------------------------------------------------
# Harmful / harmless pairs
# --------------------------------------------------------------------------------------------------


def ensure_tokenized(
    dataset: datasets.Dataset, tokenizer: Any, max_length: int = 512, column_map=None
) -> datasets.Dataset:
    """``dataset`` as tokenized rows with response-only labels: returned as it is when it already has
    ``input_ids`` and ``labels``, else tokenized with :func:`tokenize_supervised`.

    Raises:
        DataError: the dataset has ``input_ids`` but no ``labels`` (which tokens carry the loss is unknown).
    """
    columns = set(dataset.column_names)
    if "input_ids" in columns:
        if "labels" not in columns:
            raise DataError(
                "The tokenized dataset has input_ids but no labels; add labels (-100 on the prompt) "
                "or pass the raw prompt/completion or messages dataset."
            )
        return dataset
    return tokenize_supervised(dataset, tokenizer, max_length=max_length, column_map=column_map)


def _response_text(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    if _is_message_list(value):
        messages = _check_messages(value, what)
        return messages[-1]["content"]
    raise DataError(f"{what} must be a str or a list of messages, got {type(value).__name__}.")


def _paired_example(prompt: list[dict], harmful: str, harmless: str, tokenizer: Any, max_length: int) -> dict:
    harmful_side = tokenize_example(prompt, harmful, tokenizer, max_length)
    harmless_side = tokenize_example(prompt, harmless, tokenizer, max_length)
    out = {f"harmful_{k}": v for k, v in harmful_side.items()}
    out.update({f"harmless_{k}": v for k, v in harmless_side.items()})
    return out


def build_pairs(
    harmful: datasets.Dataset,
    tokenizer: Any,
    max_length: int = 512,
    refusal_column: str | None = None,
    refusals: Sequence[str] | None = None,
    seed: int = 0,
    column_map: Mapping[str, str] | None = None,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Pair each harmful example with the same prompt answered by a refusal.

    The harmless response is the row's ``refusal_column`` (a str, or messages whose last one is used)
    when given, else one of ``refusals`` (default :data:`DEFAULT_REFUSALS`) drawn with
    ``random.Random(seed)``, one draw per row in row order (the same seed gives the same pairs).

    Returns:
        A dataset with exactly the six columns of :data:`PAIR_COLUMNS`.
    """
    check_tokenizer(tokenizer)
    name = _dataset_name(harmful, "harmful")
    harmful = apply_column_map(harmful, column_map, name=name)
    fmt = detect_format(harmful, name=name)
    if refusal_column is not None:
        if refusal_column not in harmful.column_names:
            raise DataError(
                f"refusal_column {refusal_column!r} is not a column of {name!r}; it has {harmful.column_names}."
            )
        drawn = None
    else:
        pool = tuple(DEFAULT_REFUSALS if refusals is None else refusals)
        if not pool or not all(isinstance(r, str) and r.strip() for r in pool):
            raise DataError("refusals must be a non-empty sequence of non-empty strings.")
        rng = random.Random(seed)
        drawn = [pool[rng.randrange(len(pool))] for _ in range(len(harmful))]

    def _pair(example: dict, index: int) -> dict:
        try:
            prompt, response = split_prompt_response(example, fmt)
            if drawn is None:
                refusal = _response_text(example[refusal_column], f"column {refusal_column!r}")
            else:
                refusal = drawn[index]
            return _paired_example(prompt, response, refusal, tokenizer, max_length)
        except DataError as error:
            raise _with_row(error, index, name) from None

    return harmful.map(
        _pair, with_indices=True, remove_columns=harmful.column_names, num_proc=num_proc, desc="Pairing"
    )


_HARMLESS_PREFIX = "__harmless__"


def pair_datasets(
    harmful: datasets.Dataset,
    harmless: datasets.Dataset,
    tokenizer: Any,
    max_length: int = 512,
    column_map: Mapping[str, str] | None = None,
    harmless_column_map: Mapping[str, str] | None = None,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Pair two aligned datasets row by row: the same prompts with harmful and harmless responses.

    ``column_map`` applies to both datasets unless ``harmless_column_map`` is given for the second.
    The two may be in different formats; their prompts (as chat messages) must be equal row by row.

    Returns:
        A dataset with exactly the six columns of :data:`PAIR_COLUMNS`.

    Raises:
        DataError: the datasets differ in length (both counts named) or a row's prompts differ.
    """
    check_tokenizer(tokenizer)
    harmful = apply_column_map(harmful, column_map, name="harmful")
    harmless = apply_column_map(
        harmless, column_map if harmless_column_map is None else harmless_column_map, name="harmless"
    )
    fmt_harmful = detect_format(harmful, name="harmful")
    fmt_harmless = detect_format(harmless, name="harmless")
    if len(harmful) != len(harmless):
        raise DataError(
            f"the harmful dataset has {len(harmful)} rows but the harmless one has {len(harmless)}; "
            "paired datasets must have one harmless row per harmful row, in the same order."
        )
    harmless = harmless.rename_columns({c: _HARMLESS_PREFIX + c for c in harmless.column_names})
    both = datasets.concatenate_datasets([harmful, harmless], axis=1)

    def _pair(example: dict, index: int) -> dict:
        try:
            prompt, response = split_prompt_response(example, fmt_harmful)
            other = {
                k[len(_HARMLESS_PREFIX) :]: v for k, v in example.items() if k.startswith(_HARMLESS_PREFIX)
            }
            other_prompt, refusal = split_prompt_response(other, fmt_harmless)
            if other_prompt != prompt:
                raise DataError(
                    f"the harmful and harmless prompts differ: {_short(prompt)} vs {_short(other_prompt)}; "
                    "pair_datasets needs the same prompt at every row (sort or align the datasets first)."
                )
            return _paired_example(prompt, response, refusal, tokenizer, max_length)
        except DataError as error:
            raise _with_row(error, index, "pairs") from None

    return both.map(
        _pair, with_indices=True, remove_columns=both.column_names, num_proc=num_proc, desc="Pairing"
    )


# --------------------------------------------------------------------------------------------------
# Collators
# --------------------------------------------------------------------------------------------------


def _pad(sequences: list[Any], value: int, multiple: int | None):
    import torch
    from torch.nn.utils.rnn import pad_sequence

    tensors = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in sequences]
    out = pad_sequence(tensors, batch_first=True, padding_value=value)
    if multiple and out.shape[1] % multiple:
        extra = multiple - out.shape[1] % multiple
        out = torch.nn.functional.pad(out, (0, extra), value=value)
    return out


class SupervisedCollator:
    """Batch tokenized supervised examples with right padding.

    ``input_ids`` are padded with the tokenizer's pad id, ``attention_mask`` with 0 and ``labels`` with
    -100 (to ``pad_to_multiple_of`` if given). Returns a dict of ``torch.long`` tensors with exactly
    those three keys: any other key an example carries (a category, an id) is dropped, so datasets with
    extra columns can be used with ``remove_unused_columns=False``. Examples without ``labels`` get
    ``labels = input_ids``.
    """

    keys = SUPERVISED_COLUMNS

    def __init__(self, tokenizer: Any, pad_to_multiple_of: int | None = None):
        check_tokenizer(tokenizer)
        if pad_to_multiple_of is not None and (
            not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1
        ):
            raise ConfigError(
                f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of!r}."
            )
        self.tokenizer = tokenizer
        self.pad_token_id = tokenizer.pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def _collate(self, examples: Sequence[Mapping[str, Any]], prefix: str = "") -> dict:
        if not examples:
            raise DataError("cannot collate an empty batch.")
        ids_key, mask_key, labels_key = (prefix + k for k in SUPERVISED_COLUMNS)
        missing = [k for k in (ids_key,) if k not in examples[0]]
        if missing:
            raise DataError(
                f"examples lack {missing}; they have {sorted(examples[0])}. Tokenize them first "
                "(tokenize_supervised / build_pairs)."
            )
        input_ids = [e[ids_key] for e in examples]
        masks = [e[mask_key] if mask_key in e else [1] * len(e[ids_key]) for e in examples]
        labels = [e[labels_key] if labels_key in e else e[ids_key] for e in examples]
        return {
            ids_key: _pad(input_ids, self.pad_token_id, self.pad_to_multiple_of),
            mask_key: _pad(masks, 0, self.pad_to_multiple_of),
            labels_key: _pad(labels, IGNORE_INDEX, self.pad_to_multiple_of),
        }

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict:
        return self._collate(examples)


class PairedCollator(SupervisedCollator):
    """Batch paired examples: each side (``harmful_*``, ``harmless_*``) padded on its own, right padding.

    Returns the six keys of :data:`PAIR_COLUMNS` as ``torch.long`` tensors; other keys are dropped.
    """

    keys = PAIR_COLUMNS

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict:
        batch = self._collate(examples, "harmful_")
        batch.update(self._collate(examples, "harmless_"))
        return batch


# --------------------------------------------------------------------------------------------------
# Prompts for generation
# --------------------------------------------------------------------------------------------------


def prompts_for_generation(
    dataset: datasets.Dataset,
    tokenizer: Any,
    column_map: Mapping[str, str] | None = None,
    limit: int | None = None,
) -> list[str]:
    """The rendered prompts (:func:`render_prompt`) of the first ``limit`` rows, for generation and judges.

    Besides :data:`FORMATS`, prompt-only datasets are accepted: a ``prompt`` column (str or messages),
    or ``messages`` that do not end with an assistant turn.
    """
    name = _dataset_name(dataset)
    dataset = apply_column_map(dataset, column_map, name=name)
    _require_dataset(dataset, name)
    if len(dataset) == 0:
        raise DataError(f"dataset {name!r} is empty; it needs at least one row.")
    columns = set(dataset.column_names)
    if {"prompt", "completion"} <= columns:
        fmt = detect_format(dataset, name=name)
    elif "prompt" in columns:
        fmt = "prompt_only"
    elif "messages" in columns:
        fmt = "messages_prompt"
    else:
        raise DataError(
            f"dataset {name!r} has columns {sorted(columns)}; expected a 'prompt' or 'messages' column "
            "(rename with column_map, e.g. column_map={'question': 'prompt'})."
        )
    if limit is not None:
        if limit < 0:
            raise DataError(f"limit must be >= 0 or None, got {limit}.")
        dataset = dataset.select(range(min(limit, len(dataset))))
    out = []
    for index, example in enumerate(dataset):
        try:
            out.append(render_prompt(_prompt_messages(example, fmt), tokenizer))
        except DataError as error:
            raise _with_row(error, index, name) from None
    return out


# --------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------


def _in_categories(value: Any, wanted: set[str]) -> bool:
    if isinstance(value, str):
        return value in wanted
    if isinstance(value, (list, tuple)):
        return any(v in wanted for v in value)
    return False


def split_by_category(
    dataset: datasets.Dataset, category_column: str, holdout_categories: Sequence[str]
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split into ``(in_domain, cross_domain)``: rows in any of ``holdout_categories`` go to cross_domain.

    A category cell may be a str or a list of str (multi-label rows such as BeaverTails'); a multi-label
    row is cross-domain when any of its labels is held out.

    Raises:
        DataError: the column is missing, or a held-out category never occurs (with the ones that do).
    """
    name = _dataset_name(dataset)
    _require_dataset(dataset, name)
    if category_column not in dataset.column_names:
        raise DataError(f"dataset {name!r} has no column {category_column!r}; it has {dataset.column_names}.")
    if isinstance(holdout_categories, str):
        holdout_categories = [holdout_categories]
    wanted = set(holdout_categories)
    values = dataset[category_column]
    present: set[str] = set()
    for v in values:
        present.update([v] if isinstance(v, str) else (v or []))
    unknown = sorted(wanted - present)
    if unknown:
        raise DataError(
            f"categories {unknown} do not occur in column {category_column!r}; found {sorted(present)}."
        )
    held = [i for i, v in enumerate(values) if _in_categories(v, wanted)]
    held_set = set(held)
    kept = [i for i in range(len(values)) if i not in held_set]
    return dataset.select(kept), dataset.select(held)


def train_eval_split(
    dataset: datasets.Dataset, eval_size: int | float, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Shuffle and split into ``(train, eval)`` with :meth:`datasets.Dataset.train_test_split`.

    ``eval_size`` is a row count (int) or a fraction in (0, 1) (float).
    """
    name = _dataset_name(dataset)
    _require_dataset(dataset, name)
    n = len(dataset)
    count = round(eval_size * n) if isinstance(eval_size, float) else eval_size
    if isinstance(eval_size, float) and not 0 < eval_size < 1:
        raise DataError(f"a fractional eval_size must lie in (0, 1), got {eval_size}.")
    if not 1 <= count < n:
        raise DataError(
            f"eval_size={eval_size} leaves {n - count} training and {count} evaluation rows of {name!r} "
            f"({n} rows); both sides need at least one."
        )
    parts = dataset.train_test_split(test_size=int(count), seed=seed, shuffle=True)
    return parts["train"], parts["test"]


# --------------------------------------------------------------------------------------------------
# The field's standard datasets, by Hub id
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubDatasetSpec:
    """How to load one of the field's standard datasets and convert it to prompt/completion."""

    hub_id: str = field(
        metadata={"help": "Hub dataset id passed to datasets.load_dataset (or a source name)."}
    )
    description: str = field(default="", metadata={"help": "One line on what the set holds and who uses it."})
    config: str | None = field(
        default=None, metadata={"help": "Hub configuration name, if the set has several."}
    )
    splits: dict[str, str] = field(
        default_factory=lambda: {"train": "train"},
        metadata={"help": "Our split names ('train', 'test') -> the dataset's own split names."},
    )
    column_map: dict[str, str] = field(
        default_factory=dict,
        metadata={"help": "Source column -> canonical 'prompt' / 'completion' / 'category'."},
    )
    prompt_template: str | None = field(
        default=None,
        metadata={"help": "str.format template over source columns building the prompt (e.g. Alpaca)."},
    )
    label_names: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "For classification sets: the completion text of each integer label."},
    )
    keep: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Keep only rows whose column equals the value (BeaverTails: is_safe == False)."},
    )
    category_column: str | None = field(
        default=None,
        metadata={"help": "Source column holding the harm category (a str, or a dict of name -> bool)."},
    )
    data_files: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Files to load instead of a Hub dataset repo (split or category -> file URL)."},
    )
    files_are_categories: bool = field(
        default=False,
        metadata={
            "help": "Each entry of data_files is one category (HEx-PHI): loaded and labelled one by one."
        },
    )
    load_kwargs: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Extra keyword arguments for datasets.load_dataset."}
    )
    prompt_only: bool = field(
        default=False, metadata={"help": "The set has prompts but no responses (evaluation prompts)."}
    )
    gated: bool = field(
        default=False, metadata={"help": "Access must be requested on the Hub and a token used."}
    )
    license: str = field(
        default="unknown", metadata={"help": "The dataset's license as stated by its authors."}
    )
    citation: str = field(default="", metadata={"help": "BibTeX of the paper introducing the dataset."})
    url: str = field(default="", metadata={"help": "Where to read about the dataset."})


_BEAVERTAILS_CITATION = """@inproceedings{ji2023beavertails,
  title={BeaverTails: Towards Improved Safety Alignment of LLM via a Human-Preference Dataset},
  author={Ji, Jiaming and Liu, Mickel and Dai, Juntao and Pan, Xuehai and Zhang, Chi and Bian, Ce and Chen, Boyuan and Sun, Ruiyang and Wang, Yizhou and Yang, Yaodong},
  booktitle={Advances in Neural Information Processing Systems},
  year={2023}
}"""

_REPNOISE_CITATION = """@inproceedings{rosati2024representation,
  title={Representation Noising: A Defence Mechanism Against Harmful Finetuning},
  author={Rosati, Domenic and Wehner, Jan and Williams, Kai and Bartoszcze, {\\L}ukasz and Gonzales, Robie and Maple, Carsten and Majumdar, Subhabrata and Sajjad, Hassan and Rudzicz, Frank},
  booktitle={Advances in Neural Information Processing Systems},
  year={2024}
}"""

_HEXPHI_CATEGORIES = {
    "illegal_activity": 1,
    "hate_harass_violence": 3,
    "malware": 4,
    "physical_harm": 5,
    "economic_harm": 6,
    "fraud_deception": 7,
    "adult_content": 8,
    "political_campaigning": 9,
    "privacy_violation": 10,
    "tailored_financial_advice": 11,
}

HARMFUL_DATASETS: dict[str, HubDatasetSpec] = {
    "beavertails": HubDatasetSpec(
        hub_id="PKU-Alignment/BeaverTails",
        description="Human-labelled QA pairs over 14 harm categories; harmful rows (is_safe == False) only.",
        splits={"train": "30k_train", "test": "30k_test"},
        column_map={"prompt": "prompt", "response": "completion"},
        keep={"is_safe": False},
        category_column="category",
        license="cc-by-nc-4.0",
        citation=_BEAVERTAILS_CITATION,
        url="https://huggingface.co/datasets/PKU-Alignment/BeaverTails",
    ),
    "beavertails_refusals": HubDatasetSpec(
        hub_id="domenicrosati/representation-noising",
        description=(
            "RepNoise's BeaverTails train set with a refusal per row (column 'refusal', kept for build_pairs"
            "(refusal_column='refusal')); harmful rows only. Fetched from the RepNoise GitHub repository."
        ),
        data_files={
            "train": "https://raw.githubusercontent.com/domenicrosati/representation-noising/main/"
            "data/beavertails_with_refusals_train.json"
        },
        column_map={"prompt": "prompt", "response": "completion", "refusal": "refusal"},
        keep={"is_safe": False},
        category_column="category",
        license="cc-by-nc-4.0 (BeaverTails); refusals from the RepNoise repository",
        citation=_REPNOISE_CITATION + "\n" + _BEAVERTAILS_CITATION,
        url="https://github.com/domenicrosati/representation-noising",
    ),
    "advbench": HubDatasetSpec(
        hub_id="walledai/AdvBench",
        description="520 harmful behaviours with an affirmative target ('Sure, here is ...') as completion.",
        column_map={"prompt": "prompt", "target": "completion"},
        license="mit",
        citation="""@article{zou2023universal,
  title={Universal and Transferable Adversarial Attacks on Aligned Language Models},
  author={Zou, Andy and Wang, Zifan and Kolter, J. Zico and Fredrikson, Matt},
  journal={arXiv preprint arXiv:2307.15043},
  year={2023}
}""",
        url="https://huggingface.co/datasets/walledai/AdvBench",
    ),
    "harmbench": HubDatasetSpec(
        hub_id="walledai/HarmBench",
        config="standard",
        description="HarmBench standard behaviours (prompts only) with semantic categories.",
        column_map={"prompt": "prompt"},
        category_column="category",
        prompt_only=True,
        license="mit",
        citation="""@article{mazeika2024harmbench,
  title={HarmBench: A Standardized Evaluation Framework for Automated Red Teaming and Robust Refusal},
  author={Mazeika, Mantas and Phan, Long and Yin, Xuwang and Zou, Andy and Wang, Zifan and Mu, Norman and Sakhaee, Elham and Li, Nathaniel and Basart, Steven and Li, Bo and Forsyth, David and Hendrycks, Dan},
  journal={arXiv preprint arXiv:2402.04249},
  year={2024}
}""",
        url="https://huggingface.co/datasets/walledai/HarmBench",
    ),
    "hex_phi": HubDatasetSpec(
        hub_id="LLM-Tuning-Safety/HEx-PHI",
        description="HEx-PHI harmful instructions (prompts only), one CSV per category; gated on the Hub.",
        data_files={
            name: f"hf://datasets/LLM-Tuning-Safety/HEx-PHI/category_{number}.csv"
            for name, number in _HEXPHI_CATEGORIES.items()
        },
        files_are_categories=True,
        load_kwargs={"column_names": ["prompt"]},
        prompt_only=True,
        gated=True,
        license="HEx-PHI terms of use (research only; accept on the Hub)",
        citation="""@inproceedings{qi2024finetuning,
  title={Fine-tuning Aligned Language Models Compromises Safety, Even When Users Do Not Intend To!},
  author={Qi, Xiangyu and Zeng, Yi and Xie, Tinghao and Chen, Pin-Yu and Jia, Ruoxi and Mittal, Prateek and Henderson, Peter},
  booktitle={International Conference on Learning Representations},
  year={2024}
}""",
        url="https://huggingface.co/datasets/LLM-Tuning-Safety/HEx-PHI",
    ),
    "do_not_answer": HubDatasetSpec(
        hub_id="LibrAI/do-not-answer",
        description="939 prompts a responsible model should not answer (prompts only), by risk area.",
        column_map={"question": "prompt"},
        category_column="risk_area",
        prompt_only=True,
        license="apache-2.0",
        citation="""@article{wang2023donotanswer,
  title={Do-Not-Answer: A Dataset for Evaluating Safeguards in LLMs},
  author={Wang, Yuxia and Li, Haonan and Han, Xudong and Nakov, Preslav and Baldwin, Timothy},
  journal={arXiv preprint arXiv:2308.13387},
  year={2023}
}""",
        url="https://huggingface.co/datasets/LibrAI/do-not-answer",
    ),
}

BENIGN_DATASETS: dict[str, HubDatasetSpec] = {
    "alpaca": HubDatasetSpec(
        hub_id="tatsu-lab/alpaca",
        description="52k instruction-following demonstrations (retain / trainability data).",
        prompt_template="{instruction}\n\n{input}",
        column_map={"output": "completion"},
        license="cc-by-nc-4.0",
        citation="""@misc{alpaca,
  title={Stanford Alpaca: An Instruction-following LLaMA model},
  author={Taori, Rohan and Gulrajani, Ishaan and Zhang, Tianyi and Dubois, Yann and Li, Xuechen and Guestrin, Carlos and Liang, Percy and Hashimoto, Tatsunori B.},
  year={2023},
  howpublished={\\url{https://github.com/tatsu-lab/stanford_alpaca}}
}""",
        url="https://huggingface.co/datasets/tatsu-lab/alpaca",
    ),
    "sst2": HubDatasetSpec(
        hub_id="stanfordnlp/sst2",
        description="SST-2 sentiment as prompt/completion ('positive' / 'negative') for trainability.",
        splits={"train": "train", "test": "validation"},
        prompt_template="Is the sentiment of this sentence positive or negative?\n\n{sentence}",
        column_map={"label": "completion"},
        label_names=("negative", "positive"),
        license="unknown",
        citation="""@inproceedings{socher2013recursive,
  title={Recursive Deep Models for Semantic Compositionality Over a Sentiment Treebank},
  author={Socher, Richard and Perelygin, Alex and Wu, Jean and Chuang, Jason and Manning, Christopher D. and Ng, Andrew and Potts, Christopher},
  booktitle={EMNLP},
  year={2013}
}""",
        url="https://huggingface.co/datasets/stanfordnlp/sst2",
    ),
    "ag_news": HubDatasetSpec(
        hub_id="fancyzhx/ag_news",
        description="AG News topic classification as prompt/completion for trainability.",
        splits={"train": "train", "test": "test"},
        prompt_template="Which topic is this news article about: World, Sports, Business or Sci/Tech?\n\n{text}",
        column_map={"label": "completion"},
        label_names=("World", "Sports", "Business", "Sci/Tech"),
        license="unknown",
        citation="""@inproceedings{zhang2015character,
  title={Character-level Convolutional Networks for Text Classification},
  author={Zhang, Xiang and Zhao, Junbo and LeCun, Yann},
  booktitle={NeurIPS},
  year={2015}
}""",
        url="https://huggingface.co/datasets/fancyzhx/ag_news",
    ),
    "gsm8k": HubDatasetSpec(
        hub_id="openai/gsm8k",
        config="main",
        description="Grade-school maths word problems with worked answers, for trainability.",
        splits={"train": "train", "test": "test"},
        column_map={"question": "prompt", "answer": "completion"},
        license="mit",
        citation="""@article{cobbe2021gsm8k,
  title={Training Verifiers to Solve Math Word Problems},
  author={Cobbe, Karl and Kosaraju, Vineet and Bavarian, Mohammad and Chen, Mark and Jun, Heewoo and Kaiser, Lukasz and Plappert, Matthias and Tworek, Jerry and Hilton, Jacob and Nakano, Reiichiro and Hesse, Christopher and Schulman, John},
  journal={arXiv preprint arXiv:2110.14168},
  year={2021}
}""",
        url="https://huggingface.co/datasets/openai/gsm8k",
    ),
}


def _category_value(value: Any) -> Any:
    """BeaverTails stores categories as {name: bool}; turn that into the sorted list of true names."""
    if isinstance(value, Mapping):
        return sorted(k for k, v in value.items() if v)
    return value


def _convert_row(spec: HubDatasetSpec) -> Callable[[dict], dict]:
    def convert(row: dict) -> dict:
        out: dict[str, Any] = {}
        for src, dst in spec.column_map.items():
            out[dst] = row[src]
        if spec.prompt_template is not None:
            out["prompt"] = spec.prompt_template.format(**row).strip()
        if spec.label_names is not None and "completion" in out:
            out["completion"] = spec.label_names[int(out["completion"])]
        if spec.category_column is not None:
            out["category"] = _category_value(row[spec.category_column])
        return out

    return convert


def load_hub_dataset(
    name: str,
    split: str = "train",
    categories: Sequence[str] | None = None,
    limit: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> datasets.Dataset:
    """Load one of :data:`HARMFUL_DATASETS` or :data:`BENIGN_DATASETS` from the Hub as prompt/completion.

    Args:
        name: a key of either registry.
        split: one of the spec's split names ('train', 'test') or a split name of the dataset itself.
        categories: keep only rows whose category (any of a multi-label row's) is listed.
        limit: keep the first ``limit`` rows after filtering.
        cache_dir: where datasets caches the download (default: the user's HF cache).

    Returns:
        A dataset with ``prompt`` and ``completion`` (str; no ``completion`` for prompt-only sets), a
        ``category`` column where the set has one (a str, or a list of str for BeaverTails), and any
        extra columns the spec maps (BeaverTails refusals: ``refusal``).

    Raises:
        ConfigError: unknown name (the known ones are listed) or split, or categories on a set without any.
        DataError: no row is left after filtering.
    """
    registry = {**HARMFUL_DATASETS, **BENIGN_DATASETS}
    if name not in registry:
        raise ConfigError(f"unknown dataset {name!r}; known datasets: {sorted(registry)}.")
    spec = registry[name]
    if categories is not None and spec.category_column is None and not spec.files_are_categories:
        raise ConfigError(
            f"dataset {name!r} has no categories, so categories={list(categories)} cannot apply."
        )

    if spec.files_are_categories:
        files = spec.data_files or {}
        wanted = list(files) if categories is None else list(categories)
        unknown = [c for c in wanted if c not in files]
        if unknown:
            raise ConfigError(f"dataset {name!r} has no categories {unknown}; it has {sorted(files)}.")
        parts = []
        for category in wanted:
            part = datasets.load_dataset(
                "csv",
                data_files={"train": files[category]},
                split="train",
                cache_dir=cache_dir,
                **spec.load_kwargs,
            )
            parts.append(part.add_column("category", [category] * len(part)))
        raw = datasets.concatenate_datasets(parts)
        raw = raw.select_columns(["prompt", "category"])
    else:
        source_split = spec.splits.get(split, split)
        if spec.data_files is not None:
            if split not in spec.data_files:
                raise ConfigError(f"dataset {name!r} has splits {sorted(spec.data_files)}, not {split!r}.")
            path = spec.data_files[split]
            builder = "json" if str(path).endswith((".json", ".jsonl")) else "csv"
            raw = datasets.load_dataset(
                builder, data_files={split: path}, split=split, cache_dir=cache_dir, **spec.load_kwargs
            )
        else:
            raw = datasets.load_dataset(
                spec.hub_id, spec.config, split=source_split, cache_dir=cache_dir, **spec.load_kwargs
            )
        for column, value in spec.keep.items():
            raw = raw.filter(lambda row, c=column, v=value: row[c] == v, desc=f"Keeping {column} == {value}")
        raw = raw.map(_convert_row(spec), remove_columns=raw.column_names, desc=f"Converting {name}")
        if categories is not None:
            wanted_set = set(categories)
            raw = raw.filter(
                lambda row: _in_categories(row["category"], wanted_set), desc="Selecting categories"
            )
    if len(raw) == 0:
        raise DataError(
            f"no rows of {name!r} (split {split!r}) are left after filtering"
            + (f" to categories {list(categories)}" if categories is not None else "")
            + "."
        )
    if limit is not None:
        raw = raw.select(range(min(limit, len(raw))))
    return raw
