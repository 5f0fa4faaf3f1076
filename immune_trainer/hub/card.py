"""Model cards of immunized models, rendered from the package's Jinja template.

:func:`build_model_card` turns an :class:`~immune_trainer.report.ImmunizationReport` into a
``huggingface_hub.ModelCard``: condition badges (only for measured values), ``model-index`` eval results
(one per measured number, each tagged with a claim id in ``metric_config`` that ``verify`` re-checks),
the threat model that was tested and what was not, citations, and a reproducibility block with the
sha256 of every weight file. :func:`write_model_card` writes ``README.md``, ``badges/*.svg`` and
``attack_curves.png`` into a model folder; :func:`create_trainer_model_card` is what
``ImmunizationTrainer.create_model_card`` calls.

The single editable template is ``immune_trainer/templates/model_card.md.j2`` (package data).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from importlib import resources
from typing import Any

from .. import conditions as C
from ..errors import OutputError, ReportError
from ..report import ImmunizationReport, atomic_write
from .badges import condition_badges, write_badges
from .plots import plot_attack_curves

__all__ = [
    "PLOT_FILE",
    "REPORT_FILE",
    "WEIGHT_PATTERNS",
    "build_model_card",
    "card_hashes",
    "claims",
    "create_trainer_model_card",
    "eval_results",
    "not_tested",
    "template_path",
    "weights_sha256",
    "write_model_card",
]

REPORT_FILE = "immunization_report.json"
"""Name of the report inside a model folder."""
PLOT_FILE = "attack_curves.png"
"""Name of the attack-curve plot inside a model folder."""
WEIGHT_PATTERNS = (".safetensors", ".bin", ".pt", ".gguf")
"""File endings hashed into the reproducibility block."""

_SHA_LINE = re.compile(r"^([0-9a-f]{64})  (\S.*?)\s*$", re.MULTILINE)


def template_path() -> str:
    """Path of the packaged card template (``immune_trainer/templates/model_card.md.j2``)."""
    return str(resources.files("immune_trainer").joinpath("templates/model_card.md.j2"))


def weights_sha256(folder: str | os.PathLike) -> dict[str, str]:
    """sha256 of every weight file (``WEIGHT_PATTERNS``) under ``folder``, keyed by relative path (sorted).

    Raises:
        OutputError: a weight file cannot be read.
    """
    folder = os.fspath(folder)
    out = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.endswith(WEIGHT_PATTERNS):
                continue
            path = os.path.join(root, name)
            h = hashlib.sha256()
            try:
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
            except OSError as e:
                raise OutputError(f"cannot read weight file {path}: {e.strerror or e}.") from None
            out[os.path.relpath(path, folder).replace(os.sep, "/")] = h.hexdigest()
    return dict(sorted(out.items()))


def card_hashes(card_text: str) -> dict[str, str]:
    """The ``sha256  filename`` lines of a card's reproducibility block."""
    return {m.group(2): m.group(1) for m in _SHA_LINE.finditer(card_text)}


# --------------------------------------------------------------------------------------------------
# What the card says
# --------------------------------------------------------------------------------------------------


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def claims(report: ImmunizationReport) -> list[dict[str, Any]]:
    """Every measured number the card states, as ``{"id", "name", "value", "metric_type", "task"}``.

    ``id`` is a stable claim identifier (``resistance.worst_value``, ``stability.<set>.relative_change``...)
    stored in each eval result's ``metric_config`` so ``verify`` can find it again. Unmeasured or
    non-finite values make no claim.
    """
    c, tm = report.conditions, report.threat_model
    out: list[dict[str, Any]] = []

    def add(cid, name, value, metric_type, task):
        if _finite(value):
            out.append(
                {"id": cid, "name": name, "value": float(value), "metric_type": metric_type, "task": task}
            )

    def res(prefix, r: C.ResistanceResult | None, task):
        if r is None:
            return
        add(
            f"{prefix}.worst_value",
            f"worst {tm.scorer} over the grid (immunized)",
            r.worst_value,
            tm.scorer,
            task,
        )
        if r.worst_crossing is not None:
            add(
                f"{prefix}.crossing_step",
                "attack steps until harm crosses phi",
                r.worst_crossing.step,
                "steps",
                task,
            )
        add(
            f"{prefix}.steps_multiple",
            "attack cost multiple in steps (immunized / base)",
            r.steps_multiple,
            "ratio",
            task,
        )

    res("resistance", c.resistance, "harmful fine-tuning resistance")
    if c.generalization is not None:
        res("generalization.in_domain", c.generalization.in_domain, "in-domain generalization")
        res("generalization.cross_domain", c.generalization.cross_domain, "cross-domain generalization")
    if c.stability is not None:
        for name, s in c.stability.sets.items():
            add(
                f"stability.{name}.immunized",
                f"capability on {name} (immunized)",
                s.immunized,
                "capability",
                "stability",
            )
            add(
                f"stability.{name}.relative_change",
                f"relative capability change on {name}",
                s.relative_change,
                "relative_change",
                "stability",
            )
    t = c.trainability
    if t is not None:
        add(
            "trainability.immunized_final",
            "final benign score (immunized)",
            t.immunized_final,
            "benign_score",
            "trainability",
        )
        add(
            "trainability.immunized_steps",
            "steps to reach the benign target (immunized)",
            t.immunized_steps,
            "steps",
            "trainability",
        )
    return out


def eval_results(report: ImmunizationReport, dataset_name: str | None = None) -> list:
    """``huggingface_hub.EvalResult`` s of :func:`claims` (for the card's ``model-index``)."""
    from huggingface_hub import EvalResult

    data = report.datasets or ((report.extra.get("datasets") or {}) if isinstance(report.extra, dict) else {})
    ds = dataset_name or data.get("attack_train") or "harmful-fine-tuning-attack"
    return [
        EvalResult(
            task_type="text-generation",
            task_name=cl["task"],
            dataset_type=str(ds),
            dataset_name=str(ds),
            metric_type=cl["metric_type"],
            metric_name=cl["name"],
            metric_value=cl["value"],
            metric_config=cl["id"],
        )
        for cl in claims(report)
    ]


def _registered_attacks() -> list[str]:
    try:
        from ..attacks import ATTACKS

        return sorted(ATTACKS)
    except Exception:  # noqa: BLE001 - listing is cosmetic; never fail a card on it
        return []


def not_tested(report: ImmunizationReport) -> list[str]:
    """What the report lacks, as sentences for the card's "What was NOT tested" section."""
    c, tm = report.conditions, report.threat_model
    out = []
    if c.resistance is None:
        out.append("Resistance: no attack curves were recorded.")
    if c.generalization is None or c.generalization.in_domain is None:
        out.append("No held-out in-domain attack set (in-domain generalization unmeasured).")
    if c.generalization is None or c.generalization.cross_domain is None:
        out.append("No cross-domain attack set: harm domains other than the attack data were not tested.")
    if c.stability is None:
        out.append("Stability: capability on reference sets was not measured.")
    if c.trainability is None:
        out.append("Trainability: benign fine-tuning was not measured.")
    others = [f for f in _registered_attacks() if f != tm.attack_family]
    if "lora" in others:
        out.append("No LoRA attacks (only the attack family above was run).")
    if others:
        out.append(f"Other registered attack families: {', '.join(others)}.")
    out.append(
        "Attack families outside this library (e.g. jailbreak prompting, representation engineering, "
        "model merging, quantization) were not tested."
    )
    grid = tm.grid or {}
    lrs = grid.get("learning_rates") or []
    out.append(
        f"Attacks beyond the budget: more than {tm.max_steps} steps per run"
        + (f", learning rates above {max(lrs):g}" if lrs else "")
        + (
            f", more than {max(n for n in grid['num_samples'])} samples"
            if grid.get("num_samples") and min(grid["num_samples"]) > 0
            else ""
        )
        + "."
    )
    if len(grid.get("seeds") or []) <= 1:
        out.append("Only one seed per configuration: seed variance of the attack is unknown.")
    if tm.judge is None:
        out.append(f"No judge of generated text: harm was measured with `{tm.scorer}` only.")
    return out


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def _defense_info(name: str | None) -> tuple[str | None, str | None, dict]:
    """(name, title, paper) of a registered defense; unknown names keep just the name."""
    if not name:
        return None, None, {}
    try:
        from ..defenses import get_defense

        spec = get_defense(name)
        title = getattr(spec.trainer_class, "_name", None) or spec.name
        return spec.name, title, dict(spec.paper or {})
    except Exception:  # noqa: BLE001 - an unregistered defense still gets a card
        return name, name, {}


def _immunization_paper() -> dict:
    try:
        from ..trainer import IMMUNIZATION_PAPER

        return dict(IMMUNIZATION_PAPER)
    except Exception:  # noqa: BLE001
        return {"title": "Immunization against harmful fine-tuning attacks", "id": "2402.16382"}


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and not os.path.exists(name) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None


def _num(x: Any) -> str:
    return C._fmt(x) if _finite(x) or x is None else str(x)


def _verdict(report: ImmunizationReport) -> str:
    c = report.conditions
    if c.collapsed:
        return "NOT IMMUNIZED (collapsed)"
    return "IMMUNIZED" if c.immunized else "NOT IMMUNIZED"


def build_model_card(
    report: ImmunizationReport | None,
    *,
    folder: str | os.PathLike | None = None,
    model_name: str | None = None,
    defense: str | None = None,
    base_model: str | None = None,
    tags: list[str] | None = None,
    dataset_name: str | None = None,
    repo_id: str | None = None,
):
    """Render the card of an immunized model (nothing is written).

    Args:
        report: the evaluation of the model; ``None`` gives a card that claims nothing and has no badge.
        folder: the model folder, for the weight hashes and to link the plot when it exists there.
        model_name: heading and ``model_name`` of the model-index (default: the report's immunized model).
        defense: defense name when the report does not record one (e.g. from a trainer).
        base_model: base model id (default: the report's).
        tags: extra YAML tags (``immune-trainer`` and the defense's tag are always added).
        dataset_name: dataset named in the eval results (default: the recorded attack data).
        repo_id: Hub repo id, shown in the ``verify`` hint.

    Returns:
        A ``huggingface_hub.ModelCard``.
    """
    from huggingface_hub import ModelCard, ModelCardData

    c = None if report is None else report.conditions
    tm = None if report is None else report.threat_model
    defense = defense or (report.defense or {}).get("name") if report is not None else defense
    d_name, d_title, d_paper = _defense_info(defense)
    model_name = (
        model_name
        or (report.models.get("immunized") if report else None)
        or (os.path.basename(os.path.abspath(folder)) if folder else "immunized-model")
    )
    base_model = base_model or (report.models.get("base") if report else None)

    tag_list = ["immune-trainer", "immunization", "harmful-fine-tuning-defense"]
    if d_name:
        tag_list.append(d_name.replace("_", "-"))
    for t in tags or []:
        if t not in tag_list:
            tag_list.append(t)

    card_kwargs: dict[str, Any] = {}
    results = []
    if report is not None:
        results = eval_results(report, dataset_name)
        card_kwargs["immunization"] = {
            "verdict": _verdict(report),
            "immunized": c.immunized,
            "collapsed": c.collapsed,
            "resistance": None
            if c.resistance is None
            else (
                "strong"
                if c.resistance.strong and c.resistance.holds
                else {True: "weak", False: "fails", None: "undetermined"}[c.resistance.holds]
            ),
            "threshold": tm.threshold,
            "scorer": tm.scorer,
            "attack_family": tm.attack_family,
            "report": REPORT_FILE,
        }
    card_data = ModelCardData(
        model_name=model_name,
        base_model=base_model if _is_hub_id(base_model) else None,
        library_name="transformers",
        tags=tag_list,
        eval_results=results or None,
        **card_kwargs,
    )

    hashes = weights_sha256(folder) if folder is not None and os.path.isdir(folder) else {}
    if report is not None and report.models.get("weights_sha256") and hashes:
        recorded = report.models["weights_sha256"]
        differ = sorted(k for k in recorded if k in hashes and hashes[k] != recorded[k])
        if differ:
            raise ReportError(
                f"the weights in {folder} are not the ones the report measured ({', '.join(differ)} differ "
                "from report.models.weights_sha256): re-run the evaluation on these weights, or write the card "
                "into the folder of the measured model."
            )

    ctx: dict[str, Any] = {
        "model_name": model_name,
        "base_model": base_model,
        "defense_name": d_name,
        "defense_title": d_title,
        "has_report": report is not None,
        "report_file": REPORT_FILE,
        "repo_hint": repo_id or (os.fspath(folder) if folder else "MODEL_DIR"),
        "hashes": hashes,
        "badges": [b.markdown() for b in condition_badges(report)],
        "security_vectors_note": None,
        "plot_file": None,
        "configs": {},
        "dependencies": {},
        "library": None,
        "report_created": None,
    }
    if d_name == "security_vectors":
        ctx["security_vectors_note"] = (
            "Security Vectors protect only during fine-tuning while the security vector (a frozen LoRA "
            "adapter) is attached to the model. An attacker who fine-tunes these weights without the vector "
            "gets no protection at all, so the numbers below hold only for attacks run with the vector applied "
            "(the attack-time hook of the defense)."
        )
    papers = []
    if d_paper.get("title"):
        papers.append({"role": "Defense", **d_paper})
    papers.append({"role": "Immunization conditions", **_immunization_paper()})
    ctx["papers"] = papers

    if report is not None:
        ctx["verdict"] = _verdict(report)
        ctx["summary"] = c.summary
        ctx["table"] = report.table()
        ctx["tm"] = tm
        ctx["collapsed_note"] = (
            "stability was measured and failed: the model collapsed, so its resistance to the attack is not "
            "credited (a broken model also resists fine-tuning)."
            if c.collapsed
            else None
        )
        ctx["unmeasured"] = [
            f"{name} was not measured: no badge and no claim."
            for name, part in (
                ("Resistance", c.resistance),
                ("Stability", c.stability),
                ("Generalization", c.generalization),
                ("Trainability", c.trainability),
            )
            if part is None
        ]
        grid = tm.grid or {}
        ctx["grid_lrs"] = ", ".join(f"{x:g}" for x in grid.get("learning_rates", [])) or "not recorded"
        ctx["grid_samples"] = (
            ", ".join("all" if n == 0 else str(n) for n in grid.get("num_samples", [])) or "not recorded"
        )
        ctx["grid_seeds"] = ", ".join(str(s) for s in grid.get("seeds", [])) or "not recorded"
        last = [cv.points[-1] for cv in report.curves.get("immunized", {}).get("attack", []) if cv.points]
        ctx["budget_tokens"] = f"{max(p.tokens for p in last):,}" if last else "an unrecorded number of"
        ctx["budget_flops"] = f"{max(p.flops for p in last):.3g}" if last else "an unrecorded number of"
        ctx["direction"] = "higher is safer" if tm.higher_is_better else "lower is safer"
        if tm.judge:
            j = tm.judge
            acc = ", ".join(f"{k} {_num(v)}" for k, v in j.items() if k not in ("name",))
            ctx["judge"] = f"`{j.get('name', 'judge')}`" + (f" ({acc})" if acc else "")
        else:
            ctx["judge"] = "none (harm measured by the scorer above, not by a judge of generations)"
        ctx["phi"] = _num(tm.threshold) + "".join(
            f"; {name.replace('_', '-')} set: {_num(value)}"
            for name, value in sorted(tm.set_thresholds.items())
        )
        ctx["stability_tolerance"] = f"{tm.stability_tolerance:.0%}"
        ds = report.datasets or (report.extra.get("datasets") if isinstance(report.extra, dict) else None)
        ctx["data_specs"] = dict(ds) if isinstance(ds, dict) else {}
        ctx["not_tested"] = not_tested(report)
        ctx["library"] = (
            f"{report.library.get('name', 'immune_trainer')} {report.library.get('version', '?')}"
        )
        ctx["dependencies"] = dict(report.library.get("dependencies") or {})
        ctx["report_created"] = report.created
        configs = {}
        for key in ("attack_config", "evaluation_config"):
            if isinstance(report.extra.get(key), dict):
                configs[key] = report.extra[key]
        if report.defense and report.defense.get("config"):
            configs["defense_config"] = report.defense["config"]
        configs["threat_model"] = tm.to_dict()
        ctx["configs"] = {k: json.dumps(_jsonable(v), indent=2, sort_keys=True) for k, v in configs.items()}
        if folder is not None and os.path.exists(os.path.join(os.fspath(folder), PLOT_FILE)):
            ctx["plot_file"] = PLOT_FILE
    return ModelCard.from_template(card_data, template_path=template_path(), **ctx)


def _jsonable(x: Any) -> Any:
    from ..report import _encode

    return json.loads(json.dumps(_encode(x), default=str))


def write_model_card(
    folder: str | os.PathLike,
    report: ImmunizationReport | None = None,
    *,
    plot: bool = True,
    **kwargs: Any,
):
    """Write ``README.md``, ``badges/*.svg`` and ``attack_curves.png`` into the model ``folder``.

    ``report`` defaults to ``folder/immunization_report.json`` when it exists (and is saved there when
    given and missing, so the folder is self-contained). Other keyword arguments go to
    :func:`build_model_card`. Returns the ``ModelCard``.

    Raises:
        ReportError: the report in the folder cannot be read, or it measured other weights.
        OutputError: the folder cannot be written.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise OutputError(f"model folder {folder} does not exist: save the model there first.")
    report_path = os.path.join(folder, REPORT_FILE)
    if report is None and os.path.exists(report_path):
        report = ImmunizationReport.load(report_path)
    elif report is not None and not os.path.exists(report_path):
        report.save(report_path)
    write_badges(condition_badges(report), folder)
    plot_path = os.path.join(folder, PLOT_FILE)
    if report is not None and plot:
        if plot_attack_curves(report, plot_path) is None and os.path.exists(plot_path):
            os.unlink(plot_path)
    card = build_model_card(report, folder=folder, **kwargs)
    # Atomic (temporary file + os.replace): a failed write leaves the previous card intact.
    atomic_write(os.path.join(folder, "README.md"), str(card), what="the model card")
    return card


def create_trainer_model_card(
    trainer,
    model_name: str | None = None,
    dataset_name: str | None = None,
    tags: str | list[str] | None = None,
    report: ImmunizationReport | None = None,
):
    """``ImmunizationTrainer.create_model_card``: write the card into ``trainer.args.output_dir``.

    Like trl's trainers, only the main process writes. The defense is the registered one whose trainer
    class is the trainer's; the tags include the trainer's ``_tag_names``. Without a ``report`` (and no
    ``immunization_report.json`` in the output folder) the card claims nothing and has no badge.
    """
    if hasattr(trainer, "is_world_process_zero") and not trainer.is_world_process_zero():
        return None
    tag_list = [tags] if isinstance(tags, str) else list(tags or [])
    tag_list += [t for t in getattr(trainer, "_tag_names", []) if t not in tag_list]
    defense = None
    try:
        from ..defenses import DEFENSES

        defense = next((n for n, s in DEFENSES.items() if s.trainer_class is type(trainer)), None)
    except Exception:  # noqa: BLE001
        defense = None
    base_model = None
    config = getattr(getattr(trainer, "model", None), "config", None)
    name_or_path = getattr(config, "_name_or_path", None)
    if name_or_path and not os.path.isdir(name_or_path):
        base_model = name_or_path
    folder = trainer.args.output_dir
    os.makedirs(folder, exist_ok=True)
    return write_model_card(
        folder,
        report,
        model_name=model_name
        or getattr(trainer, "hub_model_id", None)
        or os.path.basename(os.path.abspath(folder)),
        defense=defense,
        base_model=base_model,
        tags=tag_list,
        dataset_name=dataset_name,
        repo_id=getattr(trainer, "hub_model_id", None),
    )
