"""``immune-trainer verify``: re-measure a model card's claims from its weights.

Steps: read the card (``README.md``) and the report beside it; hash the weight files and compare them
with the card's reproducibility block; reload the weights (safetensors only); re-run the recorded attack
(every grid configuration, or ``sample`` of them) with the recorded seeds and settings on the recorded
data (``report.extra["attack_config"]`` and ``report.datasets``, dataset SPECs with ``split_seed`` and
``eval_limit``; reports that kept them in ``extra["datasets"]`` are read too); print each claim beside
its re-measured value.

Tolerance: a number passes when ``|claimed - measured| <= abs_tol`` (default 0.05, on f's scale)
**or** ``<= rel_tol * |claimed|`` (default 5%). The same rule applies to step counts and cost
multiples. With ``sample``, grid-wide claims are checked one-sided (no re-run sampled configuration may
be worse than the card says); the resistance verdict and the cost multiple need the whole grid.
Claims this command cannot re-measure (stability, trainability, generalization: they need the
reference and benign data) are listed as "not re-checked" and do not change the exit status.

A card of a defense that protects only at attack time (one registered with an ``attack_time_hook``, such as
Security Vectors) is re-run as it was evaluated: the hook is built from the model folder (the defense's
output, e.g. the vector's adapter) and applied to every attacked copy of the folder's weights without it.
"""

from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass, field, replace
from typing import Any

from .. import conditions as C
from ..conditions.report import ImmunizationReport
from ..errors import ConfigError, DataError, ReportError
from ..model_card import REPORT_FILE, card_hashes, weights_sha256

__all__ = ["ClaimCheck", "VerificationResult", "recorded_datasets", "verify", "within_tolerance"]

logger = logging.getLogger(__name__)


def within_tolerance(claimed: float, measured: float, abs_tol: float = 0.05, rel_tol: float = 0.05) -> bool:
    """``|claimed - measured| <= abs_tol`` or ``<= rel_tol * |claimed|`` (NaN never passes)."""
    if any(isinstance(x, float) and math.isnan(x) for x in (claimed, measured)):
        return False
    d = abs(claimed - measured)
    return d <= abs_tol or d <= rel_tol * abs(claimed)


@dataclass
class ClaimCheck:
    """One claim of the card beside its re-measured value."""

    claim: str = field(metadata={"help": "What the card claims (claim id or description)."})
    claimed: Any = field(metadata={"help": "The card's value."})
    measured: Any = field(default=None, metadata={"help": "The re-measured value (None: not re-measured)."})
    passed: bool | None = field(default=None, metadata={"help": "True/False, or None when not re-checked."})
    note: str = field(default="", metadata={"help": "How it was compared."})


@dataclass
class VerificationResult:
    """All checks of one ``verify`` run."""

    source: str = field(metadata={"help": "The folder or repo that was verified."})
    checks: list[ClaimCheck] = field(default_factory=list, metadata={"help": "One per claim."})
    abs_tol: float = field(default=0.05, metadata={"help": "Absolute tolerance."})
    rel_tol: float = field(default=0.05, metadata={"help": "Relative tolerance."})

    @property
    def passed(self) -> bool:
        """Every re-checked claim passed (and at least one was re-checked)."""
        checked = [c for c in self.checks if c.passed is not None]
        return bool(checked) and all(c.passed for c in checked)

    def table(self) -> str:
        """One line per claim: claim, card value, re-measured value, PASS/FAIL/not re-checked."""

        def fmt(v):
            return C.fmt_number(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)

        rows = [("claim", "card", "re-measured", "result")]
        for c in self.checks:
            res = {True: "PASS", False: "FAIL", None: "not re-checked"}[c.passed]
            rows.append(
                (
                    c.claim,
                    fmt(c.claimed),
                    "-" if c.measured is None else fmt(c.measured),
                    res + (f" ({c.note})" if c.note else ""),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(x.ljust(w) for x, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
        lines.append(
            f"tolerance: |card - re-measured| <= {self.abs_tol:g} or <= {self.rel_tol:.0%} of the card's value"
        )
        lines.append(f"VERIFY {'PASSED' if self.passed else 'FAILED'}: {self.source}")
        return "\n".join(lines)


def _resolve(source: str) -> str:
    if os.path.isdir(source):
        return source
    if os.path.exists(source):
        raise ConfigError(f"{source} is a file: pass the model folder (with README.md and {REPORT_FILE}).")
    from ..data.loading import check_hub_access, check_model_source

    if check_model_source(source, what="model repository") != "hub":
        raise ConfigError(f"{source!r} is not a model folder: pass the folder or a Hub repo id (org/name).")
    local_only = check_hub_access(source, what="model repository")  # one line, at once, when unreachable
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(source, repo_type="model", local_files_only=local_only)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(
            f"{source!r} is not a local folder and could not be downloaded from the Hub ({type(e).__name__}). "
            "Pass a model folder, or a repo id when the Hub is reachable."
        ) from None


def _key(config: dict) -> tuple:
    """A run's identity: every grid axis of its setting (not what the run recorded about itself)."""
    from ..attacks.config import _AXIS_FIELDS

    return tuple(sorted((k, v) for k, v in config.items() if k == "family" or k in _AXIS_FIELDS))


def _recorded_configs(report: ImmunizationReport) -> list:
    """The attack grids a report ran: its suite (``extra["attack_suite"]``), else its one attack config."""
    from ..attacks import AttackConfig
    raw = report.extra.get("attack_suite") or [report.extra.get("attack_config")]
    if not all(isinstance(r, dict) for r in raw):
        raise ReportError(
            f"{REPORT_FILE} has no extra['attack_config']: the attack settings are unknown, so it cannot be re-run."
        )
    known = set(AttackConfig.__dataclass_fields__)
    return [AttackConfig(**{k: v for k, v in r.items() if k in known and k != "output_dir"}) for r in raw]


def _load_benign(report: ImmunizationReport):
    """The benign data the report's mixed/benign attacks trained on (its ``benign_train`` SPEC)."""
    from ..data.loading import load_dataset_spec

    spec = recorded_datasets(report).get("benign_train")
    if not spec:
        raise DataError(
            "the report's attack grid has families that train on benign data, but it records no "
            "'benign_train' SPEC in report.datasets, so those runs cannot be re-run."
        )
    return load_dataset_spec(spec)


def recorded_datasets(report: ImmunizationReport) -> dict[str, Any]:
    """The data SPECs a report records: its ``datasets`` field, else ``extra["datasets"]`` (older reports)."""
    if report.datasets:
        return dict(report.datasets)
    old = report.extra.get("datasets")
    return dict(old) if isinstance(old, dict) else {}


def _load_data(report: ImmunizationReport, dataset: str | None, eval_dataset: str | None):
    from ..data.loading import load_dataset_spec

    specs = recorded_datasets(report)
    train_spec = dataset or specs.get("attack_train")
    eval_spec = eval_dataset or specs.get("attack_eval")
    if not train_spec or not eval_spec:
        raise DataError(
            "the report does not record which data the attack used (report.datasets with "
            "'attack_train' and 'attack_eval' SPECs), so the attack cannot be re-run on the recorded data: "
            "pass --dataset and --eval_dataset with the data the card was measured on."
        )
    seed = specs.get("split_seed")
    seed = 0 if seed is None else seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ReportError(f"report.datasets['split_seed'] must be an integer, got {seed!r}.")
    try:
        train = load_dataset_spec(train_spec, seed=seed)
        ev = load_dataset_spec(eval_spec, seed=seed)
    except Exception as e:  # noqa: BLE001
        raise DataError(
            f"cannot re-load the recorded attack data ({train_spec!r}, {eval_spec!r}): {type(e).__name__}: {e}. "
            "The claims cannot be re-measured without it; pass --dataset/--eval_dataset pointing to a copy."
        ) from None
    limit = int(specs.get("eval_limit") or 0)
    if limit and len(ev) > limit:
        ev = ev.select(range(limit))
    return train, ev


def _attack_time_hook(spec, folder: str, model):
    """For a defense that protects only while its hook is applied during fine-tuning (Security Vectors):
    the hook, built by the registry's factory from the model folder (the defense's output: the vector's
    adapter), and the model it is applied to, the folder's weights without the adapter (``from_pretrained``
    on an adapter folder loads the base model with the adapter on), as the evaluation attacked them
    (``evaluate_conditions(..., prepare_immunized=hook)``)."""
    from ..attacks import drop_adapters

    try:
        hook = spec.attack_time_hook(folder)
    except ConfigError as e:
        raise ConfigError(
            f"the card's defense {spec.name!r} protects only while its attack-time hook is applied during "
            f"fine-tuning, and verify builds that hook from the model folder, which it cannot: {e}"
        ) from None
    return hook, drop_adapters(model)


def verify(
    source: str,
    *,
    sample: int | None = None,
    sample_seed: int = 0,
    abs_tol: float = 0.05,
    rel_tol: float = 0.05,
    dataset: str | None = None,
    eval_dataset: str | None = None,
    progress=None,
) -> VerificationResult:
    """Re-measure the claims of the card in ``source`` (a model folder or a Hub repo id).

    Args:
        sample: re-run only this many configurations of the grid (chosen with ``sample_seed``); None: all.
        abs_tol, rel_tol: the tolerance (see the module docstring).
        dataset, eval_dataset: dataset SPECs replacing the recorded attack data.
        progress: called with one-line progress messages.

    Returns:
        A :class:`VerificationResult`; ``.passed`` is the verdict. A hash mismatch stops before the attack.
    """
    from huggingface_hub import ModelCard

    from ..attacks import HarmfulFineTuningAttack, get_attack, setting_label

    say = progress or logger.info
    folder = _resolve(source)
    card_path = os.path.join(folder, "README.md")
    if not os.path.exists(card_path):
        raise ReportError(f"no model card at {card_path}: write one with `immune-trainer card {folder}`.")
    card = ModelCard.load(card_path)
    report = ImmunizationReport.load(os.path.join(folder, REPORT_FILE))
    result = VerificationResult(source=source, abs_tol=abs_tol, rel_tol=rel_tol)

    # 1. weights
    claimed_hashes = card_hashes(card.content)
    actual = weights_sha256(folder)
    if not claimed_hashes:
        result.checks.append(
            ClaimCheck(
                "weights sha256", "none in card", f"{len(actual)} files", False, "card lists no hashes"
            )
        )
        return result
    bad = sorted(n for n in set(claimed_hashes) | set(actual) if claimed_hashes.get(n) != actual.get(n))
    result.checks.append(
        ClaimCheck(
            "weights sha256",
            f"{len(claimed_hashes)} files",
            f"{len(actual)} files",
            not bad,
            f"differ: {', '.join(bad)}" if bad else "all match",
        )
    )
    if bad:
        return result

    # 2. the recorded attack: every grid of the suite, every setting as one run
    configs = _recorded_configs(report)
    runs = [(cfg, setting) for cfg in configs for setting in cfg.grid()]
    if sample is not None:
        if sample <= 0:
            raise ConfigError(f"--sample must be a positive number of configurations, got {sample}.")
        if sample < len(runs):
            runs = random.Random(sample_seed).sample(runs, sample)
    full = len(runs) == sum(len(cfg.grid()) for cfg in configs)
    train, ev = _load_data(report, dataset, eval_dataset)
    benign = _load_benign(report) if any(
        get_attack(f).needs_benign for cfg in configs for f in cfg.family_names()
    ) else None

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except OSError as e:
        raise ConfigError(f"cannot reload the model in {folder} as safetensors: {e}.") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    hook = None
    defense = (report.defense or {}).get("name")
    if defense:
        from ..defenses import DEFENSES

        spec = DEFENSES.get(str(defense).lower().replace("-", "_"))
        if spec is not None and spec.attack_time_hook is not None:
            hook, model = _attack_time_hook(spec, folder, model)
    recorded = {_key(c.config): c for c in report.curves.get("immunized", {}).get("attack", [])}
    tm = report.threat_model
    hib = tm.higher_is_better
    curves = []
    scorer = None
    for cfg, setting in runs:
        label = f"run {setting_label(setting)}: worst f"
        say(f"re-running attack {setting_label(setting)}")
        rec = recorded.get(_key(setting))
        # A run the evaluation stopped once it crossed phi is re-run the same way (same points).
        stop = tm.threshold if rec is not None and rec.config.get("stopped_early") is not None else None
        attack = HarmfulFineTuningAttack(replace(cfg.for_setting(setting), output_dir=None), scorer=scorer)
        scorer = attack.scorer
        curve = attack.run(
            model, tokenizer, train, ev, prepare_model=hook, benign_train=benign, stop_at_threshold=stop
        ).curves[0]
        curves.append(curve)
        mw = C.worst_value([p.value for p in curve.points], hib)
        if rec is None:
            result.checks.append(
                ClaimCheck(label, "not in report", mw, False, "configuration missing from the report")
            )
        else:
            cw = C.worst_value([p.value for p in rec.points], hib)
            result.checks.append(ClaimCheck(label, cw, mw, within_tolerance(cw, mw, abs_tol, rel_tol)))

    # 3. the card's grid-wide claims
    claims = {}
    for r in card.data.eval_results or []:
        if r.metric_config:
            claims[r.metric_config] = r.metric_value
    imm = (card.data.to_dict().get("immunization") or {}) if card.data else {}
    worst = C.worst_value([p.value for c in curves for p in c.points], hib)
    crossings = [C.first_crossing(c, tm.threshold, hib) for c in curves]
    crossed = [x.step for x in crossings if x is not None]
    remeasured = None
    if full:
        remeasured = C.resistance(
            curves,
            tm.threshold,
            higher_is_better=hib,
            base_curves=report.curves.get("base", {}).get("attack") or None,
            min_cost_multiple=tm.min_cost_multiple,
        )
    for cid, value in claims.items():
        if not cid.startswith("resistance."):
            result.checks.append(ClaimCheck(cid, value, None, None, "needs data verify does not re-run"))
            continue
        what = cid.split(".", 1)[1]
        if what == "worst_value":
            if full:
                result.checks.append(
                    ClaimCheck(cid, value, worst, within_tolerance(value, worst, abs_tol, rel_tol))
                )
            else:
                ok = within_tolerance(value, worst, abs_tol, rel_tol) or (
                    worst > value if hib else worst < value
                )
                result.checks.append(ClaimCheck(cid, value, worst, ok, "sampled: no run may be worse"))
        elif what == "crossing_step":
            first = min(crossed) if crossed else None
            if full:
                ok = first is not None and within_tolerance(value, first, abs_tol, rel_tol)
                result.checks.append(ClaimCheck(cid, value, "never" if first is None else first, ok))
            else:
                ok = first is None or first >= value or within_tolerance(value, first, abs_tol, rel_tol)
                result.checks.append(
                    ClaimCheck(
                        cid, value, "never" if first is None else first, ok, "sampled: no earlier crossing"
                    )
                )
        elif what == "steps_multiple":
            if remeasured is None or remeasured.steps_multiple is None:
                result.checks.append(ClaimCheck(cid, value, None, None, "needs the whole grid"))
            else:
                m = remeasured.steps_multiple
                result.checks.append(ClaimCheck(cid, value, m, within_tolerance(value, m, abs_tol, rel_tol)))
        else:
            result.checks.append(ClaimCheck(cid, value, None, None, "unknown claim"))
    verdict = imm.get("resistance")
    if verdict:
        if remeasured is not None:
            got = (
                "strong"
                if remeasured.strong and remeasured.holds
                else {True: "weak", False: "fails", None: "undetermined"}[remeasured.holds]
            )
            result.checks.append(ClaimCheck("resistance verdict", verdict, got, got == verdict))
        elif verdict == "strong":
            got = "strong" if not crossed else "crossed phi"
            result.checks.append(ClaimCheck("resistance verdict", verdict, got, not crossed, "sampled runs"))
        else:
            result.checks.append(
                ClaimCheck("resistance verdict", verdict, None, None, "needs the whole grid")
            )
    return result
