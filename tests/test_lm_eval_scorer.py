"""The ``lm_eval`` capability scorer and LMEvalTasks reference sets, offline: a tiny multiple-choice task
defined in tests/data/lm_eval_task/ (a YAML and a local JSON Lines file) on a tiny random model, whose
accuracy is recomputed here from the model's own log-likelihoods."""

from __future__ import annotations

import copy
import json
import os
import random
import sys
from pathlib import Path

import datasets
import pytest
import torch

from immune_trainer.attacks import AttackConfig, AttackSearch, SearchConfig, SearchSpace, scorer_key
from immune_trainer.data.loading import check_dataset_spec, load_dataset_spec, validate_sources
from immune_trainer.errors import ConfigError, DataError
from immune_trainer.evaluation import ConditionDatasets, EvaluationConfig, EvaluationRun, stability_stage
from immune_trainer.evaluation.specs import load_reference_spec
from immune_trainer.run_cache import RunCache
from immune_trainer.scoring import LMEvalTasks, get_scorer, list_scorers, reference_scorer
from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer

pytest.importorskip("lm_eval", reason="the lm_eval scorer needs lm-evaluation-harness (the lm-eval extra)")

TASK_DIR = Path(__file__).parent / "data" / "lm_eval_task"
TASK = "immune_trainer_tiny_mc"
ROWS = [json.loads(line) for line in (TASK_DIR / "rows.jsonl").read_text().splitlines() if line.strip()]
TEXT = datasets.Dataset.from_dict({"text": ["The quick brown fox jumps over the lazy dog. " * 3] * 4})
PAIRS = datasets.Dataset.from_list(
    [{"prompt": f"Explain step {i}.", "completion": f"Sure, step {i}: mix and bake."} for i in range(8)]
)


@pytest.fixture(autouse=True)
def in_task_dir(monkeypatch):
    """The task's data_files path is relative, and the datasets library resolves it against the working
    directory."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(TASK_DIR)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def models():
    base = tiny_causal_lm("llama", seed=0)
    other = copy.deepcopy(base)
    with torch.no_grad():  # a different model, deterministically
        other.lm_head.weight.mul_(-1.0)
    return base, other


def direct_accuracy(model, tok, rows) -> dict[str, float]:
    """acc and acc_norm of a multiple-choice task, from the model's log-likelihoods computed here: each
    choice's summed log-probability given the question (acc_norm divides it by the choice's length in
    characters), the argmax compared with the gold answer."""
    hits = {"acc": 0, "acc_norm": 0}
    for row in rows:
        context = f"Question: {row['question']}\nAnswer:"
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        lls = []
        for choice in row["choices"]:
            cont = tok(context + " " + choice, add_special_tokens=False)["input_ids"][len(ctx) :]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
            lls.append(sum(float(logp[len(ctx) + i - 1, t]) for i, t in enumerate(cont)))
        normed = [ll / len(choice) for ll, choice in zip(lls, row["choices"])]
        hits["acc"] += int(max(range(len(lls)), key=lls.__getitem__) == row["answer"])
        hits["acc_norm"] += int(max(range(len(normed)), key=normed.__getitem__) == row["answer"])
    return {k: v / len(rows) for k, v in hits.items()}


def test_accuracy_equals_the_models_own_log_likelihood_argmax(models, tok, monkeypatch):
    model = models[0]
    model.train()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    pad, side = tok.pad_token, tok.padding_side
    random.seed(123)
    torch.manual_seed(123)
    states = random.getstate(), torch.get_rng_state()

    scorer = get_scorer("lm_eval", tasks=[TASK], include_path=str(TASK_DIR))
    result = scorer.score(model, tok)
    expected = direct_accuracy(model.eval(), tok, ROWS)
    assert 0 < expected["acc"] < 1 and 0 < expected["acc_norm"] < 1  # a test that can fail
    assert result.value == pytest.approx(expected["acc"])
    task = result.details["tasks"][TASK]
    assert task["metric"] == "acc,none" and task["n"] == len(ROWS) == result.details["n"]
    assert task["metrics"]["acc_norm"] == pytest.approx(expected["acc_norm"])
    assert result.higher_is_better and result.name == "lm_eval" and scorer.range == (0.0, 1.0)
    assert result.details["lm_eval_version"] == scorer_key(scorer)["lm_eval_version"]

    # nothing of the caller's changes: training mode, weights, tokenizer, random states
    model.train()
    get_scorer("lm_eval", tasks=[TASK], include_path=str(TASK_DIR)).score(model, tok)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert (tok.pad_token, tok.padding_side) == (pad, side)
    assert random.getstate() == states[0] and torch.equal(torch.get_rng_state(), states[1])

    # under torchrun every process scores its own model (lm-eval alone answers on LOCAL_RANK 0 only)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert get_scorer("lm_eval", tasks=[TASK], include_path=str(TASK_DIR)).score(model, tok).value == (
        pytest.approx(expected["acc"])
    )
    assert os.environ["LOCAL_RANK"] == "1"

    # a named metric on the first rows only
    norm = get_scorer("lm_eval", tasks=TASK, include_path=str(TASK_DIR), metric="acc_norm", limit=4)
    result = norm.score(model, tok)
    assert result.value == pytest.approx(direct_accuracy(model.eval(), tok, ROWS[:4])["acc_norm"])
    assert result.details["n"] == 4


def test_the_scorer_key_records_tasks_limit_and_version():
    import lm_eval

    key = scorer_key(get_scorer("lm_eval", tasks=["a_task", "b_task"], limit=100, metric="acc_norm"))
    assert key["name"] == "lm_eval" and key["tasks"] == ["a_task", "b_task"] and key["limit"] == 100
    assert key["metric"] == "acc_norm" and key["lm_eval_version"] == lm_eval.__version__
    assert key["include_path_hash"] is None
    with_folder = scorer_key(get_scorer("lm_eval", tasks=[TASK], include_path=str(TASK_DIR)))
    assert len(with_folder["include_path_hash"]) == 16  # the custom task's YAML and data
    assert "lm_eval" in list_scorers("capability")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(), "at least one lm-eval task"),
        (dict(tasks=["mmlu", "mmlu"]), "named twice"),
        (dict(tasks=["mmlu"], num_fewshot=-1), "num_fewshot"),
        (dict(tasks=["mmlu"], include_path="no/such/folder"), "does not exist"),
        (dict(tasks=["mmlu"], limit=0), "limit"),
    ],
)
def test_bad_options_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        get_scorer("lm_eval", **kwargs)


def test_the_scorer_takes_no_dataset(models, tok):
    with pytest.raises(ConfigError, match="bring their own data"):
        get_scorer("lm_eval", tasks=[TASK]).score(models[0], tok, TEXT)


def test_a_missing_lm_eval_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'immune-trainer\[lm-eval\]'"):
        get_scorer("lm_eval", tasks=["mmlu"])
    with pytest.raises(ConfigError, match=r"immune-trainer\[lm-eval\]"):
        LMEvalTasks(["mmlu"], limit=100)
    get_scorer("perplexity")  # the other scorers do not need it


def test_reference_specs_name_tasks():
    tasks = LMEvalTasks.from_spec("lm_eval:mmlu")
    assert tasks == LMEvalTasks(["mmlu"]) and tasks.spec == "lm_eval:mmlu"
    both = LMEvalTasks.from_spec("lm_eval:hellaswag,arc_easy?limit=50&metric=acc_norm&num_fewshot=5")
    assert both.tasks == ("hellaswag", "arc_easy") and both.limit == 50 and both.num_fewshot == 5
    assert LMEvalTasks.from_spec(both.spec) == both
    # --eval_limit caps the rows per task unless the SPEC sets its own limit
    assert load_reference_spec("lm_eval:mmlu", limit=20) == LMEvalTasks(["mmlu"], limit=20)
    assert load_reference_spec("lm_eval:mmlu?limit=5", limit=20).limit == 5
    assert len(load_reference_spec(str(TASK_DIR / "rows.jsonl"), limit=3)) == 3  # a dataset SPEC
    for bad, message in [
        ("lm_eval:", "at least one lm-eval task"),
        ("lm_eval:mmlu?limit=many", "must be an integer"),
        ("lm_eval:mmlu?shots=5", "unknown option"),
        ("lm_eval:mmlu?limit", "OPTION=VALUE"),
    ]:
        with pytest.raises(ConfigError, match=message):
            LMEvalTasks.from_spec(bad)
    # the SPEC passes the CLI's source check without touching the Hub, and is no dataset
    assert check_dataset_spec("lm_eval:mmlu") == "lm_eval"
    validate_sources(datasets=["lm_eval:mmlu,hellaswag"])
    with pytest.raises(DataError, match="only a stability reference set"):
        load_dataset_spec("lm_eval:mmlu")


def test_lm_eval_as_the_capability_scorer_of_a_dataset_is_a_clear_error():
    with pytest.raises(ConfigError, match="runs tasks, not a dataset"):
        reference_scorer(TEXT, "lm_eval")
    assert reference_scorer(TEXT, "perplexity").name == "perplexity"
    assert reference_scorer(LMEvalTasks([TASK], limit=3), "perplexity").limit == 3


def test_stability_scores_each_reference_set_with_its_own_scorer(models, tok, tmp_path):
    base, other = models
    tasks = LMEvalTasks([TASK], include_path=str(TASK_DIR))
    data = ConditionDatasets(attack_train=TEXT, attack_eval=TEXT, reference={"mc": tasks, "text": TEXT})
    said: list[str] = []
    run = EvaluationRun(base, other, tok, data, EvaluationConfig(), said.append, RunCache(tmp_path))
    result = stability_stage(run)
    assert result.base["mc"] == pytest.approx(direct_accuracy(base, tok, ROWS)["acc"])
    assert result.immunized["mc"] == pytest.approx(direct_accuracy(other, tok, ROWS)["acc"])
    assert result.base["text"] == pytest.approx(get_scorer("perplexity").score(base, tok, TEXT).value)
    assert result.higher_is_better == {"mc": True, "text": False}
    assert said == ["[stability] lm_eval on mc", "[stability] perplexity on text"]
    assert result.scorers["mc"]["tasks"] == [TASK] and result.scorers["text"]["name"] == "perplexity"
    # the run cache keys an lm_eval measurement by its tasks: a second evaluation reuses all four
    again = EvaluationRun(base, other, tok, data, EvaluationConfig(), said.append, RunCache(tmp_path))
    assert stability_stage(again) == result and again.cache.hits == 4 and again.cache.misses == 0


def test_an_attack_search_caps_capability_on_lm_eval_tasks(models, tok, tmp_path):
    """Capability is measured on the model as the attacker deploys it: here with a soft prompt."""
    search = AttackSearch(
        AttackConfig(family="embedding_universal", num_virtual_tokens=2, max_steps=1, eval_every=1, max_length=64),
        SearchConfig(search=1, search_dir=str(tmp_path), capability_tolerance=1.0),
        SearchSpace(search_space=["learning_rate"]),
        reference={"mc": LMEvalTasks([TASK], include_path=str(TASK_DIR), limit=4), "text": TEXT},
    )
    assert search.budget()["capability_scorer"] == "lm_eval (mc), perplexity (text)"
    (trial,) = search.run(models[0], tok, PAIRS, PAIRS).trials
    assert set(trial.capability_before) == {"mc", "text"}
    assert trial.capability_before["mc"] == pytest.approx(direct_accuracy(models[0], tok, ROWS[:4])["acc"])
    assert 0 <= trial.capability_after["mc"] <= 1 and trial.capability_after["text"] > 1


def test_cli_evaluate_takes_an_lm_eval_reference_set(models, tok, tmp_path):
    from immune_trainer.cli import main

    for name, model in zip(("base", "immunized"), models):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    PAIRS.to_json(tmp_path / "pairs.jsonl")
    spec = f"mc=lm_eval:{TASK}?include_path={TASK_DIR}"
    report = tmp_path / "report.json"
    argv = ["evaluate", "--model", str(tmp_path / "immunized"), "--base_model", str(tmp_path / "base")]
    argv += ["--dataset", str(tmp_path / "pairs.jsonl"), "--eval_dataset", str(tmp_path / "pairs.jsonl")]
    argv += ["--reference", spec, f"chat={tmp_path / 'pairs.jsonl'}", "--eval_limit", "4"]
    argv += ["--max_steps", "1", "--eval_every", "1", "--max_length", "64", "--report", str(report)]
    assert main(argv) == 0
    data = json.loads(report.read_text())
    assert data["capability"]["higher_is_better"] == {"mc": True, "chat": False}
    assert data["capability"]["base"]["mc"] == pytest.approx(direct_accuracy(models[0], tok, ROWS[:4])["acc"])
    key = data["extra"]["capability_scorers"]["mc"]
    assert key["tasks"] == [TASK] and key["limit"] == 4 and key["lm_eval_version"]
    assert data["extra"]["capability_scorers"]["chat"]["name"] == "perplexity"
    assert data["datasets"]["reference"] == [spec, f"chat={tmp_path / 'pairs.jsonl'}"]
