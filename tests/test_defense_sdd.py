"""SDD: the irrelevant-answer pairs (never the harmful answer), the irrelevance filter, the trained pairs,
training lowers the irrelevant answers' loss, and bad input."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from conftest import defense_config, make_benign, make_pairs

from immune_trainer.defenses import SDDConfig, SDDTrainer, get_defense, sdd_dataset
from immune_trainer.defenses.sdd import SDD_REJECT_PREFIX, lexical_embed
from immune_trainer.errors import ConfigError, DataError
from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer


def _config(tmp_path, **kw):
    return defense_config(SDDConfig, tmp_path, **kw)


def test_lexical_cosine_by_hand():
    v = lexical_embed(["the cat sat", "The cat, the cat!", "dogs run"])
    # counts: the 1, cat 1, sat 1 | the 2, cat 2 | dogs 1, run 1
    assert float(v[0] @ v[1]) == pytest.approx(4 / (np.sqrt(3) * np.sqrt(8)))
    assert float(v[0] @ v[2]) == 0.0
    assert float(v[1] @ v[1]) == pytest.approx(1.0)


def test_pairs_are_harmful_prompts_with_irrelevant_benign_answers():
    harmful = make_pairs(12)
    benign = datasets.Dataset.from_list(
        [
            {"prompt": f"Q{i}", "completion": f"Paris is a lovely city in France, says {name}."}
            for i, name in enumerate("Ann Bob Cy Di Ed Flo".split())
        ]
        # Benign responses that share words with the prompts ("step", "recipe"): the filter must avoid them.
        + [{"prompt": "Q", "completion": f"Explain step {i} of the recipe carefully."} for i in range(6)]
    )
    out = sdd_dataset(harmful, benign, similarity_threshold=0.0, seed=0)
    assert len(out) == len(harmful)
    pool = set(benign["completion"])
    for row, src in zip(out, harmful):
        assert row["prompt"] == [{"role": "user", "content": src["prompt"]}]
        answer = row["completion"][0]["content"]
        assert row["completion"][0]["role"] == "assistant"
        assert answer in pool and answer != src["completion"]
        assert answer.startswith("Paris") and row["similarity"] == 0.0
    assert out["completion"] == sdd_dataset(harmful, benign, similarity_threshold=0.0, seed=0)["completion"]

    rejected = sdd_dataset(harmful, benign, use_reject_prefix=True, seed=0)
    assert all(r[0]["content"].startswith(SDD_REJECT_PREFIX) for r in rejected["completion"])


def test_resampling_keeps_the_least_similar_draw_and_never_the_harmful_answer():
    """With a custom embedding: no draw below the threshold -> the least similar one seen is kept; a benign
    response equal to the row's harmful response is never drawn."""
    harmful = datasets.Dataset.from_list([{"prompt": "p", "completion": "same text"}])
    benign = datasets.Dataset.from_list(
        [{"prompt": "q", "completion": t} for t in ("same text", "near", "nearer", "far")]
    )
    sims = {"p": 0, "same text": 1.0, "near": 0.9, "nearer": 0.95, "far": 0.5}

    def embed(texts):  # 2-d unit vectors with the chosen cosine to the prompt's (1, 0)
        return np.array(
            [[sims[t] if t != "p" else 1.0, np.sqrt(1 - (sims[t] if t != "p" else 1.0) ** 2)] for t in texts]
        )

    out = sdd_dataset(
        harmful, benign, similarity_threshold=0.1, max_resample_attempts=200, embed=embed, seed=1
    )
    assert out[0]["completion"][0]["content"] == "far"
    assert out[0]["similarity"] == pytest.approx(0.5) and out[0]["draws"] == 200
    with pytest.raises(DataError, match="every benign response equals"):
        sdd_dataset(harmful, datasets.Dataset.from_list([{"prompt": "q", "completion": "same text"}]))


def test_trainer_trains_on_irrelevant_answers_and_lowers_their_loss(tmp_path):
    tok = tiny_tokenizer()
    harmful = make_pairs(16)
    trainer = SDDTrainer(
        model=tiny_causal_lm("llama", seed=0),
        args=_config(tmp_path, max_steps=12, learning_rate=3e-3),
        harmful_dataset=harmful,
        retain_dataset=make_benign(16),
        processing_class=tok,
    )
    # The pairs the loss reads: the harmless side is harmful prompt -> an irrelevant benign answer.
    benign_answers = set(make_benign(16)["completion"])
    for i, row in enumerate(trainer.train_dataset):
        labels = [t for t in row["harmless_labels"] if t != -100]
        text = tok.decode(labels, skip_special_tokens=True).strip()
        assert text in benign_answers, text
        assert harmful[i]["completion"] not in tok.decode(row["harmless_input_ids"])
        assert harmful[i]["prompt"] in tok.decode(row["harmless_input_ids"])

    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(16)]))

    def losses(model):
        with torch.no_grad():
            irrelevant, _ = trainer.lm_loss(model, trainer.side(batch, "harmless"))
        return float(irrelevant)

    before = losses(trainer.model)
    trainer.train()
    after = losses(trainer.model)
    assert after < before - 0.5, (before, after)
    logged = [h for h in trainer.state.log_history if "loss/irrelevant" in h]
    assert logged and "loss/retain" not in logged[-1]  # retain_weight 0: the benign set is only the pool


def test_registry_defaults_and_bad_input(tmp_path):
    spec = get_defense("sdd")
    assert spec.trainer_class is SDDTrainer and spec.paper["id"] == "2507.21182"
    cfg = SDDConfig(output_dir=str(tmp_path), report_to="none")
    assert (cfg.similarity_threshold, cfg.max_resample_attempts, cfg.learning_rate, cfg.retain_weight) == (
        0.25,
        50,
        5e-7,
        0.0,
    )
    ref = SDDConfig.reference(output_dir=str(tmp_path), report_to="none")
    assert (ref.max_steps, ref.per_device_train_batch_size, ref.lr_scheduler_type) == (500, 24, "constant")
    with pytest.raises(ConfigError, match="similarity_threshold"):
        _config(tmp_path, similarity_threshold=2.0)
    with pytest.raises(ConfigError, match="harmless_weight"):
        _config(tmp_path, harmless_weight=0.0)
    with pytest.raises(ConfigError, match="retain_dataset"):
        SDDTrainer(
            model=tiny_causal_lm("llama", seed=0),
            args=_config(tmp_path),
            harmful_dataset=make_pairs(4),
            processing_class=tiny_tokenizer(),
        )
    with pytest.raises(DataError, match="not tokenized"):
        sdd_dataset(make_pairs(2), datasets.Dataset.from_list([{"input_ids": [1, 2], "labels": [1, 2]}]))
