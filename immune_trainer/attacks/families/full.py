"""Full-parameter fine-tuning on the harmful data (family ``full``)."""

from __future__ import annotations

from .base import AttackFamily


class FullFineTuning(AttackFamily):
    name = "full"
    description = "Full-parameter fine-tuning on the harmful data."

    def prepare(self, model, config, setting=None):
        for p in model.parameters():
            p.requires_grad_(True)
        return model
