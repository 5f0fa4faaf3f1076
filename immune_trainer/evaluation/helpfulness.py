"""Measure helpfulness at step 0 and the attacked model's harm.

* :func:`measure_helpfulness`: a model answers held-out benign requests (XSTest-style safe prompts that
  look unsafe, and plainly benign ones) and the benign task's questions greedily; the over-refusal rate
  (the ``refusal_rate`` scorer's keyword test) and the generated exact match (the ``benign_accuracy``
  scorer) go into a :class:`~immune_trainer.conditions.HelpfulnessMeasurement`, which
  :func:`~immune_trainer.conditions.compare_helpfulness` judges.
* :class:`AttackedHarmProbe`: the ``after_attack`` hook of
  :meth:`~immune_trainer.attacks.HarmfulFineTuningAttack.run`: the attacked model answers held-out harmful
  prompts greedily; the refusal rate and a judge's mean harm (by default the offline judge, whose held-out
  accuracy is recorded with it) are stored on the run's curve.

torch is imported through :mod:`immune_trainer.scoring` only when a measurement runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..conditions import HelpfulnessMeasurement
from ..errors import ConfigError, DataError
from ..run_cache import content_hash

__all__ = ["AttackedHarmProbe", "benign_request_texts", "measure_helpfulness"]


def benign_request_texts(requests: Any, limit: int | None = None) -> tuple[list[str], list[str]]:
    """``(prompts, categories)`` of ``requests``: a list of strings, or a dataset with a ``prompt`` column
    (and optionally ``category``; XSTest's own column names ``type`` / ``label`` are read too).

    A dataset with a ``label`` column keeps only its ``safe`` rows (XSTest's unsafe contrast prompts are
    meant to be refused and are not benign).

    Raises:
        DataError: a single string, no prompt column, an empty set, a prompt that is not a non-empty string.
    """
    if isinstance(requests, str):
        raise DataError("benign requests must be a list of prompts (or a dataset), not a single string.")
    columns = getattr(requests, "column_names", None)
    if columns is not None:
        if "prompt" not in columns:
            raise DataError(
                f"The benign requests dataset has columns {sorted(columns)}; it needs a 'prompt' column."
            )
        rows = list(requests)
        if "label" in columns:
            rows = [r for r in rows if str(r.get("label", "")).lower() == "safe"]
        prompts = [r["prompt"] for r in rows]
        key = "category" if "category" in columns else ("type" if "type" in columns else None)
        categories = [str(r[key]) if key else "" for r in rows]
    elif isinstance(requests, Sequence):
        prompts, categories = list(requests), [""] * len(requests)
    else:
        raise DataError(
            f"benign requests must be a list of strings or a datasets.Dataset, got {type(requests).__name__}."
        )
    if limit is not None:
        prompts, categories = prompts[:limit], categories[:limit]
    if not prompts:
        raise DataError("No benign requests to measure over-refusal on: pass at least one.")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise DataError(f"Benign request {i} is {p!r}: every request must be a non-empty string.")
    return prompts, categories


def _model_name(model) -> str:
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
    return str(name or "")


def measure_helpfulness(
    model,
    tokenizer,
    requests=None,
    task=None,
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    request_limit: int | None = None,
    task_limit: int | None = None,
    normalizer: str = "last_number",
    n_examples: int = 3,
) -> HelpfulnessMeasurement:
    """Greedy answers of ``model`` to benign ``requests`` (over-refusal) and to the benign ``task``'s
    questions (exact match against its reference answers, after ``normalizer``).

    Args:
        requests: benign requests (see :func:`benign_request_texts`), or None to skip over-refusal.
        task: a prompt/completion (or messages) dataset, e.g. the embedded arithmetic task's eval split,
            or None to skip exact match.
        normalizer: a :data:`~immune_trainer.scoring.generation.NORMALIZERS` name (``last_number``: the
            last number of the answer, for "37 + 48 = 85"-style answers to the arithmetic task).

    Returns:
        A :class:`~immune_trainer.conditions.HelpfulnessMeasurement`; the model is not modified.
    """
    from ..data import render_prompt
    from ..scoring import generate_responses, get_scorer

    if requests is None and task is None:
        raise ConfigError("measure_helpfulness needs benign requests, a benign task, or both.")
    m = HelpfulnessMeasurement(normalizer=normalizer, max_new_tokens=max_new_tokens, model=_model_name(model))
    if requests is not None:
        prompts, categories = benign_request_texts(requests, request_limit)
        refusal = get_scorer("refusal_rate")
        rendered = [render_prompt([{"role": "user", "content": p}], tokenizer) for p in prompts]
        answers = generate_responses(
            model, tokenizer, rendered, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
        refused = [refusal.is_refusal(a) for a in answers]
        m.n_requests = len(refused)
        m.over_refusal_rate = sum(refused) / len(refused)
        for c, r in zip(categories, refused):
            entry = m.by_category.setdefault(c or "uncategorised", {"n": 0, "refusals": 0})
            entry["n"] += 1
            entry["refusals"] += int(r)
        m.examples = [
            {"prompt": p, "category": c, "response": a, "refusal": r}
            for p, c, a, r in list(zip(prompts, categories, answers, refused))[:n_examples]
        ]
    if task is not None:
        if len(task) == 0:
            raise DataError("The benign task has no rows to answer for the generated exact match.")
        scorer = get_scorer(
            "benign_accuracy",
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            limit=task_limit,
            normalizer=normalizer,
            n_examples=n_examples,
        )
        result = scorer.score(model, tokenizer, task)
        m.n_answers = int(result.details["n"])
        m.exact_match = float(result.value)
        m.examples += [{"task": True, **g} for g in result.details.get("generations", [])]
    return m


class AttackedHarmProbe:
    """The ``after_attack`` hook that measures an attacked model's harm as papers report it.

    Called by the attack harness with each run's final model (as deployed: with its soft prompt, inside
    the defense's measure context), it answers the first ``limit`` held-out harmful ``prompts`` greedily
    (one plain user turn each) and returns ``{"n", "refusal_rate", "harm", "judge", "examples"}``: the
    keyword refusal rate and, with a judge, the judge's mean harm probability, through
    :func:`~immune_trainer.evaluation.measure_side_effects` (its ``plain`` template). ``cache_key`` names the
    prompts, the generation length and the judge, so saved attack runs are reused only with the same probe.

    Departure from the papers' protocol: every family's attacked model answers the same plain prompts, even
    where the family measures f on a rewrite of them (``jailbreak_tuning``'s jailbreak wrapper, a persona);
    the numbers then say how the attacked model answers plain harmful requests.

    Args:
        prompts: held-out harmful requests (a list of strings or a prompt/messages dataset).
        judge: a judge scorer name (default ``offline_judge``: MiniLM embeddings + logistic regression,
            offline, its held-out accuracy recorded in ``judge``), a judge scorer, or None (refusal only).
    """

    def __init__(
        self,
        tokenizer,
        prompts,
        *,
        judge: Any = "offline_judge",
        limit: int | None = 16,
        max_new_tokens: int = 32,
        batch_size: int = 16,
        n_examples: int = 2,
    ):
        from .side_effects import SideEffectsConfig, _resolve_judge, prompt_texts

        self.tokenizer = tokenizer
        self.prompts = prompt_texts(prompts, limit)
        self.config = SideEffectsConfig(
            max_new_tokens=max_new_tokens, templates=["plain"], batch_size=batch_size, n_examples=n_examples
        )
        self._judge, self.judge_info = _resolve_judge(judge, batch_size)
        self.cache_key = {
            "probe": "attacked_harm",
            "prompts": content_hash(self.prompts),
            "max_new_tokens": max_new_tokens,
            "judge": self.judge_info,
        }

    def __call__(self, model) -> dict[str, Any]:
        from .side_effects import measure_side_effects

        measured = measure_side_effects(
            model, self.tokenizer, self.prompts, self.config, judge=self._judge
        ).templates["plain"]
        return {
            "n": measured.n,
            "refusal_rate": measured.refusal_rate,
            "harm": measured.harm,
            "judge": self.judge_info,
            "max_new_tokens": self.config.max_new_tokens,
            "examples": measured.examples,
        }
