"""Fine-tuning as a service: benign task data with a share p of harmful pairs (family ``mixed``)."""

from __future__ import annotations

import math

import datasets

from ...errors import DataError
from .base import _subset
from .full import FullFineTuning


class MixedFineTuning(FullFineTuning):
    """Fine-tuning as a service: a benign task set with a share p of harmful pairs, full fine-tuning.

    The setting of Vaccine / Booster / Lisa (Huang et al. 2024): a user uploads a benign task data set
    (SST2, AGNews, GSM8K) poisoned with a share ``p`` of harmful pairs (default 0.1). One run of
    ``num_samples`` examples (0 = as many as the data allow at that share) holds ``round(p * n)`` harmful
    and the rest benign examples, shuffled together with the run's seed.
    """

    name = "mixed"
    description = "Fine-tuning as a service: benign task data with a share p of harmful pairs."
    needs_benign = True

    def axes(self, config):
        return {"harmful_share": list(config.harmful_shares)}

    def sources(self, harmful, benign, config):
        return {"harmful": harmful, "benign": benign}

    def training_set(self, tokenized, setting):
        harmful, benign = tokenized["harmful"], tokenized["benign"]
        p, n = setting["harmful_share"], setting["num_samples"]
        if not n:
            # The largest set at share p that both sources can fill.
            n = int(min(len(harmful) / p, len(benign) / (1 - p) if p < 1 else math.inf))
        k = round(p * n)
        if k > len(harmful) or n - k > len(benign):
            raise DataError(
                f"a mixed run of {n} examples at harmful share {p:g} needs {k} harmful and {n - k} benign "
                f"rows; the data has {len(harmful)} harmful and {len(benign)} benign rows."
            )
        if k == 0:
            raise DataError(
                f"a mixed run of {n} examples at harmful share {p:g} holds no harmful example; raise "
                "num_samples or the share."
            )
        parts = [_subset(harmful, k, setting["seed"])]
        if n - k:
            parts.append(_subset(benign, n - k, setting["seed"]))
        return datasets.concatenate_datasets(parts).shuffle(seed=setting["seed"])
