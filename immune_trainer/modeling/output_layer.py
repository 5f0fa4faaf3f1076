"""The response-only output layer: the causal LM loss with the vocabulary projection applied only where a
label is predicted (:func:`logits_at`, :func:`response_loss`), and a prompt prefix every row shares computed
once (:func:`shared_prefix_length`, :func:`sharing_prompt_prefix`)."""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .structure import _text_config, unwrap_model

__all__ = [
    "SHARED_PREFIX_MIN_ROWS",
    "SHARED_PREFIX_MIN_SAVING",
    "logits_at",
    "response_loss",
    "shared_prefix_length",
    "sharing_prompt_prefix",
]


def logits_at(model: nn.Module, predict: torch.Tensor, **forward_kwargs) -> tuple[torch.Tensor, Any]:
    """Run ``model(**forward_kwargs)`` and return ``(logits where predict is set, outputs)``.

    ``predict`` is a (batch, length) bool mask of the positions whose next-token distribution is wanted
    (:func:`immune_trainer.losses.response_prediction_mask`). The output layer is applied to those
    positions only: a forward pre-hook on ``get_output_embeddings()`` selects its input rows, so whatever
    the model does after the projection (Gemma's soft-capping, Cohere's logit scale) still applies, and
    on response-only data the prompt tokens cost no vocabulary projection, no softmax and no backward
    through either. Works with gradients, through peft and DDP / FSDP / DeepSpeed wrappers (the hook sits
    on the unwrapped head; the wrapped model is called). A model whose output layer cannot be hooked, or
    whose head sees another shape (a soft prompt prepended inside the forward), gets its full logits and
    then the selection; ``None`` as logits means neither worked.

    Returns:
        ``(logits, outputs)``: logits of shape ``(predict.sum(), vocab)`` in the model's dtype, and the
        model's outputs (whose ``logits`` hold only the selected rows when the hook applied).
    """
    inner = unwrap_model(model)
    getter = getattr(inner, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    fired: list[bool] = []

    def select(module, args):
        hidden = args[0] if args else None
        if (
            fired
            or not torch.is_tensor(hidden)
            or hidden.dim() != 3
            or tuple(hidden.shape[:2]) != tuple(predict.shape)
        ):
            return None
        fired.append(True)
        return (hidden[predict].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(select) if isinstance(head, nn.Module) else None
    try:
        outputs = model(**forward_kwargs)
    finally:
        if handle is not None:
            handle.remove()
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, (tuple, list)) and outputs:
        logits = outputs[0]
    n = int(predict.sum())
    if fired and logits is not None and logits.dim() == 3 and logits.shape[0] == 1 and logits.shape[1] == n:
        return logits[0], outputs
    if (
        logits is not None
        and not fired
        and logits.dim() == 3
        and tuple(logits.shape[:2]) == tuple(predict.shape)
    ):
        return logits[predict], outputs
    return None, outputs


# ----------------------------------------------------------------------------- a prompt prefix shared by the batch

#: A prefix shared by every row is computed once only when the batch has at least this many rows and the
#: prefix holds at least this share of the batch's tokens: below that, the extra batch-1 forward (small,
#: inefficient matrix products) costs about what it saves (``benchmarks/shared_prefix.py``).
SHARED_PREFIX_MIN_ROWS = 3
SHARED_PREFIX_MIN_SAVING = 0.1
_prefix_sharing = [True]
# Model classes whose forward gave no cache that can be repeated over the batch, or failed to continue from
# one: never tried again. Classes that did continue from one once: an error there is the user's to see.
_NO_PREFIX_CACHE: set[type] = set()
_PREFIX_CACHE_WORKS: set[type] = set()


@contextlib.contextmanager
def sharing_prompt_prefix(enabled: bool) -> Iterator[None]:
    """Turn the shared-prefix forward of :func:`response_loss` on or off inside the block (it is on by
    default). Off, every row is computed whole, as the model's own forward does."""
    _prefix_sharing.append(bool(enabled))
    try:
        yield
    finally:
        _prefix_sharing.pop()


def shared_prefix_length(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, predict: torch.Tensor
) -> int:
    """The number of leading positions that are the same token in every row, attended in every row, and
    predict no label (``predict`` from :func:`immune_trainer.losses.response_prediction_mask`).

    A chat template's system prompt (and its user-turn header) is such a prefix on right-padded batches:
    its activations are the same in every row, so one row's can serve all.
    """
    same = (input_ids == input_ids[:1]).all(dim=0) & ~predict.any(dim=0)
    if attention_mask is not None:
        same &= (attention_mask != 0).all(dim=0)
    differs = (~same).nonzero()
    return int(differs[0]) if len(differs) else int(input_ids.shape[1])


def _cache_argument(model: nn.Module) -> str | None:
    """The forward argument that takes a KV cache (``cache`` in recent transformers, else
    ``past_key_values``), or None."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def _config_dropout(inner: nn.Module) -> bool:
    """Whether the model's config sets a dropout probability (attention dropout is often functional, with
    no ``nn.Dropout`` module to find)."""
    config = _text_config(inner)
    values = vars(config).items() if config is not None else ()
    return any(
        ("dropout" in key or "pdrop" in key) and "classifier" not in key and isinstance(v, float) and v > 0
        for key, v in values
    )


def _can_share_prefix(model: nn.Module, inner: nn.Module, forward_kwargs: Mapping[str, Any]) -> str | None:
    """The cache argument to continue a forward with, when one shared prefix may serve every row: a single
    process (no DDP / FSDP / DeepSpeed wrapper around the two calls), no activation hooks that expect whole
    sequences (defenses that perturb or capture activations), no dropout that would draw one mask for all
    rows, no gradient checkpointing (which turns the cache off), no soft prompt, no other forward argument."""
    if not _prefix_sharing[-1] or set(forward_kwargs) - {"use_cache"} or type(inner) in _NO_PREFIX_CACHE:
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            return None
    # transformers 5.x renamed is_gradient_checkpointing (the old name warns)
    flag = "is_activation_checkpointing" if hasattr(type(inner), "is_activation_checkpointing") else None
    if torch.is_grad_enabled() and getattr(inner, flag or "is_gradient_checkpointing", False):
        return None
    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        return None
    from torch.nn.modules import module as module_lib

    if module_lib._global_forward_hooks or module_lib._global_forward_pre_hooks:
        return None
    training = model.training
    for m in model.modules():
        if m._forward_hooks or m._forward_pre_hooks or (training and isinstance(m, nn.Dropout) and m.p > 0):
            return None
    if training and _config_dropout(inner):
        return None
    return _cache_argument(inner)


def _with_shared_prefix(
    model: nn.Module,
    inner: nn.Module,
    cache_arg: str,
    prefix: int,
    predict: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> tuple[torch.Tensor | None, Any]:
    """The logits of :func:`logits_at`, with the first ``prefix`` positions computed for one row and their
    keys and values repeated for the others. ``(None, None)`` when the model returns no such cache."""
    rows = input_ids.shape[0]
    prefix_mask = None if attention_mask is None else attention_mask[:1, :prefix]
    no_rows = torch.zeros(1, prefix, dtype=torch.bool, device=predict.device)
    _, first = logits_at(
        model, no_rows, input_ids=input_ids[:1, :prefix], attention_mask=prefix_mask, use_cache=True
    )
    cache = getattr(first, "cache", None)  # transformers 5.x renamed past_key_values
    if cache is None:
        cache = getattr(first, "past_key_values", None)
    if cache is None or not callable(getattr(cache, "batch_repeat_interleave", None)):
        _NO_PREFIX_CACHE.add(type(inner))
        return None, None
    cache.batch_repeat_interleave(rows)
    return logits_at(
        model,
        predict[:, prefix:],
        input_ids=input_ids[:, prefix:],
        attention_mask=attention_mask,
        use_cache=True,
        **{cache_arg: cache},
    )


def response_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    *,
    per_token: bool = False,
    **forward_kwargs,
) -> tuple[torch.Tensor, Any]:
    """The causal LM loss of ``labels`` (``-100`` ignored), with the output layer applied only where a
    label is predicted (:func:`logits_at`).

    The same value as the model's own ``labels=`` loss: position ``t`` predicts ``labels[t + 1]``, the
    cross-entropy is taken in float32 and averaged over the labelled tokens, or summed and divided by
    ``num_items_in_batch`` when that is given (the Trainer's gradient-accumulation normalisation). If the
    output layer could not be isolated, the model computes its loss itself with ``labels=``.

    A prompt prefix that every row shares (:func:`shared_prefix_length`: a chat template's system prompt)
    is computed once, for one row, and its keys and values serve the others: the same loss and gradients
    to float rounding, with ``(rows - 1) x prefix`` fewer tokens through the model. This applies with at
    least :data:`SHARED_PREFIX_MIN_ROWS` rows when it saves at least :data:`SHARED_PREFIX_MIN_SAVING` of
    the tokens, and only where it cannot change what is computed (see :func:`_can_share_prefix`);
    :func:`sharing_prompt_prefix` turns it off.

    With ``per_token=True`` the loss is not reduced: one float32 NLL per labelled target, in the order of
    ``response_prediction_mask(labels)`` read row by row (``num_items_in_batch`` is then ignored); ``None``
    when the model's logits do not line up with ``labels`` (a soft prompt prepended inside its forward).

    Returns:
        ``(loss, outputs)``; ``outputs.logits`` holds the selected rows only when the hook applied; after a
        shared prefix, ``outputs`` are those of the rows' continuation.
    """
    import torch.nn.functional as F

    from ..losses import response_prediction_mask

    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask == 0, -100)
    predict = response_prediction_mask(labels)
    logits = outputs = None
    rows, length = input_ids.shape
    if rows >= SHARED_PREFIX_MIN_ROWS:
        prefix = shared_prefix_length(input_ids, attention_mask, predict)
        if 0 < prefix < length and (rows - 1) * prefix >= SHARED_PREFIX_MIN_SAVING * rows * length:
            inner = unwrap_model(model)
            cache_arg = _can_share_prefix(model, inner, forward_kwargs)
            if cache_arg is not None:
                try:
                    logits, outputs = _with_shared_prefix(
                        model, inner, cache_arg, prefix, predict, input_ids, attention_mask
                    )
                except Exception as exc:  # noqa: BLE001 - a model class's first try only, then re-raised
                    if type(inner) in _PREFIX_CACHE_WORKS or isinstance(exc, torch.OutOfMemoryError):
                        raise
                    # An architecture whose forward does not continue from a repeated cache: compute its
                    # rows whole, now and from now on, rather than fail the user's run.
                    _NO_PREFIX_CACHE.add(type(inner))
                    warnings.warn(
                        f"{type(inner).__name__} could not continue a forward from a shared prompt prefix "
                        f"({type(exc).__name__}: {exc}); every row is computed whole from now on.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    logits = outputs = None
                else:
                    if logits is not None:
                        _PREFIX_CACHE_WORKS.add(type(inner))
    if logits is None:
        logits, outputs = logits_at(
            model, predict, input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs
        )
    if logits is None and per_token:
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs)
        if tuple(outputs.logits.shape[:2]) != tuple(predict.shape):
            return None, outputs  # the logits do not line up with the labels: no per-token losses
        logits = outputs.logits[predict]
    if logits is None:
        outputs = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            **({"num_items_in_batch": num_items_in_batch} if num_items_in_batch is not None else {}),
            **forward_kwargs,
        )
        return outputs.loss, outputs
    targets = labels[:, 1:][predict[:, :-1]]
    if per_token:
        return F.cross_entropy(logits.float(), targets, reduction="none"), outputs
    if num_items_in_batch is None:
        return F.cross_entropy(logits.float(), targets, reduction="mean"), outputs
    total = F.cross_entropy(logits.float(), targets, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch, outputs
