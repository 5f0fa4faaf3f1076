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

Modules: :mod:`.structure` (finding the blocks, the unembedding), :mod:`.hooks` (forward hooks, block
outputs), :mod:`.output_layer` (the response-only loss and the shared prompt prefix; the benchmark
``benchmarks/shared_prefix.py`` sets its ``SHARED_PREFIX_*`` limits there). Layer 3 of the package: imports
torch (and peft only through duck typing), nothing above.
"""

from __future__ import annotations

from .hooks import HookManager, add_to_outputs, capture_outputs, primary_tensor, replace_primary_tensor
from .output_layer import (
    SHARED_PREFIX_MIN_ROWS,
    SHARED_PREFIX_MIN_SAVING,
    logits_at,
    response_loss,
    shared_prefix_length,
    sharing_prompt_prefix,
)
from .structure import (
    ATTENTION_NAMES,
    FINAL_NORM_NAMES,
    MLP_NAMES,
    DecoderStructure,
    find_decoder_structure,
    hidden_states_via_unembedding,
    resolve_layer_indices,
    unembed,
    unwrap_model,
)

__all__ = [
    "ATTENTION_NAMES",
    "FINAL_NORM_NAMES",
    "MLP_NAMES",
    "SHARED_PREFIX_MIN_ROWS",
    "SHARED_PREFIX_MIN_SAVING",
    "DecoderStructure",
    "HookManager",
    "add_to_outputs",
    "capture_outputs",
    "find_decoder_structure",
    "resolve_layer_indices",
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
