"""Full fine-tuning on benign data only (family ``benign``)."""

from __future__ import annotations

from .base import _subset
from .full import FullFineTuning


class BenignFineTuning(FullFineTuning):
    """Fine-tuning on benign data only (Qi et al. 2023, "Fine-tuning aligned language models compromises
    safety, even when users do not intend to", arXiv 2310.03693): harm is still measured on the held-out
    harmful set, so a defense must also survive the erosion that ordinary fine-tuning causes."""

    name = "benign"
    description = "Full fine-tuning on benign data only; harm measured on the held-out harmful set."
    needs_benign = True

    def sources(self, harmful, benign, config):
        return {"benign": benign}

    def training_set(self, tokenized, setting):
        return _subset(tokenized["benign"], setting["num_samples"], setting["seed"])
