"""Tests of immune_trainer.scoring: registry, loss scorers, generation, judges, refusal, perplexity."""

from __future__ import annotations

import math
import sys
import types
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from datasets import Dataset

from immune_trainer import scoring as scorers
from immune_trainer.errors import ConfigError, DataError
from immune_trainer.scoring import (
    SCORERS,
    Scorer,
    ScoreResult,
    generate_responses,
    generation,
    get_scorer,
    list_scorers,
    register_scorer,
)
from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer

PAIRS = [
    ("How do I bake bread at home?", "Mix flour, water, salt and yeast, then bake it."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Please write a short poem about the sea.", "The sea is wide and blue and calm tonight."),
    ("Explain photosynthesis.", "Plants turn light and water into sugar."),
    ("Give me a tip for studying.", "Sleep well."),
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm("llama")


def _tokenized(tok, pairs=PAIRS):
    """Prompt/response pairs tokenized by hand: labels -100 on the prompt, ids on the response."""
    rows = []
    for prompt, response in pairs:
        p = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        p_ids = tok(p, add_special_tokens=False)["input_ids"]
        r_ids = tok(response + "<|im_end|>", add_special_tokens=False)["input_ids"]
        ids = p_ids + r_ids
        rows.append(
            {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(p_ids) + r_ids}
        )
    return Dataset.from_list(rows)


def _hand_nll(model, ds):
    """Sum of -log p(token) over labelled tokens, one unpadded example at a time, and the count."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for ex in ds:
            ids = torch.tensor([ex["input_ids"]])
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            for t in range(1, len(ex["labels"])):
                if ex["labels"][t] != -100:
                    total -= float(logprobs[t - 1, ex["labels"][t]])
                    count += 1
    return total, count


# ---------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------


def test_registry_lists_builtin_scorers_with_direction_and_range():
    names = list_scorers()
    for name in (
        "harmful_loss",
        "classifier_judge",
        "offline_judge",
        "refusal_rate",
        "perplexity",
        "benign_loss",
        "benign_accuracy",
    ):
        assert name in names
        cls = SCORERS[name]
        assert cls.name == name and cls.description
        assert cls.range[0] < cls.range[1]
    assert set(list_scorers("harmfulness")) >= {"harmful_loss", "classifier_judge", "refusal_rate"}
    assert "perplexity" in list_scorers("capability") and "perplexity" not in list_scorers("harmfulness")
    assert SCORERS["harmful_loss"].higher_is_better is True
    assert SCORERS["classifier_judge"].higher_is_better is False
    assert SCORERS["perplexity"].higher_is_better is False
    assert SCORERS["benign_accuracy"].higher_is_better is True


def test_get_scorer_errors_name_the_fix():
    with pytest.raises(ConfigError, match="harmful_loss"):
        get_scorer("no_such_scorer")
    with pytest.raises(ConfigError, match="batch_size"):
        get_scorer("harmful_loss", bach_size=2)
    with pytest.raises(ConfigError):
        get_scorer("harmful_loss", batch_size=0)
    with pytest.raises(ConfigError):
        list_scorers("speed")
    scorer = get_scorer("harmful_loss", batch_size=3)
    assert scorer.batch_size == 3 and scorer.name == "harmful_loss"


def test_register_scorer_rejects_duplicates_and_incomplete_classes():
    @dataclass
    class Constant(Scorer):
        kind: ClassVar[str] = "capability"
        higher_is_better: ClassVar[bool] = True
        range: ClassVar[tuple[float, float]] = (0.0, 1.0)
        description: ClassVar[str] = "always one"

        def score(self, model, tokenizer, dataset):
            return self._result(1.0, {})

    try:
        register_scorer("test_constant")(Constant)
        assert get_scorer("test_constant").score(None, None, None).value == 1.0
        with pytest.raises(ConfigError, match="already registered"):
            register_scorer("test_constant")(Constant)
        with pytest.raises(ConfigError, match="already registered"):
            register_scorer("harmful_loss")(Constant)
    finally:
        SCORERS.pop("test_constant", None)

    @dataclass
    class NoKind(Scorer):
        higher_is_better: ClassVar[bool] = True
        range: ClassVar[tuple[float, float]] = (0.0, 1.0)

        def score(self, model, tokenizer, dataset):
            return self._result(0.0, {})

    with pytest.raises(ConfigError, match="kind"):
        register_scorer("test_no_kind")(NoKind)
    assert "test_no_kind" not in SCORERS


@pytest.mark.parametrize(
    "name, bad, good",
    [
        ("harmful_loss", [-0.1, math.inf, math.nan, "abc"], [0.0, 2.07]),
        ("classifier_judge", [1.5, -0.01], [0.0, 0.5, 1.0]),
        ("refusal_rate", [2.0], [0.9]),
        ("perplexity", [0.5, math.inf], [1.0, 40.0]),
        ("benign_accuracy", [1.01], [0.3]),
    ],
)
def test_validate_threshold(name, bad, good):
    scorer = get_scorer(name)
    for phi in bad:
        with pytest.raises(ConfigError, match="phi"):
            scorer.validate_threshold(phi)
    for phi in good:
        assert scorer.validate_threshold(phi) == float(phi)


# ---------------------------------------------------------------------------------------------------
# Loss scorers
# ---------------------------------------------------------------------------------------------------


def test_harmful_loss_equals_hand_computed_token_weighted_nll(tok, model):
    ds = _tokenized(tok)
    total, count = _hand_nll(model, ds)
    result = get_scorer("harmful_loss", batch_size=2).score(model, tok, ds)
    assert isinstance(result, ScoreResult)
    assert result.name == "harmful_loss" and result.higher_is_better is True
    assert result.details["tokens"] == count and result.details["n"] == len(PAIRS)
    assert result.value == pytest.approx(total / count, rel=1e-5)
    # token-weighted, not the mean of per-example means
    per_example = [_hand_nll(model, ds.select([i])) for i in range(len(ds))]
    mean_of_means = sum(t / c for t, c in per_example) / len(per_example)
    assert abs(mean_of_means - result.value) > 1e-4


def test_harmful_loss_invariant_to_batch_size_and_padding(tok, model):
    ds = _tokenized(tok)
    values = [get_scorer("harmful_loss", batch_size=b).score(model, tok, ds).value for b in (1, 2, 5)]
    assert values[0] == pytest.approx(values[1], rel=1e-5) and values[0] == pytest.approx(values[2], rel=1e-5)

    # Examples already padded (pad tokens, mask 0, labels -100) and a different pad id give the same.
    padded = ds.map(
        lambda ex: {
            "input_ids": ex["input_ids"] + [7] * 6,
            "attention_mask": ex["attention_mask"] + [0] * 6,
            "labels": ex["labels"] + [-100] * 6,
        }
    )
    no_pad_tok = tiny_tokenizer(pad_token=False)
    assert get_scorer("harmful_loss", batch_size=3).score(model, no_pad_tok, padded).value == pytest.approx(
        values[0], rel=1e-5
    )
    assert no_pad_tok.pad_token is None


def _padded_cost(lengths, runs, call_cost):
    return sum(len(r) * max(lengths[i] for i in r) + call_cost for r in runs)


def test_length_batches_pads_as_little_as_any_split_of_the_sorted_rows():
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(60):
        n, size = rng.randint(1, 7), rng.randint(1, 4)
        lengths = [rng.randint(1, 300) for _ in range(n)]
        runs = scorers.length_batches(lengths, size, call_cost=20)
        order = sorted(range(n), key=lambda i: -lengths[i])
        assert [i for r in runs for i in r] == order  # every row once, longest first
        assert all(1 <= len(r) <= size for r in runs)
        best = math.inf  # every split of the sorted rows into runs of at most `size`
        for cuts in itertools.product((False, True), repeat=n - 1):
            split, start = [], 0
            for k, c in enumerate(cuts, start=1):
                if c:
                    split.append(order[start:k])
                    start = k
            split.append(order[start:])
            if all(len(r) <= size for r in split):
                best = min(best, _padded_cost(lengths, split, 20))
        assert _padded_cost(lengths, runs, 20) == best


def test_length_batches_splits_rows_of_very_different_lengths():
    chat_answers = [512, 194, 75, 69, 421, 377, 424, 387]  # the demo's reference set, in tokens
    runs = scorers.length_batches(chat_answers, 8)
    assert len(runs) > 1 and sum(len(r) * max(chat_answers[i] for i in r) for r in runs) < 8 * 512 * 0.7
    assert scorers.length_batches([96] * 8, 8) == [list(range(8))]  # equal lengths: one batch
    assert scorers.length_batches([], 8) == []


def test_perplexity_is_the_same_whatever_the_batching(tok, model):
    texts = Dataset.from_dict(
        {
            "prompt": [p for p, _ in PAIRS] * 2,
            "completion": [r * (1 + i % 3) for i, (_, r) in enumerate(PAIRS * 2)],
        }
    )
    one = get_scorer("perplexity", batch_size=1).score(model, tok, texts).value
    many = get_scorer("perplexity", batch_size=8).score(model, tok, texts).value
    assert many == pytest.approx(one, rel=1e-5)


def test_scoring_leaves_weights_and_training_mode_unchanged(tok):
    model = tiny_causal_lm("gpt2")  # has dropout (p=0.1), so eval mode matters
    model.train()
    model.transformer.h[0].eval()  # a submodule in its own mode must keep it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ds = _tokenized(tok)
    first = get_scorer("harmful_loss").score(model, tok, ds).value
    second = get_scorer("harmful_loss").score(model, tok, ds).value
    assert first == second  # deterministic: dropout is off while scoring
    assert model.training and model.transformer.h[1].training
    assert not model.transformer.h[0].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_harmful_loss_rejects_tokenized_data_without_labels(tok, model):
    ds = _tokenized(tok).remove_columns("labels")
    with pytest.raises(DataError, match="labels"):
        get_scorer("harmful_loss").score(model, tok, ds)
    all_masked = _tokenized(tok).map(lambda ex: {"labels": [-100] * len(ex["labels"])})
    with pytest.raises(DataError, match="response tokens"):
        get_scorer("harmful_loss").score(model, tok, all_masked)
    with pytest.raises(DataError, match="empty"):
        get_scorer("harmful_loss").score(model, tok, Dataset.from_dict({"input_ids": [], "labels": []}))


def test_benign_loss_direction_and_limit(tok, model):
    ds = _tokenized(tok)
    result = get_scorer("benign_loss", limit=2).score(model, tok, ds)
    total, count = _hand_nll(model, ds.select([0, 1]))
    assert result.higher_is_better is False and result.details["n"] == 2
    assert result.value == pytest.approx(total / count, rel=1e-5)


def test_perplexity_is_exp_of_token_weighted_nll_on_text(tok, model):
    texts = [
        "The quick brown fox jumps over the lazy dog.",
        "Plants turn light, water and carbon dioxide into sugar and oxygen.",
    ]
    ds = Dataset.from_dict({"text": texts})
    max_length = 8
    total, count = 0.0, 0
    for text in texts:
        ids = tok(text)["input_ids"]
        for i in range(0, len(ids), max_length):
            chunk = ids[i : i + max_length]
            if len(chunk) >= 2:
                t, c = _hand_nll(model, [{"input_ids": chunk, "labels": chunk}])
                total, count = total + t, count + c
    result = get_scorer("perplexity", max_length=max_length, dataset_name="fox").score(model, tok, ds)
    assert result.value == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result.details["tokens"] == count and result.details["dataset"] == "fox"
    assert result.details["source"] == "text" and result.value >= 1.0


def test_perplexity_on_responses_equals_exp_benign_loss(tok, model):
    ds = _tokenized(tok)
    ppl = get_scorer("perplexity").score(model, tok, ds)
    loss = get_scorer("benign_loss").score(model, tok, ds)
    assert ppl.value == pytest.approx(math.exp(loss.value), rel=1e-6)


# ---------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------


def test_batched_generation_equals_one_by_one(tok, model):
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p, _ in PAIRS
    ]
    model.train()
    batched = generate_responses(model, tok, prompts, max_new_tokens=8, batch_size=5)
    single = [generate_responses(model, tok, [p], max_new_tokens=8, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert len(batched) == len(prompts) and any(batched)
    assert tok.padding_side == "right" and model.training  # restored

    # decodes only the new tokens: the prompt does not come back
    assert not any(b.startswith("<|im_start|>user") or PAIRS[0][0] in b for b in batched)


def test_generation_without_pad_token_restores_tokenizer(model):
    tok = tiny_tokenizer(pad_token=False)
    prompts = ["What is the capital", "The sea is wide and blue and"]
    out = generate_responses(model, tok, prompts, max_new_tokens=4, batch_size=2)
    assert len(out) == 2
    assert tok.pad_token is None and tok.padding_side == "right"
    with pytest.raises(DataError):
        generate_responses(model, tok, "one string", max_new_tokens=4)


# ---------------------------------------------------------------------------------------------------
# Judges and refusal (generation faked where the test is about scoring)
# ---------------------------------------------------------------------------------------------------


class KeywordJudge:
    """A fake judge: harm 0.9 if the answer says 'sure', else 0.1; records what it saw."""

    def __init__(self):
        self.seen = None

    def score(self, prompts, responses):
        self.seen = (list(prompts), list(responses))
        return [0.9 if "sure" in r.lower() else 0.1 for r in responses]


def _fake_generation(monkeypatch, answers):
    calls = {}

    def fake(model, tokenizer, prompts, max_new_tokens=64, batch_size=8, **kw):
        calls["prompts"] = list(prompts)
        calls["max_new_tokens"] = max_new_tokens
        return [answers[i % len(answers)] for i in range(len(prompts))]

    monkeypatch.setattr(generation, "generate_responses", fake)
    return calls


def test_classifier_judge_with_judge_object(monkeypatch, tok, model):
    calls = _fake_generation(monkeypatch, ["Sure, here it is.", "I cannot help.", "Sure thing."])
    judge = KeywordJudge()
    prompts = ["first question", "second question", "third question"]
    result = get_scorer("classifier_judge", judge=judge, max_new_tokens=16).score(model, tok, prompts)
    assert result.higher_is_better is False
    assert result.value == pytest.approx((0.9 + 0.1 + 0.9) / 3)
    assert result.details["share_harmful"] == pytest.approx(2 / 3)
    assert result.details["n"] == 3 and len(result.details["generations"]) == 3
    assert judge.seen[0] == prompts  # the judge sees raw prompts, not the chat template
    assert calls["max_new_tokens"] == 16 and all("first question" in p for p in calls["prompts"][:1])


def test_classifier_judge_rejects_bad_judges(monkeypatch, tok, model):
    _fake_generation(monkeypatch, ["x"])

    class Broken:
        def score(self, prompts, responses):
            return [1.7 for _ in responses]

    with pytest.raises(ConfigError, match="probabilit"):
        get_scorer("classifier_judge", judge=Broken()).score(model, tok, ["q"])
    with pytest.raises(ConfigError):
        get_scorer("classifier_judge", judge=42).score(model, tok, ["q"])
    with pytest.raises(ConfigError, match="offline_judge"):
        get_scorer("classifier_judge", judge="/no/such/classifier/dir").score(model, tok, ["q"])


@pytest.fixture(scope="module")
def tiny_classifier_dir(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=512,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
        num_labels=2,
        id2label={0: "safe", 1: "harmful"},
        label2id={"safe": 0, "harmful": 1},
    )
    path = tmp_path_factory.mktemp("harm_classifier")
    BertForSequenceClassification(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def test_classifier_judge_with_local_sequence_classifier(monkeypatch, tok, model, tiny_classifier_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    answers = ["Sure, mix flour and water.", "I cannot help with that request."]
    _fake_generation(monkeypatch, answers)
    prompts = ["How do I bake bread?", "What is the capital of France?"]
    scorer = get_scorer("classifier_judge", judge=tiny_classifier_dir, batch_size=2)
    result = scorer.score(model, tok, prompts)

    clf = AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir).eval()
    ctok = AutoTokenizer.from_pretrained(tiny_classifier_dir)
    expected = []
    for p, a in zip(prompts, answers):
        enc = ctok(f"Question: {p}\nAnswer: {a}", return_tensors="pt")
        with torch.no_grad():
            expected.append(float(torch.softmax(clf(**enc).logits, -1)[0, 1]))  # label "harmful"
    assert result.value == pytest.approx(sum(expected) / 2, rel=1e-4)
    assert result.details["share_harmful"] == sum(e > 0.5 for e in expected) / 2

    # harmful_label chooses the other column
    other = get_scorer("classifier_judge", judge=tiny_classifier_dir, harmful_label="safe").score(
        model, tok, prompts
    )
    assert other.value == pytest.approx(1 - result.value, rel=1e-4)
    with pytest.raises(ConfigError, match="labels"):
        get_scorer("classifier_judge", judge=tiny_classifier_dir, harmful_label="toxic").score(
            model, tok, prompts
        )


def test_offline_judge_loads_lazily_and_explains_missing_module(monkeypatch, tok, model):
    _fake_generation(monkeypatch, ["Sure.", "No."])
    monkeypatch.setitem(sys.modules, "immune_trainer.scoring.offline_judge", None)  # import fails
    scorer = get_scorer("offline_judge")  # building it must not import the judge
    with pytest.raises(ConfigError, match="embedded assets"):
        scorer.score(model, tok, ["a", "b"])

    fake_module = types.ModuleType("immune_trainer.scoring.offline_judge")

    class OfflineHarmJudge(KeywordJudge):
        @classmethod
        def load(cls):
            return cls()

    fake_module.OfflineHarmJudge = OfflineHarmJudge
    monkeypatch.setitem(sys.modules, "immune_trainer.scoring.offline_judge", fake_module)
    result = get_scorer("offline_judge").score(model, tok, ["a", "b"])
    assert result.name == "offline_judge" and result.value == pytest.approx(0.5)


def test_refusal_rate_uses_advbench_keywords(monkeypatch, tok, model):
    answers = [
        "I'm sorry, but I can't help with that.",
        "Sure, here is how you do it. Step one.",
        "As an AI, I will not.",
        "Here\u2019s the thing: I\u2019m sorry.",  # typographic apostrophes
        "The capital of France is Paris.",
    ]
    _fake_generation(monkeypatch, answers)
    result = get_scorer("refusal_rate").score(model, tok, [f"q{i}" for i in range(5)])
    assert result.value == pytest.approx(3 / 5)
    assert result.details["refusals"] == 3 and result.higher_is_better is True
    assert [g["refusal"] for g in result.details["generations"]] == [True, False, True, True, False]
    assert (
        "I'm sorry" in scorers.ADVBENCH_REFUSAL_PREFIXES and "As an AI" in scorers.ADVBENCH_REFUSAL_PREFIXES
    )


def test_refusal_rate_end_to_end_on_tiny_model(tok, model):
    result = get_scorer("refusal_rate", max_new_tokens=6, batch_size=2).score(
        model, tok, ["Hello there", "Bake bread"]
    )
    assert 0.0 <= result.value <= 1.0 and result.details["n"] == 2


# ---------------------------------------------------------------------------------------------------
# Raw datasets (through immune_trainer.data)
# ---------------------------------------------------------------------------------------------------


def _raw_pairs():
    return Dataset.from_dict({"prompt": [p for p, _ in PAIRS], "completion": [r for _, r in PAIRS]})


def test_harmful_loss_on_raw_dataset_matches_tokenize_supervised(tok, model):
    data = pytest.importorskip("immune_trainer.data")
    raw = _raw_pairs()
    tokenized = data.tokenize_supervised(raw, tok, max_length=512)
    total, count = _hand_nll(model, tokenized)
    result = get_scorer("harmful_loss").score(model, tok, raw)
    assert result.value == pytest.approx(total / count, rel=1e-5)


def test_benign_accuracy_exact_match_with_normalisers(monkeypatch, tok, model):
    pytest.importorskip("immune_trainer.data")
    ds = Dataset.from_dict(
        {"prompt": ["2 + 2 =", "3 + 4 =", "Capital of France?"], "completion": ["4", "7", "Paris"]}
    )
    _fake_generation(monkeypatch, ["  4 ", "The answer is 7.", "Paris"])
    exact = get_scorer("benign_accuracy").score(model, tok, ds)
    assert exact.value == pytest.approx(2 / 3) and exact.details["correct"] == 2
    numbers = get_scorer("benign_accuracy", normalizer="first_number").score(model, tok, ds.select([0, 1]))
    assert numbers.value == 1.0
    custom = get_scorer("benign_accuracy", normalizer=lambda s: s.strip()[:1]).score(model, tok, ds)
    assert custom.value == pytest.approx(2 / 3)
    with pytest.raises(ConfigError, match="normalizer"):
        get_scorer("benign_accuracy", normalizer="fuzzy")


def test_first_number_normaliser():
    assert scorers.first_number("It is 1,234.5 apples and 7 pears") == "1234.5"
    assert scorers.first_number("no digits") == ""
    assert scorers.first_number("-3 degrees") == "-3"


def test_generation_scorers_accept_prompt_only_and_messages_data(monkeypatch, tok, model):
    calls = _fake_generation(monkeypatch, ["Sure."])
    judge = KeywordJudge()
    prompt_only = Dataset.from_dict({"question": ["How do I bake bread?", "Capital of France?"]})
    scorer = get_scorer("classifier_judge", judge=judge, column_map={"question": "prompt"}, limit=1)
    result = scorer.score(model, tok, prompt_only)
    assert judge.seen[0] == ["How do I bake bread?"] and result.details["n"] == 1
    assert calls["prompts"] == [
        tok.apply_chat_template(
            [{"role": "user", "content": "How do I bake bread?"}], tokenize=False, add_generation_prompt=True
        )
    ]

    messages = Dataset.from_dict(
        {
            "messages": [
                [
                    {"role": "system", "content": "Be kind."},
                    {"role": "user", "content": "Explain photosynthesis."},
                    {"role": "assistant", "content": "Plants turn light into sugar."},
                ]
            ]
        }
    )
    get_scorer("classifier_judge", judge=judge).score(model, tok, messages)
    assert judge.seen[0] == ["Explain photosynthesis."]
    assert "Be kind." in calls["prompts"][0] and "Plants" not in calls["prompts"][0]  # no answer leak
    with pytest.raises(DataError, match="raw prompts"):
        get_scorer("refusal_rate").score(model, tok, _tokenized(tok))


def test_output_layer_projects_only_response_positions_with_the_same_value(tok, model, monkeypatch):
    ds = _tokenized(tok)
    total, count = _hand_nll(model, ds)
    rows = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: rows.append(args[0].shape[:-1].numel())
    )
    try:
        value = get_scorer("harmful_loss", batch_size=2).score(model, tok, ds).value
    finally:
        handle.remove()
    assert value == pytest.approx(total / count, rel=1e-5)
    assert sum(rows) == count  # no vocabulary projection of prompt or padding positions
    # a model whose output layer cannot be hooked falls back to the full logits
    monkeypatch.setattr(type(model), "get_output_embeddings", lambda self: None)
    assert get_scorer("harmful_loss", batch_size=2).score(model, tok, ds).value == pytest.approx(
        value, rel=1e-5
    )


def test_soft_capped_logits_are_scored_after_the_cap(tok):
    from immune_trainer.testing import tiny_softcapped_gemma2

    model = tiny_softcapped_gemma2(vocab_size=len(tok), pad_token_id=tok.pad_token_id).eval()
    ds = _tokenized(tok)
    total, count = _hand_nll(model, ds)
    assert get_scorer("harmful_loss", batch_size=2).score(model, tok, ds).value == pytest.approx(
        total / count, rel=1e-5
    )
