"""Tokenization with response-only labels, and the collators that batch tokenized rows.

Tokenized supervised examples have ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on every
token but the response's, which end with the chat template's end-of-turn, or the eos token when the
tokenizer has no chat template). Paired examples (the same prompt with a harmful and a harmless
response) have the six columns ``harmful_input_ids``, ``harmful_attention_mask``, ``harmful_labels``,
``harmless_input_ids``, ``harmless_attention_mask``, ``harmless_labels``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import datasets

from ..errors import ConfigError, DataError
from .formats import (
    _PLAIN_RESPONSE_PREFIX,
    _apply_template,
    _check_messages,
    _dataset_name,
    _has_chat_template,
    _short,
    _warn_plain_format,
    _with_row,
    apply_column_map,
    detect_format,
    render_plain,
    split_prompt_response,
)

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


# --------------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------------


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
