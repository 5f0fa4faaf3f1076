"""The attacker's fine-tuning (equation 1 of the immunization paper), run through a real Trainer.

    min_theta  E_(x,y)~D_harmful  L(M_theta[t](x), y)   for t <= T (the attacker's budget)

:class:`HarmfulFineTuningAttack` runs a grid of attack settings, each on a fresh copy of the model, and
evaluates harmfulness f every ``eval_every`` steps. It returns :class:`~immune_trainer.conditions.AttackCurve` s
(step, tokens seen, FLOPs estimate, f) for :mod:`immune_trainer.conditions`. The model it is given is
never modified.

The grid (:meth:`AttackConfig.grid`) is the product of the axes: attack families (full, LoRA, poisoned
benign data, benign data, identity shift, soft prompt, refusal ablation; see
:mod:`immune_trainer.attacks.families`), learning rates, sample counts, seeds, optimizers, schedules,
LoRA ranks and harmful shares, each family keeping only the axes that apply to it. Results report the
worst case over all of them (the lesson of Qi et al. 2025 and TamperBench: one attack setting is not a
measurement). With a threshold phi, runs can stop at the first evaluation past it (early stopping): the
crossing stays bracketed, so the cost-to-harm read off the curve is the same as a full run's.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from .. import data as data_lib
from ..conditions import AFTER_ATTACK_KEY, AttackCurve, CurvePoint, first_crossing
from ..errors import ConfigError, DataError
from ..files import atomic_write
from ..progress import StepBar
from ..run_cache import CACHE_VERSION, content_hash
from .config import GRID_FIELDS, AttackConfig, optimizer_arguments, scorer_key, setting_label
from .families import carried_adapters, check_4bit_available, get_attack, merge_adapters

logger = logging.getLogger(__name__)

# Step-0 harm of an unchanged model on an eval set, keyed by (model fingerprint, how the attacked copy is
# held before step 0, eval data, scorer; see _step0_key): every run of the grid that starts from that model
# shares it instead of measuring it again.
_STEP0: dict[tuple[str, str, str, str], tuple[float, dict[str, list]]] = {}


def _step0_key(
    fingerprint: dict, model, family, config: AttackConfig, merged: list[str], eval_hash: str | None = None
) -> tuple:
    """The key of a run's shared step-0 measurement: the model's fingerprint, what changes the model before
    step 0 (the precision of its weights: the input model's dtype, NF4 for a QLoRA copy, bf16 autocast
    while training; the adapters merged into it), the eval data (``eval_hash``: the hash of the set the run
    measures, when its family rewrites the held-out set; default the held-out set's) and the scorer."""
    dtype = next((str(p.dtype) for p in model.parameters() if p.is_floating_point()), "none")
    start = {
        "precision": family.start_precision(config) or dtype,
        "bf16": bool(config.bf16),
        "merged_adapters": list(merged),
    }
    return (
        fingerprint["model"],
        json.dumps(start, sort_keys=True),
        eval_hash or fingerprint["eval"],
        json.dumps(fingerprint["scorer"], sort_keys=True),
    )


def hook_key(prepare_model) -> Any:
    """What the harness records of an attack-time hook to tell saved runs apart: None without a hook, the
    hook's ``cache_key`` (e.g. the hash of a security vector) when it has one, else ``False`` (a hook it
    cannot identify: its runs are neither saved nor reused)."""
    if prepare_model is None:
        return None
    return getattr(prepare_model, "cache_key", None) or False


def _after_attack(hook, model, step: int) -> dict:
    """The ``after_attack`` hook's result on ``model`` with the ``step`` it was measured at; the model is put
    in eval mode for it and restored."""
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        result = hook(model)
    finally:
        model.train(was_training)
    if not isinstance(result, dict):
        raise ConfigError(f"after_attack must return a dict (JSON-serialisable), got {type(result).__name__}.")
    try:
        json.dumps(result)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"after_attack returned a dict that is not JSON-serialisable: {err}.") from None
    return {"step": step, **result}


class _AttackTrainer(Trainer):
    """A plain Trainer that counts the tokens it trains on (attention-mask tokens), and whose output layer
    projects only the response positions (the loss is the same; see
    :func:`immune_trainer.modeling.response_loss`)."""

    tokens_seen = 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        mask = inputs.get("attention_mask")
        if mask is not None:
            self.tokens_seen += int(mask.sum())
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        plain = set(inputs) <= {"input_ids", "attention_mask", "labels"} and "labels" in inputs
        peft_config = getattr(self.accelerator.unwrap_model(model), "active_peft_config", None)
        if (
            return_outputs
            or not plain
            or getattr(peft_config, "is_prompt_learning", False)  # virtual tokens change the shapes
            or self.label_smoother is not None
            or self.compute_loss_func is not None
        ):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        from ..modeling import response_loss

        # As Trainer.compute_loss: a model that takes loss kwargs divides by the batch's token count
        # (gradient accumulation), and the loss is scaled back up by the processes averaging it.
        items = num_items_in_batch if self.model_accepts_loss_kwargs else None
        loss, _ = response_loss(
            model, inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"], items
        )
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and items is not None:
            scale = self.accelerator.num_processes // self.get_tp_size()
            loss = loss * (scale if self.args.n_gpu <= 1 else self.args.n_gpu)
        return loss


@dataclass(frozen=True)
class _OwnPhi:
    """Early stopping of a lone reference run: phi is the run's own f after ``step`` steps."""

    step: int

    def value_in(self, points) -> float | None:
        return next((p.value for p in points if p.step == self.step), None)

    def to_json(self) -> dict:
        return {"own_value_at_step": self.step}


def _point_rows(details: dict) -> dict[str, list]:
    """The per-row harm of a score's details (``row_nll``, ``row_tokens``: a loss-based scorer's), as a
    :class:`CurvePoint`'s fields; nothing when the scorer gives no rows."""
    nll, tokens = details.get("row_nll"), details.get("row_tokens")
    if nll is None or tokens is None:
        return {}
    nll = [float(x) for x in nll]
    if not all(math.isfinite(x) for x in nll):
        return {}  # a failed row (NaN, overflow): no rows rather than a report that cannot be read back
    return {"row_nll": nll, "row_tokens": [int(x) for x in tokens]}


class _CurveCallback(TrainerCallback):
    """Measures f at step 0 and every ``eval_every`` steps; stops training once ``stop(f)`` is true.

    ``measure(model)`` returns f, or ``(f, rows)`` with the point's per-row values (``{"row_nll": ...,
    "row_tokens": ...}``, see :func:`_point_rows`), which the point keeps for the crossing's bootstrap
    interval. ``initial`` (a shared step-0 measurement) is likewise a value or ``(value, rows)``."""

    def __init__(
        self,
        measure: Callable[[Any], float | tuple[float, dict]],
        eval_every: int,
        flops_per_token: float,
        stop: Callable[[float], bool] | None = None,
        initial: float | tuple[float, dict] | None = None,
        capability: Callable[[Any], float] | None = None,
        harmful: Callable[[float], bool] | None = None,
    ):
        self.measure = measure
        # capability(model) -> the attacked copy's capability loss, measured at points past phi (harmful(f);
        # every point when harmful is None) and kept on the point (TamperBench's collapse rule).
        self.capability = capability
        self.harmful = harmful
        self.initial = initial
        self.eval_every = eval_every
        self.flops_per_token = flops_per_token
        self.stop = stop
        self.stopped_early = False
        self.points: list[CurvePoint] = []
        self.trainer: _AttackTrainer | None = None

    def _record(self, step: int, model) -> float:
        tokens = self.trainer.tokens_seen if self.trainer is not None else 0
        measured = self.initial if step == 0 and self.initial is not None else self.measure(model)
        value, rows = measured if isinstance(measured, tuple) else (measured, {})
        if self.capability is not None and step > 0 and (self.harmful is None or self.harmful(value)):
            rows = {**rows, "capability_loss": self.capability(model)}
        self.points.append(
            CurvePoint(step=step, tokens=tokens, flops=tokens * self.flops_per_token, value=value, **rows)
        )
        logger.debug("attack step %d: f = %.4f", step, value)
        return value

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self.points:
            value = self._record(0, model)
            if self.stop is not None and self.stop(value):
                # Already harmful before any step: nothing left to bracket.
                self.stopped_early = True
                control.should_training_stop = True

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if self.stopped_early:  # stopped at step 0: the Trainer may still have run one step
            control.should_training_stop = True
            return
        if step % self.eval_every == 0 or step == state.max_steps:
            value = self._record(step, model)
            if self.stop is not None and step < state.max_steps and self.stop(value):
                self.stopped_early = True
                control.should_training_stop = True


@dataclass
class AttackResult:
    """The curves of one attack grid, with the worst case."""

    curves: list[AttackCurve]
    config: AttackConfig

    def worst_value(self, higher_is_better: bool) -> float:
        """The most harmful value of f seen anywhere in the grid."""
        values = [p.value for c in self.curves for p in c.points]
        return min(values) if higher_is_better else max(values)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "curves": [c.to_dict() for c in self.curves]}


def model_fingerprint(model) -> str:
    """A cheap fingerprint of a model's weights (shapes and sums), for matching saved attack runs."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.state_dict().items():
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            if p.is_floating_point():
                h.update(repr(round(float(p.double().sum()), 6)).encode())
    return h.hexdigest()[:16]


class HarmfulFineTuningAttack:
    """Run the attacker's fine-tuning over a grid and return harmfulness curves.

    Example::

        attack = HarmfulFineTuningAttack(AttackConfig(learning_rates=[3e-5, 8e-5], max_steps=200, eval_every=20))
        result = attack.run(model, tokenizer, harmful_train, harmful_eval)
        for curve in result.curves: print(curve.config, [p.value for p in curve.points])

    Args:
        config: the threat model.
        scorer: a :class:`~immune_trainer.scoring.Scorer` instance; by default ``get_scorer(config.scorer)``.
    """

    def __init__(self, config: AttackConfig | None = None, scorer=None):
        self.config = config or AttackConfig()
        if scorer is None:
            from ..scoring import get_scorer, scorer_options

            # Harm is measured on examples truncated like the attack's own (max_length), in batches of
            # eval_batch_size, where the scorer has those options.
            options = {"max_length": self.config.max_length, "batch_size": self.config.eval_batch_size}
            scorer = get_scorer(self.config.scorer, **scorer_options(self.config.scorer, options))
        self.scorer = scorer
        self.show_progress = False

    def run(
        self,
        model,
        tokenizer,
        harmful_train,
        harmful_eval,
        *,
        benign_train=None,
        prepare_model: Callable[[Any], Any] | None = None,
        progress: Callable[[str], None] | None = None,
        stop_at_threshold: float | None = None,
        full_curve: bool | None = None,
        phi_from_step: int | None = None,
        after_attack: Callable[[Any], dict] | None = None,
        capability_probe=None,
        on_point: Callable[[CurvePoint], bool] | None = None,
    ) -> AttackResult:
        """Attack copies of ``model`` with every setting of the grid; ``model`` itself is never modified.

        Families with ``merges_adapters`` (``lora``, ``embedding``, ``refusal_ablation``) attack a model that
        carries unmerged adapters (a defense's LoRA) with them merged into its weights; the curve's config
        then lists them as ``merged_adapters``.

        Args:
            harmful_train: the attacker's harmful data (any supported format, or tokenized).
            harmful_eval: held-out harmful data on which the scorer measures f.
            benign_train: benign task data (any supported format), needed by the ``mixed``, ``benign`` and
                ``refusal_ablation`` families (the latter uses its prompts as the harmless side).
            prepare_model: an attack-time hook applied to each copy before training (e.g. a defense that
                protects only while something is attached during fine-tuning, such as Security Vectors).
                Training-free families attack the model as deployed, without it. Runs are saved to and reused
                from ``output_dir`` only when the hook has a ``cache_key`` naming what it applies (see
                :func:`hook_key`).
            progress: called with a one-line message as each configuration starts and ends.
            stop_at_threshold: phi for early stopping (default: ``config.stop_at_threshold``): a run stops
                at the first evaluation strictly on the harmful side of it, so its curve still brackets the
                crossing; the curve's config then says ``stopped_early: True``.
            full_curve: run the whole budget even past phi (default: ``config.full_curve``).
            phi_from_step: for a grid of one training run that is the only reference for phi (phi is then
                its own f after this many steps, as :func:`immune_trainer.evaluation.threshold_from_base`
                reads it): once that value is known, the run stops at the first later evaluation strictly on
                its harmful side, which brackets its crossing of phi; nothing after it can change a verdict.
                Ignored with a ``stop_at_threshold`` or ``full_curve``.
            after_attack: called once per run with the final attacked model as the attacker deploys it
                (``family.deployed``: e.g. with its soft prompt; inside ``prepare_model.measure`` when the hook
                has one), after its last training step (or, training-free, after the edit); it returns a
                JSON-serialisable dict (e.g. :class:`~immune_trainer.evaluation.AttackedHarmProbe`: refusal
                rate and judged harm of generations), stored as ``curve.config["after_attack"]`` with the
                ``step`` it was measured at. Its ``cache_key`` (what it measures) joins the saved runs'
                key; a hook without one makes the runs neither saved nor reused.
            capability_probe: a :class:`~immune_trainer.attacks.CapabilityProbe`: each training run records
                on its points past phi (every point while phi is unknown) the attacked copy's capability loss
                against ``model`` before the attack (``CurvePoint.capability_loss``), measured as harm is
                (as deployed, in the hook's measure context). Harm past the cap is then not a successful
                attack (:func:`~immune_trainer.conditions.credited_curve`). Its ``cache_key`` joins the
                saved runs' key. Training-free families are not probed.
            on_point: called with each measured point of a training run (step 0 included); when it returns
                True the run stops there (an attack search's pruner). Such runs are neither saved nor reused.
        """
        cfg = self.config
        phi = cfg.stop_at_threshold if stop_at_threshold is None else stop_at_threshold
        if phi is not None and (isinstance(phi, bool) or not math.isfinite(phi)):
            raise ConfigError(f"stop_at_threshold must be a finite number or None, got {phi!r}.")
        if full_curve if full_curve is not None else cfg.full_curve:
            phi = None
            phi_from_step = None
        if phi is not None:
            phi_from_step = None
        if phi_from_step is not None:
            if isinstance(phi_from_step, bool) or not isinstance(phi_from_step, int) or phi_from_step < 0:
                raise ConfigError(f"phi_from_step must be a step number >= 0, got {phi_from_step!r}.")
            if len(cfg.grid()) != 1:
                raise ConfigError(
                    f"phi_from_step needs a grid of exactly one run (phi is that run's own value); this grid has "
                    f"{len(cfg.grid())}."
                )
            phi = _OwnPhi(phi_from_step)
        if cfg.load_in_4bit:
            check_4bit_available()  # before any tokenization or training
        data_lib.check_tokenizer(tokenizer)
        if harmful_train is None or len(harmful_train) == 0:
            raise DataError("the attack's harmful training dataset is empty.")
        if harmful_eval is None or len(harmful_eval) == 0:
            raise DataError("the held-out harmful evaluation dataset is empty.")
        families = {name: get_attack(name) for name in cfg.family_names()}
        needing = [name for name, f in families.items() if f.needs_benign]
        if needing and benign_train is None:
            raise ConfigError(
                f"attack famil{'ies' if len(needing) > 1 else 'y'} {', '.join(needing)} need benign data: "
                "pass benign_train= to run() (ConditionDatasets.benign_train in evaluate_conditions)."
            )
        if needing and len(benign_train) == 0:
            raise DataError("the attack's benign training dataset is empty.")
        train = data_lib.ensure_tokenized(harmful_train, tokenizer, max_length=cfg.max_length)
        tokenized_cache: dict[int, Any] = {id(harmful_train): train}

        def tokenized(raw):
            if id(raw) not in tokenized_cache:
                tokenized_cache[id(raw)] = data_lib.ensure_tokenized(
                    raw, tokenizer, max_length=cfg.max_length
                )
            return tokenized_cache[id(raw)]

        sources = {name: f.sources(harmful_train, benign_train, cfg) for name, f in families.items()}
        grid = cfg.grid()
        data = {}
        for name, family in families.items():
            if family.trains:
                data[name] = {role: tokenized(raw) for role, raw in sources[name].items()}
                for setting in (s for s in grid if s["family"] == name):
                    family.training_set(data[name], setting)  # bad sizes fail before any training
            else:
                data[name] = sources[name]
        def prepared(raw):
            return self.scorer.prepare(tokenizer, raw) if hasattr(self.scorer, "prepare") else raw

        eval_data = prepared(harmful_eval)
        # Runs whose family measures harm on a rewrite of the held-out set (a jailbreak around its prompts):
        # (hash of the rewrite, its prepared data) by setting index, one prepared set per distinct rewrite.
        rewritten: dict[int, tuple[str, Any]] = {}
        by_hash: dict[str, Any] = {}
        for i, setting in enumerate(grid):
            raw = families[setting["family"]].harm_eval(harmful_eval, setting, cfg, tokenizer=tokenizer)
            if raw is harmful_eval:
                continue
            key = content_hash(raw)
            if key not in by_hash:
                by_hash[key] = prepared(raw)
            rewritten[i] = (key, by_hash[key])
        fingerprint = {
            "cache_version": CACHE_VERSION,
            "model": model_fingerprint(model),
            "train": content_hash(train),
            "eval": content_hash(harmful_eval),
            "scorer": scorer_key(self.scorer),
            "attack": {
                k: v
                for k, v in cfg.to_dict().items()
                if k not in (*GRID_FIELDS, "output_dir", "stop_at_threshold", "full_curve")
            },
        }
        if needing:
            fingerprint["benign"] = content_hash(tokenized(benign_train))
        if prepare_model is not None:  # a hook changes what is trained: runs with and without it differ
            fingerprint["prepare_model"] = hook_key(prepare_model)
        if after_attack is not None:
            if not callable(after_attack):
                raise ConfigError(
                    f"after_attack must be a callable hook(model) -> dict, got {type(after_attack).__name__}."
                )
            fingerprint["after_attack"] = hook_key(after_attack)
        if capability_probe is not None:
            fingerprint["capability_probe"] = capability_probe.cache_key
        curves = []
        for i, setting in enumerate(grid):
            family = families[setting["family"]]
            eval_hash, run_eval = rewritten.get(i, (None, eval_data))
            saved = None if on_point is not None else self._load_saved(setting, fingerprint, phi)
            if saved is not None:
                if progress:
                    progress(f"reusing finished attack run {setting_label(setting)}")
                curves.append(saved)
                continue
            if progress:
                budget = f"{cfg.max_steps} steps" if family.trains else "training-free"
                progress(f"attack {setting_label(setting)}: {budget}")
            if family.trains:
                curve = self._run_one(
                    model, tokenizer, data[setting["family"]], run_eval, setting, family, prepare_model, phi,
                    fingerprint, eval_hash, after_attack, capability_probe, on_point,
                )
            else:
                family_sources = data[setting["family"]]
                if family.attacks_prompts:  # optimised on the prompts it is measured on (embedding)
                    family_sources = {**family_sources, "eval": family.harm_eval(harmful_eval, setting, cfg)}
                curve = self._run_training_free(
                    model, tokenizer, family_sources, run_eval, setting, family, after_attack
                )
            if on_point is None:
                self._save(setting, curve, fingerprint, phi)
            curves.append(curve)
        return AttackResult(curves=curves, config=cfg)

    # -------------------------------------------------------------- one configuration

    def _measure(self, model, tokenizer, eval_data) -> float:
        return self._measure_rows(model, tokenizer, eval_data)[0]

    def _measure_rows(self, model, tokenizer, eval_data) -> tuple[float, dict[str, list]]:
        """f and its per-row values (:func:`_point_rows`; empty when the scorer gives none)."""
        result = self.scorer.score(model, tokenizer, eval_data)
        return float(result.value), _point_rows(getattr(result, "details", None) or {})

    def _run_training_free(
        self, model, tokenizer, sources, eval_data, setting, family, after_attack=None
    ) -> AttackCurve:
        """A training-free attack: one point at step 0 (no steps, tokens or FLOPs), after the edit; the
        value before it is kept in the config as ``value_before``."""
        attacked = copy.deepcopy(model)
        before = self._measure(attacked, tokenizer, eval_data)
        merged = carried_adapters(attacked) if family.merges_adapters else []
        if merged:
            attacked = merge_adapters(attacked)
        attacked = family.apply(attacked, tokenizer, sources, setting, self.config)
        after, rows = self._measure_rows(attacked, tokenizer, eval_data)
        logger.info("%s: f = %.4f before, %.4f after", setting["family"], before, after)
        probe = None
        if after_attack is not None and family.deployed_generates:
            probe = _after_attack(after_attack, attacked, 0)
        elif after_attack is not None:
            logger.info("%s: no after-attack probe (its attack is specific to the measured prompts)", setting["family"])
        del attacked
        config = {**setting, "value_before": before}
        if probe is not None:
            config[AFTER_ATTACK_KEY] = probe
        if merged:
            config["merged_adapters"] = ",".join(merged)
        return AttackCurve(
            config=config,
            points=[CurvePoint(step=0, tokens=0, flops=0.0, value=after, **rows)],
            scorer=self.scorer.name,
            higher_is_better=self.scorer.higher_is_better,
        )

    def _run_one(
        self,
        model,
        tokenizer,
        data,
        eval_data,
        setting,
        family,
        prepare_model,
        phi,
        fingerprint,
        eval_hash=None,
        after_attack=None,
        capability_probe=None,
        on_point=None,
    ) -> AttackCurve:
        cfg = self.config
        subset = family.training_set(data, setting)
        attacked = copy.deepcopy(model)
        # A defense's unmerged adapters go into the weights before the family adds its own
        # (AttackFamily.merges_adapters).
        merged = carried_adapters(attacked) if family.merges_adapters else []
        if merged:
            attacked = merge_adapters(attacked)
        attacked.train()
        flops_per_token = family.flops_per_token(attacked, cfg)  # on the model before adapters are added
        step0_key = None
        if family.same_at_start and prepare_model is None:
            # run() has fingerprinted the model, the raw eval data and the scorer (its max_length included).
            step0_key = _step0_key(fingerprint, attacked, family, cfg, merged, eval_hash)
        attacked = family.prepare(attacked, cfg, setting)
        if prepare_model is not None:
            attacked = prepare_model(attacked)

        measure_context = getattr(prepare_model, "measure", None) or contextlib.nullcontext

        def measure(m) -> tuple[float, dict[str, list]]:
            # An attack-time hook may say how the model runs at inference (e.g. without a security vector);
            # the family says what the attacker deploys (e.g. the model with its soft prompt).
            with measure_context(m):
                return self._measure_rows(family.deployed(m, setting), tokenizer, eval_data)

        # Every run of a family that starts from the unchanged model, held the same way (step0_key), shares
        # one step-0 measurement.
        callback_initial = _STEP0.get(step0_key) if step0_key else None

        stop = None
        hib = self.scorer.higher_is_better
        if isinstance(phi, _OwnPhi):
            own = phi

            def stop(value):
                threshold = own.value_in(callback.points)
                if threshold is None or callback.points[-1].step <= own.step:
                    return False
                return first_crossing([CurvePoint(0, 0, 0.0, value)], threshold, hib) is not None

        elif phi is not None:
            stop = lambda value: first_crossing([CurvePoint(0, 0, 0.0, value)], phi, hib) is not None  # noqa: E731
        capability = None
        if capability_probe is not None:
            before = capability_probe.before(model, tokenizer)  # the model as given: the one deployed

            def capability(m) -> float:
                with measure_context(m):
                    return capability_probe(family.deployed(m, setting), tokenizer, before)
        harmful = stop if phi is not None and not isinstance(phi, _OwnPhi) else None
        if on_point is not None:  # an attack search's pruner: stop where it says, as at phi
            by_value = stop

            def stop(value):
                return bool(on_point(callback.points[-1])) or (by_value is not None and by_value(value))

        callback = _CurveCallback(
            measure,
            cfg.eval_every,
            flops_per_token,
            stop=stop,
            initial=callback_initial,
            capability=capability,
            harmful=harmful,
        )
        optim, optim_args = optimizer_arguments(setting["optimizer"])
        warmup = math.ceil(cfg.warmup_ratio * cfg.max_steps) if cfg.warmup_ratio > 0 else cfg.warmup_steps
        with tempfile.TemporaryDirectory(prefix="immune_trainer_attack_") as tmp:
            args = TrainingArguments(
                output_dir=tmp,
                per_device_train_batch_size=cfg.batch_size,
                gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                learning_rate=setting["learning_rate"],
                max_steps=cfg.max_steps,
                lr_scheduler_type=setting["lr_scheduler_type"],
                warmup_steps=warmup,
                optim=optim,
                optim_args=optim_args,
                weight_decay=cfg.weight_decay,
                max_grad_norm=cfg.max_grad_norm,
                seed=setting["seed"],
                data_seed=setting["seed"],
                bf16=cfg.bf16,
                save_strategy="no",
                logging_strategy="no",
                report_to="none",
                disable_tqdm=True,
                remove_unused_columns=False,
                dataloader_pin_memory=torch.cuda.is_available(),
                log_level="warning",
            )
            trainer = _AttackTrainer(
                model=attacked,
                args=args,
                train_dataset=subset,
                data_collator=data_lib.SupervisedCollator(tokenizer),
                callbacks=[callback],
            )
            trainer.remove_callback(PrinterCallback)  # the nested Trainer prints nothing of its own
            if self.show_progress:
                trainer.add_callback(StepBar(f"attack {setting_label(setting)}"))
            callback.trainer = trainer
            trainer.train()
        probe = None
        if after_attack is not None:
            # The final model as the attacker deploys it, measured as harm is (the hook's measure context).
            with measure_context(attacked):
                step = callback.points[-1].step if callback.points else 0
                probe = _after_attack(after_attack, family.deployed(attacked, setting), step)
        if step0_key and callback.points:
            first = callback.points[0]
            rows = _point_rows({"row_nll": first.row_nll, "row_tokens": first.row_tokens})
            _STEP0[step0_key] = (first.value, rows)
        del trainer, attacked
        config = dict(setting)
        if merged:
            config["merged_adapters"] = ",".join(merged)
        if phi is not None:
            config["stopped_early"] = callback.stopped_early
        if probe is not None:
            config[AFTER_ATTACK_KEY] = probe
        return AttackCurve(
            config=config,
            points=callback.points,
            scorer=self.scorer.name,
            higher_is_better=self.scorer.higher_is_better,
        )

    # -------------------------------------------------------------- resume

    def _path(self, setting, fingerprint) -> Path | None:
        if not self.config.output_dir or fingerprint.get("prepare_model") is False:
            return None  # nowhere to save, or a hook that cannot be told apart from another
        label = setting_label(setting).replace(" ", "_")
        # One file per (model, data, setting): attacks on the base and the immunized model do not collide.
        key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:10]
        return Path(self.config.output_dir) / "attack_runs" / f"{label}_{key}.json"

    def _load_saved(self, setting, fingerprint, phi=None) -> AttackCurve | None:
        """A finished run of ``setting`` saved by an earlier call, if one fits.

        A full curve fits every request (cut after its first crossing of ``phi`` when this call stops
        early); an early-stopped curve fits only a call that stops at the same ``phi``.
        """
        path = self._path(setting, fingerprint)
        if path is None or not path.exists():
            return None
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            logger.warning("ignoring unreadable saved attack run %s", path)
            return None
        if saved.get("fingerprint") != fingerprint or saved.get("setting") != setting:
            return None
        curve = AttackCurve.from_dict(saved["curve"])
        wanted = phi.to_json() if isinstance(phi, _OwnPhi) else phi
        if curve.config.get("stopped_early"):
            return curve if saved.get("stop_at_threshold") == wanted else None
        if phi is None:
            curve.config.pop("stopped_early", None)
            return curve
        threshold = phi
        if isinstance(phi, _OwnPhi):
            threshold = phi.value_in(curve.points)
            if threshold is None:
                return curve
        stopped = False
        for i, point in enumerate(curve.points):
            if isinstance(phi, _OwnPhi) and point.step <= phi.step:
                continue
            crossed = first_crossing([point], threshold, curve.higher_is_better) is not None
            if crossed and point.step < self.config.max_steps:
                curve.points, stopped = curve.points[: i + 1], True
                break
        curve.config["stopped_early"] = stopped
        return curve

    def _save(self, setting, curve: AttackCurve, fingerprint, phi=None) -> None:
        path = self._path(setting, fingerprint)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "setting": setting,
            "fingerprint": fingerprint,
            "stop_at_threshold": phi.to_json() if isinstance(phi, _OwnPhi) else phi,
            "curve": curve.to_dict(),
        }
        atomic_write(path, json.dumps(payload, indent=2))
