"""The trainer every defense subclasses: :class:`ImmunizationTrainer` (:mod:`.base`), a ``transformers.Trainer``
fed with paired harmful/harmless batches, and its configuration :class:`ImmunizationConfig` (:mod:`.config`).
"""

from __future__ import annotations

from .base import IMMUNIZATION_PAPER, PAIRED_KEYS, ImmunizationCollator, ImmunizationTrainer, merge_parts
from .config import ImmunizationConfig, check_non_negative, check_search_space

__all__ = [
    "IMMUNIZATION_PAPER",
    "PAIRED_KEYS",
    "ImmunizationCollator",
    "ImmunizationConfig",
    "ImmunizationTrainer",
    "check_non_negative",
    "check_search_space",
    "merge_parts",
]
