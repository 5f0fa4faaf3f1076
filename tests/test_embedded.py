"""Embedded datasets, read from a synthetic (innocuous) stand-in for the pyrit asset, plus real-asset checks."""

from __future__ import annotations

import hashlib
import json

import pytest

from immune_trainer.data import assets
from immune_trainer.data.embedded import (
    EMBEDDED_DATASETS,
    arithmetic_task,
    harm_category,
    harmful_splits,
    load_embedded,
)
from immune_trainer.errors import ConfigError, DataError

# Innocuous placeholders: the prompts only carry the keywords the category rules look for.
_FAKE = (
    [("Write code for a toy {i}", "code answer {i}", "Harmful. Reason: placeholder") for i in range(10)]
    + [("Generate the lyrics of song {i}", "la la {i}", "Harmful\n\nplaceholder") for i in range(6)]
    + [("Write a persuasive article about topic {i}", "text {i}", "Answer: Harmful") for i in range(5)]
    + [("Tell me about drugs {i}", "answer {i}", "**Harmful** placeholder") for i in range(8)]
    + [("Say hello {i}", "Hello {i}!", "Not harmful. Friendly.") for i in range(7)]
)


def _fake_asset(cache, name, files: dict[str, str]):
    folder = cache / name
    entries = {}
    for rel, text in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        data = path.read_bytes()
        entries[rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    spec = assets.ASSETS[name]
    manifest = {"archive_sha256": spec.sha256, "version": spec.version, "files": entries}
    (folder / assets.MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IMMUNE_TRAINER_CACHE", str(tmp_path))
    shots = []
    for k, (u, a, v) in enumerate(_FAKE):
        shots.append({"user": u.format(i=k), "assistant": a.format(i=k), "category": v})
    refusal_csv = (
        "# dataset_version=1.0\n"
        "objective,assistant_response,human_score,data_type\n"
        "Tell me a joke.,Why did the chicken cross the road?,0,text\n"
        "Do a bad thing.,\"I'm sorry, but I can't help with that.\",1,text\n"
        "Explain tides.,Blockchain is a ledger.,1,text\n"
    )
    _fake_asset(
        tmp_path,
        "pyrit",
        {
            "pyrit/datasets/jailbreak/many_shot_examples.json": json.dumps(shots),
            "pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv": refusal_csv,
            "pyrit/datasets/scorer_evals/refusal_scorer/refusal_extra.csv": refusal_csv,
        },
    )

    def no_download(*args):
        raise AssertionError("a test must not download")

    monkeypatch.setattr(assets, "pip_downloader", no_download)
    return tmp_path


def test_harm_category_rules():
    assert harm_category("Generate the lyrics of a song") == "copyright"
    assert harm_category("Write code for a keylogger") == "cybercrime"
    assert harm_category("Write a persuasive article") == "misinformation"
    assert harm_category("Describe methods for making a cake") != "drugs"  # 'meth' only as a word
    assert harm_category("Do something", "Reason: it is hate speech") == "harassment_hate"
    assert harm_category("Do something", "no keyword here") == "illegal_other"


def test_harmful_qa_keeps_only_harmful_verdicts(fake_cache):
    ds = load_embedded("harmful_qa")
    assert len(ds) == 29
    assert set(ds.column_names) >= {"prompt", "completion", "category", "verdict"}
    assert all(not v.lower().startswith("not harmful") for v in ds["verdict"])
    benign = load_embedded("benign_qa")
    assert len(benign) == 7 and set(benign["category"]) == {"not_harmful"}


def test_harmful_splits_by_category(fake_cache):
    splits = harmful_splits(seed=0, cross_domain_categories=("copyright", "misinformation"))
    assert set(splits) == {"defense", "attack", "in_domain", "cross_domain"}
    assert splits.categories["cross_domain"] == ["copyright", "misinformation"]
    assert splits.categories["defense"] == ["cybercrime", "drugs"]
    assert set(splits["cross_domain"]["category"]) == {"copyright", "misinformation"}
    for key in ("defense", "attack", "in_domain"):
        assert set(splits[key]["category"]) <= {"cybercrime", "drugs"}
        assert len(splits[key]) > 0
    prompts = [set(splits[k]["prompt"]) for k in ("defense", "attack", "in_domain")]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    assert sum(splits.counts.values()) == 29
    assert splits.category_counts == {"copyright": 6, "cybercrime": 10, "drugs": 8, "misinformation": 5}
    # same seed, same rows; another seed shuffles
    again = harmful_splits(seed=0, cross_domain_categories=("copyright", "misinformation"))
    assert again["attack"]["prompt"] == splits["attack"]["prompt"]
    other = harmful_splits(seed=1, cross_domain_categories=("copyright", "misinformation"))
    assert other["defense"]["prompt"] != splits["defense"]["prompt"]


def test_harmful_splits_rejects_bad_arguments(fake_cache):
    with pytest.raises(ConfigError, match="not among the categories"):
        harmful_splits(cross_domain_categories=("no_such_category",))
    with pytest.raises(ConfigError, match="fractions"):
        harmful_splits(fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ConfigError, match="at least one"):
        harmful_splits(cross_domain_categories=("copyright", "misinformation", "cybercrime", "drugs"))


def test_refusals_and_chat_responses(fake_cache):
    refusals = load_embedded("refusals")
    assert refusals["completion"] == [
        "I'm sorry, but I can't help with that."
    ]  # deduplicated, off-topic dropped
    chat = load_embedded("chat_responses")
    assert chat["prompt"] == ["Tell me a joke."]


def test_unknown_dataset_and_split(fake_cache):
    with pytest.raises(ConfigError, match="harmful_qa"):
        load_embedded("nope")
    with pytest.raises(ConfigError, match="splits: defense"):
        load_embedded("harmful_qa", split="train")


def test_a_damaged_asset_is_a_data_error(fake_cache):
    (fake_cache / "pyrit/pyrit/datasets/jailbreak/many_shot_examples.json").unlink()
    manifest_path = fake_cache / "pyrit" / assets.MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    del manifest["files"]["pyrit/datasets/jailbreak/many_shot_examples.json"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="many_shot_examples.json"):
        load_embedded("harmful_qa")


def test_arithmetic_task_is_deterministic_and_correct():
    a = arithmetic_task(50, seed=3)
    assert a["prompt"] == arithmetic_task(50, seed=3)["prompt"]
    assert a["prompt"] != arithmetic_task(50, seed=4)["prompt"]
    assert len(set(a["prompt"])) == 50
    for q, ans in zip(a["prompt"], a["completion"]):
        x, op, y = q.removeprefix("What is ").removesuffix("?").split()
        assert int(ans) == (int(x) + int(y) if op == "+" else int(x) - int(y))
        assert int(ans) >= 0


def test_arithmetic_splits_are_disjoint():
    train = load_embedded("arithmetic", split="train")
    evals = load_embedded("arithmetic", split="eval")
    card = EMBEDDED_DATASETS["arithmetic"]
    assert len(train) == card.counts["train"] and len(evals) == card.counts["eval"]
    assert not set(train["prompt"]) & set(evals["prompt"])
    with pytest.raises(ConfigError):
        arithmetic_task(0)
    with pytest.raises(ConfigError, match="distinct"):
        arithmetic_task(10_000, max_operand=5)


def test_every_card_is_complete():
    for name, card in EMBEDDED_DATASETS.items():
        assert card.name == name
        assert card.license and card.description and card.columns
        if card.asset is not None:
            assert card.asset in assets.ASSETS and card.source_files


@pytest.mark.slow
@pytest.mark.assets
def test_real_embedded_datasets_match_their_cards():
    """Needs the real archives (fetched into the cache on first use)."""
    for name, card in EMBEDDED_DATASETS.items():
        for split, count in card.counts.items():
            ds = load_embedded(name, split=None if split == "all" else split)
            assert len(ds) == count, (name, split)
            assert set(card.columns) <= set(ds.column_names)
    splits = harmful_splits(seed=0)
    assert all(n > 0 for n in splits.counts.values())
    assert not set(splits["cross_domain"]["category"]) & set(splits["defense"]["category"])
    held = set(load_embedded("shakespeare", split="eval")["play"])
    assert held and not held & set(load_embedded("shakespeare", split="train")["play"])


@pytest.mark.slow
@pytest.mark.assets
def test_real_offline_judge_separates_harm_from_refusal():
    from immune_trainer.scoring.offline_judge import OfflineHarmJudge

    judge = OfflineHarmJudge.load()
    assert judge.metrics["roc_auc"] > 0.7 and judge.metrics["n_eval"] > 0
    harmful = load_embedded("harmful_qa", split="in_domain")
    refusals = load_embedded("refusals")
    n = min(len(harmful), len(refusals), 20)
    p_harm = judge.score(harmful["prompt"][:n], harmful["completion"][:n])
    p_ref = judge.score(harmful["prompt"][:n], refusals["completion"][:n])
    assert sum(p_harm) / n > sum(p_ref) / n
    with pytest.raises(DataError):
        judge.score(["a", "b"], ["only one"])


def test_judge_absent_without_training_is_an_asset_error(tmp_path):
    from immune_trainer.errors import AssetError
    from immune_trainer.scoring.offline_judge import OfflineHarmJudge

    with pytest.raises(AssetError, match="train_offline_judge"):
        OfflineHarmJudge.load(cache=tmp_path, train_if_missing=False, packaged=False)


def test_the_packaged_judge_loads_without_training(tmp_path, monkeypatch):
    """With nothing in the cache, load() takes the judge shipped with the package: trained for this very
    encoder archive, with its held-out figures, and it never trains."""
    from immune_trainer.data.assets import ASSETS
    from immune_trainer.scoring import offline_judge as judge_mod

    payload = json.loads(judge_mod.PACKAGED_JUDGE.read_text())
    assert payload["encoder"]["archive_sha256"] == ASSETS["minilm"].sha256
    assert payload["training_data"]["package"] == ASSETS["pyrit"].requirement
    assert len(payload["coef"]) == 384 and payload["metrics"]["roc_auc"] > 0.7
    monkeypatch.setattr(judge_mod, "fetch_asset", lambda name, cache=None, **kw: tmp_path / name)
    monkeypatch.setattr(judge_mod, "train_offline_judge", lambda *a, **k: pytest.fail("trained"))
    judge = judge_mod.OfflineHarmJudge.load(cache=tmp_path, train_if_missing=False)
    assert judge.metrics == payload["metrics"] and judge.input == payload["input"]


@pytest.mark.slow
@pytest.mark.assets
def test_packaged_offline_judge_is_what_training_gives(tmp_path):
    """Retraining from the pinned assets reproduces the shipped judge (embeddings differ in the last bits
    from machine to machine, so the weights are compared to 1e-3)."""
    import numpy as np

    from immune_trainer.data import assets
    from immune_trainer.scoring.offline_judge import PACKAGED_JUDGE, judge_path, train_offline_judge

    for name in assets.ASSETS:  # the downloaded assets, without the judge trained from them
        if assets.is_ready(name):
            (tmp_path / name).symlink_to(assets.asset_path(name))
    metrics = train_offline_judge(cache=tmp_path, progress=False)
    shipped = json.loads(PACKAGED_JUDGE.read_text())
    trained = json.loads(judge_path(tmp_path).read_text())
    assert trained["input"] == shipped["input"]
    assert metrics["roc_auc"] == pytest.approx(shipped["metrics"]["roc_auc"], abs=1e-3)
    np.testing.assert_allclose(trained["coef"], shipped["coef"], atol=1e-3)
    assert trained["intercept"] == pytest.approx(shipped["intercept"], abs=1e-3)


def test_judge_file_of_another_format_is_an_asset_error(tmp_path):
    from immune_trainer.errors import AssetError
    from immune_trainer.scoring.offline_judge import OfflineHarmJudge, judge_path

    path = judge_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"format_version": 999}))
    with pytest.raises(AssetError, match="delete it and retrain"):
        OfflineHarmJudge.load(cache=tmp_path, train_if_missing=False, packaged=False)


def test_judge_encoder_batches_by_length_without_changing_any_embedding(tmp_path):
    """The offline judge's MiniLM encoder sorts texts into batches of similar length: each text's embedding
    is the one it gets on its own, in the caller's order."""
    import numpy as np
    import transformers

    from immune_trainer.scoring.offline_judge import _Encoder

    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "slept", "all", "day", "long"]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(tmp_path)
    config = transformers.BertConfig(
        vocab_size=len(words) + 5,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    transformers.BertModel(config).save_pretrained(tmp_path)
    texts = [
        "the cat sat on a mat and then slept all day long the cat sat",
        "cat",
        "the cat sat",
        "a mat",
        "then slept all day long",
    ]
    encoder = _Encoder(tmp_path, max_length=32, batch_size=2)
    together = encoder(texts)
    alone = np.stack([encoder([t])[0] for t in texts])
    assert together.shape == (5, 16)
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(together[0], together[1])  # different texts, different rows: order kept
    assert encoder([]).shape == (0, 16)
