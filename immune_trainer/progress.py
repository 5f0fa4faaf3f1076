"""Progress a person can follow: tqdm bars with the time left, and no raw log dictionaries on screen.

:class:`StepBar` is a Trainer callback that shows one bar over a run's optimizer steps (a defense, an
attack run, a benign fine-tune) and puts the few numbers worth watching in the bar's postfix, where the
Trainer's own :class:`~transformers.ProgressCallback` would print every log dictionary. :class:`StageBar`
counts the stages of a longer job (the evaluation's attack runs, probes and fine-tunes) with an estimate
of the time left, and writes the stage's one-line message above the bar.
"""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm
from transformers import TrainerCallback


def bars_enabled() -> bool:
    """Bars are on unless ``IMMUNE_TRAINER_NO_PROGRESS`` is set (tests, logs of batch jobs)."""
    return not os.environ.get("IMMUNE_TRAINER_NO_PROGRESS")


class StepBar(TrainerCallback):
    """A bar over a Trainer's optimizer steps, on the main process only.

    Args:
        desc: the bar's label (e.g. ``"defense"`` or ``"attack full lr=8e-05 seed=0"``).
        keys: log keys shown in the postfix when the Trainer logs them (``loss`` and the defense's
            per-term losses, for example); nothing else of a log dictionary is printed.
        leave: keep the finished bar on screen.
    """

    def __init__(self, desc: str, keys: tuple[str, ...] = ("loss",), leave: bool = False):
        self.desc, self.keys, self.leave = desc, keys, leave
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and bars_enabled():
            self.bar = tqdm(
                total=state.max_steps,
                desc=self.desc,
                leave=self.leave,
                dynamic_ncols=True,
                file=sys.stderr,
                initial=state.global_step,
                unit="step",
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs:
            shown = {
                k.split("/")[-1]: f"{v:.3g}"
                for k, v in logs.items()
                if k in self.keys and isinstance(v, float)
            }
            if shown:
                self.bar.set_postfix(shown, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StageBar:
    """A bar over the stages of a job; ``say(message)`` writes the message and, for a stage, advances.

    A message that starts a new stage (``is_stage(message)``) closes the previous one; every message is
    written above the bar, so the log reads as before while the bar estimates the time left.
    """

    def __init__(self, total: int, desc: str, is_stage=lambda message: True, write=None):
        self.is_stage = is_stage
        self.write = write or (lambda message: tqdm.write(message, file=sys.stdout))
        self.started = False
        self.bar = (
            tqdm(total=total, desc=desc, dynamic_ncols=True, unit="stage", file=sys.stderr)
            if bars_enabled() and total > 0
            else None
        )

    def __call__(self, message: str) -> None:
        if self.bar is not None and self.is_stage(message):
            if self.started:
                self.bar.update(1)
            self.started = True
        self.write(message)

    def close(self) -> None:
        if self.bar is not None:
            if self.started:
                self.bar.update(1)
            self.bar.close()
            self.bar = None
