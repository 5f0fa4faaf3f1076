"""Stop training on the conditions :class:`~immune_trainer.callbacks.ConditionsCallback` logged."""

from __future__ import annotations

import logging
import math

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..errors import ConfigError
from .config import PREFIX

logger = logging.getLogger(__name__)

__all__ = ["ConditionsEarlyStoppingCallback"]


class ConditionsEarlyStoppingCallback(TrainerCallback, ExportableState):
    """Stop training when stability breaks, or when every measured condition held for ``patience`` probes.

    It reads the entries :class:`ConditionsCallback` appends to ``state.log_history`` (those with a
    ``conditions/probe`` key): ``conditions/stability/<set>/relative_degradation`` against
    ``stability_tolerance`` (by default the one the ConditionsCallback judged with, via
    ``conditions/stability/holds``), and ``conditions/all_hold``. Put it after the ConditionsCallback
    in ``callbacks`` so it acts at the same step; placed before, it acts at the next step.

    Args:
        patience: consecutive probes at which all conditions must hold before stopping (0: never stop
            for success).
        stop_on_stability_break: stop as soon as stability fails.
        stability_tolerance: overrides the tolerance of the ConditionsCallback (relative degradation).
    """

    def __init__(
        self,
        patience: int = 3,
        stop_on_stability_break: bool = True,
        stability_tolerance: float | None = None,
    ):
        if patience < 0:
            raise ConfigError(f"patience must be >= 0, got {patience}.")
        if stability_tolerance is not None and (
            not math.isfinite(stability_tolerance) or stability_tolerance < 0
        ):
            raise ConfigError(f"stability_tolerance must be a finite number >= 0, got {stability_tolerance}.")
        self.patience = patience
        self.stop_on_stability_break = stop_on_stability_break
        self.stability_tolerance = stability_tolerance
        self.consecutive = 0
        self.seen = 0
        self.stop_reason: str | None = None

    def state(self) -> dict:
        return {
            "args": {
                "patience": self.patience,
                "stop_on_stability_break": self.stop_on_stability_break,
                "stability_tolerance": self.stability_tolerance,
            },
            "attributes": {"consecutive": self.consecutive, "seen": self.seen},
        }

    def on_train_begin(self, args, state, control, **kwargs):
        # Entries already in the (resumed) history were judged before the checkpoint.
        self.seen = len(state.log_history)

    def _stable(self, entry: dict) -> bool | None:
        if self.stability_tolerance is None:
            v = entry.get(f"{PREFIX}stability/holds")
            return None if v is None else bool(v)
        degradations = [
            v
            for k, v in entry.items()
            if k.startswith(f"{PREFIX}stability/") and k.endswith("/relative_degradation")
        ]
        if not degradations:
            return None
        return all(not math.isnan(d) and d <= self.stability_tolerance for d in degradations)

    def _check(self, state, control):
        new = state.log_history[self.seen :]
        self.seen = len(state.log_history)
        for entry in new:
            if f"{PREFIX}probe" not in entry:
                continue
            stable = self._stable(entry)
            if self.stop_on_stability_break and stable is False:
                self.stop_reason = f"stability broke its tolerance at step {entry.get('step')}"
                logger.warning("ConditionsEarlyStoppingCallback: %s; stopping.", self.stop_reason)
                control.should_training_stop = True
                return control
            if entry.get(f"{PREFIX}all_hold") == 1.0:
                self.consecutive += 1
            else:
                self.consecutive = 0
            if self.patience and self.consecutive >= self.patience:
                self.stop_reason = f"all conditions held for {self.consecutive} consecutive probes"
                logger.info("ConditionsEarlyStoppingCallback: %s; stopping.", self.stop_reason)
                control.should_training_stop = True
                return control
        return control

    def on_step_end(self, args, state, control, **kwargs):
        return self._check(state, control)

    def on_evaluate(self, args, state, control, **kwargs):
        return self._check(state, control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        return self._check(state, control)
