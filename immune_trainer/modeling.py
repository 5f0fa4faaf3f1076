"""Model plumbing shared by the defenses: find a decoder-only LM's blocks, hook them, unembed states.

Every defense needs the same few handles on a causal LM: the stack of decoder layers, each layer's
attention and MLP blocks, the final norm and the unembedding. :func:`find_decoder_structure` finds
them for any decoder-only model (GPT-2, Llama, Qwen2, Mistral, Gemma, ...) without naming model
classes, also through a peft ``PeftModel`` (LoRA modules stay in place, so hooks see their outputs)
and through DDP / accelerate / ``torch.compile`` wrappers.

:class:`HookManager` installs forward hooks on entry and removes them on exit, even when the body
raises, so nothing leaks from one training step into the next::

    structure = find_decoder_structure(model)
    hooks, acts = capture_outputs(structure.mlp)
    with hooks:
        model(**batch)
    acts[0].shape  # (batch, seq, hidden)

Layer 3 of the package: imports torch (and peft only through duck typing), nothing above.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, ModelStructureError

__all__ = [
    "ATTENTION_NAMES",
    "FINAL_NORM_NAMES",
    "MLP_NAMES",
    "DecoderStructure",
    "HookManager",
    "add_to_outputs",
    "capture_outputs",
    "find_decoder_structure",
    "hidden_states_via_unembedding",
    "logits_at",
    "primary_tensor",
    "replace_primary_tensor",
    "response_loss",
    "shared_prefix_length",
    "sharing_prompt_prefix",
    "unembed",
    "unwrap_model",
]

#: Child names of a decoder layer that hold its attention block, most common first.
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention", "mixer_attn")
#: Child names of a decoder layer that hold its MLP / feed-forward block.
MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe", "mlp_block")
#: Names of the norm applied after the last decoder layer.
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f", "final_norm")
# Projections that betray an attention block whatever its name.
_ATTENTION_PROJECTIONS = (
    ("q_proj", "k_proj", "v_proj"),
    ("query", "key", "value"),
    ("c_attn",),
    ("qkv_proj",),
    ("query_key_value",),
    ("Wqkv",),
)
# Projections that betray a gated or plain MLP whatever its name.
_MLP_PROJECTIONS = (
    ("gate_proj", "up_proj", "down_proj"),
    ("up_proj", "down_proj"),
    ("c_fc", "c_proj"),
    ("fc1", "fc2"),
    ("fc_in", "fc_out"),
    ("dense_h_to_4h", "dense_4h_to_h"),
    ("w1", "w2"),
)
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass
class DecoderStructure:
    """The handles on a decoder-only causal LM that the defenses hook and read.

    ``layers[i]``, ``attention[i]`` and ``mlp[i]`` are the i-th decoder block and its attention and
    MLP sub-blocks (the live modules of the model, LoRA wrappers included). ``final_norm`` is the
    norm applied after the last block (``None`` for models without one) and ``unembedding`` the
    output projection (``model.get_output_embeddings()``). ``layers_path`` is the dotted path of the
    ``nn.ModuleList`` of layers relative to :func:`unwrap_model`'s result (``"model.layers"``,
    ``"transformer.h"``). ``final_logit_softcapping`` and ``logit_multiplier`` repeat what the
    model's head does to its logits (Gemma-2/3 soft-capping, Cohere / Granite scaling) so that
    :func:`unembed` reproduces the model's logits exactly. ``model`` is the unwrapped model the
    handles belong to.
    """

    layers: list[nn.Module]
    attention: list[nn.Module]
    mlp: list[nn.Module]
    final_norm: nn.Module | None
    unembedding: nn.Module
    layers_path: str
    final_logit_softcapping: float | None = None
    logit_multiplier: float = 1.0
    model: nn.Module | None = field(default=None, repr=False)

    @property
    def num_layers(self) -> int:
        """Number of decoder layers."""
        return len(self.layers)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the transformers model inside DDP / accelerate / ``torch.compile`` / peft wrappers.

    ``.module`` (DDP, DataParallel, FSDP-1, DeepSpeed) and ``._orig_mod`` (``torch.compile``) are
    peeled off; a peft ``PeftModel`` is replaced by ``get_base_model()``, the transformers model in
    which peft injected its LoRA layers, so hooks placed on its blocks see the LoRA outputs.
    """
    seen: set[int] = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config"):
            model = model.get_base_model()
    return model


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is not None and callable(getattr(config, "get_text_config", None)):
        try:
            return config.get_text_config(decoder=True)
        except TypeError:  # older signature
            return config.get_text_config()
    return config


def _expected_layer_count(config: Any) -> int | None:
    if config is None:
        return None
    for key in _LAYER_COUNT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _find_named_child(module: nn.Module, names: Sequence[str]) -> nn.Module | None:
    children = dict(module.named_children())
    for name in names:
        child = children.get(name)
        if isinstance(child, nn.Module):
            return child
    return None


def _has_children(module: nn.Module, names: Sequence[str]) -> bool:
    children = dict(module.named_children())
    return all(name in children for name in names)


def _find_by_projections(layer: nn.Module, signatures: Sequence[Sequence[str]]) -> nn.Module | None:
    # Direct children first, then deeper descendants (shallowest wins).
    for _name, module in sorted(layer.named_modules(), key=lambda item: item[0].count(".")):
        if module is layer:
            continue
        if any(_has_children(module, sig) for sig in signatures):
            return module
    return None


def _find_attention(layer: nn.Module, attention_name: str | None) -> nn.Module | None:
    if attention_name is not None:
        return _get_submodule(layer, attention_name)
    return _find_named_child(layer, ATTENTION_NAMES) or _find_by_projections(layer, _ATTENTION_PROJECTIONS)


def _find_mlp(layer: nn.Module, mlp_name: str | None, attention: nn.Module | None) -> nn.Module | None:
    if mlp_name is not None:
        return _get_submodule(layer, mlp_name)
    found = _find_named_child(layer, MLP_NAMES)
    if found is not None:
        return found
    found = _find_by_projections(layer, _MLP_PROJECTIONS)
    # c_proj alone also appears in GPT-2-like attention blocks: never return the attention block.
    if found is not None and attention is not None and found is attention:
        return None
    return found


def _get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        return None


def _layer_list_candidates(model: nn.Module, expected: int | None) -> list[tuple[str, nn.ModuleList]]:
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        same_class = len({type(child) for child in module}) == 1
        if not same_class and len(module) != expected:
            continue
        candidates.append((name, module))

    def rank(item: tuple[str, nn.ModuleList]) -> tuple:
        name, module = item
        n_params = sum(p.numel() for p in module.parameters())
        return (len(module) != expected, name.count("."), -n_params)

    return sorted(candidates, key=rank)


def _hint(model: nn.Module) -> str:
    return (
        "Pass the paths explicitly, e.g. find_decoder_structure(model, layers_path='model.layers', "
        "attention_name='self_attn', mlp_name='mlp') (paths are relative to unwrap_model(model); "
        f"for this model, named ModuleLists: {_module_lists(model) or 'none'})."
    )


def _module_lists(model: nn.Module) -> list[str]:
    return [
        f"{name} (len {len(m)})" for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and name
    ][:8]


def find_decoder_structure(
    model: nn.Module,
    layers_path: str | None = None,
    attention_name: str | None = None,
    mlp_name: str | None = None,
    final_norm_path: str | None = None,
) -> DecoderStructure:
    """Find the decoder layers, their attention and MLP blocks, the final norm and the unembedding.

    Works on any decoder-only causal LM without naming model classes: the layers are the
    ``nn.ModuleList`` of identical blocks whose length matches ``config.num_hidden_layers`` (or
    ``n_layer``; the shallowest, then largest, such list wins) and in which every block has an
    attention child (``self_attn``/``attn``/``attention``..., or a module with q/k/v projections)
    and an MLP child (``mlp``/``feed_forward``/``ffn``..., or a module with up/down projections).
    peft and DDP/accelerate wrappers are looked through (:func:`unwrap_model`).

    Args:
        model: a causal LM (``AutoModelForCausalLM``), possibly wrapped.
        layers_path: dotted path of the ``nn.ModuleList`` of layers, relative to
            ``unwrap_model(model)`` (``"model.layers"``, ``"transformer.h"``); found if ``None``.
        attention_name: dotted path of the attention block inside a layer (``"self_attn"``).
        mlp_name: dotted path of the MLP block inside a layer (``"mlp"``).
        final_norm_path: dotted path of the final norm relative to ``unwrap_model(model)``
            (``"model.norm"``); ``""`` means the model has none.

    Raises:
        ModelStructureError: no decoder layers, attention/MLP blocks or output embedding were
            found (an encoder-only or encoder-decoder model, or an unusual layout: pass the paths).
    """
    base = unwrap_model(model)
    cls_name = type(base).__name__
    config = _text_config(base)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        raise ModelStructureError(
            f"{cls_name} is an encoder-decoder model; immune_trainer's defenses need a decoder-only "
            "causal LM (load it with AutoModelForCausalLM)."
        )

    if layers_path is not None:
        layers_module = _get_submodule(base, layers_path)
        if not isinstance(layers_module, (nn.ModuleList, nn.Sequential)) or len(layers_module) == 0:
            raise ModelStructureError(
                f"layers_path={layers_path!r} does not name a non-empty nn.ModuleList in {cls_name}. "
                + _hint(base)
            )
        candidates = [(layers_path, layers_module)]
    else:
        candidates = _layer_list_candidates(base, _expected_layer_count(config))

    chosen = None
    for path, layer_list in candidates:
        layers = list(layer_list)
        attention = [_find_attention(layer, attention_name) for layer in layers]
        mlp = [_find_mlp(layer, mlp_name, att) for layer, att in zip(layers, attention)]
        if all(a is not None for a in attention) and all(m is not None for m in mlp):
            chosen = (path, layers, attention, mlp)
            break
    if chosen is None:
        looked_for = (
            f"attention child {attention_name!r}"
            if attention_name
            else f"attention child in {ATTENTION_NAMES}"
        ) + (f" and MLP child {mlp_name!r}" if mlp_name else f" and MLP child in {MLP_NAMES}")
        raise ModelStructureError(
            f"Could not find the decoder layers of {cls_name}: looked for an nn.ModuleList of "
            f"identical blocks (length = config.num_hidden_layers) each with an {looked_for}. "
            "Encoder-only models (BERT) and models without such a list are not supported. " + _hint(base)
        )
    path, layers, attention, mlp = chosen

    unembedding = (
        base.get_output_embeddings() if callable(getattr(base, "get_output_embeddings", None)) else None
    )
    if not isinstance(unembedding, nn.Module):
        raise ModelStructureError(
            f"{cls_name} has no output embedding (get_output_embeddings() returned {unembedding!r}): "
            "load the model with AutoModelForCausalLM so that it has a language-modelling head."
        )

    final_norm = _find_final_norm(base, path, final_norm_path, cls_name)
    softcap = getattr(config, "final_logit_softcapping", None) if config is not None else None
    multiplier = 1.0
    if config is not None:
        if isinstance(getattr(config, "logit_scale", None), (int, float)):
            multiplier *= float(config.logit_scale)  # Cohere
        if isinstance(getattr(config, "logits_scaling", None), (int, float)) and config.logits_scaling:
            multiplier /= float(config.logits_scaling)  # Granite
    return DecoderStructure(
        layers=layers,
        attention=attention,
        mlp=mlp,
        final_norm=final_norm,
        unembedding=unembedding,
        layers_path=path,
        final_logit_softcapping=float(softcap) if softcap else None,
        logit_multiplier=multiplier,
        model=base,
    )


def _find_final_norm(base: nn.Module, layers_path: str, final_norm_path: str | None, cls_name: str):
    if final_norm_path is not None:
        if final_norm_path == "":
            return None
        norm = _get_submodule(base, final_norm_path)
        if norm is None:
            raise ModelStructureError(f"final_norm_path={final_norm_path!r} does not exist in {cls_name}.")
        return norm
    # The norm is normally a sibling of the layer list (model.norm next to model.layers).
    parent_path = layers_path.rpartition(".")[0]
    parent = _get_submodule(base, parent_path)
    if parent is not None:
        norm = _find_named_child(parent, FINAL_NORM_NAMES)
        if norm is not None:
            return norm
    layer_prefix = layers_path + "."
    for name, module in base.named_modules():
        if name.startswith(layer_prefix) or name == layers_path:
            continue
        if name.rpartition(".")[2] in FINAL_NORM_NAMES:
            return module
    warnings.warn(
        f"No final norm found in {cls_name} (looked for {FINAL_NORM_NAMES} next to {layers_path!r}); "
        "unembed() will apply the unembedding directly. Pass final_norm_path if the model has one.",
        stacklevel=3,
    )
    return None


# --------------------------------------------------------------------------- outputs of blocks


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


# --------------------------------------------------------------------------- unembedding


def unembed(structure: DecoderStructure, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of a residual-stream state: ``unembedding(final_norm(hidden))``, then the head's scaling.

    Applied to the last decoder layer's output this reproduces the model's logits (including
    Gemma-2/3 soft-capping ``cap * tanh(logits / cap)`` and Cohere / Granite logit scaling); applied
    to an earlier layer's output it is the "logit lens" that RepNoise's ascent term uses. Gemma's
    embedding scaling by sqrt(hidden_size) happens at the input and needs nothing here.
    """
    if structure.final_norm is not None:
        hidden = structure.final_norm(hidden)
    logits = structure.unembedding(hidden)
    if structure.logit_multiplier != 1.0:
        logits = logits * structure.logit_multiplier
    cap = structure.final_logit_softcapping
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def hidden_states_via_unembedding(
    model_or_structure: nn.Module | DecoderStructure, outputs: Any
) -> list[torch.Tensor]:
    """Logits of every entry of ``outputs.hidden_states`` (run the model with ``output_hidden_states=True``).

    Entry 0 is the embeddings, entry i the output of layer i. transformers returns the last entry
    already passed through the final norm, so its logits are ``outputs.logits`` themselves (reused,
    not recomputed). Memory: one ``(batch, seq, vocab)`` tensor per layer; for large vocabularies
    call :func:`unembed` layer by layer and reduce each result instead.
    """
    structure = (
        model_or_structure
        if isinstance(model_or_structure, DecoderStructure)
        else find_decoder_structure(model_or_structure)
    )
    hidden_states = getattr(outputs, "hidden_states", None)
    if not hidden_states:
        raise ConfigError("outputs has no hidden_states: call the model with output_hidden_states=True.")
    logits = [unembed(structure, h) for h in hidden_states[:-1]]
    final = getattr(outputs, "logits", None)
    logits.append(final if final is not None else _unembed_normed(structure, hidden_states[-1]))
    return logits


def _unembed_normed(structure: DecoderStructure, hidden: torch.Tensor) -> torch.Tensor:
    no_norm = DecoderStructure(**{**structure.__dict__, "final_norm": None})
    return unembed(no_norm, hidden)


# --------------------------------------------------------------------------- response-only output layer


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

    Returns:
        ``(loss, outputs)``; ``outputs.logits`` holds the selected rows only when the hook applied; after a
        shared prefix, ``outputs`` are those of the rows' continuation.
    """
    import torch.nn.functional as F

    from .losses import response_prediction_mask

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
    if num_items_in_batch is None:
        return F.cross_entropy(logits.float(), targets, reduction="mean"), outputs
    total = F.cross_entropy(logits.float(), targets, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch, outputs
