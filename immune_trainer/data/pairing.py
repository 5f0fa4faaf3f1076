"""Harmful / harmless pairs, prompts for generation, and train / evaluation / category splits.

A pair is one prompt with a harmful response and a harmless one (by default a refusal drawn from
:data:`DEFAULT_REFUSALS`), tokenized into the six columns of
:data:`immune_trainer.data.tokenization.PAIR_COLUMNS`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import datasets

from ..errors import DataError
from .formats import (
    _check_messages,
    _dataset_name,
    _is_message_list,
    _prompt_messages,
    _require_dataset,
    _short,
    _with_row,
    apply_column_map,
    detect_format,
    render_prompt,
    split_prompt_response,
)
from .tokenization import check_tokenizer, tokenize_example

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


# --------------------------------------------------------------------------------------------------
# Harmful / harmless pairs
# --------------------------------------------------------------------------------------------------


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
