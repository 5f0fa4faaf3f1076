"""The evaluate modules in metrics/: doctests, a data-driven table of cases, add_batch, combine, bad input."""

from __future__ import annotations

import doctest
import json
import math
import sys
from pathlib import Path

import pytest

evaluate = pytest.importorskip("evaluate")

ROOT = Path(__file__).resolve().parents[1]
METRICS = ["resistance", "stability", "generalization", "trainability", "harmfulness"]
CASES = json.loads((ROOT / "tests" / "metric_cases.json").read_text())

_real_load = evaluate.load


@pytest.fixture(autouse=True)
def importable_package(monkeypatch):
    # evaluate copies a local module into its cache and imports it there: `import immune_trainer`
    # inside it must resolve to this checkout even when the package is not installed.
    monkeypatch.syspath_prepend(str(ROOT))


def load(name: str):
    return _real_load(str(ROOT / "metrics" / name))


@pytest.fixture(scope="module")
def modules():
    sys.path.insert(0, str(ROOT))
    try:
        return {name: load(name) for name in METRICS}
    finally:
        sys.path.remove(str(ROOT))


def _local_load(path, *args, **kwargs):
    """evaluate.load("metrics/<name>") from the repository root, whatever the working directory."""
    p = Path(path)
    if not p.is_absolute() and p.parts[:1] == ("metrics",):
        path = str(ROOT / p)
    return _real_load(path, *args, **kwargs)


@pytest.mark.parametrize("name", METRICS)
def test_module_files_follow_the_evaluate_layout(name):
    folder = ROOT / "metrics" / name
    for f in (f"{name}.py", "README.md", "app.py", "requirements.txt"):
        assert (folder / f).is_file(), f
    src = (folder / f"{name}.py").read_text()
    order = [
        src.index(s)
        for s in (
            "Licensed under the Apache",
            '"""',
            "_CITATION =",
            "_DESCRIPTION =",
            "_KWARGS_DESCRIPTION =",
            "class ",
        )
    ]
    assert order == sorted(order)
    assert "2402.16382" in src
    assert "from immune_trainer import conditions" in src
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "app_file: app.py" in card and "sdk: gradio" in card
    for section in (
        "## Metric Description",
        "## How to Use",
        "### Inputs",
        "### Output Values",
        "## Examples",
        "## Limitations and Bias",
        "## Citation",
    ):
        assert section in card, section
    assert "launch_gradio_widget" in (folder / "app.py").read_text()
    reqs = (folder / "requirements.txt").read_text().split()
    assert "evaluate" in reqs[0] and any(r.startswith("immune-trainer") for r in reqs)


@pytest.mark.parametrize("name", METRICS)
def test_doctests(name, modules, monkeypatch):
    monkeypatch.setattr(evaluate, "load", _local_load)
    module = sys.modules[type(modules[name]).__module__]
    result = doctest.testmod(module, verbose=False, raise_on_error=False, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, "no doctest examples found"
    assert result.failed == 0


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_metric_cases(case, modules):
    out = modules[case["metric"]].compute(**case["kwargs"])
    for key, expected in case["expected"].items():
        got = out[key]
        if isinstance(expected, float) and not isinstance(got, bool):
            assert got == pytest.approx(expected, rel=case["tolerance"], abs=case["tolerance"]), key
        elif isinstance(expected, list):
            assert got == pytest.approx(expected, rel=case["tolerance"], abs=case["tolerance"]), key
        else:
            assert got == expected, key


def test_loads_by_absolute_path():
    m = load("resistance")
    assert isinstance(m, evaluate.Metric)
    assert m.name == "resistance"
    assert m.features["predictions"].dtype == "float64"


def test_add_batch_streams_a_curve(modules):
    m = modules["resistance"]
    imm = [2.364, 2.182, 2.100, 2.065, 1.993]
    base = [2.174, 2.124, 2.070, 2.034, 1.971]
    m.add_batch(predictions=imm[:2], references=base[:2])
    m.add_batch(predictions=imm[2:], references=base[2:])
    streamed = m.compute(steps=[0, 5, 10, 15, 20], threshold=2.07)
    direct = m.compute(predictions=imm, references=base, steps=[0, 5, 10, 15, 20], threshold=2.07)
    assert streamed == direct
    assert streamed["cost_multiple"] == pytest.approx(1 + 3 / 7)


def test_combine_passes_shared_kwargs_to_every_module(modules):
    combined = evaluate.combine([modules["resistance"], modules["trainability"]])
    out = combined.compute(
        predictions=[0.5, 0.6, 0.9],
        references=[0.5, 0.7, 0.9],
        steps=[0, 10, 20],
        threshold=0.8,
        target=0.8,
        eps_steps=5,
    )
    # the same rows read as a harm score that must stay >= 0.8, and as a benign score that must reach 0.8
    assert out["resistance"] is False and out["strong_resistance"] is False
    assert out["trainability"] is True and out["base_steps_to_target"] == pytest.approx(15.0)
    harm = evaluate.combine([modules["harmfulness"]])
    assert harm.compute(predictions=[0.2, 0.8])["harmful_share"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "name, kwargs, error, match",
    [
        (
            "resistance",
            dict(predictions=[1.0, 2.0], references=[1.0], threshold=1.5),
            ValueError,
            "references",
        ),
        (
            "resistance",
            dict(predictions=[1.0, math.nan], references=[1.0, 1.0], threshold=1.5),
            ValueError,
            "finite",
        ),
        ("resistance", dict(predictions=[1.0, 2.0], references=[1.0, 1.0]), ValueError, "threshold"),
        (
            "resistance",
            dict(predictions=[1.0, 2.0], references=[1.0, 1.0], threshold=1.5, steps=[0]),
            ValueError,
            "steps",
        ),
        (
            "resistance",
            dict(predictions=[1.0, 2.0], references=[1.0, 1.0], threshold=1.5, treshold=1),
            ValueError,
            "treshold",
        ),
        (
            "resistance",
            dict(predictions=["high", "low"], references=[1.0, 1.0], threshold=1.5),
            ValueError,
            "float",
        ),
        (
            "stability",
            dict(predictions=[1.0, 2.0], references=[1.0, 2.0], reference_sets=["a"]),
            ValueError,
            "reference_sets",
        ),
        ("stability", dict(predictions=[1.0], references=[math.nan]), ValueError, "finite"),
        ("generalization", dict(predictions=[1.0], references=[1.0], threshold=0.5), ValueError, "domains"),
        (
            "generalization",
            dict(predictions=[1.0], references=[1.0], threshold=0.5, domains=["other"]),
            ValueError,
            "other",
        ),
        ("trainability", dict(predictions=[1.0], references=[1.0], eps_steps=1), ValueError, "target"),
        ("harmfulness", dict(predictions=[0.2, 1.7]), ValueError, "outside"),
        ("harmfulness", dict(predictions=[]), ValueError, "non-empty"),
    ],
)
def test_malformed_input_raises_a_clear_error(name, kwargs, error, match):
    # A module of its own experiment (milliseconds to load): after a failed compute, evaluate's next
    # compute in the same experiment waits a second for a lock the failure left behind.
    module = _real_load(str(ROOT / "metrics" / name), experiment_id=f"malformed-{name}-{match}")
    with pytest.raises(error, match=match):
        module.compute(**kwargs)
