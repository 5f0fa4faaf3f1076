"""What a sweep measured and wrote: each trial's :class:`TrialOutcome`, the :class:`SweepResult`, and the
files of the study (the trial table, the resistance-vs-stability frontier plot, best.yaml)."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

from ..conditions.report import ImmunizationReport
from ..files import atomic_write
from .config import ImmunizeArguments

logger = logging.getLogger(__name__)

#: What ranks the trials while the study searches (stated in every trial's record and report).
SCREENING_ATTACK = "screening attack: the fixed grid (one picked setting per family, not searched)"
#: What re-measures the best trials before the sweep chooses (``SweepConfig.confirm_top_k`` > 0).
CONFIRMATION_ATTACK = "calibrated attack (each training family searched per model, winners on >= 2 seeds)"


@dataclass
class TrialOutcome:
    """What one trial measured (also stored in the trial's Optuna user attributes)."""

    cost_multiple: float | None = field(
        default=None, metadata={"help": "Worst-case attack-cost multiple in steps over the families."}
    )
    family_multiples: dict[str, float | None] = field(
        default_factory=dict,
        metadata={"help": "Cost multiple of each attack family (None: it could not be judged; see notes)."},
    )
    lower_bound: bool = field(
        default=False, metadata={"help": "cost_multiple is a lower bound (a run that never crossed phi)."}
    )
    stability_degradation: float | None = field(
        default=None, metadata={"help": "Worst relative capability degradation over the reference sets."}
    )
    feasible: bool | None = field(default=None, metadata={"help": "Stability within tolerance."})
    pruned: bool = field(default=False, metadata={"help": "Stopped after the fastest attack."})
    report: str | None = field(default=None, metadata={"help": "Path of the trial's report."})
    notes: list[str] = field(default_factory=list, metadata={"help": "How the numbers were read."})
    attack: str = field(
        default=SCREENING_ATTACK, metadata={"help": "The attack these numbers were measured under."}
    )
    model_fingerprint: str | None = field(
        default=None,
        metadata={
            "help": "Fingerprint of the trial's immunized weights (a confirmation retrains and compares)."
        },
    )


@dataclass
class SweepResult:
    """The study and the files a sweep wrote."""

    study: Any = field(metadata={"help": "The optuna.Study."})
    best_trial: Any = field(metadata={"help": "Best feasible FrozenTrial (None if no feasible trial)."})
    pareto_front: list = field(metadata={"help": "Feasible non-dominated FrozenTrials."})
    table_path: str = field(metadata={"help": "Markdown table of every trial."})
    csv_path: str = field(metadata={"help": "CSV table of every trial."})
    pareto_path: str = field(metadata={"help": "Pareto front JSON."})
    plot_path: str | None = field(metadata={"help": "Resistance-vs-stability frontier PNG."})
    best_config_path: str | None = field(metadata={"help": "best.yaml for `immune-trainer immunize`."})
    best_report_path: str | None = field(metadata={"help": "Report of the best trial."})
    table: str = field(default="", metadata={"help": "The table as text."})
    chosen_by: str = field(
        default="screening",
        metadata={"help": "The attack whose measurement chose best_trial: 'calibrated' or 'screening'."},
    )
    choice: str = field(default="", metadata={"help": "How best_trial was chosen, in one sentence."})
    confirmations: list = field(
        default_factory=list,
        metadata={
            "help": "One dict per confirmed trial: its numbers under the calibrated attack and, under 'screening', "
            "under the screening attack (see DefenseSweep.confirm)."
        },
    )


def _family_multiple(report: ImmunizationReport) -> tuple[float | None, bool, str | None]:
    """The report's worst-case cost multiple in steps (the worst attack family's, as the verdict reads it),
    whether it is a lower bound (a run that never crossed), and a note when it cannot rank the trial."""
    r = report.conditions.resistance
    if r is None:
        return None, False, "resistance not measured"
    if r.holds is False and r.steps_multiple is None:
        return 0.0, False, f"{r.worst_family}: easier to attack than the base (the base never crossed phi)"
    if r.steps_multiple is None:
        return None, False, f"undetermined: {r.worst_family}: phi never reached by the base model"
    note = (
        f"{r.worst_family}: a lower bound (a run stopped before crossing)"
        if r.multiple_is_lower_bound
        else None
    )
    return float(r.steps_multiple), bool(r.multiple_is_lower_bound), note


def _candidates(feasible, k: int) -> list:
    """The ``k`` best feasible trials of the screening: highest worst-case multiple first, then the smaller
    stability change, then the earlier trial."""

    def key(t):
        multiple = _num(t.user_attrs.get("cost_multiple"), -math.inf)
        degradation = _num(t.user_attrs.get("stability_degradation"), math.inf)
        return (
            -(multiple if not math.isnan(multiple) else -math.inf),
            degradation if not math.isnan(degradation) else math.inf,
            t.number,
        )

    return sorted(feasible, key=key)[:k]


def _confirmed_rank(rec: dict[str, Any]) -> tuple[float, bool, float]:
    """How confirmed trials are ranked: the worst-case multiple under the calibrated attack (a lower bound
    counts as its bound, an undetermined family as 0x), then a decided claim over an undecided one, then the
    smaller stability change."""
    multiple = _num(rec.get("cost_multiple"), 0.0)
    degradation = _num(rec.get("stability_degradation"), math.inf)
    return (
        multiple if not math.isnan(multiple) else 0.0,
        bool(rec.get("decided")),
        -(degradation if not math.isnan(degradation) else math.inf),
    )


def _is_dominated(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """a (cost multiple up, degradation down) is dominated by b."""
    return b[0] >= a[0] and b[1] <= a[1] and b != a


def trial_setting(trial, space: dict[str, Any]) -> dict[str, Any]:
    """A finished trial's full setting: its searched parameters and the space's fixed values."""
    return {n: trial.params[n] if isinstance(s, dict) else s for n, s in space.items()}


def _num(x, default: float = math.nan) -> float:
    return default if x is None else float(x)


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * float(x):+.2f}%"


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


# ---------------------------------------------------------------------------- outputs


def _trial_dict(t) -> dict[str, Any]:
    """A finished trial as the Pareto front JSON lists it."""
    return {
        "number": t.number,
        "params": dict(t.params),
        "cost_multiple": t.user_attrs.get("cost_multiple"),
        "family_multiples": t.user_attrs.get("family_multiples"),
        "stability_degradation": t.user_attrs.get("stability_degradation"),
        "feasible": t.user_attrs.get("feasible"),
        "report": t.user_attrs.get("report"),
    }


def _trial_table(
    trials, front: set[int], best, confirmations: list[dict[str, Any]] | None = None
) -> tuple[str, list[dict[str, Any]]]:
    """Every trial as a markdown table, and its rows (for the CSV). The screening's columns come first;
    with ``confirmations``, each confirmed trial's numbers under the calibrated attack follow."""
    names = list(dict.fromkeys(k for t in trials for k in t.params))
    confirmed = {c["trial"]: c for c in confirmations or []}
    rows = []
    for t in trials:
        attrs = t.user_attrs
        feasible = attrs.get("feasible")
        row = {
            "trial": t.number,
            "state": t.state.name.lower(),
            "cost_multiple": (">= " if attrs.get("lower_bound") else "") + _fmt(attrs.get("cost_multiple")),
            "stability_change": _pct(attrs.get("stability_degradation")),
            "feasible": "" if feasible is None else ("yes" if feasible else "no"),
            "pareto": "yes" if t.number in front else "",
            "best": "*" if best is not None and t.number == best.number else "",
        }
        for fam, m in (attrs.get("family_multiples") or {}).items():
            row[f"x_{fam}"] = "undetermined" if m is None else _fmt(m)
        if confirmations:
            c = confirmed.get(t.number)
            row["calibrated_multiple"] = "" if c is None else _confirmed_multiple(c)
            row["calibrated_stability_change"] = "" if c is None else _pct(c.get("stability_degradation"))
            row["calibrated_feasible"] = "" if c is None else ("yes" if c.get("feasible") else "no")
        row.update({n: _fmt(t.params[n]) if n in t.params else "" for n in names})
        rows.append(row)
    heads = list(dict.fromkeys(k for r in rows for k in r)) or ["trial"]
    rows = [{h: r.get(h, "") for h in heads} for r in rows]
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
    lines += ["| " + " | ".join(str(r[h]) for h in heads) + " |" for r in rows]
    return "\n".join(lines), rows


def _confirmed_multiple(c: dict[str, Any]) -> str:
    if c.get("cost_multiple") is None:
        return "undetermined"
    text = (">= " if c.get("lower_bound") else "") + _fmt(_num(c.get("cost_multiple")))
    return text + ("" if c.get("decided") else " (undecided)")


def _plot_frontier(out: Path, complete, front, best, evaluation, defense: str) -> str | None:
    """Resistance vs stability: every completed trial, feasible vs infeasible, the Pareto front and the
    tolerance line. ``None`` (nothing written) without matplotlib or without completed trials."""
    pts = [
        (
            t,
            100 * _num(t.user_attrs.get("stability_degradation")),
            _num(t.user_attrs.get("cost_multiple"), -1),
        )
        for t in complete
        if t.user_attrs.get("stability_degradation") is not None
        and t.user_attrs.get("cost_multiple") is not None
    ]
    if not pts:
        return None
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed: no frontier plot (pip install immune-trainer[demo]).")
        return None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    finite = [y for _, _, y in pts if math.isfinite(y)]
    cap = (max(finite) * 1.2 if finite else 1.0) or 1.0
    fig, ax = plt.subplots(figsize=(6, 4.2))
    try:
        for ok, marker, color, label in (
            (True, "o", "tab:blue", "feasible"),
            (False, "x", "tab:red", "infeasible"),
        ):
            sel = [(x, min(y, cap)) for t, x, y in pts if bool(t.user_attrs.get("feasible")) == ok]
            if sel:
                ax.scatter([x for x, _ in sel], [y for _, y in sel], marker=marker, color=color, label=label)
        if front:
            fx = [100 * _num(t.user_attrs.get("stability_degradation")) for t in front]
            fy = [min(_num(t.user_attrs.get("cost_multiple")), cap) for t in front]
            ax.step(fx, fy, where="post", color="tab:green", linewidth=1.2, label="Pareto front")
        if best is not None:
            ax.scatter(
                [100 * _num(best.user_attrs.get("stability_degradation"))],
                [min(_num(best.user_attrs.get("cost_multiple")), cap)],
                s=160,
                facecolors="none",
                edgecolors="black",
                label=f"best (trial {best.number})",
            )
        tol = 100 * evaluation.stability_tolerance
        ax.axvline(tol, color="black", linestyle=":", linewidth=1, label=f"stability tolerance {tol:g}%")
        ax.axhline(
            evaluation.min_cost_multiple,
            color="grey",
            linestyle="--",
            linewidth=0.8,
            label=f"weak resistance {evaluation.min_cost_multiple:g}x",
        )
        ax.set_xlabel("worst stability change (% capability degradation)")
        ax.set_ylabel("worst-case attack-cost multiple (steps)")
        ax.set_title(f"{defense} sweep: resistance vs stability ({len(pts)} trials)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / "frontier.png"
        tmp = out / ".frontier.png.tmp"
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
    return str(path)


def _write_best_yaml(
    out: Path, best, *, defense: str, space, data_specs, defense_args, study_name: str, choice: str = ""
) -> str:
    """best.yaml: the defense, the data and every config field the best trial used, in the shape
    ``immune-trainer immunize --config best.yaml`` accepts."""
    import yaml

    params = trial_setting(best, space)
    # Only what `immunize` takes: its data options (model, dataset, retain_dataset...), never the defense.
    options = {f.name for f in dataclass_fields(ImmunizeArguments)} - {"defense"}
    body: dict[str, Any] = {"defense": defense}
    body.update({k: v for k, v in data_specs.items() if v is not None and k in options})
    body["output_dir"] = str(out / "best_model")
    body.update(defense_args)
    body.update(params)
    header = (
        f"# immune-trainer sweep: best trial {best.number} of study {study_name!r}\n"
        f"# worst-case attack-cost multiple {_fmt(best.user_attrs.get('cost_multiple'))}x, stability change "
        f"{_pct(best.user_attrs.get('stability_degradation'))} (screening attack)\n"
        + (f"# {choice}\n" if choice else "")
        + "# train it: immune-trainer immunize --config best.yaml\n"
    )
    path = out / "best.yaml"
    atomic_write(path, header + yaml.safe_dump(_json_safe(body), sort_keys=False))
    return str(path)
