"""Dataset formats: which of the three formats a dataset is in, column renaming, prompt rendering.

A user's :class:`datasets.Dataset` enters here in one of the formats trl users already have:

* ``"prompt_completion"``: columns ``prompt`` (str) and ``completion`` (str);
* ``"conversational_prompt_completion"``: ``prompt`` is a list of ``{"role", "content"}`` messages and
  ``completion`` a list holding the assistant message(s);
* ``"messages"``: ``messages`` is a list of ``{"role", "content"}``; the response is the LAST assistant
  turn and everything before it is the prompt.

Other column names are accepted through an explicit ``column_map`` (``{"response": "completion"}``
for BeaverTails), never guessed. Prompts are rendered with the tokenizer's chat template, or in the
plain format (:func:`render_plain`) when it has none.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import datasets

from ..errors import DataError

logger = logging.getLogger(__name__)

FORMATS = ("prompt_completion", "conversational_prompt_completion", "messages")

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


def _with_row(error: DataError, index: int, name: str) -> DataError:
    where = f"row {index}" if name == "dataset" else f"{name!r} row {index}"
    return DataError(f"{where}: {error}")


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
# Rendering
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
