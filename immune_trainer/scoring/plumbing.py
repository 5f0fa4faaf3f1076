"""Shared plumbing of the scorers: eval mode, tokenizer settings, the model's device, dataset inputs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..errors import DataError


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """Put ``model`` in eval mode inside the block and restore every module's previous mode after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def _tokenizer_settings(tokenizer, padding_side: str) -> Iterator[None]:
    """``padding_side`` and a pad token (eos if unset) inside the block; the tokenizer restored after."""
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = padding_side
    if pad is None:
        if tokenizer.eos_token is None:
            raise DataError(
                "The tokenizer has neither a pad token nor an eos token, so batches cannot be padded; "
                "set tokenizer.pad_token first."
            )
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None


def _device(model):
    try:
        return next(model.parameters()).device
    except StopIteration:
        return None


def _as_dataset(dataset):
    """Accept a datasets.Dataset or a list of dicts."""
    from datasets import Dataset

    if isinstance(dataset, Dataset):
        ds = dataset
    elif isinstance(dataset, list) and all(isinstance(x, dict) for x in dataset):
        ds = Dataset.from_list(dataset)
    elif isinstance(dataset, dict):
        ds = Dataset.from_dict(dataset)
    else:
        raise DataError(
            f"Expected a datasets.Dataset (or a list of dicts), got {type(dataset).__name__}. "
            "Load your data with datasets.load_dataset or Dataset.from_list."
        )
    if len(ds) == 0:
        raise DataError("The dataset to score is empty; pass at least one example.")
    return ds


def _limited(ds, limit: int | None):
    return ds.select(range(min(limit, len(ds)))) if limit is not None else ds


def _dataset_name(ds, explicit: str | None) -> str:
    if explicit:
        return explicit
    info = getattr(ds, "info", None)
    return (
        (getattr(info, "dataset_name", None) or getattr(info, "builder_name", None) or "unnamed")
        if info
        else "unnamed"
    )


def _is_tokenized(ds) -> bool:
    return "input_ids" in ds.column_names
