"""Isolation of the probes from the training run they measure: the global random number generators and
accelerate's shared state are restored after each probe, and every rank logs rank 0's values."""

from __future__ import annotations

import contextlib
import inspect
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from transformers.trainer_callback import CallbackHandler

__all__ = ["find_callback_handler", "is_distributed", "isolated_rng", "same_on_all_ranks"]


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Save the global RNGs and accelerate's shared gradient state, restore them afterwards.

    A nested Trainer seeds the global RNGs (``set_seed``) and writes accelerate's singleton
    ``GradientState``; without this, a probe would change the training run's dropout masks, data order
    and gradient accumulation.
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    grad_state = None
    singletons = []
    try:
        from accelerate.state import AcceleratorState, GradientState, PartialState

        shared = GradientState._shared_state
        grad_state = (shared, dict(shared), list(shared.get("_dataloader_references_ref") or []))
        # A nested Trainer's TrainingArguments resets and rebuilds accelerate's process state; under DDP
        # the outer run would then stop sharding new dataloaders and gathering its metrics.
        singletons = [
            (cls._shared_state, dict(cls._shared_state)) for cls in (PartialState, AcceleratorState)
        ]
    except Exception:  # pragma: no cover - accelerate is a dependency; be defensive anyway
        pass
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        for state, saved_state in singletons:
            state.clear()
            state.update(saved_state)
        if grad_state is not None:
            shared, saved, refs = grad_state
            shared.clear()
            shared.update(saved)
            if "_dataloader_references_ref" in saved and isinstance(
                saved["_dataloader_references_ref"], list
            ):
                saved["_dataloader_references_ref"][:] = refs


def find_callback_handler() -> CallbackHandler | None:
    """The ``CallbackHandler`` calling the current hook (found on the call stack), or None.

    Hooks do not receive the Trainer or its handler; the handler's ``call_event`` frame is on the stack
    whenever a hook runs, and it is how the values reach every logger's ``on_log``.
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, CallbackHandler):
                return candidate
            frame = frame.f_back
    finally:
        del frame
    return None


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def same_on_all_ranks(values: dict[str, Any]) -> dict[str, Any]:
    """Rank 0's values on every process (a no-op without torch.distributed)."""
    if not is_distributed() or torch.distributed.get_world_size() == 1:
        return values
    box = [values]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
