"""Find a decoder-only LM's blocks: the stack of decoder layers, each layer's attention and MLP blocks, the
final norm and the unembedding (:func:`find_decoder_structure`), through peft and DDP / accelerate /
``torch.compile`` wrappers (:func:`unwrap_model`); read a residual-stream state through the final norm and
the unembedding (:func:`unembed`, the logit lens)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ModelStructureError

__all__ = [
    "ATTENTION_NAMES",
    "FINAL_NORM_NAMES",
    "MLP_NAMES",
    "DecoderStructure",
    "find_decoder_structure",
    "resolve_layer_indices",
    "hidden_states_via_unembedding",
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


def resolve_layer_indices(layers, num_layers: int, option: str) -> list[int]:
    """Decoder-layer indices from a user's list (negative counts from the end), sorted and unique; an
    index outside the model is a ConfigError naming ``option`` (the config field it came from)."""
    resolved = []
    for layer in layers:
        if not -num_layers <= layer < num_layers:
            raise ConfigError(
                f"{option} contains {layer}, but the model has {num_layers} decoder layers "
                f"(valid: 0..{num_layers - 1} or negative from the end)."
            )
        resolved.append(layer % num_layers)
    return sorted(set(resolved))
