"""Harmfulness scorers f and capability scorers g, in one registry, and the judges they use.

The modules:

* :mod:`.registry`: ``KINDS``, :class:`ScoreResult`, the :class:`Scorer` base class and the registry
  (``SCORERS``, ``register_scorer``, ``get_scorer``, ``list_scorers``).
* :mod:`.plumbing`: what every scorer shares: ``eval_mode``, tokenizer settings, the model's device.
* :mod:`.loss`: the loss-based scorers, ``length_batches`` and ``scorer_options``.
* :mod:`.generation`: ``generate_responses`` (greedy answers) and the generation-based scorers
  (``refusal_rate`` with ``ADVBENCH_REFUSAL_PREFIXES``, ``benign_accuracy`` with ``NORMALIZERS``).
* :mod:`.judges`: the judge scorers (``classifier_judge``, ``offline_judge``) and :class:`JudgeScorer`,
  the base of every judge scorer.
* :mod:`.lm_judges`: the judges the field reports with, each a language model in its authors' format
  (``strongreject``, ``harmbench_classifier``, ``llama_guard``), their prompts and parsers.
* :mod:`.offline_judge`: the embedded offline harm judge (:class:`OfflineHarmJudge`), its training and
  loading.
* :mod:`.lm_eval_tasks`: the ``lm_eval`` scorer (lm-evaluation-harness tasks on the model in memory, an
  optional dependency) and :class:`LMEvalTasks`, a reference set that names tasks; ``reference_scorer``
  and ``reference_key`` pick each reference set's scorer and cache key.

Registered scorers (``import immune_trainer.scoring`` registers them):

- ``harmful_loss`` (f, higher is better): token-weighted mean NLL of the harmful responses.
- ``classifier_judge`` (f, lower is better): mean harm probability given by a sequence classifier
  (default: the DeBERTa BeaverTails classifier used by RepNoise) or any judge object with
  ``score(prompts, responses)``, over greedy answers to held-out harmful prompts.
- ``offline_judge`` (f, lower is better): the same with the embedded offline judge
  (:class:`immune_trainer.scoring.offline_judge.OfflineHarmJudge`).
- ``strongreject`` (f, lower is better): StrongREJECT's rubric (Souly et al. 2024) graded by any chat
  model, ``(1 - refused) * (convincing + specific - 2) / 8``.
- ``harmbench_classifier`` (f, lower is better): P("Yes") of HarmBench's classifier prompt
  (``cais/HarmBench-Llama-2-13b-cls`` by default).
- ``llama_guard`` (f, lower is better): P("unsafe") of Llama Guard through its own chat template
  (``meta-llama/Llama-Guard-3-1B`` by default).
- ``refusal_rate`` (f, higher is better): AdvBench/GCG keyword refusal rate of greedy answers.
- ``perplexity`` (g, lower is better): token-weighted perplexity on a reference set.
- ``benign_loss`` (g, lower is better): token-weighted mean NLL of benign responses.
- ``benign_accuracy`` (g, higher is better): exact-match accuracy of greedy answers on a benign task.
- ``lm_eval`` (g, higher is better): accuracy on lm-evaluation-harness tasks (``pip install
  immune-trainer[lm-eval]``), e.g. ``get_scorer("lm_eval", tasks=["mmlu"], limit=100)``.
"""

from __future__ import annotations

from .generation import (
    ADVBENCH_REFUSAL_PREFIXES,
    NORMALIZERS,
    BenignAccuracyScorer,
    RefusalRateScorer,
    first_number,
    generate_responses,
    normalize_whitespace,
)
from .judges import DEFAULT_HARM_CLASSIFIER, ClassifierJudgeScorer, JudgeScorer, OfflineJudgeScorer
from .lm_eval_tasks import (
    LM_EVAL_INSTALL,
    LM_EVAL_SPEC_PREFIX,
    LMEvalScorer,
    LMEvalTasks,
    reference_key,
    reference_scorer,
)
from .lm_judges import (
    DEFAULT_HARMBENCH_CLASSIFIER,
    DEFAULT_LLAMA_GUARD,
    HarmBenchClassifierScorer,
    LlamaGuardScorer,
    StrongRejectScorer,
)
from .loss import (
    CALL_COST_TOKENS,
    BenignLossScorer,
    HarmfulLossScorer,
    PerplexityScorer,
    length_batches,
    scorer_options,
)
from .offline_judge import (
    JUDGE_DIRNAME,
    JUDGE_FILENAME,
    JUDGE_FORMAT_VERSION,
    PACKAGED_JUDGE,
    OfflineHarmJudge,
    judge_path,
    judge_training_rows,
    train_offline_judge,
)
from .plumbing import eval_mode
from .registry import KINDS, SCORERS, Scorer, ScoreResult, get_scorer, list_scorers, register_scorer

__all__ = [
    "SCORERS",
    "ADVBENCH_REFUSAL_PREFIXES",
    "DEFAULT_HARM_CLASSIFIER",
    "ScoreResult",
    "Scorer",
    "register_scorer",
    "get_scorer",
    "list_scorers",
    "generate_responses",
    "eval_mode",
    "HarmfulLossScorer",
    "ClassifierJudgeScorer",
    "OfflineJudgeScorer",
    "JudgeScorer",
    "StrongRejectScorer",
    "HarmBenchClassifierScorer",
    "LlamaGuardScorer",
    "DEFAULT_HARMBENCH_CLASSIFIER",
    "DEFAULT_LLAMA_GUARD",
    "RefusalRateScorer",
    "PerplexityScorer",
    "BenignLossScorer",
    "BenignAccuracyScorer",
    "LMEvalScorer",
    "LMEvalTasks",
    "LM_EVAL_INSTALL",
    "LM_EVAL_SPEC_PREFIX",
    "reference_scorer",
    "reference_key",
    # also public in the old scorers module
    "KINDS",
    "scorer_options",
    "CALL_COST_TOKENS",
    "length_batches",
    "NORMALIZERS",
    "normalize_whitespace",
    "first_number",
    # the old judge module
    "PACKAGED_JUDGE",
    "OfflineHarmJudge",
    "judge_path",
    "judge_training_rows",
    "train_offline_judge",
    "JUDGE_DIRNAME",
    "JUDGE_FILENAME",
    "JUDGE_FORMAT_VERSION",
]
