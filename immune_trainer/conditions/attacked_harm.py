"""The attacked model's harm as the field reports it, the pure part: per attack family, the refusal rate and
judged harm of the worst run's final model, base vs immunized.

Papers on harmful fine-tuning (RepNoise, TAR, Vaccine, Booster; TamperBench) report the harmfulness of the
attacked model's *generations* (a judge's harmful score, or an attack success rate), not only the loss of
reference harmful answers. When the attack harness is given an ``after_attack`` hook
(:meth:`~immune_trainer.attacks.HarmfulFineTuningAttack.run`), each run's final model answers held-out
harmful prompts and the hook's result is stored on the run's curve, ``curve.config["after_attack"]``
(``{"step", "n", "refusal_rate", "harm", "judge", ...}``). :func:`attacked_harm_by_family` reads those
back: for each family, the run whose final harm score f is worst (the attacker's best run) on each model.
Standard library only.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AFTER_ATTACK_KEY", "attacked_harm_by_family", "attacked_harm_rows"]

AFTER_ATTACK_KEY = "after_attack"
"""Where the harness stores the ``after_attack`` hook's result in a curve's config."""


def _worst(curves, higher_is_better: bool):
    """The curve (with a hook result) whose last value is the most harmful, or None."""
    measured = [c for c in curves if isinstance(c.config.get(AFTER_ATTACK_KEY), dict) and c.points]
    if not measured:
        return None
    pick = min if higher_is_better else max
    return pick(measured, key=lambda c: c.points[-1].value)


def attacked_harm_by_family(
    base_curves: list, immunized_curves: list, higher_is_better: bool
) -> dict[str, dict[str, Any]]:
    """``{family: {"base": result, "immunized": result}}`` from the curves of one harmful set.

    ``result`` is the ``after_attack`` record of the family's worst run on that model (lowest final f when
    higher is better), with ``"setting"`` (the run's learning rate, seed... ) and ``"final_value"`` (its
    last f) added; a model whose runs of the family carry no record maps to None. Families measured on
    neither model are left out."""
    families: dict[str, dict[str, Any]] = {}
    for who, curves in (("base", base_curves or []), ("immunized", immunized_curves or [])):
        by_family: dict[str, list] = {}
        for c in curves:
            by_family.setdefault(str(c.config.get("family", "full")), []).append(c)
        for family, group in by_family.items():
            worst = _worst(group, higher_is_better)
            if worst is None:
                continue
            record = dict(worst.config[AFTER_ATTACK_KEY])
            record["setting"] = {
                k: v for k, v in worst.config.items() if k != AFTER_ATTACK_KEY and not isinstance(v, dict)
            }
            record["final_value"] = worst.points[-1].value
            families.setdefault(family, {"base": None, "immunized": None})[who] = record
    return dict(sorted(families.items()))


def _cell(record: dict[str, Any] | None) -> str:
    if record is None:
        return "-"
    text = f"refusal {record['refusal_rate']:.2f}"
    if record.get("harm") is not None:
        text += f", judged harm {record['harm']:.2f}"
    return text + f" (n={record.get('n', '?')}, step {record.get('step', '?')})"


def attacked_harm_rows(
    base_curves: list, immunized_curves: list, higher_is_better: bool
) -> list[tuple[str, str, str, str]]:
    """Table rows ``(condition, base, immunized, verdict)``: one per family with a hook result; the
    verdict column names the judge (these numbers are reported, not judged)."""
    rows = []
    for family, pair in attacked_harm_by_family(base_curves, immunized_curves, higher_is_better).items():
        judge = next((r.get("judge") for r in pair.values() if r and r.get("judge")), None)
        name = judge.get("name", "judge") if isinstance(judge, dict) else "no judge"
        acc = judge.get("accuracy") if isinstance(judge, dict) else None
        note = name + (f", acc {acc:.2f}" if isinstance(acc, (int, float)) else "")
        rows.append(
            (
                "after attack" if not rows else "",
                f"{family}: {_cell(pair['base'])}",
                _cell(pair["immunized"]),
                f"reported ({note})",
            )
        )
    return rows
