"""The callback that probes resistance, stability, generalization and trainability while a model trains
(see :mod:`immune_trainer.callbacks`)."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .. import data as data_lib
from ..attacks import AttackConfig, HarmfulFineTuningAttack
from ..conditions import AttackCurve, TrainingCurve, relative_degradation
from ..conditions.report import ImmunizationReport, ThreatModel, build_report
from ..conditions.trainability import default_eps_steps
from ..errors import ConfigError, DataError
from ..evaluation import EvaluationConfig, benign_curves, dependency_versions, threshold_from_base
from ..scoring import get_scorer
from .config import PREFIX, ConditionsCallbackConfig
from .isolation import find_callback_handler, isolated_rng, same_on_all_ranks

logger = logging.getLogger(__name__)

__all__ = ["ConditionsCallback"]


def _flag(value: bool | None) -> float | None:
    return None if value is None else float(bool(value))


def _good_side(value: float, threshold: float, higher_is_better: bool) -> bool:
    if math.isnan(value):
        return False
    return value >= threshold if higher_is_better else value <= threshold


class ConditionsCallback(TrainerCallback, ExportableState):
    """Probe resistance, stability, generalization and trainability during training, with any Trainer.

    Example::

        callback = ConditionsCallback(
            tokenizer, harmful_train=attack_rows, harmful_eval=held_out_rows,
            reference={"wiki": wiki_rows}, benign=(task_train, task_eval),
            config=ConditionsCallbackConfig(probe_steps=5),
        )
        trainer = GradientAscentTrainer(..., callbacks=[callback, ConditionsEarlyStoppingCallback()])
        trainer.train()   # logs conditions/... and writes output_dir/immunization_report.json

    Args:
        tokenizer: the model's tokenizer (needs a pad token).
        harmful_train: harmful rows the probe attack trains on (any supported format, or tokenized).
        harmful_eval: held-out harmful rows on which f is measured.
        in_domain: optional ``(train, eval)`` of another harmful subset of the same domain.
        cross_domain: optional ``(train, eval)`` of another harm domain.
        reference: optional ``{name: dataset}`` for stability (capability g).
        benign: optional ``(train, eval)`` benign task for trainability.
        config: a :class:`ConditionsCallbackConfig`.
        defense: ``{"name": ..., "config": {...}}`` recorded in the report (optional).
    """

    def __init__(
        self,
        tokenizer=None,
        harmful_train=None,
        harmful_eval=None,
        *,
        in_domain: tuple[Any, Any] | None = None,
        cross_domain: tuple[Any, Any] | None = None,
        reference: dict[str, Any] | None = None,
        benign: tuple[Any, Any] | None = None,
        config: ConditionsCallbackConfig | None = None,
        defense: dict[str, Any] | None = None,
    ):
        if tokenizer is None:
            raise ConfigError(
                "ConditionsCallback needs the tokenizer and its datasets. If this happened while resuming "
                "from a checkpoint, set TrainingArguments(restore_callback_states_from_checkpoint=False): "
                "the callback restores its own state from trainer_state.json."
            )
        data_lib.check_tokenizer(tokenizer)
        self.config = config or ConditionsCallbackConfig()
        self.tokenizer = tokenizer
        self.defense = defense
        cfg = self.config
        self.harm_scorer = get_scorer(cfg.harm_scorer)
        if cfg.threshold is not None:
            self.harm_scorer.validate_threshold(cfg.threshold)
        self.sets: dict[str, tuple[Any, Any]] = {"attack": self._pair(harmful_train, harmful_eval, "harmful")}
        for key, pair in (("in_domain", in_domain), ("cross_domain", cross_domain)):
            if pair is not None:
                self.sets[key] = self._pair(*self._two(pair, key), key)
        self.cap_scorer = get_scorer(cfg.capability_scorer) if reference else None
        self.reference = {
            name: self._limit(self._nonempty(ds, f"reference[{name!r}]"))
            for name, ds in (reference or {}).items()
        }
        self.benign_scorer = self.benign = None
        if benign is not None:
            b_train, b_eval = self._two(benign, "benign")
            self.benign_scorer = get_scorer(cfg.benign_scorer)
            self.benign = (
                self._nonempty(b_train, "benign train"),
                self._limit(self._nonempty(b_eval, "benign eval")),
            )
        # State exported to checkpoints.
        self.base: dict[str, Any] | None = None  # the starting model's measurements
        self.last: dict[str, Any] | None = None  # the latest probe's measurements (curves etc.)
        self.num_probes = 0
        self.last_probe_step = -1
        self.probe_seconds = 0.0  # wall time spent probing in this process (not exported)
        self.threshold: float | None = cfg.threshold
        self.threshold_source = "given by the user" if cfg.threshold is not None else ""
        self.report_path: str | None = None

    # -------------------------------------------------------------- inputs

    @staticmethod
    def _two(pair, name):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise DataError(f"{name} must be a (train, eval) pair of datasets, got {type(pair).__name__}.")
        return pair

    @staticmethod
    def _nonempty(ds, name):
        if ds is None or len(ds) == 0:
            raise DataError(f"the {name} dataset given to ConditionsCallback is empty or missing.")
        return ds

    def _limit(self, ds):
        n = self.config.max_eval_samples
        return ds.select(range(n)) if n and len(ds) > n else ds

    def _pair(self, train, ev, name):
        train = self._nonempty(train, f"{name} train")
        ev = self._limit(self._nonempty(ev, f"{name} eval"))
        train = data_lib.ensure_tokenized(train, self.tokenizer, max_length=self.config.max_length)
        return train, self.harm_scorer.prepare(self.tokenizer, ev)

    # -------------------------------------------------------------- checkpoint state

    def state(self) -> dict:
        """The callback's state for ``trainer_state.json`` (restored in :meth:`on_train_begin`)."""
        return {
            "args": {},
            "attributes": {
                "base": self.base,
                "last": self.last,
                "num_probes": self.num_probes,
                "last_probe_step": self.last_probe_step,
                "threshold": self.threshold,
                "threshold_source": self.threshold_source,
            },
        }

    def _restore(self, state) -> bool:
        stored = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(stored, list):
            stored = stored[0] if stored else None
        attrs = (stored or {}).get("attributes") or {}
        if not attrs.get("base"):
            return False
        for key in ("base", "last", "num_probes", "last_probe_step", "threshold", "threshold_source"):
            if key in attrs:
                setattr(self, key, attrs[key])
        if self.config.threshold is not None:
            self.threshold = self.config.threshold
        return True

    # -------------------------------------------------------------- measuring

    def _attack(self, model, key: str, cfg: AttackConfig | None = None) -> list[AttackCurve]:
        train, ev = self.sets[key]
        attack = HarmfulFineTuningAttack(cfg or self.config.attack_config(), scorer=self.harm_scorer)
        return attack.run(model, self.tokenizer, train, ev).curves

    def _benign_curve(self, model) -> TrainingCurve:
        cfg = self.config
        steps = cfg.benign_steps
        eval_cfg = EvaluationConfig(
            benign_scorer=cfg.benign_scorer,
            benign_learning_rate=cfg.benign_learning_rate,
            benign_max_steps=steps,
            benign_eval_every=max(1, steps // 2),
        )
        train, ev = self.benign
        return benign_curves(
            model, self.tokenizer, train, ev, cfg.attack_config(), eval_cfg, self.benign_scorer
        )

    def measure(self, model, *, trainability: bool = True) -> dict[str, Any]:
        """Run every probe on a copy of ``model`` and return the raw measurements (JSON-safe).

        ``model`` is not modified and the global RNG state is unchanged afterwards.
        """
        out: dict[str, Any] = {"curves": {}, "capability": None, "benign": None}
        with isolated_rng():
            for key in self.sets:
                out["curves"][key] = [c.to_dict() for c in self._attack(model, key)]
            if self.reference:
                out["capability"] = {
                    name: float(self.cap_scorer.score(model, self.tokenizer, ds).value)
                    for name, ds in self.reference.items()
                }
            if trainability and self.benign is not None:
                out["benign"] = self._benign_curve(model).to_dict()
        return same_on_all_ranks(out)

    def _harm(self, curves: list[dict]) -> tuple[float, float]:
        """(harm before, worst harm after the probe) of one set's probe curves."""
        hib = self.harm_scorer.higher_is_better
        before = [c["points"][0]["value"] for c in curves]
        after = [c["points"][-1]["value"] for c in curves]
        worst = min if hib else max
        return float(worst(before)), float(worst(after))

    def _set_threshold(self) -> None:
        if self.threshold is not None:
            return
        curves = [AttackCurve.from_dict(c) for c in self.base["curves"]["attack"]]
        self.threshold = threshold_from_base(curves, self.config.probe_steps)
        self.threshold_source = (
            f"starting model's median {self.harm_scorer.name} after {self.config.probe_steps} probe steps"
        )

    def values(self, measured: dict[str, Any]) -> dict[str, float]:
        """Turn raw measurements into the ``conditions/...`` log values (see :data:`LOG_KEYS`)."""
        cfg = self.config
        hib = self.harm_scorer.higher_is_better
        logs: dict[str, float] = {}
        holds: dict[str, bool | None] = {}
        gen: list[bool] = []
        for key, curves in measured["curves"].items():
            before, after = self._harm(curves)
            drop = (before - after) if hib else (after - before)
            prefix = "resistance" if key == "attack" else f"generalization/{key}"
            if key == "attack":
                logs[f"{PREFIX}resistance/harm_before_probe"] = before
            logs[f"{PREFIX}{prefix}/harm_after_probe"] = after
            logs[f"{PREFIX}{prefix}/probe_drop"] = drop
            ok = _good_side(after, self.threshold, hib) if self.threshold is not None else None
            if key == "attack":
                holds["resistance"] = ok
                if ok is not None:
                    logs[f"{PREFIX}resistance/holds"] = _flag(ok)
            elif ok is not None:
                gen.append(ok)
        if gen:
            holds["generalization"] = all(gen)
            logs[f"{PREFIX}generalization/holds"] = _flag(all(gen))
        if measured.get("capability") and self.base and self.base.get("capability"):
            stable = True
            for name, value in measured["capability"].items():
                change, degradation = relative_degradation(
                    self.base["capability"][name], value, self.cap_scorer.higher_is_better
                )
                logs[f"{PREFIX}stability/{name}/value"] = value
                logs[f"{PREFIX}stability/{name}/relative_change"] = change
                logs[f"{PREFIX}stability/{name}/relative_degradation"] = degradation
                stable = stable and not math.isnan(degradation) and degradation <= cfg.stability_tolerance
            holds["stability"] = stable
            logs[f"{PREFIX}stability/holds"] = _flag(stable)
        if measured.get("benign") and self.base and self.base.get("benign"):
            final = measured["benign"]["points"][-1]["value"]
            start = self.base["benign"]["points"][-1]["value"]
            _, degradation = relative_degradation(start, final, self.benign_scorer.higher_is_better)
            ok = not math.isnan(degradation) and degradation <= cfg.trainability_tolerance
            logs[f"{PREFIX}trainability/final_score"] = final
            logs[f"{PREFIX}trainability/relative_degradation"] = degradation
            logs[f"{PREFIX}trainability/holds"] = _flag(ok)
            holds["trainability"] = ok
        measured_holds = [v for v in holds.values() if v is not None]
        if holds.get("resistance") is not None:
            logs[f"{PREFIX}all_hold"] = _flag(all(measured_holds))
        return logs

    # -------------------------------------------------------------- logging

    def _log(self, args, state, control, logs: dict[str, float]) -> None:
        """Append to ``state.log_history`` and pass ``logs`` to every other callback's ``on_log``."""
        clean = {k: float(v) for k, v in logs.items() if v is not None}
        if state.epoch is not None:
            clean["epoch"] = state.epoch
        state.log_history.append({**clean, "step": state.global_step})
        handler = find_callback_handler()
        if handler is None:
            logger.debug("ConditionsCallback: no CallbackHandler on the stack; values only in log_history.")
            return
        for cb in handler.callbacks:
            if cb is self:
                continue
            cb.on_log(
                args,
                state,
                control,
                logs=dict(clean),
                model=handler.model,
                processing_class=handler.processing_class,
                optimizer=handler.optimizer,
                lr_scheduler=handler.lr_scheduler,
                train_dataloader=handler.train_dataloader,
                eval_dataloader=handler.eval_dataloader,
            )

    def _probe(self, args, state, control, model, *, final: bool = False) -> dict[str, float]:
        if self.base is None:  # on_train_begin did not run (the callback was added late)
            self._measure_base(model)
        self.num_probes += 1
        # The probe at the last step also measures trainability: the report needs it.
        final = final or bool(state.max_steps and state.global_step >= state.max_steps)
        trainability = self.benign is not None and (
            final or self.num_probes % self.config.trainability_every == 0
        )
        start = time.perf_counter()
        measured = self.measure(model, trainability=trainability)
        seconds = time.perf_counter() - start
        self.probe_seconds += seconds
        self.last = measured
        self.last_probe_step = state.global_step
        logs = self.values(measured)
        logs[f"{PREFIX}probe"] = float(self.num_probes)
        logs[f"{PREFIX}probe_seconds"] = seconds
        logs = same_on_all_ranks(logs)  # the time too: every process logs rank 0's numbers
        self._log(args, state, control, logs)
        return logs

    def _measure_base(self, model) -> None:
        start = time.perf_counter()
        self.base = self.measure(model, trainability=True)
        self.probe_seconds += time.perf_counter() - start
        self._set_threshold()
        logger.info(
            "ConditionsCallback: starting model measured; phi = %.4f (%s)",
            self.threshold,
            self.threshold_source,
        )

    def _probe_every(self, args, state) -> int:
        if self.config.probe_every:
            return self.config.probe_every
        evaluates = str(getattr(args, "eval_strategy", "no")) not in ("no", "IntervalStrategy.NO")
        if evaluates and self.config.probe_at_evaluate:
            return 0
        return max(1, (state.max_steps or 0) // 10)

    # -------------------------------------------------------------- hooks

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step > 0 and self._restore(state):
            logger.info("ConditionsCallback: restored the starting model's measurements from the checkpoint.")
            return
        if state.global_step > 0:
            logger.warning(
                "ConditionsCallback: resuming at step %d without saved callback state; the starting model is "
                "measured from the resumed weights.",
                state.global_step,
            )
        self.num_probes, self.last, self.last_probe_step = 0, None, -1
        self._measure_base(model)

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if not self.config.probe_at_evaluate or model is None:
            return
        if self.last_probe_step == state.global_step:
            logs = self.values(self.last)
        else:
            logs = self._probe(args, state, control, model)
        if metrics is not None:
            metrics.update({k: v for k, v in logs.items() if v is not None})

    def on_step_end(self, args, state, control, model=None, **kwargs):
        every = self._probe_every(args, state)
        due = bool(every) and state.global_step % every == 0
        # The final probe runs at the last step rather than in on_train_end: the reporters (TensorBoard,
        # W&B, trackio) close their runs in their own on_train_end, which the Trainer calls before ours.
        last = self.config.final_probe and bool(state.max_steps) and state.global_step >= state.max_steps
        if (due or last) and state.global_step != self.last_probe_step and model is not None:
            self._probe(args, state, control, model, final=last)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        cfg = self.config
        needs_final = self.last_probe_step != state.global_step or (
            self.benign is not None and not (self.last or {}).get("benign")
        )
        if cfg.final_probe and needs_final and model is not None:
            self._probe(args, state, control, model, final=True)
        if cfg.write_report and self.last is not None:
            report = self.build_report(model)
            if state.is_world_process_zero:
                os.makedirs(args.output_dir, exist_ok=True)
                self.report_path = report.save(os.path.join(args.output_dir, cfg.report_name))
                logger.info("ConditionsCallback: wrote %s (%s)", self.report_path, report.conditions.summary)

    # -------------------------------------------------------------- report

    def build_report(self, model=None) -> ImmunizationReport:
        """The report of the starting model ("base") against the latest probe ("immunized")."""
        cfg = self.config
        if self.base is None or self.last is None:
            raise ConfigError("no probe has run yet: train with the callback before building its report.")
        scorer = self.harm_scorer
        probe = cfg.attack_config()

        def curves(m):
            return {k: [AttackCurve.from_dict(c) for c in cs] for k, cs in m["curves"].items()}

        base_benign = imm_benign = target = eps = None
        if self.base.get("benign") and self.last.get("benign"):
            base_benign = TrainingCurve.from_dict(self.base["benign"])
            imm_benign = TrainingCurve.from_dict(self.last["benign"])
            half = cfg.benign_steps / 2
            target = next(p.value for p in base_benign.points if p.step >= half)
            eps = default_eps_steps(cfg.benign_steps)
        cap_dir = (
            {name: self.cap_scorer.higher_is_better for name in self.reference}
            if self.base.get("capability")
            else None
        )
        threat = ThreatModel(
            attack_family=probe.family,
            scorer=scorer.name,
            higher_is_better=scorer.higher_is_better,
            threshold=float(self.threshold),
            scorer_range=tuple(scorer.range),
            threshold_source=self.threshold_source,
            grid={
                "learning_rates": list(probe.learning_rates),
                "num_samples": list(probe.num_samples),
                "seeds": list(probe.seeds),
            },
            max_steps=probe.max_steps,
            eval_every=probe.eval_every,
            batch_size=probe.batch_size,
            max_length=probe.max_length,
            judge=scorer.judge_info() if hasattr(scorer, "judge_info") else None,
            min_cost_multiple=cfg.min_cost_multiple,
            stability_tolerance=cfg.stability_tolerance,
            trainability_tolerance=cfg.trainability_tolerance,
            trainability_target=target,
            trainability_eps_steps=eps,
        )
        name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
        return build_report(
            threat_model=threat,
            base_model=f"{name} (at train begin)",
            immunized_model=f"{name} (at train end)",
            base_curves=curves(self.base),
            immunized_curves=curves(self.last),
            base_capability=self.base.get("capability") if cap_dir else None,
            immunized_capability=self.last.get("capability") if cap_dir else None,
            capability_higher_is_better=cap_dir,
            base_benign=base_benign,
            immunized_benign=imm_benign,
            defense=self.defense,
            dependencies=dependency_versions(),
            notes=[
                "measured during training by ConditionsCallback: short probe attacks "
                f"({probe.max_steps} steps), not a full attack grid; confirm with evaluate_conditions."
            ],
            extra={"callback_config": asdict(cfg), "probes": self.num_probes},
        )
