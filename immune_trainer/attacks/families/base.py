"""The base class of the attack families (:class:`AttackFamily`) and the helpers the families share.

:class:`~immune_trainer.attacks.config.AttackConfig` is imported for the annotations only: the config
looks families up in the registry (:mod:`immune_trainer.attacks.families`) at run time, so a family reads
its settings off the config it is handed without importing the config's module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import datasets

from ...errors import DataError

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

    def prepare(self, model, config: AttackConfig, setting: dict[str, Any] | None = None):
        """Return the model to train (``model`` is already a private copy)."""
        return model

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
