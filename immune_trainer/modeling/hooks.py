"""Forward hooks on a model's blocks that never outlive their use (:class:`HookManager`), and the primary
tensor of a block's output (a tensor, or the first element of a tuple / model output)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ModelStructureError

__all__ = ["HookManager", "add_to_outputs", "capture_outputs", "primary_tensor", "replace_primary_tensor"]


def primary_tensor(output: Any) -> torch.Tensor:
    """The hidden-state tensor in a module's output: the tensor itself, or the first element of a
    tuple / list / ``ModelOutput`` (attention blocks return ``(hidden, weights)`` in most models)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        for value in output.values():
            if isinstance(value, torch.Tensor):
                return value
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ModelStructureError(
        f"Cannot read a hidden-state tensor from a module output of type {type(output).__name__}; "
        "hook a module that returns a tensor or a tuple whose first element is one."
    )


def replace_primary_tensor(output: Any, new: torch.Tensor) -> Any:
    """Return ``output`` with its hidden-state tensor (see :func:`primary_tensor`) replaced by ``new``."""
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, Mapping):
        for key, value in output.items():
            if isinstance(value, torch.Tensor):
                updated = dict(output)
                updated[key] = new
                try:
                    return type(output)(**updated)
                except TypeError:
                    return updated
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return type(output)([new, *output[1:]]) if isinstance(output, list) else (new, *output[1:])
    raise ModelStructureError(
        f"Cannot replace the hidden-state tensor in a module output of type {type(output).__name__}."
    )


# --------------------------------------------------------------------------- hooks


class HookManager:
    """Forward hooks that exist only inside a ``with`` block.

    Hooks are declared with :meth:`add_hook` / :meth:`capture` / :meth:`add` and installed when the
    block is entered; every one is removed on exit, even if the body raises. The same manager can be
    entered again (once per training step, say): each entry installs the hooks once, each exit
    removes them, so hooks never pile up. Nested entries of one manager install nothing more.

    Note: with gradient checkpointing, hooked modules run again during backward; a capture hook
    then overwrites its entry and an additive hook adds its delta again (which keeps the recomputed
    forward identical to the first).
    """

    def __init__(self) -> None:
        self._specs: list[tuple[nn.Module, Callable, bool]] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._depth = 0
        self._stores: list[dict[int, torch.Tensor]] = []

    def add_hook(
        self, module: nn.Module, hook: Callable[[nn.Module, tuple, Any], Any], prepend: bool = False
    ) -> HookManager:
        """Declare a raw forward hook ``hook(module, args, output) -> new output or None``.

        ``prepend=True`` runs it before the module's other forward hooks (transformers 5 installs
        permanent output-recording hooks for ``output_hidden_states``; a hook that changes the
        output must run before them for ``outputs.hidden_states`` to show the change).
        """
        if not isinstance(module, nn.Module):
            raise ConfigError(f"Hooks attach to torch.nn.Module objects, got {type(module).__name__}.")
        self._specs.append((module, hook, prepend))
        if self._depth:  # declared while active: install now, removed with the rest.
            self._handles.append(module.register_forward_hook(hook, prepend=prepend))
        return self

    def capture(
        self, modules: Sequence[nn.Module], store: dict[int, torch.Tensor] | None = None, detach: bool = False
    ) -> dict[int, torch.Tensor]:
        """Record ``modules[i]``'s output hidden state in ``store[i]`` at each forward.

        The tensors keep their graph (gradients flow through them) unless ``detach=True``.
        Returns ``store`` (a new dict if none was given); it is cleared on each entry.
        """
        store = {} if store is None else store
        self._stores.append(store)
        for idx, module in enumerate(modules):

            def hook(_module, _args, output, idx=idx):
                tensor = primary_tensor(output)
                store[idx] = tensor.detach() if detach else tensor

            self.add_hook(module, hook)
        return store

    def add(self, modules: Sequence[nn.Module], deltas: Mapping[int, torch.Tensor]) -> HookManager:
        """Add ``deltas[i]`` to ``modules[i]``'s output hidden state (tuple outputs keep their tail).

        These hooks run before any other forward hook of the module, so captures (ours, and
        transformers' ``output_hidden_states``) see the perturbed output.

        A delta must broadcast to the output's shape; it is cast to the output's dtype and device.
        Indices outside ``range(len(modules))`` raise :class:`ConfigError`.
        """
        for idx in deltas:
            if not 0 <= idx < len(modules):
                raise ConfigError(f"delta index {idx} is outside the {len(modules)} hooked modules.")
        for idx, delta in deltas.items():

            def hook(_module, _args, output, idx=idx, delta=delta):
                hidden = primary_tensor(output)
                try:
                    shape = torch.broadcast_shapes(tuple(delta.shape), tuple(hidden.shape))
                except RuntimeError as err:
                    raise ConfigError(
                        f"Perturbation {idx} has shape {tuple(delta.shape)}, which does not broadcast to "
                        f"the module output's shape {tuple(hidden.shape)}: build it from that output."
                    ) from err
                if tuple(shape) != tuple(hidden.shape):
                    raise ConfigError(
                        f"Perturbation {idx} of shape {tuple(delta.shape)} would enlarge the module output "
                        f"of shape {tuple(hidden.shape)}."
                    )
                return replace_primary_tensor(
                    output, hidden + delta.to(device=hidden.device, dtype=hidden.dtype)
                )

            self.add_hook(modules[idx], hook, prepend=True)
        return self

    @property
    def active(self) -> bool:
        """Whether the hooks are installed right now."""
        return self._depth > 0

    def __enter__(self) -> HookManager:
        if self._depth == 0:
            for store in self._stores:
                store.clear()
            try:
                for module, hook, prepend in self._specs:
                    self._handles.append(module.register_forward_hook(hook, prepend=prepend))
            except BaseException:
                self.remove()
                raise
        self._depth += 1
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.remove()

    def remove(self) -> None:
        """Remove every installed hook now (the declarations stay, for the next entry)."""
        while self._handles:
            self._handles.pop().remove()
        self._depth = 0

    def __len__(self) -> int:
        return len(self._specs)


def capture_outputs(
    modules: Sequence[nn.Module], detach: bool = False
) -> tuple[HookManager, dict[int, torch.Tensor]]:
    """Hooks recording each module's output hidden state: ``(manager, {index: tensor})``.

    The dict fills during forwards run inside ``with manager:`` and is cleared on each entry.
    """
    manager = HookManager()
    store = manager.capture(modules, detach=detach)
    return manager, store


def add_to_outputs(modules: Sequence[nn.Module], deltas: Mapping[int, torch.Tensor]) -> HookManager:
    """Hooks adding ``deltas[i]`` to ``modules[i]``'s output while ``with manager:`` is active."""
    return HookManager().add(modules, deltas)
