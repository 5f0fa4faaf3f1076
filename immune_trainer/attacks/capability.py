"""The attacked copy's capability along an attack curve: :class:`CapabilityProbe`.

A self-destructive defense (SEAM, CTRAP) answers a strong attack by losing its capability: the attacker
reaches harm past phi, but with a model that no longer works. TamperBench's rule is that such an attack
is not a success. :class:`CapabilityProbe` gives the harness what the rule needs: at each evaluation where
the attacked copy is on the harmful side of phi (every evaluation while phi is not known yet), the relative
capability loss of that copy against the model before the attack, on a few rows of a reference set with the
stability scorer. The harness stores it on the curve point (``CurvePoint.capability_loss``); the
conditions judge a point past the cap as no crossing (:func:`~immune_trainer.conditions.credited_curve`).
"""

from __future__ import annotations

from typing import Any

from ..conditions.stability import relative_degradation
from ..errors import DataError
from ..run_cache import content_hash

__all__ = ["CapabilityProbe"]


class CapabilityProbe:
    """Capability loss of an attacked model against the model before the attack.

    Args:
        reference: a reference dataset (any format the scorer reads: text or prompt/completion rows).
        scorer: the capability scorer (default: ``perplexity``, the stability default).
        rows: how many of the reference's rows are scored at each measured point (the first ``rows``).

    ``probe.before(model)`` scores the model before the attack (remembered per model object); ``probe(model,
    before)`` returns the relative degradation (positive is worse; NaN when the score is NaN).
    """

    def __init__(self, reference, scorer=None, rows: int = 8):
        from ..scoring import get_scorer

        if reference is None or len(reference) == 0:
            raise DataError("the capability probe's reference set is empty.")
        if rows < 1:
            raise DataError(f"the capability probe needs at least one row, got rows={rows}.")
        n = min(rows, len(reference))
        self.reference = reference.select(range(n)) if hasattr(reference, "select") else list(reference)[:n]
        self.scorer = scorer if scorer is not None else get_scorer("perplexity")
        self.rows = len(self.reference)
        self._before: dict[int, tuple[Any, float]] = {}

    @property
    def cache_key(self) -> dict[str, Any]:
        """What tells saved attack runs measured with this probe apart (scorer, rows)."""
        from .config import scorer_key

        return {"scorer": scorer_key(self.scorer), "reference": content_hash(self.reference)}

    def before(self, model, tokenizer) -> float:
        """Capability of ``model`` before the attack (scored once per model object)."""
        hit = self._before.get(id(model))
        if hit is not None and hit[0] is model:
            return hit[1]
        value = float(self.scorer.score(model, tokenizer, self.reference).value)
        self._before[id(model)] = (model, value)
        return value

    def __call__(self, model, tokenizer, before: float) -> float:
        after = float(self.scorer.score(model, tokenizer, self.reference).value)
        return float(relative_degradation(before, after, self.scorer.higher_is_better)[1])
