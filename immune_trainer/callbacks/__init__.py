"""Track the four immunization conditions while a model is being trained.

:class:`ConditionsCallback` is a ``transformers.TrainerCallback`` that works with any ``Trainer`` (an
:class:`~immune_trainer.trainer.ImmunizationTrainer` or a user's own). At each evaluation (and/or every
``probe_every`` optimizer steps) it *probes* the current weights:

- **resistance**: a short harmful fine-tuning attack (:class:`~immune_trainer.attacks.HarmfulFineTuningAttack`,
  family ``full`` or ``lora``) of a private copy of the current model; logs the harm before and after the
  probe and the drop the probe caused;
- **stability**: the capability scorer g on each reference set, against the value measured on the
  starting model at train begin;
- **generalization**: the resistance probe on the in-domain and cross-domain sets, when given;
- **trainability** (every ``trainability_every`` probes): a short benign fine-tune of a copy.

Values are logged under ``conditions/...`` keys (see :data:`LOG_KEYS`): they are appended to
``state.log_history`` (so they land in ``trainer_state.json``), passed to every callback's ``on_log``
(TensorBoard, W&B, trackio...; transformers' reporters show every key that is not an ``eval_`` metric
under ``train/``, so TensorBoard's tags read ``train/conditions/...``), and added to the metrics returned
by ``trainer.evaluate()`` when the probe runs inside an evaluation. At the last step (or at train end,
when training stops early) the final model is probed once more and
``immunization_report.json`` is written to ``args.output_dir`` (main process only, atomically) with
:func:`~immune_trainer.conditions.report.build_report`: the starting model's probes are the "base" measurements,
the final model's the "immunized" ones.

The trained weights are never touched: every probe works on a ``deepcopy``, and the global random
number generators (Python, NumPy, torch CPU and CUDA) and accelerate's shared gradient state are saved
before a probe and restored after it, so a run with the callback trains exactly the same weights as a run
without it.

Checkpoints: the callback is an ``ExportableState``. Its starting-model measurements and counters are
saved in ``trainer_state.json`` (``stateful_callbacks``) with every checkpoint and restored in
``on_train_begin`` when training resumes, so the starting model is *not* re-measured from the resumed
weights. Leave ``TrainingArguments.restore_callback_states_from_checkpoint`` at ``False``: the callback
restores itself (the Trainer's restore would rebuild it without its datasets).

Distributed training (DDP): every process runs the same probes on the same data (a nested Trainer on
rank 0 only would hang the collective calls of the others). The probes' copies start from identical
weights and their gradients are averaged across processes, and the scorers read the whole evaluation
sets on every process, so the numbers agree; to be certain, the values of rank 0 are broadcast to all
processes before they are logged, so every rank logs and decides early stopping on the same numbers.
Only the main process writes the report.

:class:`ConditionsEarlyStoppingCallback` reads those logged values from ``state.log_history`` and stops
training when stability breaks its tolerance, or when all measured conditions held for ``patience``
consecutive probes.

Modules: :mod:`.config` (:data:`LOG_KEYS`, :class:`ConditionsCallbackConfig`), :mod:`.conditions` (the
callback), :mod:`.isolation` (RNG and accelerate state around a probe, rank 0's values on every rank),
:mod:`.early_stopping`.
"""

from __future__ import annotations

from .conditions import ConditionsCallback
from .config import LOG_KEYS, PREFIX, ConditionsCallbackConfig
from .early_stopping import ConditionsEarlyStoppingCallback

__all__ = [
    "LOG_KEYS",
    "PREFIX",
    "ConditionsCallbackConfig",
    "ConditionsCallback",
    "ConditionsEarlyStoppingCallback",
]
