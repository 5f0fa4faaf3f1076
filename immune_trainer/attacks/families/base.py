"""The base class of the attack families (:class:`AttackFamily`) and the helpers the families share.

:class:`~immune_trainer.attacks.config.AttackConfig` is imported for the annotations only: the config
looks families up in the registry (:mod:`immune_trainer.attacks.families`) at run time, so a family reads
its settings off the config it is handed without importing the config's module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import datasets

from ...errors import ConfigError, DataError

if TYPE_CHECKING:
    from ..config import AttackConfig


class AttackFamily:
    """How an attacker adapts the model. Subclass and :func:`register_attack` it.

    Class attributes:
        trains: False for a training-free attack (no learning rate, optimizer or schedule axes; the
            runner calls :meth:`apply` instead of a Trainer and records the result at step 0).
        needs_benign: the family needs ``benign_train`` (a ``ConfigError`` is raised without it).
    """

    name: str = ""
    description: str = ""
    trains: bool = True
    # The model the attacker starts from measures exactly like the input model (no adapter output, soft
    # prompt or edit at step 0), so every run of the grid can share one step-0 measurement.
    same_at_start: bool = True
    needs_benign: bool = False
    # An inference-time attack that optimises on the very prompts harm is measured on (the per-prompt soft
    # suffix of ``embedding``): the runner hands a training-free family the run's raw held-out set as
    # ``sources["eval"]``.
    attacks_prompts: bool = False
    deployed_generates: bool = True
    """Whether the attacked model as deployed answers new prompts (an ``after_attack`` probe generates on
    held-out prompts). False for a soft suffix optimised per measured prompt: it has no suffix for others."""
    # Adapters the model already carries unmerged (the LoRA of a defense such as rerouting, or of any defense
    # trained with ``peft_config``): True merges the active ones into the weights of the attacked copy before
    # :meth:`prepare` / :meth:`apply`, so the attack starts from the defended model (see
    # :func:`merge_adapters`; the curve's config records them as ``merged_adapters``). False leaves them in
    # place (full fine-tuning trains them along with every other weight).
    merges_adapters: bool = False

    def axes(self, config: AttackConfig) -> dict[str, list]:
        """Grid axes of this family beyond learning rate, samples, seed, optimizer and schedule:
        ``{setting key: values}`` (e.g. ``{"lora_rank": [8, 16]}``)."""
        return {}

    def sources(self, harmful, benign, config: AttackConfig) -> dict[str, Any]:
        """The raw datasets this family trains on, by role (``"harmful"``, ``"benign"``)."""
        return {"harmful": harmful}

    def training_set(self, tokenized: dict[str, datasets.Dataset], setting: dict[str, Any]):
        """One run's training examples: ``num_samples`` of them (0 = all), drawn with the run's seed."""
        return _subset(tokenized["harmful"], setting["num_samples"], setting["seed"])

    def harm_eval(self, harmful_eval, setting: dict[str, Any], config: AttackConfig, tokenizer=None):
        """The held-out harmful data harm is measured on for one run: ``harmful_eval`` itself, or a
        rewrite of it when the attacker deploys the model with something around the prompts (the jailbreak
        of ``jailbreak_tuning``, the persona and forced answer prefix of ``identity_shift``, which tokenizes
        with ``tokenizer`` to keep the prefix out of the labels)."""
        return harmful_eval

    def prepare(self, model, config: AttackConfig, setting: dict[str, Any] | None = None):
        """Return the model to train (``model`` is already a private copy)."""
        return model

    def start_precision(self, config: AttackConfig) -> str | None:
        """How the weights are stored when the attacked model is first measured, when :meth:`prepare`
        changes it (``"nf4"`` for a QLoRA attack); None: as the input model stores them. It keys the step-0
        measurement that runs of a grid share."""
        return None

    def deployed(self, model, setting: dict[str, Any]):
        """The model as the attacker runs it when harm is measured (default: the trained model itself)."""
        return model

    def flops_per_token(self, model, config: AttackConfig) -> float:
        """Training FLOPs per token of ``model`` (before :meth:`prepare`), N = non-embedding parameters:
        forward 2N + backward 4N for full fine-tuning."""
        return 6.0 * _num_parameters(model)

    def apply(self, model, tokenizer, sources: dict[str, Any], setting: dict[str, Any], config: AttackConfig):
        """Training-free families: edit ``model`` (a private copy) in place and return it."""
        raise NotImplementedError(f"attack family {self.name!r} trains; it has no training-free apply().")


def _tuner_layers(model) -> list[tuple[str, Any]]:
    """``(name, module)`` of every peft tuner layer (a LoRA-wrapped projection, ...) inside ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def _prompt_learning(model) -> bool:
    return bool(getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False))


def carried_adapters(model) -> list[str]:
    """The adapters ``model`` carries active and unmerged (a defense's LoRA: ``["default"]``), whether it
    is a peft ``PeftModel`` or a transformers model with adapters loaded (``load_adapter``, or
    ``from_pretrained`` on an adapter folder). Empty for a plain model."""
    names: list[str] = []
    if _prompt_learning(model):
        names.append(model.active_adapter)
    for _, layer in _tuner_layers(model):
        if layer.disable_adapters:
            continue
        for name in layer.active_adapters:
            if name not in layer.merged_adapters and name not in names:
                names.append(name)
    return names


def merge_adapters(model):
    """``model`` with the adapters it carries merged into its weights: the plain model that computes what the
    adapted model computes (a plain model is returned as it is). Active adapters are merged, inactive ones
    dropped; a peft ``PeftModel`` becomes its base model (``merge_and_unload``), a transformers model with
    loaded adapters loses its adapter layers. Edits ``model`` in place: pass a copy.

    Raises:
        ConfigError: the model carries a prompt-learning adapter (soft prompt), which has no weights to merge.
    """
    if _prompt_learning(model):
        raise ConfigError(
            "the model carries a prompt-learning adapter (a soft prompt): it cannot be merged into the "
            "weights before the attack; attack the model without it, or with family 'full'."
        )
    return _unload(model, merge=True)


def drop_adapters(model):
    """``model`` without the adapters it carries (not merged: the weights they were added to, as they are).
    For a model whose adapter is applied by an attack-time hook rather than deployed (a security vector).
    Edits ``model`` in place: pass a copy."""
    if _prompt_learning(model):
        return model.get_base_model()
    return _unload(model, merge=False)


def _unload(model, merge: bool):
    if hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None)):
        method = "merge_and_unload" if merge else "unload"
        if callable(getattr(model, method, None)):  # a PeftModel (LoRA, IA3, ...)
            return getattr(model, method)()
    layers = _tuner_layers(model)
    if not layers:
        return model
    # Adapters injected into a transformers model (PeftAdapterMixin: ``load_adapter``, or ``from_pretrained``
    # on an adapter folder): merge each layer if asked, then put its base layer back in its place.
    import torch

    with torch.no_grad():
        for name, layer in layers:
            if merge and not layer.disable_adapters:
                pending = [a for a in layer.active_adapters if a not in layer.merged_adapters]
                if pending:
                    layer.merge(adapter_names=pending)
            elif not merge and layer.merged_adapters:
                layer.unmerge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, layer.get_base_layer())
    if "_hf_peft_config_loaded" in vars(model):
        del model._hf_peft_config_loaded  # save_pretrained would otherwise write the adapters only
    if "peft_config" in vars(model):
        del model.peft_config
    return model


def _num_parameters(model) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "num_parameters"):
        return base.num_parameters(exclude_embeddings=True)
    return sum(p.numel() for p in base.parameters())


def _subset(dataset: datasets.Dataset, n: int, seed: int) -> datasets.Dataset:
    if not n:
        return dataset
    if n > len(dataset):
        raise DataError(
            f"num_samples={n} exceeds the {len(dataset)} rows of the attack's training data; "
            "lower it or pass more data."
        )
    return dataset.shuffle(seed=seed).select(range(n))
