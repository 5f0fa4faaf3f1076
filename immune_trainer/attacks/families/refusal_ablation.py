"""Directional ablation of the refusal direction (family ``refusal_ablation``; training-free)."""

from __future__ import annotations

import datasets
import torch
from torch import nn

from ... import data as data_lib
from ...errors import ConfigError, DataError
from .base import AttackFamily, _subset, _tuner_layers, merge_adapters


class RefusalAblation(AttackFamily):
    """Directional ablation of the refusal direction (Arditi et al. 2024, "Refusal in language models is
    mediated by a single direction", arXiv 2406.11717). Training-free.

    ``r`` = mean residual-stream activation at the last prompt token on harmful prompts minus the mean on
    harmless prompts (the prompts of ``benign_train``), at the output of decoder layer
    ``refusal_layer`` (default: the middle layer), normalised. Every matrix that writes to the residual
    stream (token and position embeddings, each attention output projection, each MLP down projection,
    and their biases) is orthogonalised against ``r`` (``W <- W - r r^T W`` on the residual side), so no
    layer can write along ``r`` any more.

    Cost: zero optimizer steps, tokens and FLOPs. Its curve has two points at step 0: the model before
    the ablation, then after it (so the harm it gains is visible, and the cost to reach phi is 0 when it
    crosses). ``num_samples`` harmful and harmless prompts (0 = all) estimate ``r``, drawn with the seed.

    A model that carries adapters (a defense's unmerged LoRA) has them merged into its weights first
    (:func:`~immune_trainer.attacks.families.base.merge_adapters`): the weights that write to the residual
    stream are then the effective ones, base and adapter together. Ablating the wrapped projections instead
    would edit only part of what they write (a LoRA's ``lora_B``, say), and the model would keep writing
    along ``r``. The curve's config names the merged adapters (``merged_adapters``).
    """

    name = "refusal_ablation"
    description = "Training-free: remove the refusal direction (harmful minus harmless mean activation)."
    trains = False
    needs_benign = True
    merges_adapters = True

    def axes(self, config):
        return {"refusal_layer": [config.refusal_layer]}

    def sources(self, harmful, benign, config):
        return {"harmful": harmful, "benign": benign}

    def apply(self, model, tokenizer, sources, setting, config):
        from ...modeling import find_decoder_structure

        model = merge_adapters(model)  # the residual-stream writers are the merged, effective weights
        structure = find_decoder_structure(model)
        layer = setting.get("refusal_layer")
        layer = structure.num_layers // 2 if layer is None else layer
        if not 0 <= layer < structure.num_layers:
            raise ConfigError(
                f"refusal_layer={layer} is outside the model's {structure.num_layers} decoder layers."
            )
        n, seed = setting["num_samples"], setting["seed"]
        harmful = _subset(_prompt_ends(sources["harmful"], tokenizer, config.max_length), n, seed)
        harmless = _prompt_ends(sources["benign"], tokenizer, config.max_length)
        harmless = _subset(harmless, min(n, len(harmless)) if n else 0, seed)
        direction = refusal_direction(model, structure, layer, harmful, harmless, tokenizer, config)
        ablate_direction(model, structure, direction)
        return model


def _prompt_ends(dataset, tokenizer, max_length: int) -> datasets.Dataset:
    """Tokenized prompts (the tokens before the response, as training renders them) of a dataset."""
    tokenized = data_lib.ensure_tokenized(dataset, tokenizer, max_length=max_length)

    def cut(example):
        first = next((i for i, label in enumerate(example["labels"]) if label != data_lib.IGNORE_INDEX), None)
        end = len(example["input_ids"]) if first is None else first
        if end == 0:
            raise DataError("a row of the refusal-ablation data has no prompt tokens before its response.")
        return {"input_ids": example["input_ids"][:end]}

    return tokenized.map(cut, remove_columns=tokenized.column_names)


@torch.no_grad()
def last_token_activations(model, structure, layer: int, prompts: datasets.Dataset, tokenizer, batch_size=8):
    """Output of decoder layer ``layer`` at each prompt's last token: a ``(len(prompts), hidden)`` tensor."""
    from ...modeling import capture_outputs, primary_tensor

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    manager, store = capture_outputs([structure.layers[layer]], detach=True)
    rows = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            ids = prompts[start : start + batch_size]["input_ids"]
            width = max(len(x) for x in ids)
            # Right padding: the last real token sits at len - 1 whatever the attention implementation.
            input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
            with manager:
                model(input_ids=input_ids, attention_mask=mask)
                hidden = primary_tensor(store[0])
            last = torch.tensor([len(x) - 1 for x in ids], device=device)
            rows.append(hidden[torch.arange(len(ids), device=device), last].float())
    finally:
        model.train(was_training)
    return torch.cat(rows)


def refusal_direction(model, structure, layer, harmful, harmless, tokenizer, config=None) -> torch.Tensor:
    """The unit refusal direction: mean harmful minus mean harmless last-prompt-token activation."""
    batch = config.eval_batch_size if config is not None else 8
    diff = last_token_activations(model, structure, layer, harmful, tokenizer, batch).mean(0)
    diff = diff - last_token_activations(model, structure, layer, harmless, tokenizer, batch).mean(0)
    norm = diff.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise DataError(
            "the harmful and harmless prompts give the same mean activation: no refusal direction to ablate."
        )
    return diff / norm


def residual_writers(model, structure) -> list[tuple[nn.Module, str]]:
    """Every module that writes to the residual stream, with the side its output dimension sits on:
    ``(module, "rows")`` when the weight is ``(hidden, ...)`` as in ``nn.Linear``, ``(module, "cols")``
    when it is ``(..., hidden)`` as in embeddings and GPT-2's ``Conv1D``.

    Raises:
        ConfigError: the model carries peft adapter layers (a LoRA): the weight a wrapped projection writes
            with is its base weight plus the adapter's, so merge them first (:func:`merge_adapters`).
    """
    from ...modeling import unwrap_model

    if _tuner_layers(model):
        raise ConfigError(
            "the model carries adapter layers (e.g. a defense's LoRA): what a wrapped projection writes to "
            "the residual stream is its base weight plus the adapter's, so merge them into the weights "
            "first (immune_trainer.attacks.merge_adapters) before ablating a direction."
        )
    base = unwrap_model(model)
    embeddings = base.get_input_embeddings()
    size = embeddings.weight.shape[-1]
    writers: list[tuple[nn.Module, str]] = [(embeddings, "cols")]
    inside_layers = {id(m) for layer in structure.layers for m in layer.modules()}
    for module in base.modules():  # learned absolute position embeddings (GPT-2's wpe) write too
        if (
            isinstance(module, nn.Embedding)
            and module is not embeddings
            and module.weight.shape[-1] == size
            and id(module) not in inside_layers
        ):
            writers.append((module, "cols"))
    for blocks, kind in ((structure.attention, "attention"), (structure.mlp, "MLP")):
        for i, block in enumerate(blocks):
            writers.append(_output_projection(block, size, f"{kind} block {i}"))
    return writers


_OUTPUT_NAMES = (
    "o_proj",
    "out_proj",
    "down_proj",
    "c_proj",
    "dense",
    "dense_4h_to_h",
    "fc2",
    "fc_out",
    "wo",
    "w2",
)


def _output_projection(block: nn.Module, size: int, where: str) -> tuple[nn.Module, str]:
    """The projection of an attention or MLP block whose output is the block's output: a known name
    first, else the last registered linear layer with ``size`` outputs."""
    candidates = []
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == size:
            candidates.append((name, module, "rows"))
        elif type(module).__name__ == "Conv1D" and module.weight.shape[-1] == size:
            candidates.append((name, module, "cols"))
    if not candidates:
        raise ConfigError(
            f"refusal_ablation found no linear layer writing to the residual stream in {where} "
            f"({type(block).__name__}); this architecture is not supported."
        )
    named = [c for c in candidates if c[0].rsplit(".", 1)[-1] in _OUTPUT_NAMES]
    _, module, side = (named or candidates)[-1]
    return module, side


@torch.no_grad()
def ablate_direction(model, structure, direction: torch.Tensor) -> None:
    """Orthogonalise every residual-stream writer against the unit vector ``direction`` (in place)."""
    for module, side in residual_writers(model, structure):
        w = module.weight
        r = direction.to(device=w.device, dtype=torch.float32)
        wf = w.float()
        if side == "rows":  # y = W x, W: (hidden, in)
            wf = wf - torch.outer(r, r @ wf)
        else:  # y = x W (Conv1D) or a lookup of W's rows (embeddings), W: (..., hidden)
            wf = wf - torch.outer(wf @ r, r)
        w.copy_(wf.to(w.dtype))
        bias = getattr(module, "bias", None)
        if bias is not None:
            bf = bias.float()
            bias.copy_((bf - (bf @ r) * r).to(bias.dtype))
