"""Many immunization reports side by side: defenses x attack families.

:func:`compare_reports` reads reports (paths, model folders or :class:`ImmunizationReport` objects) and
builds a :class:`Comparison`: one cell per (defense, attack family) with the worst-case cost multiple,
the worst stability change over the reference sets, the cross-domain cost multiple and the verdict.
It writes a markdown table, a CSV (one row per report) and a heatmap of the cost multiples.

A cost multiple is only as meaningful as what it was measured against: reports whose phi, base model
or harm scorer differ from the first report's, or whose attack grid / budget differ from the first
report of the same attack family, are not silently compared: each carries a note such as
``comparable: no - different phi (2.01 vs 1.80)``, shown in every output.

    immune-trainer compare run_a/immunization_report.json run_b/ [--output_dir DIR]
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import ConfigError, OutputError
from ..files import atomic_write
from .curves import fmt_number, fmt_percent
from .report import ImmunizationReport
from .resistance import resistance_by_family

__all__ = ["Comparison", "ComparisonRow", "cmd_compare", "compare_reports"]

PHI_REL_TOL = 1e-3
"""Two phi within 0.1% of each other are the same threshold (two runs of one evaluation read phi off the
base model with float noise of this order); beyond it the reports are flagged as not comparable."""

REPORT_FILE = "immunization_report.json"
"""The report's file name inside a model folder (as written by the model card commands)."""

CSV_COLUMNS = (
    "defense",
    "attack_family",
    "report",
    "cost_multiple",
    "cost_multiple_is_lower_bound",
    "strong",
    "stability_change",
    "stability_set",
    "cross_domain_multiple",
    "verdict",
    "comparable",
    "note",
)


@dataclass
class ComparisonRow:
    """One report's numbers in the comparison (one cell of the defenses x attack families table)."""

    defense: str = field(metadata={"help": "Defense label: the report's defense name (or immunized model)."})
    attack_family: str = field(metadata={"help": "The threat model's attack family."})
    report: str = field(metadata={"help": "Where the report came from (path or label)."})
    cost_multiple: float | None = field(
        default=None,
        metadata={"help": "Worst-case steps multiple over the base model; None: not computable."},
    )
    cost_multiple_is_lower_bound: bool = field(
        default=False,
        metadata={"help": "The immunized model never crossed phi: the multiple is a lower bound."},
    )
    strong: bool = field(default=False, metadata={"help": "Strong resistance: no run crossed phi."})
    cost_multiple_interval: list[float] | None = field(
        default=None,
        metadata={"help": "Bootstrap 95% interval of the multiple (eval rows and seeds); None: no per-row harm."},
    )
    within_noise: bool = field(
        default=False,
        metadata={"help": "The multiple reaches the required one, its interval does not: not credited."},
    )
    stability_change: float | None = field(
        default=None,
        metadata={"help": "Relative capability change of the worst reference set; None: not measured."},
    )
    stability_set: str | None = field(default=None, metadata={"help": "That worst reference set."})
    cross_domain_multiple: float | None = field(
        default=None, metadata={"help": "Cost multiple of the cross-domain attack; None: not measured."}
    )
    verdict: str = field(default="", metadata={"help": "IMMUNIZED, NOT IMMUNIZED or COLLAPSED."})
    collapsed: bool = field(default=False, metadata={"help": "Stability failed: resistance not credited."})
    notes: list[str] = field(
        default_factory=list, metadata={"help": "Why this report is not comparable with the others."}
    )

    @property
    def comparable(self) -> bool:
        """Whether the report measured the same thing as the others (no mismatch note)."""
        return not self.notes

    @property
    def note(self) -> str:
        """``comparable: no - ...`` listing every mismatch, or ``""``."""
        return f"comparable: no \u2014 {'; '.join(self.notes)}" if self.notes else ""

    def cell(self) -> str:
        """The cell text: cost multiple, stability change, cross-domain multiple and verdict."""
        cost = f"cost {_multiple(self.cost_multiple, self.cost_multiple_is_lower_bound, self.strong)}"
        if self.cost_multiple_interval is not None:
            low, high = self.cost_multiple_interval
            cost += f" (95% {fmt_number(low, 3)}x..{fmt_number(high, 3)}x{', within noise' if self.within_noise else ''})"
        parts = [cost]
        stab = f"stability {fmt_percent(self.stability_change)}"
        parts.append(stab + (f" ({self.stability_set})" if self.stability_set else ""))
        parts.append(f"cross-domain {_multiple(self.cross_domain_multiple, False, False)}")
        parts.append(self.verdict)
        text = ", ".join(parts)
        return text + (" (not comparable)" if self.notes else "")


def _multiple(x: float | None, lower_bound: bool, strong: bool) -> str:
    if x is None:
        return "strong (no base crossing)" if strong else "n/a"
    return f"{'>=' if lower_bound else ''}{fmt_number(x, 3)}x"


def _num(x: float | None) -> str:
    if x is None:
        return ""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return repr(float(x))


@dataclass
class Comparison:
    """Reports side by side: rows (one per report), defenses x attack families."""

    rows: list[ComparisonRow] = field(metadata={"help": "One row per report, in the order given."})

    @property
    def defenses(self) -> list[str]:
        """Defense labels in first-seen order."""
        return list(dict.fromkeys(r.defense for r in self.rows))

    @property
    def attack_families(self) -> list[str]:
        """Attack families in first-seen order."""
        return list(dict.fromkeys(r.attack_family for r in self.rows))

    @property
    def comparable(self) -> bool:
        """Every report measured the same thing."""
        return all(r.comparable for r in self.rows)

    def get(self, defense: str, attack_family: str) -> ComparisonRow | None:
        """The row of one cell, or None."""
        return next((r for r in self.rows if r.defense == defense and r.attack_family == attack_family), None)

    def to_markdown(self) -> str:
        """A markdown table (defenses x attack families) followed by the comparability notes."""
        fams = self.attack_families
        lines = [
            "| defense | " + " | ".join(fams) + " |",
            "|---|" + "---|" * len(fams),
        ]
        for d in self.defenses:
            cells = []
            for f in fams:
                r = self.get(d, f)
                cells.append("-" if r is None else r.cell())
            lines.append(f"| {d} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append(
            "cost: worst-case attack steps to cross phi, as a multiple of the base model's; stability: "
            "relative capability change of the worst reference set; cross-domain: cost multiple of the "
            "cross-domain attack."
        )
        for r in self.rows:
            if r.notes:
                lines.append(f"- {r.report} ({r.defense}, {r.attack_family}): {r.note}")
        if self.comparable:
            lines.append("- comparable: yes (same phi, base model, scorer, and grid per attack family)")
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        """CSV text, one row per report (columns :data:`CSV_COLUMNS`; empty cell = not measured)."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        for r in self.rows:
            w.writerow(
                [
                    r.defense,
                    r.attack_family,
                    r.report,
                    _num(r.cost_multiple),
                    r.cost_multiple_is_lower_bound,
                    r.strong,
                    _num(r.stability_change),
                    r.stability_set or "",
                    _num(r.cross_domain_multiple),
                    r.verdict,
                    "yes" if r.comparable else "no",
                    r.note,
                ]
            )
        return buf.getvalue()

    def heatmap(self, path: str | os.PathLike) -> str:
        """A PNG heatmap of the cost multiples (log scale colour, annotated; collapsed cells hatched and
        marked, non-comparable ones starred). Returns the path."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        import numpy as np

        defs, fams = self.defenses, self.attack_families
        values = np.full((len(defs), len(fams)), np.nan)
        for i, d in enumerate(defs):
            for j, f in enumerate(fams):
                r = self.get(d, f)
                # A collapsed model's multiple is not credited: its cell stays grey (and hatched below).
                if r is not None and not r.collapsed and r.cost_multiple is not None and r.cost_multiple > 0:
                    values[i, j] = math.log2(min(r.cost_multiple, 1e6))
        fig, ax = plt.subplots(figsize=(2.2 + 1.8 * len(fams), 1.2 + 0.7 * len(defs)))
        finite = values[np.isfinite(values)]
        lim = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
        cmap = plt.get_cmap("RdYlGn").with_extremes(bad="#dddddd")
        im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=-lim, vmax=lim, aspect="auto")
        for i, d in enumerate(defs):
            for j, f in enumerate(fams):
                r = self.get(d, f)
                if r is None:
                    text = "-"
                else:
                    text = _multiple(r.cost_multiple, r.cost_multiple_is_lower_bound, r.strong)
                    text = text.replace(" (no base crossing)", "")
                    if r.collapsed:
                        text += "\ncollapsed"
                        ax.add_patch(
                            plt.Rectangle(
                                (j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", edgecolor="#888888", lw=0
                            )
                        )
                    if r.notes:
                        text += " *"
                box = {"boxstyle": "round,pad=0.2", "facecolor": "white", "alpha": 0.8, "lw": 0}
                ax.text(j, i, text, ha="center", va="center", fontsize=9, bbox=None if r is None else box)
        ax.set_xticks(range(len(fams)), fams)
        ax.set_yticks(range(len(defs)), defs)
        ax.set_xlabel("attack family")
        title = "worst-case cost multiple (attack steps vs base)"
        if not self.comparable:
            title += "\n* not comparable: see the notes"
        ax.set_title(title, fontsize=10)
        cbar = fig.colorbar(im, ax=ax)
        cbar.set_label("log2 cost multiple")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120)
        plt.close(fig)
        return atomic_write(path, buf.getvalue(), what="the comparison heatmap")

    def save(self, output_dir: str | os.PathLike) -> dict[str, str]:
        """Write ``comparison.md``, ``comparison.csv`` and ``comparison.png`` to ``output_dir``.

        Raises:
            OutputError: the folder cannot be created or written.
        """
        output_dir = os.fspath(output_dir)
        try:
            os.makedirs(output_dir, exist_ok=True)
        except OSError as e:
            raise OutputError(
                f"cannot create {output_dir}: {e.strerror or e}. Choose a writable location."
            ) from None
        return {
            "markdown": atomic_write(os.path.join(output_dir, "comparison.md"), self.to_markdown()),
            "csv": atomic_write(os.path.join(output_dir, "comparison.csv"), self.to_csv()),
            "heatmap": self.heatmap(os.path.join(output_dir, "comparison.png")),
        }


def _load(item: Any, i: int) -> tuple[ImmunizationReport, str]:
    if isinstance(item, ImmunizationReport):
        return item, f"report {i + 1}"
    if isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        if os.path.isdir(path):
            path = os.path.join(path, REPORT_FILE)
        return ImmunizationReport.load(path), os.fspath(item)
    raise ConfigError(
        f"compare_reports: item {i} is a {type(item).__name__}; give report paths, model folders or "
        "ImmunizationReport objects."
    )


def _defense_label(report: ImmunizationReport) -> str:
    name = (report.defense or {}).get("name")
    return str(name) if name else str(report.models.get("immunized", "?"))


def _rows(report: ImmunizationReport, source: str) -> list[ComparisonRow]:
    """One row per attack family of the report's main grid (a suite of families gives several), each with
    that family's worst-case cost multiple; stability, cross-domain and verdict are the report's."""
    tm = report.threat_model
    curves = report.curves.get("immunized", {}).get("attack", [])
    families = list(dict.fromkeys(c.config.get("family", "full") for c in curves))
    row = _row(report, source)
    if len(families) <= 1:
        return [row]
    base_curves = report.curves.get("base", {}).get("attack", [])
    judged = report.conditions.resistance
    if judged is not None and judged.families:
        # The report's own per-family judgement (schema 1.2); families the base was not attacked with are left out.
        attacked = {c.config.get("family", "full") for c in base_curves}
        by_family = {f.family: f for f in judged.families if f.family in attacked}
    else:  # a report of an older schema: judge its curves family by family now
        by_family = resistance_by_family(
            curves,
            tm.threshold,
            higher_is_better=tm.higher_is_better,
            base_curves=base_curves,
            min_cost_multiple=tm.min_cost_multiple,
        )
    rows = []
    for family, r in by_family.items():
        rows.append(
            replace(
                row,
                attack_family=family,
                cost_multiple=r.steps_multiple,
                cost_multiple_is_lower_bound=r.multiple_is_lower_bound,
                strong=r.strong,
                cost_multiple_interval=getattr(r, "multiple_interval", None),
                within_noise=bool(getattr(r, "within_noise", False)),
            )
        )
    return rows


def _row(report: ImmunizationReport, source: str) -> ComparisonRow:
    c = report.conditions
    r = c.resistance
    stab = c.stability
    worst_set = None if stab is None else stab.worst_set
    cross = None if c.generalization is None else c.generalization.cross_domain
    verdict = "COLLAPSED" if c.collapsed else ("IMMUNIZED" if c.immunized else "NOT IMMUNIZED")
    worst = None if r is None else next((f for f in r.families if f.family == r.worst_family), None)
    return ComparisonRow(
        defense=_defense_label(report),
        attack_family=report.threat_model.attack_family,
        report=source,
        cost_multiple=None if r is None else r.steps_multiple,
        cost_multiple_is_lower_bound=bool(r is not None and r.multiple_is_lower_bound),
        strong=bool(r is not None and r.strong),
        cost_multiple_interval=None if worst is None else worst.multiple_interval,
        within_noise=bool(worst is not None and worst.within_noise),
        stability_change=None if worst_set is None else stab.sets[worst_set].relative_change,
        stability_set=worst_set,
        cross_domain_multiple=None if cross is None else cross.steps_multiple,
        verdict=verdict,
        collapsed=c.collapsed,
    )


def _measure_differences(report: ImmunizationReport, ref: ImmunizationReport) -> list[str]:
    """What makes ``report``'s numbers incomparable with ``ref``'s whatever the attack: phi, scorer, base."""
    out = []
    tm, rt = report.threat_model, ref.threat_model
    if not math.isclose(tm.threshold, rt.threshold, rel_tol=PHI_REL_TOL, abs_tol=1e-12):
        out.append(f"different phi ({fmt_number(tm.threshold, 6)} vs {fmt_number(rt.threshold, 6)})")
    if tm.scorer != rt.scorer or tm.higher_is_better != rt.higher_is_better:
        out.append(f"different scorer ({tm.scorer} vs {rt.scorer})")
    if report.models.get("base") != ref.models.get("base"):
        out.append(f"different base model ({report.models.get('base')} vs {ref.models.get('base')})")
    return out


def _search_settings(report: ImmunizationReport) -> dict | None:
    """A calibrated report's search, as configured (space, trials, seeds, budget, cap), without its results;
    None for a fixed grid or another search."""
    search = report.search or {}
    if search.get("kind") != "calibrated":
        return None
    return {k: v for k, v in search.items() if k != "sets"}


def _grid_differences(report: ImmunizationReport, ref: ImmunizationReport) -> list[str]:
    """Within one attack family: a different grid, search or budget measures a different attacker."""
    out = []
    tm, rt = report.threat_model, ref.threat_model
    search, ref_search = _search_settings(report), _search_settings(ref)
    if search is not None or ref_search is not None:
        # A calibrated attack searches each model for its own winner: its grid is the union of the winners,
        # which differ from model to model under the same attacker. The search's settings are the attacker.
        if search != ref_search:
            what = "a calibrated search vs a fixed grid" if None in (search, ref_search) else (
                f"{search} vs {ref_search}"
            )
            out.append(f"different attack search ({what})")
    else:
        # The grid's top-level max_steps lists every run length, including runs extended past the budget
        # to decide a claim: the same attacker, measured longer. The budget itself is compared below.
        grid, ref_grid = ({k: v for k, v in g.items() if k != "max_steps"} for g in (tm.grid or {}, rt.grid or {}))
        if grid != ref_grid:
            out.append(f"different attack grid ({tm.grid} vs {rt.grid})")
    if tm.max_steps != rt.max_steps:
        out.append(f"different attack budget ({tm.max_steps} vs {rt.max_steps} steps)")
    return out


def compare_reports(reports: Sequence[str | os.PathLike | ImmunizationReport]) -> Comparison:
    """Read ``reports`` (report files, model folders holding ``immunization_report.json``, or
    :class:`ImmunizationReport` objects) and put them side by side.

    The first report is the reference for phi, base model and harm scorer; the first report of each
    attack family is the reference for that family's grid and budget. Differences become notes on the
    offending rows (``comparable: no - different phi (2.01 vs 1.80)``).

    Raises:
        ConfigError: no reports, or an item of an unsupported type.
        ReportError: a path holds no report or an invalid one (the message names the path).
    """
    if isinstance(reports, (str, os.PathLike, ImmunizationReport)):
        reports = [reports]
    if not reports:
        raise ConfigError("compare_reports needs at least one report.")
    loaded = [_load(item, i) for i, item in enumerate(reports)]
    ref = loaded[0][0]
    family_ref: dict[str, ImmunizationReport] = {}
    rows = []
    for report, source in loaded:
        for row in _rows(report, source):
            fam = row.attack_family
            row.notes = _measure_differences(report, ref)
            if fam in family_ref:
                row.notes += _grid_differences(report, family_ref[fam])
            else:
                family_ref[fam] = report
            rows.append(row)
    # Two reports of the same defense and family: keep both, told apart by their source.
    seen: dict[tuple[str, str], int] = {}
    for row in rows:
        key = (row.defense, row.attack_family)
        seen[key] = seen.get(key, 0) + 1
    for row in rows:
        if seen[(row.defense, row.attack_family)] > 1:
            row.defense = f"{row.defense} ({row.report})"
    return Comparison(rows=rows)


def cmd_compare(argv: list[str]) -> int:
    """``immune-trainer compare REPORT... [--output_dir DIR]``: print the table, write md/CSV/PNG."""
    parser = argparse.ArgumentParser(
        prog="immune-trainer compare",
        description="Put immunization reports side by side (defenses x attack families).",
    )
    parser.add_argument("reports", nargs="+", help="Report JSON files or model folders holding one.")
    parser.add_argument(
        "--output_dir", default=None, help="Write comparison.md, comparison.csv and comparison.png here."
    )
    args = parser.parse_args(argv)
    comparison = compare_reports(args.reports)
    print(comparison.to_markdown())
    if args.output_dir:
        for kind, path in comparison.save(args.output_dir).items():
            print(f"wrote {kind}: {path}")
    return 0
