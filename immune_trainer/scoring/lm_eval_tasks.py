"""The ``lm_eval`` capability scorer: lm-evaluation-harness tasks run on the model in memory.

``get_scorer("lm_eval", tasks=["mmlu"], limit=100)`` wraps the model and its tokenizer in lm-eval's
Hugging Face model class (``lm_eval.models.huggingface.HFLM``, which accepts a loaded model: nothing is
saved or reloaded), runs ``lm_eval.simple_evaluate`` on the tasks and returns their accuracy as the
capability g (higher is better, in [0, 1]): each task's ``acc`` (``acc_norm`` when it has no ``acc``,
then ``exact_match``) or the ``metric`` named, the plain mean over the tasks named when there are
several, each task's value in the details. A group (``mmlu``) counts as one task, with lm-eval's own
aggregate over its subtasks; a tag counts as one task, with the plain mean over its tasks.

:class:`LMEvalTasks` is a stability reference set that *names tasks* instead of holding rows: put it
in ``ConditionDatasets.reference`` (or the ``reference`` of an attack search or a defense sweep) and that
set is scored by ``lm_eval`` while the other sets keep the configured capability scorer. On the command
line it is the SPEC ``lm_eval:TASK[,TASK...]`` (options after ``?``: ``lm_eval:mmlu?limit=100``).

lm-evaluation-harness is an optional dependency: ``pip install immune-trainer[lm-eval]``. Its real tasks
download their datasets from the Hugging Face Hub on first use (``datasets`` caches them); a task defined
in a local YAML (``include_path``) with a local data file runs offline. A multiple-choice task costs one
forward pass per row and answer choice (MMLU: 4 per question; lm-eval batches them and reuses a shared
context's logits where it can); ``limit`` caps the rows *per task*, so ``mmlu`` (57 subtasks) with
``limit=100`` scores up to 5,700 questions, 22,800 forward passes.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import logging
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qsl

from ..data.loading import LM_EVAL_PREFIX
from ..errors import ConfigError, DataError
from .plumbing import eval_mode
from .registry import Scorer, ScoreResult, get_scorer, register_scorer

__all__ = [
    "LM_EVAL_INSTALL",
    "LM_EVAL_SPEC_PREFIX",
    "LMEvalScorer",
    "LMEvalTasks",
    "import_lm_eval",
    "lm_eval_version",
    "reference_key",
    "reference_scorer",
]

LM_EVAL_INSTALL = "pip install 'immune-trainer[lm-eval]'"
"""How to install the optional dependency (named in every error about it)."""

LM_EVAL_SPEC_PREFIX = LM_EVAL_PREFIX
"""A reference SPEC that starts with this (``lm_eval:``) names lm-evaluation-harness tasks, not a dataset."""

DEFAULT_METRICS = ("acc", "acc_norm", "exact_match")
"""The metric read off a task when none is named: the first of these the task reports."""

_SPEC_OPTIONS = {"limit": int, "metric": str, "num_fewshot": int, "include_path": str, "batch_size": int}

logger = logging.getLogger(__name__)


def import_lm_eval():
    """Import and return the ``lm_eval`` package.

    Raises:
        ConfigError: lm-evaluation-harness is not installed (the message says how to install it).
    """
    try:
        import lm_eval
    except ImportError as err:
        raise ConfigError(
            "the lm_eval scorer runs lm-evaluation-harness, which is not installed: "
            f"{LM_EVAL_INSTALL} (or pip install 'lm-eval>=0.4.9,<0.5')."
        ) from err
    return lm_eval


def lm_eval_version() -> str:
    """The installed lm-evaluation-harness version (ConfigError when it is missing)."""
    lm_eval = import_lm_eval()
    version = getattr(lm_eval, "__version__", None)
    if version is None:  # pragma: no cover - every 0.4 release sets __version__
        from importlib.metadata import version as dist_version

        version = dist_version("lm_eval")
    return str(version)


def _task_list(tasks: Any, owner: str) -> list[str]:
    """``tasks`` as a list of non-empty names (a comma-separated string is split)."""
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    if not isinstance(tasks, (list, tuple)):
        raise ConfigError(f"{owner}: tasks must be a list of lm-eval task names, got {tasks!r}.")
    names = [t.strip() if isinstance(t, str) else t for t in tasks]
    if not names or not all(isinstance(t, str) and t for t in names):
        raise ConfigError(
            f"{owner}: tasks must name at least one lm-eval task (e.g. ['mmlu'] or ['hellaswag', "
            f"'arc_easy']), got {tasks!r}."
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"{owner}: a task is named twice in {names}.")
    return names


def _folder_hash(path: str | None) -> str | None:
    """A hash of every file under a custom task folder (its YAMLs, code and local data), or None."""
    if path is None:
        return None
    root = Path(path).expanduser()
    if not root.exists():
        raise ConfigError(
            f"lm_eval: include_path {path!r} does not exist; give the folder of your task YAMLs."
        )
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for p in files:
        if "__pycache__" in p.parts:
            continue
        h.update(str(p.relative_to(root) if p != root else p.name).encode())
        with open(p, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- scorer


@register_scorer("lm_eval")
@dataclass
class LMEvalScorer(Scorer):
    """Accuracy on lm-evaluation-harness tasks, run on the model in memory (capability; higher is better).

    ``score(model, tokenizer)`` takes no dataset: the tasks bring their own (a real task downloads it from
    the Hugging Face Hub on first use). ``limit`` caps the rows of each task (of each subtask of a group).
    The model is evaluated in eval mode (each module's mode is restored after), greedily and without
    changing a weight; the tokenizer is copied, so lm-eval's pad-token setup does not touch the caller's;
    lm-eval's seeds are set for the run and the global random states restored after.
    """

    kind: ClassVar[str] = "capability"
    higher_is_better: ClassVar[bool] = True
    range: ClassVar[tuple[float, float]] = (0.0, 1.0)
    description: ClassVar[str] = (
        "Accuracy (acc, acc_norm or a named metric) on lm-evaluation-harness tasks; mean over tasks."
    )

    tasks: list[str] = field(
        default_factory=list,
        metadata={
            "help": "lm-eval task, group or tag names (e.g. mmlu, hellaswag); the value is their mean."
        },
    )
    metric: str | None = field(
        default=None,
        metadata={
            "help": "Metric read off each task (e.g. acc_norm, or exact_match,strict-match with a filter). "
            "None: acc, else acc_norm, else exact_match."
        },
    )
    num_fewshot: int | None = field(
        default=None, metadata={"help": "Few-shot examples per prompt (None: each task's own default)."}
    )
    include_path: str | None = field(
        default=None,
        metadata={
            "help": "Folder (or YAML file) of custom task definitions, for tasks lm-eval does not ship."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.tasks = _task_list(self.tasks, "lm_eval")
        if self.num_fewshot is not None and (not isinstance(self.num_fewshot, int) or self.num_fewshot < 0):
            raise ConfigError(
                f"lm_eval: num_fewshot must be a non-negative integer, got {self.num_fewshot!r}."
            )
        if self.metric is not None and (not isinstance(self.metric, str) or not self.metric.strip()):
            raise ConfigError(
                f"lm_eval: metric must be a metric name such as 'acc_norm', got {self.metric!r}."
            )
        if self.include_path is not None:
            self.include_path = str(self.include_path)
            if not Path(self.include_path).expanduser().exists():
                raise ConfigError(
                    f"lm_eval: include_path {self.include_path!r} does not exist; give the folder of your "
                    "task YAMLs."
                )
        import_lm_eval()  # a missing install fails here, before any model is loaded

    def key_extras(self) -> dict[str, Any]:
        """What a measurement depends on beyond the scalar options: the tasks, lm-eval's version (which
        pins its task definitions) and the content of a custom task folder."""
        return {
            "tasks": list(self.tasks),
            "lm_eval_version": lm_eval_version(),
            "include_path_hash": _folder_hash(self.include_path),
        }

    def score(self, model, tokenizer, dataset=None) -> ScoreResult:
        """Run the tasks on ``model`` and return their (mean) accuracy; details hold each task's value.

        Args:
            dataset: None (the tasks bring their data), or the :class:`LMEvalTasks` this scorer was made
                from.
        """
        if dataset is not None and not (isinstance(dataset, LMEvalTasks) and dataset.scorer() == self):
            raise ConfigError(
                "the lm_eval scorer runs lm-evaluation-harness tasks, which bring their own data: call "
                "score(model, tokenizer) without a dataset (or use LMEvalTasks([...]).scorer()). To score a "
                "dataset, use a scorer such as perplexity."
            )
        lm_eval = import_lm_eval()
        from lm_eval.models.huggingface import HFLM

        results = None
        for manager, complete in _task_managers(self.include_path, self.tasks):
            with eval_mode(model), _lm_eval_run():
                lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=self.batch_size)
                try:
                    results = lm_eval.simple_evaluate(
                        model=lm,
                        tasks=list(self.tasks),
                        num_fewshot=self.num_fewshot,
                        limit=self.limit,
                        task_manager=manager,
                        log_samples=False,
                        bootstrap_iters=0,
                    )
                except KeyError as err:
                    if not complete:
                        continue  # a custom group names lm-eval's own tasks: retry with them indexed too
                    raise ConfigError(f"lm_eval: {err.args[0] if err.args else err}") from err
                except Exception as err:  # noqa: BLE001 - the data of a task could not be loaded
                    if _is_data_error(err):
                        raise DataError(
                            f"lm_eval could not load the data of {', '.join(self.tasks)}: "
                            f"{type(err).__name__}: {str(err)[:300]}. Real lm-eval tasks (mmlu, hellaswag...) "
                            "download their datasets from the Hugging Face Hub on first use: make the Hub "
                            "reachable once (the datasets cache keeps them), or define a task on local data "
                            "(include_path)."
                        ) from err
                    raise
            break
        if results is None:  # pragma: no cover - lm-eval returns None only on non-zero ranks
            raise ConfigError("lm_eval returned no results (a distributed run's non-zero rank?).")
        per_task = {name: _task_value(results, name, self.metric, manager) for name in self.tasks}
        value = sum(t["value"] for t in per_task.values()) / len(per_task)
        return self._result(
            value,
            {
                "dataset": "lm_eval:" + ",".join(self.tasks),
                "tasks": per_task,
                "n": sum(t["n"] for t in per_task.values()),
                "limit": self.limit,
                "num_fewshot": {name: results.get("n-shot", {}).get(name) for name in self.tasks},
                "lm_eval_version": lm_eval_version(),
                "reduction": "mean over tasks" if len(per_task) > 1 else "the task's value",
            },
        )


def _is_data_error(err: BaseException) -> bool:
    """Whether ``err`` comes from loading a task's data (the Hub, the datasets library, a missing file)."""
    module = type(err).__module__ or ""
    return module.startswith(("datasets", "huggingface_hub", "requests", "httpx", "urllib3")) or isinstance(
        err, (ConnectionError, FileNotFoundError, TimeoutError)
    )


@contextlib.contextmanager
def _lm_eval_run() -> Iterator[None]:
    """lm-eval's run seeds python, numpy and torch; restore the caller's random states after. Its warning
    that a loaded model (not a name) was passed is expected here and hidden. Under torchrun, lm-eval
    returns results on LOCAL_RANK 0 only; every process scores its own model here, as the other scorers
    do, so each one is rank 0 for the call."""
    import numpy as np
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    lm_logger = logging.getLogger("lm_eval.models.huggingface")
    level = lm_logger.level
    lm_logger.setLevel(logging.ERROR)
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None:
        os.environ["LOCAL_RANK"] = "0"
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        if local_rank is not None:
            os.environ["LOCAL_RANK"] = local_rank
        lm_logger.setLevel(level)
        random.setstate(py_state)
        np.random.set_state(np_state)


class _TaskManagers:
    """lm-eval's TaskManagers, built once per process: indexing every task lm-eval ships takes seconds.

    With a custom task folder, a manager of that folder alone is tried first (it indexes in milliseconds);
    lm-eval's own tasks are added when a name is not in the folder.
    """

    def __init__(self):
        self._cache: dict[tuple[str | None, bool], Any] = {}

    def _get(self, include_path: str | None, defaults: bool):
        key = (None if include_path is None else str(Path(include_path).expanduser().resolve()), defaults)
        if key not in self._cache:
            from lm_eval.tasks import TaskManager

            self._cache[key] = TaskManager(include_path=key[0], include_defaults=defaults)
        return self._cache[key]

    def __call__(self, include_path: str | None, tasks: Sequence[str]) -> Iterator[tuple[Any, bool]]:
        """The managers to try, in order, each with whether it indexes lm-eval's own tasks too; a name no
        manager knows raises ConfigError (with suggestions)."""
        if include_path is not None:
            custom = self._get(include_path, False)
            if all(name in custom.all_tasks for name in tasks):
                yield custom, False
        full = self._get(include_path, True)
        unknown = [name for name in tasks if name not in full.all_tasks]
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, full.all_tasks, n=3)
                hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
            where = "lm-eval's tasks" + (f" or {include_path!r}" if include_path else "")
            raise ConfigError(
                f"lm_eval: unknown task {'; '.join(hints)}: not in {where}. List them with "
                "`lm-eval ls tasks`; a task of your own needs include_path."
            )
        yield full, True


_task_managers = _TaskManagers()


def _metric_key(metrics: dict[str, Any], metric: str | None) -> str | None:
    """The results key (``metric,filter``) of ``metric`` (or of the first default metric) in ``metrics``."""
    keys = [k for k in metrics if "," in k and "_stderr," not in k]
    if metric is not None and "," in metric:
        return metric if metric in keys else None
    for name in [metric] if metric is not None else DEFAULT_METRICS:
        if f"{name},none" in keys:
            return f"{name},none"
        matches = sorted(k for k in keys if k.split(",", 1)[0] == name)
        if matches:
            return matches[0]
    return None


def _leaves(results: dict, name: str, manager) -> list[str]:
    """The tasks whose results stand for ``name``: a group's subtasks (recursively) or a tag's tasks."""
    subtasks = results.get("group_subtasks", {})
    if name in subtasks:
        return [leaf for child in subtasks[name] for leaf in (_leaves(results, child, manager) or [child])]
    index = getattr(manager, "task_index", {})
    return sorted(n for n, e in index.items() if name in getattr(e, "tags", ()) and n in results["results"])


def _task_value(results: dict, name: str, metric: str | None, manager) -> dict[str, Any]:
    """``{"value", "metric", "n", "metrics"}`` of one task, group or tag named by the user."""
    table = results["results"]
    leaves = _leaves(results, name, manager)
    n = sum(int(results.get("n-samples", {}).get(leaf, {}).get("effective", 0)) for leaf in leaves or [name])
    metrics = table.get(name, {})
    key = _metric_key(metrics, metric)
    if key is not None:
        value = metrics[key]
    else:
        # a tag, or a group lm-eval does not aggregate: the plain mean over its tasks
        parts = [_task_value(results, leaf, metric, manager) for leaf in leaves if leaf != name]
        if not parts:
            wanted = metric or " or ".join(DEFAULT_METRICS)
            have = sorted({k.split(",", 1)[0] for k in metrics if "_stderr," not in k and "," in k})
            raise ConfigError(
                f"lm_eval: task {name!r} reports no {wanted} (it reports: {', '.join(have) or 'nothing'}); "
                "name one of its accuracy metrics with metric=..."
            )
        key = parts[0]["metric"]
        value = sum(p["value"] for p in parts) / len(parts)
    base = key.split(",", 1)[0]
    if results.get("higher_is_better", {}).get(name, {}).get(base) is False:
        raise ConfigError(f"lm_eval: lower is better for {base} of task {name!r}; pick an accuracy metric.")
    if isinstance(value, str) or not 0.0 <= float(value) <= 1.0:
        raise ConfigError(
            f"lm_eval: {base} of task {name!r} is {value!r}, outside [0, 1]; the lm_eval scorer reads "
            "accuracy-like metrics (acc, acc_norm, exact_match...)."
        )
    shown = {k.split(",", 1)[0] if k.endswith(",none") else k: v for k, v in metrics.items() if "," in k}
    return {
        "value": float(value),
        "metric": key,
        "n": n,
        "metrics": {k: v for k, v in shown.items() if "_stderr" not in k},
    }


# ---------------------------------------------------------------------------------- reference set


@dataclass(frozen=True)
class LMEvalTasks:
    """A stability reference set that names lm-evaluation-harness tasks instead of holding rows.

    Put it among the reference sets; that set is scored by the ``lm_eval`` scorer (its accuracy, higher is
    better) and the others by the configured capability scorer::

        ConditionDatasets(..., reference={"mmlu": LMEvalTasks(["mmlu"], limit=100), "text": wikitext})

    On the command line: ``--reference mmlu=lm_eval:mmlu`` (``lm_eval:TASK[,TASK...][?OPTION=VALUE&...]``
    with the options below, e.g. ``lm_eval:hellaswag?limit=200&metric=acc_norm``).

    Args:
        tasks: lm-eval task, group or tag names (a comma-separated string is split).
        limit: rows per task (per subtask of a group); None: all of them.
        metric: the metric read off each task (None: acc, else acc_norm, else exact_match).
        num_fewshot: few-shot examples per prompt (None: each task's default).
        include_path: folder of custom task YAMLs.
        batch_size: requests per forward pass.
    """

    tasks: tuple[str, ...]
    limit: int | None = None
    metric: str | None = None
    num_fewshot: int | None = None
    include_path: str | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(_task_list(self.tasks, "LMEvalTasks")))
        if self.include_path is not None:
            object.__setattr__(self, "include_path", str(self.include_path))
        self.scorer()  # every option checked (and lm-eval's presence) when the set is made

    def scorer(self) -> LMEvalScorer:
        """The ``lm_eval`` scorer of these tasks and options."""
        return get_scorer(
            "lm_eval",
            tasks=list(self.tasks),
            limit=self.limit,
            metric=self.metric,
            num_fewshot=self.num_fewshot,
            include_path=self.include_path,
            batch_size=self.batch_size,
        )

    def key(self) -> dict[str, Any]:
        """What identifies this set's data in the run cache (the data key of a dataset's rows)."""
        return {
            "lm_eval_tasks": list(self.tasks),
            "limit": self.limit,
            "metric": self.metric,
            "num_fewshot": self.num_fewshot,
            "lm_eval_version": lm_eval_version(),
            "include_path_hash": _folder_hash(self.include_path),
        }

    @property
    def spec(self) -> str:
        """The SPEC that names this set on the command line."""
        options = [
            f"{name}={getattr(self, name)}"
            for name in _SPEC_OPTIONS
            if getattr(self, name) is not None and not (name == "batch_size" and self.batch_size == 8)
        ]
        return LM_EVAL_SPEC_PREFIX + ",".join(self.tasks) + ("?" + "&".join(options) if options else "")

    @classmethod
    def from_spec(cls, spec: str, limit: int | None = None) -> LMEvalTasks:
        """Parse ``lm_eval:TASK[,TASK...][?OPTION=VALUE&...]``; ``limit`` applies unless the SPEC sets one.

        Raises:
            ConfigError: not an lm_eval SPEC, no task, an unknown option or a bad value.
        """
        if not isinstance(spec, str) or not spec.startswith(LM_EVAL_SPEC_PREFIX):
            raise ConfigError(f"{spec!r} is not an lm_eval SPEC (lm_eval:TASK[,TASK...]).")
        body, _, query = spec[len(LM_EVAL_SPEC_PREFIX) :].partition("?")
        options: dict[str, Any] = {}
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
        except ValueError:
            raise ConfigError(
                f"lm_eval SPEC {spec!r}: options go after '?' as OPTION=VALUE joined by '&'."
            ) from None
        for name, value in pairs:
            if name not in _SPEC_OPTIONS:
                raise ConfigError(
                    f"lm_eval SPEC {spec!r}: unknown option {name!r}; options: {', '.join(_SPEC_OPTIONS)}."
                )
            try:
                options[name] = _SPEC_OPTIONS[name](value)
            except ValueError:
                raise ConfigError(
                    f"lm_eval SPEC {spec!r}: {name} must be an integer, got {value!r}."
                ) from None
        if limit and "limit" not in options:
            options["limit"] = limit
        return cls(tasks=body, **options)


def reference_scorer(reference, default) -> Scorer:
    """The capability scorer of one reference set: an :class:`LMEvalTasks` set's own ``lm_eval`` scorer,
    else ``default`` (a scorer or a registered name).

    Raises:
        ConfigError: the default is ``lm_eval``, which has no tasks to run on a dataset.
    """
    if isinstance(reference, LMEvalTasks):
        return reference.scorer()
    if default == "lm_eval" or isinstance(default, LMEvalScorer):
        raise ConfigError(
            "capability scorer 'lm_eval' runs tasks, not a dataset: give each set it should score as "
            "LMEvalTasks([...]) (Python) or NAME=lm_eval:TASK (--reference), and keep a dataset scorer such "
            "as perplexity as the capability scorer of the other reference sets."
        )
    return get_scorer(default) if isinstance(default, str) else default


def reference_key(reference) -> Any:
    """What identifies a reference set's data in a cache key: an :class:`LMEvalTasks` set's tasks and
    options, else the hash of the dataset's rows."""
    if isinstance(reference, LMEvalTasks):
        return reference.key()
    from ..run_cache import content_hash

    return content_hash(reference)
