"""Stability: capability on reference sets unchanged by immunization, within a relative tolerance."""

from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError
from .curves import (
    _check_threshold,
    fmt_number,
    fmt_percent,
)
from .schema import (
    StabilityResult,
    StabilitySet,
)

# --------------------------------------------------------------------------------------------------
# Stability
# --------------------------------------------------------------------------------------------------


def relative_degradation(base: float, immunized: float, higher_is_better: bool) -> tuple[float, float]:
    """``(relative_change, relative_degradation)`` of a score, the degradation signed so that positive
    means worse for the defender. ``relative_change = (immunized - base) / |base|``; with a zero base
    the change is 0 if both are 0, else +-inf. NaN in, NaN out."""
    if math.isnan(base) or math.isnan(immunized):
        return math.nan, math.nan
    diff = immunized - base
    if base != 0:
        change = diff / abs(base)
    elif diff == 0:
        change = 0.0
    else:
        change = math.copysign(math.inf, diff)
    return change, (-change if higher_is_better else change)


def stability(
    base: dict[str, float],
    immunized: dict[str, float],
    *,
    higher_is_better: dict[str, bool],
    tolerance: float = 0.10,
) -> StabilityResult:
    """Stability: capability on each reference set within ``tolerance`` relative degradation of the base.

    Per set: ``relative_change = (immunized - base) / |base|``, and the degradation is that change
    signed by direction (positive = worse). Holds when every degradation is <= ``tolerance``.
    A NaN score does not raise: that set (and so stability) does not hold, with a note.

    Raises:
        ConfigError: empty dicts, mismatched reference-set names, a missing direction, bad tolerance.
    """
    _check_threshold(tolerance, "tolerance")
    if tolerance < 0:
        raise ConfigError(f"`tolerance` must be >= 0, got {tolerance}.")
    for name, d in (("base", base), ("immunized", immunized), ("higher_is_better", higher_is_better)):
        if not isinstance(d, dict):
            raise ConfigError(f"`{name}` must be a dict keyed by reference-set name, got {type(d).__name__}.")
    if not base:
        raise ConfigError("stability needs at least one reference set: `base` and `immunized` are empty.")
    if set(base) != set(immunized):
        raise ConfigError(
            f"reference sets differ: base has {sorted(base)}, immunized has {sorted(immunized)}. "
            "Score both models on the same reference sets."
        )
    missing = sorted(set(base) - set(higher_is_better))
    if missing:
        raise ConfigError(f"`higher_is_better` has no direction for reference set(s) {missing}.")
    sets: dict[str, StabilitySet] = {}
    notes: list[str] = []
    for k in base:
        b, m = base[k], immunized[k]
        for who, v in (("base", b), ("immunized", m)):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise ConfigError(f"{who} score of reference set '{k}' is {v!r}: expected a number.")
        hib = bool(higher_is_better[k])
        change, degr = relative_degradation(float(b), float(m), hib)
        ok = not math.isnan(degr) and degr <= tolerance
        if math.isnan(degr):
            notes.append(f"reference set '{k}' has a NaN score: stability cannot hold.")
        sets[k] = StabilitySet(float(b), float(m), hib, change, degr, ok)

    def key(item):
        v = item[1].relative_degradation
        return math.inf if math.isnan(v) else v

    worst_name, worst = max(sets.items(), key=key)
    holds = all(s.holds for s in sets.values())
    verdict = "holds" if holds else "fails"
    summary = (
        f"stability {verdict}: worst reference set '{worst_name}' {fmt_number(worst.base)} -> {fmt_number(worst.immunized)} "
        f"({fmt_percent(worst.relative_degradation)} degradation; tolerance {fmt_percent(tolerance)})."
    )
    return StabilityResult(
        holds=holds,
        tolerance=float(tolerance),
        sets=sets,
        worst_set=worst_name,
        worst_degradation=worst.relative_degradation,
        notes=notes,
        summary=summary,
    )
