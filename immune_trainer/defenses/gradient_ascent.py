"""Bounded gradient ascent: the simplest immunization baseline.

    L = w_h * CE(harmless) + w_r * CE(retain) - alpha * log(1 + CE(harmful))

The ascent is bounded: the gradient of log(1 + CE) shrinks as the harmful loss grows, so the model is
pushed away from harmful responses without the unbounded blow-up of plain gradient ascent. It is
RepNoise's ascent term without the noise term and without the per-layer unembedding (Rosati et al. 2024).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..trainer import ImmunizationConfig, ImmunizationTrainer, check_non_negative, merge_parts
from .papers import REPNOISE_PAPER


@dataclass
class GradientAscentConfig(ImmunizationConfig):
    r"""Configuration of :class:`GradientAscentTrainer`.

    Parameters:
        alpha (`float`, defaults to `1.0`):
            Weight of the bounded ascent term ``log(1 + CE(harmful))``.
    """

    alpha: float = field(
        default=1.0, metadata={"help": "Weight of the bounded ascent term log(1 + CE(harmful))."}
    )

    @classmethod
    def search_space(cls) -> dict:
        """Learning rate and steps around RepNoise's (2e-5, one epoch), the ascent weight and the retain weight."""
        return {
            **super().search_space(),
            "learning_rate": {"type": "float", "low": 1e-6, "high": 1e-4, "log": True},
            "alpha": {"type": "float", "low": 0.1, "high": 4.0, "log": True},
            "retain_weight": {"type": "float", "low": 0.1, "high": 10.0, "log": True},
        }

    def __post_init__(self):
        check_non_negative(self, "alpha")
        super().__post_init__()


class GradientAscentTrainer(ImmunizationTrainer):
    """Retain loss on harmless (and benign) data minus ``alpha * log(1 + harmful CE)``."""

    _tag_names = ["immune-trainer", "gradient-ascent"]
    _name = "Bounded gradient ascent"
    _paper = REPNOISE_PAPER  # the ascent term is RepNoise's
    config_class = GradientAscentConfig

    def defense_loss_parts(self, model, inputs):
        # Two parts, back-propagated one after the other: the retain side, then the ascent side.
        parts = [lambda: self.retain_part(model, inputs)] if self.has_retain_terms() else []
        return parts + [lambda: self._ascent_part(model, inputs)]

    def _ascent_part(self, model, inputs):
        harmful, _ = self.lm_loss(model, self.side(inputs, "harmful"))
        ascent = torch.log1p(harmful)
        return {"harmful": harmful, "ascent": ascent, "loss": -self.args.alpha * ascent}

    def compute_defense_loss(self, model, inputs):
        return merge_parts(part() for part in self.defense_loss_parts(model, inputs))
