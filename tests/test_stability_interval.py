"""Stability's paired bootstrap interval: the arithmetic (pure), the verdict rule, the table, and the
per-row NLLs it is computed from (perplexity scorer, stability stage, run cache)."""

from __future__ import annotations

import copy
import itertools
import math

import datasets
import numpy as np
import pytest
import torch
from conftest import make_pairs

from immune_trainer import ConditionDatasets, EvaluationConfig
from immune_trainer.conditions.stability import perplexity_change_interval, stability
from immune_trainer.errors import ConfigError
from immune_trainer.evaluation import EvaluationRun, stability_stage
from immune_trainer.run_cache import RunCache
from immune_trainer.scoring import get_scorer
from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer

BASE = ([20.0, 35.0, 12.0], [10, 20, 8])
IMMUNIZED = ([21.0, 38.0, 12.5], [10, 20, 8])


def _ppl(nll, tokens) -> float:
    return math.exp(sum(nll) / sum(tokens))


def test_bootstrap_matches_exact_enumeration_of_all_resamples():
    (nb, tb), (nm, tm) = BASE, IMMUNIZED
    changes = []
    for idx in itertools.product(range(3), repeat=3):  # all 27 equally likely resamples
        b = _ppl([nb[i] for i in idx], [tb[i] for i in idx])
        m = _ppl([nm[i] for i in idx], [tm[i] for i in idx])
        changes.append((m - b) / b)
    # the percentiles of the exact resampling distribution (27 equally likely outcomes) vs many draws
    for level in (0.95, 0.5):
        q = [(1 - level) / 2, (1 + level) / 2]
        exact = np.quantile(changes, q, method="inverted_cdf")
        low, high = perplexity_change_interval(BASE, IMMUNIZED, draws=100_000, level=level)
        assert low == pytest.approx(exact[0], abs=1e-3) and high == pytest.approx(exact[1], abs=1e-3)
    low, high = perplexity_change_interval(BASE, IMMUNIZED)
    assert min(changes) <= low < high <= max(changes)
    # reproducible: a fixed seed
    assert perplexity_change_interval(BASE, IMMUNIZED) == perplexity_change_interval(BASE, IMMUNIZED)


def test_paired_identical_rows_give_a_zero_interval():
    rows = ([3.0, 7.5, 1.25, 40.0], [2, 5, 1, 30])
    assert perplexity_change_interval(rows, rows) == (0.0, 0.0)
    # a constant per-token shift is a constant ratio whatever the resample: the interval is one point
    shifted = ([v + 0.1 * t for v, t in zip(*rows)], rows[1])
    low, high = perplexity_change_interval(rows, shifted)
    assert low == pytest.approx(math.exp(0.1) - 1) and high == pytest.approx(math.exp(0.1) - 1)


def test_bootstrap_rejects_unpaired_rows():
    with pytest.raises(ConfigError, match="same rows"):
        perplexity_change_interval(BASE, ([1.0], [1]))
    with pytest.raises(ConfigError, match="same length"):
        perplexity_change_interval(([1.0, 2.0], [1]), ([1.0], [1]))


def _judge(base_rows, imm_rows, tolerance=0.10, with_rows=True):
    b, m = _ppl(*base_rows), _ppl(*imm_rows)
    rows = {"chat": {"base": base_rows, "immunized": imm_rows}} if with_rows else None
    return stability(
        {"chat": b}, {"chat": m}, higher_is_better={"chat": False}, tolerance=tolerance, rows=rows
    )


def test_point_inside_interval_outside_fails_with_a_note():
    rng = np.random.default_rng(1)  # 16 rows: +9.5% at the point, 95% +4.7%..+15.7%
    tokens = rng.integers(50, 500, 16)
    nb = tokens * rng.uniform(1.5, 2.5, 16)
    nm = nb * rng.uniform(0.95, 1.15, 16)
    r = _judge((nb, tokens), (nm, tokens))
    s = r.sets["chat"]
    assert s.relative_degradation <= 0.10 < s.change_interval[1]
    assert s.holds is False and r.holds is False
    assert any("within tolerance at the point estimate but not over the interval" in n for n in r.notes)
    assert "more reference rows would decide" in r.notes[0]
    # without rows: today's point rule
    plain = _judge((nb, tokens), (nm, tokens), with_rows=False)
    assert plain.holds is True and plain.sets["chat"].change_interval is None


def test_interval_inside_the_tolerance_passes_and_the_table_shows_it():
    from immune_trainer.conditions import ThreatModel, build_report

    base = ([20.0, 35.0, 12.0, 18.0], [10, 20, 8, 9])
    imm = ([20.2, 35.3, 12.1, 18.2], [10, 20, 8, 9])
    r = _judge(base, imm)
    low, high = r.sets["chat"].change_interval
    assert r.holds and 0 < low <= r.sets["chat"].relative_change <= high < 0.10
    report = build_report(
        threat_model=ThreatModel(
            attack_family="full", scorer="harmful_loss", threshold=1.0, higher_is_better=True
        ),
        base_model="b",
        immunized_model="m",
        base_curves=None,
        immunized_curves={},
        base_capability={"chat": _ppl(*base)},
        immunized_capability={"chat": _ppl(*imm)},
        capability_higher_is_better={"chat": False},
        capability_rows={"chat": {"base": base, "immunized": imm}},
    )
    table = report.table()
    assert "95% +" in table and ".." in table
    again = type(report).from_dict(report.to_dict())  # the interval survives the JSON round trip
    assert again.conditions.stability.sets["chat"].change_interval == pytest.approx([low, high])


@pytest.fixture(scope="module")
def models():
    base = tiny_causal_lm("llama", seed=0)
    immunized = copy.deepcopy(base)
    with torch.no_grad():
        immunized.lm_head.weight.mul_(0.5)
    return base, immunized, tiny_tokenizer()


@pytest.mark.parametrize("kind", ["text", "chat"])
def test_perplexity_rows_sum_to_its_totals(models, kind):
    base, _, tok = models
    if kind == "text":
        ds = datasets.Dataset.from_dict(
            {"text": ["The quick brown fox jumps over the lazy dog. " * 3, "Hi there."]}
        )
    else:
        ds = make_pairs(5)
    scorer = get_scorer("perplexity", max_length=16 if kind == "text" else 64, batch_size=2)
    r = scorer.score(base, tok, ds)
    nll, tokens = r.details["row_nll"], r.details["row_tokens"]
    assert sum(tokens) == r.details["tokens"]
    assert math.exp(sum(nll) / sum(tokens)) == pytest.approx(r.value, rel=1e-5)
    if kind == "text":
        assert len(nll) > len(ds)  # per chunk
    else:
        assert len(nll) == len(ds)
        one = get_scorer("perplexity", batch_size=1).score(base, tok, ds.select([3]))
        assert nll[3] == pytest.approx(one.details["row_nll"][0], rel=1e-5)  # dataset order
    loss = get_scorer("benign_loss", max_length=64).score(base, tok, ds if kind == "chat" else make_pairs(3))
    assert sum(loss.details["row_tokens"]) == loss.details["tokens"]


def test_stability_stage_keeps_the_rows_and_caches_them(models, tmp_path):
    base, immunized, tok = models
    ref = {"chat": make_pairs(6, offset=50)}
    data = ConditionDatasets(attack_train=make_pairs(4), attack_eval=make_pairs(2, offset=100), reference=ref)

    def run():
        cfg = EvaluationConfig(benign_scorer="benign_loss")
        return EvaluationRun(base, immunized, tok, data, cfg, lambda _: None, cache=RunCache(tmp_path))

    first = run()
    result = stability_stage(first)
    rows = result.rows["chat"]
    assert set(rows) == {"base", "immunized"} and len(rows["base"][0]) == 6
    assert rows["base"][1] == rows["immunized"][1]
    assert math.exp(sum(rows["base"][0]) / sum(rows["base"][1])) == pytest.approx(
        result.base["chat"], rel=1e-5
    )
    second = run()
    again = stability_stage(second)
    assert second.cache.hits == 2 and second.cache.misses == 0
    assert again.rows == result.rows and again.base == result.base
    # an old entry (a bare number) is scored again for its rows
    for path in (tmp_path / "capability").glob("*.json"):
        import json

        payload = json.loads(path.read_text())
        payload["value"] = payload["value"]["value"]
        path.write_text(json.dumps(payload))
    third = run()
    old = stability_stage(third)
    assert third.cache.misses == 2 and old.rows == result.rows
