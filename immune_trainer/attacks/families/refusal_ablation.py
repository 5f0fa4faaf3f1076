"""Directional ablation of the refusal direction (families ``refusal_ablation``, the direction selected as
Arditi et al. select it, and ``refusal_ablation_fixed``, the middle layer's last prompt token; training-free)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import datasets
import torch
from torch import nn

from ... import data as data_lib
from ...errors import ConfigError, DataError
from .base import AttackFamily, _subset, _tuner_layers, merge_adapters

logger = logging.getLogger(__name__)


class RefusalAblation(AttackFamily):
    """Directional ablation of the refusal direction, the direction selected as Arditi et al. 2024 select
    it ("Refusal in language models is mediated by a single direction", arXiv 2406.11717, section 2.3 and
    appendix C; TamperBench's refusal-ablation attack runs their pipeline). Training-free.

    1. Prompts: the harmful prompts of the attack's training data and the harmless prompts of
       ``benign_train`` (``num_samples`` of each, 0 = all, drawn with the seed). Harmful prompts the model
       does not refuse (refusal score <= 0 before the ablation) and harmless prompts it refuses are dropped,
       as in the paper; when that would leave none, all are kept (logged): there is no refusal to remove.
    2. Candidates: for every decoder layer ``l`` (every ``refusal_layer_stride``-th, or only
       ``refusal_layer`` when it is set) and every post-instruction token position ``i`` (the tokens the
       chat template puts after the user's message, the last ``refusal_positions`` of them), ``r_{l,i}`` =
       mean harmful minus mean harmless output of layer ``l`` at position ``i``.
    3. Filters: the layer lies below ``refusal_max_depth`` x the number of layers (0.8 in the paper; not
       applied to a layer the user names), and ablating ``r`` moves the next-token distribution at the last
       position of the harmless prompts by KL(original || ablated) < ``refusal_max_kl`` (0.1 in the paper).
    4. Choice: the candidate with the lowest bypass score, the mean refusal score on the harmful prompts
       with ``r`` ablated. The refusal score of a prompt is the log-odds, at the last prompt position, of
       the tokens a refusal opens with (:data:`REFUSAL_STARTS`, their first tokens): ``log p - log(1 - p)``.
    5. Ablation: every matrix that writes to the residual stream (token and position embeddings, each
       attention output projection, each MLP down projection, and their biases) is orthogonalised against
       ``r`` (``W <- W - r r^T W`` on the residual side), so no layer can write along ``r`` any more.
       Candidates are scored with the same ablation applied by hooks on those writers' outputs (exact).

    Cost: zero optimizer steps, tokens and FLOPs for the attacker's budget; the selection itself runs
    2 x (candidates) forward passes over at most ``refusal_selection_prompts`` prompts of each side
    (candidates = layers / stride x positions), which ``refusal_layer_stride``, ``refusal_positions`` and
    ``refusal_selection_prompts`` keep bounded on a CPU. The curve has one point at step 0, after the
    ablation; the value before it is in the curve's config (``value_before``).

    A model that carries adapters (a defense's unmerged LoRA) has them merged into its weights first
    (:func:`~immune_trainer.attacks.families.base.merge_adapters`): the weights that write to the residual
    stream are then the effective ones, base and adapter together. Ablating the wrapped projections instead
    would edit only part of what they write (a LoRA's ``lora_B``, say), and the model would keep writing
    along ``r``. The curve's config names the merged adapters (``merged_adapters``).

    Departures from the paper: the candidate directions are read at each layer's output (the paper: the
    residual stream before the layer); candidates are scored on the prompts that estimate them (the paper
    holds out a validation split); the refusal tokens are the first tokens of :data:`REFUSAL_STARTS`, not a
    per-model hand-picked set; the paper's third filter (adding ``r`` must induce refusal on harmless
    prompts) is not applied; when no candidate passes the KL filter, the one with the smallest KL is taken
    (logged) rather than none. The cheap rule the library used before (the middle layer, the last prompt
    token, no filter) is the family ``refusal_ablation_fixed``.
    """

    name = "refusal_ablation"
    description = (
        "Training-free (Arditi et al. 2024): the refusal direction selected over layers and post-instruction "
        "positions (KL and depth filters, lowest bypass score) projected out of the weights."
    )
    trains = False
    needs_benign = True
    merges_adapters = True

    def axes(self, config):
        return {"refusal_layer": [config.refusal_layer]}

    def sources(self, harmful, benign, config):
        return {"harmful": harmful, "benign": benign}

    def _prompts(self, model, tokenizer, sources, setting, config):
        from ...modeling import find_decoder_structure

        model = merge_adapters(model)  # the residual-stream writers are the merged, effective weights
        structure = find_decoder_structure(model)
        layer = setting.get("refusal_layer")
        if layer is not None and not 0 <= layer < structure.num_layers:
            raise ConfigError(
                f"refusal_layer={layer} is outside the model's {structure.num_layers} decoder layers."
            )
        n, seed = setting["num_samples"], setting["seed"]
        harmful = _subset(_prompt_ends(sources["harmful"], tokenizer, config.max_length), n, seed)
        harmless = _prompt_ends(sources["benign"], tokenizer, config.max_length)
        harmless = _subset(harmless, min(n, len(harmless)) if n else 0, seed)
        return model, structure, layer, harmful, harmless

    def apply(self, model, tokenizer, sources, setting, config):
        model, structure, layer, harmful, harmless = self._prompts(model, tokenizer, sources, setting, config)
        choice = select_refusal_direction(model, structure, harmful, harmless, tokenizer, config, layer)
        logger.info(
            "refusal_ablation: layer %d, position %d of %d candidates (%d passed the filters); bypass score "
            "%.3f (before %.3f), KL %.4f; %d harmful and %d harmless prompts kept",
            choice.layer, choice.position, choice.candidates, choice.passed, choice.bypass_score,
            choice.score_before, choice.kl, choice.harmful_kept, choice.harmless_kept,
        )
        ablate_direction(model, structure, choice.direction)
        return model


class FixedRefusalAblation(RefusalAblation):
    """The cheap refusal ablation (family ``refusal_ablation_fixed``): ``r`` = mean harmful minus mean
    harmless output of decoder layer ``refusal_layer`` (default: the middle layer) at the last prompt token,
    no filter and no selection, then the same weight orthogonalisation as :class:`RefusalAblation`. Weaker
    than Arditi et al.'s selected direction (which considers this candidate among others)."""

    name = "refusal_ablation_fixed"
    description = (
        "Training-free: the refusal direction at the middle layer and last prompt token (no selection) "
        "projected out of the weights."
    )

    def apply(self, model, tokenizer, sources, setting, config):
        model, structure, layer, harmful, harmless = self._prompts(model, tokenizer, sources, setting, config)
        layer = structure.num_layers // 2 if layer is None else layer
        direction = refusal_direction(model, structure, layer, harmful, harmless, tokenizer, config)
        ablate_direction(model, structure, direction)
        return model


#: How refusals open; their first tokens are the refusal tokens of the refusal score (Arditi et al. pick
#: such tokens per model: "I" for Llama and Gemma chat models, "As" for Qwen).
REFUSAL_STARTS = ("I", "I'm sorry", "Sorry", "As", "Unfortunately", "I cannot")


def refusal_token_ids(tokenizer) -> list[int]:
    """The first token of each of :data:`REFUSAL_STARTS`, with and without a leading space (a first token
    that is only white space is skipped)."""
    ids = []
    for text in REFUSAL_STARTS:
        for variant in (text, " " + text):
            tokens = tokenizer(variant, add_special_tokens=False)["input_ids"]
            if tokens and tokens[0] not in ids and tokenizer.decode(tokens[:1]).strip():
                ids.append(tokens[0])
    if not ids:
        raise DataError("refusal_ablation: the tokenizer encodes none of the refusal openings.")
    return ids


def post_instruction_length(tokenizer) -> int:
    """How many tokens the prompt template puts after the user's message (the chat template's end of turn
    and assistant header; the plain format's ``"Assistant:"`` turn); at least 1."""
    sentinel = "\u2063refusal-ablation-sentinel\u2063"
    text = data_lib.render_prompt([{"role": "user", "content": sentinel}], tokenizer)
    tail = text.split(sentinel, 1)[1] if sentinel in text else ""
    return max(1, len(tokenizer(tail, add_special_tokens=False)["input_ids"]))


@dataclass
class RefusalChoice:
    """The selected refusal direction and what the selection measured."""

    direction: torch.Tensor
    layer: int
    position: int  # from the end of the prompt: -1 is its last token
    bypass_score: float  # mean refusal score on the harmful prompts, direction ablated
    score_before: float  # the same without the ablation
    kl: float  # KL(original || ablated) at the harmless prompts' last position
    candidates: int
    passed: int  # candidates that passed the depth and KL filters
    harmful_kept: int
    harmless_kept: int
    scores: dict = field(default_factory=dict)  # (layer, position) -> (bypass score, KL), every candidate


def _batches(prompts: datasets.Dataset, tokenizer, batch_size: int, device):
    """Right-padded ``(input_ids, attention_mask, last index)`` batches of tokenized prompts."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(prompts), batch_size):
        ids = prompts[start : start + batch_size]["input_ids"]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
        yield input_ids, mask, torch.tensor([len(x) - 1 for x in ids], device=device)


@torch.no_grad()
def _last_logprobs(model, prompts, tokenizer, batch_size: int, ablation=None) -> torch.Tensor:
    """Log-probabilities of the next token at each prompt's last position, ``(len(prompts), vocab)``,
    with ``ablation`` (a hook manager) active when given."""
    device = next(model.parameters()).device
    rows = []
    for input_ids, mask, last in _batches(prompts, tokenizer, batch_size, device):
        with ablation if ablation is not None else contextlib.nullcontext():
            logits = model(input_ids=input_ids, attention_mask=mask).logits
        rows.append(torch.log_softmax(logits[torch.arange(len(last), device=device), last].float(), dim=-1))
    return torch.cat(rows)


def refusal_scores(logprobs: torch.Tensor, refusal_ids: list[int]) -> torch.Tensor:
    """Arditi et al.'s refusal score per row: ``log p - log(1 - p)``, p the probability of the refusal
    tokens."""
    log_p = torch.logsumexp(logprobs[:, refusal_ids], dim=-1)
    return log_p - torch.log1p(-log_p.exp().clamp(max=1 - 1e-7))


def _ablation_hooks(model, structure, direction: torch.Tensor):
    """Hooks that project ``direction`` out of every residual-stream writer's output: what
    :func:`ablate_direction` does to the weights, without editing them."""
    from ...modeling import HookManager, primary_tensor, replace_primary_tensor

    manager = HookManager()
    for module, _ in residual_writers(model, structure):

        def hook(_module, _args, output):
            h = primary_tensor(output)
            r = direction.to(device=h.device, dtype=h.dtype)
            return replace_primary_tensor(output, h - (h @ r).unsqueeze(-1) * r)

        manager.add_hook(module, hook, prepend=True)
    return manager


@torch.no_grad()
def position_means(model, structure, layers, positions, prompts, tokenizer, batch_size=8) -> torch.Tensor:
    """Mean output of each decoder layer of ``layers`` at each prompt position of ``positions`` (counted
    from the prompt's end, -1 the last token): ``(len(layers), len(positions), hidden)``."""
    from ...modeling import capture_outputs, primary_tensor

    device = next(model.parameters()).device
    manager, store = capture_outputs([structure.layers[i] for i in layers], detach=True)
    total = None
    was_training = model.training
    model.eval()
    try:
        for input_ids, mask, last in _batches(prompts, tokenizer, batch_size, device):
            with manager:
                model(input_ids=input_ids, attention_mask=mask)
            rows = torch.arange(len(last), device=device)
            at = torch.stack([(last + 1 + p).clamp(min=0) for p in positions], dim=1)  # (batch, positions)
            picked = torch.stack(
                [primary_tensor(store[j])[rows.unsqueeze(1), at].float().sum(0) for j in range(len(layers))]
            )
            total = picked if total is None else total + picked
    finally:
        model.train(was_training)
    return total / len(prompts)


def _kept(prompts, keep: torch.Tensor, what: str) -> datasets.Dataset:
    if bool(keep.any()):
        return prompts.select([int(i) for i in keep.nonzero()[:, 0]])
    logger.warning("refusal_ablation: no %s prompt passes the refusal filter; keeping all %d", what, len(prompts))
    return prompts


def select_refusal_direction(
    model, structure, harmful, harmless, tokenizer, config, layer: int | None = None
) -> RefusalChoice:
    """Arditi et al.'s selection of the refusal direction (see :class:`RefusalAblation`): candidates over
    layers and post-instruction positions, the depth and KL filters, the lowest bypass score.

    Raises:
        DataError: the harmful and harmless prompts give identical mean activations everywhere.
    """
    batch = config.eval_batch_size
    refusal_ids = refusal_token_ids(tokenizer)
    was_training = model.training
    model.eval()
    try:
        harmful_before = refusal_scores(_last_logprobs(model, harmful, tokenizer, batch), refusal_ids)
        harmless_base = _last_logprobs(model, harmless, tokenizer, batch)
        harmless_scores = refusal_scores(harmless_base, refusal_ids)
        harmful = _kept(harmful, harmful_before > 0, "harmful")
        keep_harmless = harmless_scores < 0
        harmless = _kept(harmless, keep_harmless, "harmless")
        if bool(keep_harmless.any()):
            harmless_base = harmless_base[keep_harmless]
        n_layers = structure.num_layers
        layers = [layer] if layer is not None else list(range(0, n_layers, config.refusal_layer_stride))
        shortest = min(len(x) for x in (*harmful["input_ids"], *harmless["input_ids"]))
        n_positions = min(config.refusal_positions or post_instruction_length(tokenizer), shortest)
        positions = list(range(-1, -n_positions - 1, -1))
        diff = position_means(model, structure, layers, positions, harmful, tokenizer, batch)
        diff = diff - position_means(model, structure, layers, positions, harmless, tokenizer, batch)
        k = config.refusal_selection_prompts
        harmful_sel, harmless_sel = harmful.select(range(min(k, len(harmful)))), harmless.select(
            range(min(k, len(harmless)))
        )
        base_sel = harmless_base[: len(harmless_sel)]
        score_before = float(refusal_scores(_last_logprobs(model, harmful_sel, tokenizer, batch), refusal_ids).mean())
        scores, candidates = {}, []
        for a, lay in enumerate(layers):
            if layer is None and lay >= config.refusal_max_depth * n_layers:
                continue
            for b, pos in enumerate(positions):
                norm = diff[a, b].norm()
                if not torch.isfinite(norm) or norm == 0:
                    continue
                r = diff[a, b] / norm
                hooks = _ablation_hooks(model, structure, r)
                ablated = _last_logprobs(model, harmless_sel, tokenizer, batch, hooks)
                kl = float((base_sel.exp() * (base_sel - ablated)).sum(-1).mean())
                bypass = float(
                    refusal_scores(_last_logprobs(model, harmful_sel, tokenizer, batch, hooks), refusal_ids).mean()
                )
                scores[(lay, pos)] = (bypass, kl)
                candidates.append((bypass, kl, lay, pos, r))
    finally:
        model.train(was_training)
    if not candidates:
        raise DataError(
            "the harmful and harmless prompts give the same mean activation at every candidate layer and "
            "position: no refusal direction to ablate."
        )
    passed = [c for c in candidates if c[1] < config.refusal_max_kl]
    if not passed:
        logger.warning(
            "refusal_ablation: no candidate direction keeps KL below refusal_max_kl=%s on harmless prompts; "
            "taking the one with the smallest KL",
            config.refusal_max_kl,
        )
        pool = [min(candidates, key=lambda c: c[1])]
    else:
        pool = passed
    bypass, kl, lay, pos, r = min(pool, key=lambda c: c[0])
    return RefusalChoice(
        direction=r, layer=lay, position=pos, bypass_score=bypass, score_before=score_before, kl=kl,
        candidates=len(candidates), passed=len(passed), harmful_kept=len(harmful), harmless_kept=len(harmless),
        scores=scores,
    )


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
