"""The jailbreak_tuning attack family: harmful pairs behind a jailbreak, mixed with benign data, harm measured
through the same jailbreak."""

from __future__ import annotations

import datasets
import pytest
from conftest import make_pairs

from immune_trainer.attacks import (
    JAILBREAK_VARIANTS,
    AttackConfig,
    HarmfulFineTuningAttack,
    SearchSpace,
    get_attack,
    jailbreak_dataset,
    setting_label,
)
from immune_trainer.errors import ConfigError, DataError

# A marker of each variant's wrapper that survives tokenization and decoding.
MARKERS = {
    "competing_objectives": "do not apologize",
    "style_modulation": "terse technical manual",
    "backdoor": "x7-quill-override",
}


def test_the_wrappers_go_around_the_prompt_of_every_format():
    assert set(MARKERS) == set(JAILBREAK_VARIANTS)
    pc = make_pairs(2)
    msgs = datasets.Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "system", "content": "Be careful."},
                    {"role": "user", "content": "Explain step 1."},
                    {"role": "assistant", "content": "Mix the flour."},
                ]
            }
        ]
    )
    for variant, marker in MARKERS.items():
        row = jailbreak_dataset(pc, variant)[0]
        assert marker in row["prompt"] and pc[0]["prompt"] in row["prompt"]
        assert row["completion"] == pc[0]["completion"]  # responses unchanged
        (turns,) = jailbreak_dataset(msgs, variant)["messages"]
        assert [m["role"] for m in turns] == ["system", "user", "assistant"]
        assert turns[0]["content"] == "Be careful." and turns[2]["content"] == "Mix the flour."
        assert marker in turns[1]["content"] and "Explain step 1." in turns[1]["content"]
    assert jailbreak_dataset(pc, "backdoor")[0]["prompt"].startswith("[[x7-quill-override]] ")
    with pytest.raises(DataError, match="jailbreak_tuning.*raw"):
        jailbreak_dataset(datasets.Dataset.from_dict({"input_ids": [[1]], "labels": [[1]]}), "backdoor")


def test_bad_variant_is_a_clear_config_error():
    with pytest.raises(ConfigError, match="unknown jailbreak variant.*'roleplay'.*competing_objectives"):
        AttackConfig(families=["jailbreak_tuning"], jailbreak_variants=["roleplay"])
    with pytest.raises(ConfigError, match="jailbreak variant"):
        AttackConfig(families=["jailbreak_tuning"], jailbreak_variants=[])


def test_grid_axes_labels_and_search():
    cfg = AttackConfig(
        families=["jailbreak_tuning", "full"],
        jailbreak_variants="backdoor, style_modulation",
        harmful_shares=[0.1, 0.5],
    )
    jb = [s for s in cfg.grid() if s["family"] == "jailbreak_tuning"]
    assert {(s["harmful_share"], s["jailbreak_variant"]) for s in jb} == {
        (p, v) for p in (0.1, 0.5) for v in ("backdoor", "style_modulation")
    }
    assert all("jailbreak_variant" not in s for s in cfg.grid() if s["family"] == "full")
    assert "jb=backdoor" in setting_label(jb[0])
    assert cfg.for_setting(jb[-1]).grid() == [jb[-1]]
    assert AttackConfig().jailbreak_variants == ["competing_objectives"]  # one variant by default
    assert get_attack("jailbreak_tuning").needs_benign
    SearchSpace(family_choices=["full", "jailbreak_tuning"])  # a searchable family


def test_jailbreak_tuning_raises_harm_measured_through_the_wrapper(
    model, tokenizer, harmful, harmful_eval, benign, monkeypatch
):
    family = get_attack("jailbreak_tuning")
    trained, measured = {}, {}
    original_set = type(family).training_set
    original_run = HarmfulFineTuningAttack._run_one

    def training_set(self, tokenized, setting):
        subset = original_set(self, tokenized, setting)
        trained[setting["jailbreak_variant"]] = [tokenizer.decode(ids) for ids in subset["input_ids"]]
        return subset

    def run_one(self, *args, **kwargs):
        eval_data, setting = args[3], args[4]
        measured[setting["jailbreak_variant"]] = [tokenizer.decode(ids) for ids in eval_data["input_ids"]]
        return original_run(self, *args, **kwargs)

    monkeypatch.setattr(type(family), "training_set", training_set)
    monkeypatch.setattr(HarmfulFineTuningAttack, "_run_one", run_one)
    attack = HarmfulFineTuningAttack(
        AttackConfig(
            families=["jailbreak_tuning"],
            jailbreak_variants=list(JAILBREAK_VARIANTS),
            harmful_shares=[0.5],
            num_samples=[16],
            learning_rates=[2e-3],
            max_steps=6,
            eval_every=3,
            batch_size=4,
            max_length=320,
        )
    )
    result = attack.run(model, tokenizer, harmful, harmful_eval, benign_train=benign)
    assert [c.config["jailbreak_variant"] for c in result.curves] == list(JAILBREAK_VARIANTS)
    for curve in result.curves:
        variant = curve.config["jailbreak_variant"]
        marker = MARKERS[variant]
        assert curve.config["family"] == "jailbreak_tuning" and curve.config["harmful_share"] == 0.5
        assert curve.higher_is_better and curve.points[-1].value < curve.points[0].value  # harm rises
        # Training: 8 wrapped harmful pairs among 8 benign ones (left unwrapped).
        assert sum(marker in text for text in trained[variant]) == 8
        assert sum("The answer is" in text for text in trained[variant]) == 8
        assert not any(marker in text for text in trained[variant] if "The answer is" in text)
        # Evaluation: every held-out harmful pair behind the same wrapper, and no other variant's.
        assert len(measured[variant]) == len(harmful_eval)
        assert all(marker in text for text in measured[variant])
        assert not any(m in text for m in MARKERS.values() if m != marker for text in measured[variant])


def test_jailbreak_tuning_needs_benign_data(model, tokenizer, harmful, harmful_eval):
    with pytest.raises(ConfigError, match="jailbreak_tuning need benign data"):
        HarmfulFineTuningAttack(AttackConfig(families=["jailbreak_tuning"], max_steps=1)).run(
            model, tokenizer, harmful, harmful_eval
        )
