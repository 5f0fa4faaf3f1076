"""Every defense ranked under one attack: a leaderboard read from immunization reports.

:func:`leaderboard_from_reports` reads one report per defense (all measured on the same base model, data,
phi and attack: :func:`~immune_trainer.conditions.compare.compare_reports` flags any report that is not)
and ranks them. One row per defense:

* the cost multiple of each attack family of the resistance grid (or search), as the report judged it
  (a lower bound is shown ``>=``; a family whose base model never reached phi is "undetermined");
* the worst case over those families, the number the ranking reads first after the verdict;
* the in-domain and cross-domain multiples, the stability change of the worst reference set, the
  helpfulness rows when the report has them, trainability, the verdict and the defense's training time.

Ranking: IMMUNIZED before NOT IMMUNIZED before COLLAPSED (a collapsed model is never credited), then the
worst-case multiple (undetermined and unmeasured families count as no resistance: nothing is credited
that no run showed), then the smaller stability degradation. The order is a reading aid; every number
beside it is the report's own.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..files import atomic_write
from .compare import Comparison, compare_reports
from .curves import fmt_number, fmt_percent
from .report import ImmunizationReport
from .schema import FamilyResistance, ResistanceResult

__all__ = ["Leaderboard", "LeaderboardRow", "leaderboard_from_reports"]


@dataclass
class FamilyCell:
    """One attack family's judgement in a leaderboard row."""

    multiple: float | None
    lower_bound: bool = False
    strong: bool = False
    undetermined: bool = False

    def text(self) -> str:
        if self.undetermined:
            return "undetermined"
        if self.multiple is None:
            return "strong" if self.strong else "n/a"
        return f"{'>=' if self.lower_bound else ''}{fmt_number(self.multiple, 3)}x"

    def credited(self) -> float:
        """What the ranking reads: the multiple (a bound counts as its value), 0 when nothing was shown."""
        if self.undetermined or self.multiple is None or not math.isfinite(self.multiple):
            return math.inf if (self.strong and not self.undetermined and self.multiple is None) else 0.0
        return float(self.multiple)


@dataclass
class LeaderboardRow:
    """One defense's numbers, as its report gives them."""

    defense: str
    report: str
    verdict: str
    families: dict[str, FamilyCell] = field(default_factory=dict)
    in_domain: FamilyCell | None = None
    cross_domain: FamilyCell | None = None
    stability_change: float | None = None
    stability_set: str | None = None
    stability_holds: bool | None = None
    helpfulness: dict[str, str] = field(default_factory=dict)
    trainability_holds: bool | None = None
    defense_time_s: float | None = None
    searched: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def worst_family(self) -> str | None:
        if not self.families:
            return None
        return min(self.families, key=lambda f: self.families[f].credited())

    @property
    def worst_case(self) -> float:
        """The smallest credited multiple over the families (0 without any)."""
        return min((c.credited() for c in self.families.values()), default=0.0)

    def rank_key(self) -> tuple:
        order = {"IMMUNIZED": 0, "NOT IMMUNIZED": 1, "COLLAPSED": 2}
        degradation = self.stability_change if self.stability_change is not None else math.inf
        return (order.get(self.verdict, 3), -self.worst_case, abs(degradation), self.defense)


def _cell(result: FamilyResistance | ResistanceResult | None) -> FamilyCell | None:
    """The cell of one attack family's judgement (a :class:`FamilyResistance`) or of a resistance judged as
    a whole (a :class:`ResistanceResult`: a report of one family, the in- and cross-domain attacks).

    Undetermined: the base model never crossed phi, so no multiple and no strong resistance was shown;
    except for a training-free family (only a :class:`FamilyResistance` has ``training_free``), judged on
    step 0 alone, which shows no multiple ("n/a")."""
    if result is None:
        return None
    undetermined = (
        result.base_crossing is None
        and result.steps_multiple is None
        and not result.strong
        and not getattr(result, "training_free", False)
    )
    return FamilyCell(
        multiple=result.steps_multiple,
        lower_bound=bool(result.multiple_is_lower_bound),
        strong=bool(result.strong),
        undetermined=undetermined,
    )


# (label of the column, key of the measured rate in the report's helpfulness block, key of its verdict)
_HELPFULNESS_ROWS = (
    ("over_refusal", "over_refusal_rate", "over_refusal_holds"),
    ("generated_exact_match", "exact_match", "exact_match_holds"),
)


def _helpfulness(report: ImmunizationReport) -> dict[str, str]:
    """Stability's helpfulness rows (benign over-refusal and generated exact match, base -> immunized, and
    whether each holds) when the report measured them: a model that refuses benign requests is not stable,
    whatever its perplexity."""
    block = report.helpfulness or {}
    base, immunized = block.get("base") or {}, block.get("immunized") or {}
    out: dict[str, str] = {}
    for label, key, holds in _HELPFULNESS_ROWS:
        if base.get(key) is not None and immunized.get(key) is not None:
            out[label] = f"{fmt_number(base[key], 3)} -> {fmt_number(immunized[key], 3)} {_yes(block.get(holds))}"
    return out


def _defense_time(report: ImmunizationReport) -> float | None:
    extra = report.extra or {}
    for source in (extra.get("leaderboard", {}), extra.get("demo", {}).get("timings_s", {})):
        value = source.get("defense_s") if isinstance(source, dict) else None
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
    return None


def _row(report: ImmunizationReport, source: str, comparison_notes: list[str]) -> LeaderboardRow:
    c = report.conditions
    verdict = "COLLAPSED" if c.collapsed else ("IMMUNIZED" if c.immunized else "NOT IMMUNIZED")
    name = (report.defense or {}).get("name") or str(report.models.get("immunized", "?"))
    row = LeaderboardRow(defense=str(name), report=source, verdict=verdict, notes=list(comparison_notes))
    r = c.resistance
    if r is not None:
        for fam in r.families or []:
            row.families[fam.family] = _cell(fam)
        if not row.families:  # a report of one family, judged as a whole
            cell = _cell(r)
            if cell is not None:
                row.families[report.threat_model.attack_family] = cell
    g = c.generalization
    if g is not None:
        row.in_domain = _cell(g.in_domain)
        row.cross_domain = _cell(g.cross_domain)
    stab = c.stability
    if stab is not None:
        row.stability_holds = bool(stab.holds)
        if stab.worst_set is not None:
            row.stability_set = stab.worst_set
            row.stability_change = stab.sets[stab.worst_set].relative_change
    row.helpfulness = _helpfulness(report)
    if c.trainability is not None:
        row.trainability_holds = bool(c.trainability.holds)
    row.defense_time_s = _defense_time(report)
    row.searched = bool(
        (report.extra or {}).get("attack_search") or getattr(report.threat_model, "search", None)
    )
    return row


def _yes(x: bool | None) -> str:
    return "-" if x is None else ("holds" if x else "FAILS")


@dataclass
class Leaderboard:
    """Defenses ranked under one attack (see the module docstring); ``comparison`` is the cell grid of
    :func:`~immune_trainer.conditions.compare.compare_reports` (its heatmap is the leaderboard's figure)."""

    rows: list[LeaderboardRow]
    comparison: Comparison

    @property
    def families(self) -> list[str]:
        return list(dict.fromkeys(f for r in self.rows for f in r.families))

    def to_markdown(self) -> str:
        fams = self.families
        helpful_keys = list(dict.fromkeys(k for r in self.rows for k in r.helpfulness))
        head = (
            ["rank", "defense", "verdict", "worst case"]
            + fams
            + ["in-domain", "cross-domain", "stability (worst set)"]
            + [k.replace("_", " ") for k in helpful_keys]
            + ["trainability", "defense time"]
        )
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for i, r in enumerate(self.rows, 1):
            worst = r.worst_family
            worst_text = "-" if worst is None else f"{r.families[worst].text()} ({worst})"
            stab = "-"
            if r.stability_change is not None:
                stab = f"{fmt_percent(r.stability_change)} ({r.stability_set}) {_yes(r.stability_holds)}"
            cells = (
                [str(i), r.defense + (" (not comparable)" if r.notes else ""), r.verdict, worst_text]
                + [r.families[f].text() if f in r.families else "-" for f in fams]
                + [
                    r.in_domain.text() if r.in_domain else "-",
                    r.cross_domain.text() if r.cross_domain else "-",
                    stab,
                ]
                + [r.helpfulness.get(k, "-") for k in helpful_keys]
                + [
                    _yes(r.trainability_holds),
                    "-" if r.defense_time_s is None else f"{r.defense_time_s:.0f} s",
                ]
            )
            lines.append("| " + " | ".join(cells) + " |")
        notes = [f"- {r.defense}: comparable: no \u2014 {'; '.join(r.notes)}" for r in self.rows if r.notes]
        return "\n".join(lines + ([""] + notes if notes else []))

    def to_csv(self) -> str:
        fams = self.families
        helpful_keys = list(dict.fromkeys(k for r in self.rows for k in r.helpfulness))
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(
            ["rank", "defense", "verdict", "worst_case_multiple", "worst_family"]
            + [f"{f}_multiple" for f in fams]
            + ["in_domain_multiple", "cross_domain_multiple", "stability_change", "stability_set"]
            + helpful_keys
            + ["trainability_holds", "defense_time_s", "comparable", "report"]
        )
        for i, r in enumerate(self.rows, 1):
            writer.writerow(
                [i, r.defense, r.verdict, repr(r.worst_case), r.worst_family or ""]
                + [r.families[f].text() if f in r.families else "" for f in fams]
                + [
                    r.in_domain.text() if r.in_domain else "",
                    r.cross_domain.text() if r.cross_domain else "",
                    "" if r.stability_change is None else repr(float(r.stability_change)),
                    r.stability_set or "",
                ]
                + [r.helpfulness.get(k, "") for k in helpful_keys]
                + [
                    "" if r.trainability_holds is None else str(r.trainability_holds),
                    "" if r.defense_time_s is None else f"{r.defense_time_s:.1f}",
                    str(not r.notes),
                    r.report,
                ]
            )
        return buf.getvalue()

    def save(self, output_dir: str | os.PathLike) -> dict[str, str]:
        """Write ``leaderboard.md``, ``leaderboard.csv`` and the heatmap ``leaderboard.png``."""
        out = os.fspath(output_dir)
        os.makedirs(out, exist_ok=True)
        paths = {"markdown": os.path.join(out, "leaderboard.md"), "csv": os.path.join(out, "leaderboard.csv")}
        atomic_write(paths["markdown"], self.to_markdown() + "\n")
        atomic_write(paths["csv"], self.to_csv())
        try:
            paths["heatmap"] = self.comparison.heatmap(os.path.join(out, "leaderboard.png"))
        except Exception as err:  # matplotlib missing must not lose the tables
            paths["heatmap_error"] = str(err)
        return paths


def leaderboard_from_reports(reports: Sequence[str | os.PathLike | ImmunizationReport]) -> Leaderboard:
    """Rank the defenses of ``reports`` (report files, model folders or reports); see the module docstring.

    Raises:
        ConfigError: no reports, or two reports of the same defense (rank one report per defense).
    """
    if isinstance(reports, (str, os.PathLike, ImmunizationReport)):
        reports = [reports]
    if not reports:
        raise ConfigError("a leaderboard needs at least one report.")
    comparison = compare_reports(reports)
    rows = []
    seen: dict[str, str] = {}
    for i, item in enumerate(reports):
        if isinstance(item, ImmunizationReport):
            report, source = item, f"report {i + 1}"
        else:
            path = os.fspath(item)
            if os.path.isdir(path):
                path = os.path.join(path, "immunization_report.json")
            report, source = ImmunizationReport.load(path), os.fspath(item)
        notes = sorted({n for row in comparison.rows if row.report == source for n in row.notes})
        row = _row(report, source, notes)
        if row.defense in seen:
            raise ConfigError(
                f"two reports of defense {row.defense!r} ({seen[row.defense]} and {source}): a leaderboard "
                "ranks one report per defense; compare several runs of one defense with immune-trainer compare."
            )
        seen[row.defense] = source
        rows.append(row)
    rows.sort(key=LeaderboardRow.rank_key)
    return Leaderboard(rows=rows, comparison=comparison)
