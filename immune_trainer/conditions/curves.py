"""Curves and crossings: the points of f along an attack, the first step past phi, the worst value and
the seed spread of a grid, and the formatting of numbers in tables. Pure: numpy and the standard library."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError
from .schema import (
    NON_FINITE,
    AttackCurve,
    Crossing,
    CurvePoint,
    CurveSummary,
    SeedSpread,
)

CURVE_SETS = ("attack", "in_domain", "cross_domain")
"""Keys of the attack curve sets: the main resistance grid, held-out in-domain and cross-domain attacks."""

EVALUATE_KWARGS = frozenset(
    {
        "steps",
        "tokens",
        "flops",
        "runs",
        "domains",
        "threshold",
        "higher_is_better",
        "min_cost_multiple",
        "reference_sets",
        "tolerance",
        "target",
        "eps_steps",
        "cutoff",
    }
)
"""Keyword arguments of the evaluate modules in ``metrics/``. ``evaluate.combine`` passes every keyword to
every module, so each module ignores the names of this set it does not use and rejects any other name
(a typo must not pass silently)."""

_NON_FINITE = NON_FINITE  # the string form of non-finite floats in a report (see immune_trainer.conditions.schema)


# --------------------------------------------------------------------------------------------------
# Text formatting of numbers (tables, summaries)
# --------------------------------------------------------------------------------------------------


def fmt_percent(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "+inf%" if x > 0 else "-inf%"
    return f"{100 * x:+.1f}%"


def fmt_number(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}g}"


# --------------------------------------------------------------------------------------------------
# Curves
# --------------------------------------------------------------------------------------------------


def curves_from_columns(
    values: Sequence[float],
    *,
    steps: Sequence[int] | None = None,
    tokens: Sequence[int] | None = None,
    flops: Sequence[float] | None = None,
    groups: Sequence[Any] | None = None,
) -> dict[Any, list[CurvePoint]]:
    """Group flat, aligned columns (one row per evaluation point) into point lists, one per group.

    This is how the evaluate modules in ``metrics/`` turn ``predictions``/``references`` rows into
    curves. ``steps`` defaults to ``0, 1, 2, ...`` within each group; ``groups`` defaults to a single
    group ``None``. Rows of a group are sorted by step.

    Raises:
        ConfigError: on a length mismatch, a non-numeric value or repeated steps within a group.
    """
    n = len(values)
    for name, col in (("steps", steps), ("tokens", tokens), ("flops", flops), ("groups", groups)):
        if col is not None and len(col) != n:
            raise ConfigError(
                f"`{name}` has {len(col)} entries but there are {n} values: give one entry per evaluation point."
            )
    out: dict[Any, list[CurvePoint]] = {}
    counters: dict[Any, int] = {}
    for i in range(n):
        g = None if groups is None else groups[i]
        v = values[i]
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) and v is not None:
            raise ConfigError(f"value {i} is {v!r}: scores must be numbers.")
        step = counters.get(g, 0) if steps is None else steps[i]
        counters[g] = counters.get(g, 0) + 1
        out.setdefault(g, []).append(
            CurvePoint(
                step=int(step),
                tokens=0 if tokens is None else int(tokens[i]),
                flops=0.0 if flops is None else float(flops[i]),
                value=math.nan if v is None else float(v),
            )
        )
    for g, pts in out.items():
        pts.sort(key=lambda p: p.step)
        _check_points(pts, f"group {g!r}" if groups is not None else "curve")
    return out


def _check_points(points: Sequence[CurvePoint], what: str) -> None:
    if len(points) == 0:
        raise ConfigError(f"{what} has no evaluation points: evaluate the score at least once (at step 0).")
    for a, b in zip(points, points[1:]):
        if b.step <= a.step:
            raise ConfigError(
                f"{what}: steps must be strictly increasing, got {a.step} then {b.step}. "
                "Sort the points by step and drop duplicate evaluations."
            )


def check_metric_kwargs(unused: dict[str, Any], module: str) -> None:
    """Raise :class:`ConfigError` for keyword arguments no evaluate module of immune_trainer knows."""
    unknown = sorted(set(unused) - EVALUATE_KWARGS)
    if unknown:
        raise ConfigError(
            f"{module}: unknown keyword argument(s) {unknown}; see the metric card for its inputs."
        )


def require_finite(values: Sequence[Any], name: str) -> list[float]:
    """``values`` as floats; :class:`ConfigError` naming the first entry that is not a finite number."""
    out = []
    for i, v in enumerate(values):
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float, np.integer, np.floating))
            or not math.isfinite(v)
        ):
            raise ConfigError(
                f"{name}[{i}] is {v!r}: every score must be a finite number (a NaN means the measurement "
                "failed; re-run it, or call immune_trainer.conditions directly, which counts NaN as crossed)."
            )
        out.append(float(v))
    return out


def _points(curve: Any) -> list[CurvePoint]:
    return list(curve.points) if hasattr(curve, "points") else list(curve)


# --------------------------------------------------------------------------------------------------
# Crossing
# --------------------------------------------------------------------------------------------------


def _is_bad(value: float, threshold: float, higher_is_better: bool) -> bool:
    """Strictly on the bad side of ``threshold`` (NaN counts as bad)."""
    if math.isnan(value):
        return True
    return value < threshold if higher_is_better else value > threshold


def _first_past(points: Sequence[CurvePoint], is_past, threshold: float) -> Crossing | None:
    prev = None
    for p in points:
        if is_past(p.value):
            if prev is None or math.isnan(p.value) or math.isnan(prev.value):
                return Crossing(step=float(p.step), tokens=float(p.tokens), flops=float(p.flops))
            span = p.value - prev.value
            frac = 1.0 if span == 0 else (threshold - prev.value) / span
            frac = min(max(frac, 0.0), 1.0)
            return Crossing(
                step=prev.step + frac * (p.step - prev.step),
                tokens=prev.tokens + frac * (p.tokens - prev.tokens),
                flops=prev.flops + frac * (p.flops - prev.flops),
            )
        prev = p
    return None


def first_crossing(curve: Any, threshold: float, higher_is_better: bool) -> Crossing | None:
    """The first point where ``curve`` goes strictly to the bad side of ``threshold``, or ``None``.

    The crossing is linearly interpolated between the last evaluation on the good side and the first on
    the bad side, in steps, tokens and FLOPs alike (so a coarse evaluation grid does not round 1.25x up
    to 1.5x). A curve already on the bad side at its first point crosses at that point. A NaN value
    counts as crossed at its own step (nothing to interpolate with).

    Args:
        curve: an :class:`AttackCurve`, a :class:`TrainingCurve` or a sequence of :class:`CurvePoint`.
        threshold: phi, in the scorer's units.
        higher_is_better: the scorer's direction from the defender's view.
    """
    pts = _points(curve)
    _check_points(pts, "curve")
    _check_threshold(threshold, "threshold")
    return _first_past(pts, lambda v: _is_bad(v, threshold, higher_is_better), threshold)


def _check_threshold(x: Any, name: str) -> None:
    if (
        isinstance(x, bool)
        or not isinstance(x, (int, float, np.integer, np.floating))
        or not math.isfinite(x)
    ):
        raise ConfigError(f"`{name}` must be a finite number, got {x!r}.")


def _ratio(a: float, b: float, *, zero_over_zero: float | None) -> float | None:
    if b > 0:
        return a / b
    if a > 0:
        return math.inf
    return zero_over_zero


# --------------------------------------------------------------------------------------------------
# Resistance
# --------------------------------------------------------------------------------------------------


def worst_value(values: Sequence[float], higher_is_better: bool) -> float:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan
    return min(finite) if higher_is_better else max(finite)


def _summarize_curves(
    curves: Sequence[AttackCurve], threshold: float, hib: bool, what: str
) -> list[CurveSummary]:
    if not isinstance(curves, (list, tuple)) or len(curves) == 0:
        raise ConfigError(
            f"{what}: no attack curves. Run at least one attack configuration and pass its AttackCurve."
        )
    out = []
    for i, c in enumerate(curves):
        if not isinstance(c, AttackCurve):
            raise ConfigError(f"{what}[{i}] is a {type(c).__name__}, expected an AttackCurve.")
        pts = list(c.points)
        _check_points(pts, f"{what}[{i}] (config {c.config})")
        if c.higher_is_better != hib:
            raise ConfigError(
                f"{what}[{i}] was scored with higher_is_better={c.higher_is_better} but the threshold is for "
                f"higher_is_better={hib}: score every curve with the same scorer as phi."
            )
        out.append(
            CurveSummary(
                config=dict(c.config),
                crossing=first_crossing(pts, threshold, hib),
                worst_value=worst_value([p.value for p in pts], hib),
                budget_steps=pts[-1].step,
                budget_tokens=pts[-1].tokens,
                budget_flops=float(pts[-1].flops),
                has_nan=any(math.isnan(p.value) for p in pts),
            )
        )
    return out


def seed_spread(summaries: Sequence[CurveSummary]) -> list[SeedSpread]:
    """Group runs by their setting (config without ``seed``) and, for every setting run with at least two
    seeds, the min / max / mean crossing step over the seeds whose run crossed phi.

    A worst case over one seed can be luck (Qi et al. 2025 found defenses brittle to the seed alone);
    the spread tells a reader how far the crossing moves when only the seed changes. Runs without a
    ``seed`` in their config are not grouped.
    """
    groups: list[tuple[dict[str, Any], list[CurveSummary]]] = []
    for s in summaries:
        if "seed" not in s.config:
            continue
        key = {k: v for k, v in s.config.items() if k != "seed"}
        for k, members in groups:
            if k == key:
                members.append(s)
                break
        else:
            groups.append((key, [s]))
    out = []
    for key, members in groups:
        if len(members) < 2:
            continue
        steps = [None if m.crossing is None else float(m.crossing.step) for m in members]
        crossed = [x for x in steps if x is not None]
        out.append(
            SeedSpread(
                config=key,
                seeds=[m.config["seed"] for m in members],
                crossing_steps=steps,
                min_step=min(crossed) if crossed else None,
                max_step=max(crossed) if crossed else None,
                mean_step=sum(crossed) / len(crossed) if crossed else None,
            )
        )
    return out
