"""The data a report records (``report.datasets``) and the :class:`ConditionDatasets` it describes.

``immune-trainer evaluate`` and the demo write the record first and build their datasets from it with
:func:`condition_datasets`; ``immune-trainer verify`` builds them again from the report alone, so what it
re-measures is, row for row, what was measured. The record's keys (every one optional):

* ``attack_train``, ``attack_eval``: SPECs of the main harmful set (resistance);
* ``in_domain_train``, ``in_domain_eval``: SPECs of the held-out in-domain set;
* ``cross_domain``: one SPEC cut in two as ``cross_domain_split`` says: ``"halves"`` (shuffled with
  ``split_seed``; the first half trains, the next rows evaluate; the demo) or ``"train_test_split"``
  (``Dataset.train_test_split(test_size=0.5, seed=0)``; ``immune-trainer evaluate``). Without
  ``cross_domain_split`` the cut is unknown and the set is not rebuilt;
* ``benign_train``, ``benign_eval``: SPECs of the benign task (trainability), or ``benign``: one SPEC cut
  80/20 by ``Dataset.train_test_split(test_size=0.2, seed=0)``;
* ``reference``: ``["NAME=SPEC", ...]``, the stability reference sets, each cut to its first
  ``reference_rows`` rows (default: ``eval_limit``);
* ``harmful_prompts``: a SPEC of the side-effects prompts cut to ``harmful_prompts_rows`` (default:
  ``eval_limit``), or ``"embedded:side_effect_prompts"``:
  :func:`~immune_trainer.evaluation.embedded_side_effect_prompts` of ``harmful_prompts_rows`` prompts drawn
  with ``split_seed`` (without ``harmful_prompts_rows`` the draw is unknown and the set is not rebuilt);
* ``benign_requests``: a SPEC of the benign (XSTest-style) requests of helpfulness's over-refusal check,
  cut to ``benign_requests_rows`` (default: all), e.g. ``embedded:benign_requests``;
* ``split_seed``: the seed every SPEC is loaded with (it draws the embedded harmful splits and the
  embedded arithmetic task); ``eval_limit``: every evaluation set keeps its first ``eval_limit`` rows
  (0: all).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, DataError
from .config import ConditionDatasets

__all__ = ["RecordedDatasets", "condition_datasets"]

SIDE_EFFECT_PROMPTS = "embedded:side_effect_prompts"
"""The record's name for :func:`~immune_trainer.evaluation.embedded_side_effect_prompts` (not a SPEC)."""

CROSS_DOMAIN_SPLITS = ("halves", "train_test_split")


@dataclass
class RecordedDatasets:
    """The datasets a record describes, and why each part that is missing is missing."""

    datasets: ConditionDatasets
    missing: dict[str, str] = field(default_factory=dict)
    """Part (``attack``, ``in_domain``, ``cross_domain``, ``reference``, ``benign``, ``harmful_prompts``) ->
    why it could not be built (not recorded, or its SPEC failed to load)."""


def _int(record: dict[str, Any], key: str, default: int = 0) -> int:
    value = record.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"report.datasets[{key!r}] must be an integer >= 0, got {value!r}.")
    return value


def condition_datasets(
    record: dict[str, Any], *, strict: bool = True, overrides: dict[str, str] | None = None
) -> RecordedDatasets:
    """Build the :class:`ConditionDatasets` a data record describes (the module docstring lists its keys).

    Args:
        record: ``report.datasets`` (or the record a run is about to write).
        strict: raise on a SPEC that does not load (what a run wants); False: leave that part out and say
            why in ``missing`` (what ``verify`` wants: that claim is then "not re-checked").
        overrides: ``{"attack_train": SPEC, "attack_eval": SPEC}`` replacing the recorded attack data.

    Raises:
        ConfigError: a malformed record (a negative ``eval_limit``, an unknown ``cross_domain_split``...).
        DataError, ConfigError: with ``strict``, a SPEC that cannot be loaded (what loading it raised).
    """
    from ..data.loading import load_dataset_spec
    from ..scoring import LM_EVAL_SPEC_PREFIX, LMEvalTasks

    record = {**dict(record or {}), **{k: v for k, v in (overrides or {}).items() if v}}
    seed = _int(record, "split_seed")
    limit = _int(record, "eval_limit")
    out = RecordedDatasets(ConditionDatasets(attack_train=None, attack_eval=None))
    ds = out.datasets

    def load(spec: str):
        return load_dataset_spec(spec, seed=seed)

    def first(data, n: int):
        return data.select(range(n)) if n and len(data) > n else data

    def part(name: str, build) -> None:
        try:
            build()
        except Exception as e:  # noqa: BLE001 - verify names any failure to load a part and goes on
            if strict:
                raise
            out.missing[name] = f"{type(e).__name__}: {e}"

    def pair(name: str, train_key: str, eval_key: str) -> None:
        train_spec, eval_spec = record.get(train_key), record.get(eval_key)
        if not train_spec or not eval_spec:
            if train_spec or eval_spec or name == "attack":
                out.missing[name] = f"the report records no {train_key!r} and {eval_key!r} SPECs"
            return

        def build():
            train, ev = load(train_spec), first(load(eval_spec), limit)
            setattr(ds, f"{name}_train", train)
            setattr(ds, f"{name}_eval", ev)

        part(name, build)

    pair("attack", "attack_train", "attack_eval")
    pair("in_domain", "in_domain_train", "in_domain_eval")

    cross = record.get("cross_domain")
    if cross:
        rule = record.get("cross_domain_split")

        def build_cross():
            if rule not in CROSS_DOMAIN_SPLITS:
                raise DataError(
                    f"the report does not record how its cross_domain set {cross!r} was cut into attack and "
                    f"evaluation rows (cross_domain_split is {rule!r}, not one of {list(CROSS_DOMAIN_SPLITS)})"
                )
            data = load(cross)
            if rule == "halves":
                data = data.shuffle(seed=seed)
                half = len(data) // 2
                end = len(data) if not limit else min(len(data), half + limit)
                ds.cross_domain_train, ds.cross_domain_eval = (
                    data.select(range(half)),
                    data.select(range(half, end)),
                )
            else:
                parts = data.train_test_split(test_size=0.5, seed=0)
                ds.cross_domain_train, ds.cross_domain_eval = parts["train"], first(parts["test"], limit)

        part("cross_domain", build_cross)

    if record.get("benign_train") or record.get("benign_eval"):
        pair("benign", "benign_train", "benign_eval")
    elif record.get("benign"):

        def build_benign():
            parts = load(record["benign"]).train_test_split(test_size=0.2, seed=0)
            ds.benign_train, ds.benign_eval = parts["train"], first(parts["test"], limit)

        part("benign", build_benign)

    refs = record.get("reference")
    if refs:

        def build_reference():
            if isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
                raise ConfigError(f"report.datasets['reference'] must be a list of NAME=SPEC, got {refs!r}.")
            rows = _int(record, "reference_rows", limit)
            sets = {}
            for item in refs:
                name, sep, spec = item.partition("=")
                if not sep:
                    raise ConfigError(f"a reference set is NAME=SPEC, got {item!r}.")
                if spec.startswith(LM_EVAL_SPEC_PREFIX):  # lm-evaluation-harness tasks, not a dataset
                    sets[name] = LMEvalTasks.from_spec(spec, limit=rows or None)
                else:
                    sets[name] = first(load(spec), rows)
            ds.reference = sets

        part("reference", build_reference)

    prompts = record.get("harmful_prompts")
    if prompts:

        def build_prompts():
            n = _int(record, "harmful_prompts_rows", limit)
            if prompts == SIDE_EFFECT_PROMPTS:
                n = _int(record, "harmful_prompts_rows")  # no default: eval_limit says nothing of this draw
                if not n:
                    raise DataError(
                        f"the report records {SIDE_EFFECT_PROMPTS!r} without harmful_prompts_rows: how many "
                        "prompts were drawn is unknown"
                    )
                from .side_effects import embedded_side_effect_prompts

                ds.harmful_prompts = embedded_side_effect_prompts(n, seed=seed)
            else:
                ds.harmful_prompts = first(load(prompts), n)

        part("harmful_prompts", build_prompts)

    requests = record.get("benign_requests")
    if requests:

        def build_requests():
            ds.benign_requests = first(load(requests), _int(record, "benign_requests_rows"))

        part("benign_requests", build_requests)
    return out
