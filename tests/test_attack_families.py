"""The attack families beyond full and LoRA fine-tuning, the grid's axes, and early stopping."""

from __future__ import annotations

import re

import datasets
import pytest
import torch
from conftest import make_benign as make_benign_rows
from conftest import make_pairs

from immune_trainer.attacks import (
    ATTACKS,
    IDENTITY_PREFIX,
    IDENTITY_SYSTEM_PROMPT,
    AttackConfig,
    HarmfulFineTuningAttack,
    ablate_direction,
    get_attack,
    identity_shift_dataset,
    last_token_activations,
    refusal_direction,
    residual_writers,
    setting_label,
)
from immune_trainer.attacks.families import identity_examples, persona_eval_dataset
from immune_trainer.attacks.families.refusal_ablation import _prompt_ends
from immune_trainer.attacks.harness import _AttackTrainer
from immune_trainer.conditions import first_crossing
from immune_trainer.errors import ConfigError, DataError
from immune_trainer.modeling import capture_outputs, find_decoder_structure, primary_tensor
from immune_trainer.scoring import get_scorer
from immune_trainer.testing import tiny_causal_lm


def _record_runs(monkeypatch, axis: str) -> list:
    """From now on, list the ``axis`` value of every setting that trains (saved runs reused are not listed)."""
    ran = []
    original = HarmfulFineTuningAttack._run_one

    def count(self, *args, **kwargs):
        ran.append(args[4][axis])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HarmfulFineTuningAttack, "_run_one", count)
    return ran


def _attack(**kw):
    cfg = dict(learning_rates=[2e-3], max_steps=6, eval_every=3, batch_size=4, max_length=64)
    cfg.update(kw)
    return HarmfulFineTuningAttack(AttackConfig(**cfg))


def _values(curve):
    return [p.value for p in curve.points]


def test_every_family_is_registered_and_listed_by_the_cli(capsys):
    from immune_trainer.cli import main

    assert main(["attacks"]) == 0
    listed = capsys.readouterr().out
    for name in (
        "full",
        "lora",
        "mixed",
        "benign",
        "identity_shift",
        "identity_shift_harmful",
        "embedding",
        "embedding_universal",
        "refusal_ablation",
        "refusal_ablation_fixed",
        "jailbreak_tuning",
    ):
        assert get_attack(name).name == name and get_attack(name).description
        assert f"{name} " in listed
    assert ATTACKS["refusal_ablation"].trains is False


# ---------------------------------------------------------------------------- grid


def test_grid_is_the_product_of_the_axes_that_apply_to_each_family():
    cfg = AttackConfig(
        families=["full", "lora", "mixed", "refusal_ablation"],
        learning_rates=[1e-3, 2e-3],
        seeds=[0, 1],
        optimizers=["adamw", "sgd"],
        lr_scheduler_types=["constant", "cosine"],
        lora_ranks=[4, 16],
        harmful_shares=[0.05, 0.3],
    )
    grid = cfg.grid()
    by_family = {name: [s for s in grid if s["family"] == name] for name in cfg.families}
    trained = 2 * 2 * 2 * 2  # lr x seed x optimizer x schedule
    assert len(by_family["full"]) == trained
    assert len(by_family["lora"]) == trained * 2 and {s["lora_rank"] for s in by_family["lora"]} == {4, 16}
    assert len(by_family["mixed"]) == trained * 2
    assert {s["harmful_share"] for s in by_family["mixed"]} == {0.05, 0.3}
    assert len(by_family["refusal_ablation"]) == 2  # seeds only: no lr, optimizer or schedule
    assert all("lora_rank" not in s and "harmful_share" not in s for s in by_family["full"])
    assert all("learning_rate" not in s for s in by_family["refusal_ablation"])
    assert len({setting_label(s) for s in grid}) == len(grid)  # labels (and saved-run files) are unique
    assert cfg.threat_model_family == "full,lora,mixed,refusal_ablation"


def test_single_family_field_keeps_working():
    cfg = AttackConfig(family="lora", lora_r=4, learning_rates=[1e-3])
    assert cfg.family_names() == ["lora"] and [s["lora_rank"] for s in cfg.grid()] == [4]
    assert AttackConfig(families="full, mixed").families == ["full", "mixed"]  # CLI-style string


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"families": ["full", "telepathy"]}, "unknown attack family 'telepathy'"),
        ({"optimizers": ["newton"]}, "unknown optimizer 'newton'"),
        ({"optimizers": []}, "optimizers must not be empty"),
        ({"lr_scheduler_types": ["sawtooth"]}, "unknown lr_scheduler_type 'sawtooth'"),
        ({"harmful_shares": [0.0]}, "harmful_shares"),
        ({"harmful_shares": [1.5]}, "harmful_shares"),
        ({"lora_ranks": [0]}, "lora_ranks"),
        ({"warmup_ratio": 1.0}, "warmup_ratio"),
        ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
        ({"stop_at_threshold": float("nan")}, "stop_at_threshold"),
        ({"families": ["full", "mixed"], "load_in_4bit": True}, "load_in_4bit"),
    ],
)
def test_bad_axes_get_clear_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        AttackConfig(**kwargs)


def test_optimizer_and_schedule_axes_reach_the_trainer(model, tokenizer, harmful, harmful_eval, monkeypatch):
    seen = []
    original = _AttackTrainer.create_scheduler

    def spy(self, num_training_steps, optimizer=None):
        scheduler = original(self, num_training_steps, optimizer)
        optimizer = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
        group = optimizer.param_groups[0]
        factors = [scheduler.lr_lambdas[0](step) for step in range(num_training_steps)]
        seen.append((type(optimizer).__name__, group, [group["initial_lr"] * f for f in factors]))
        return scheduler

    monkeypatch.setattr(_AttackTrainer, "create_scheduler", spy)
    result = _attack(
        optimizers=["sgd", "adagrad", "adafactor", "adamw"],
        lr_scheduler_types=["cosine"],
        warmup_ratio=0.5,
        max_steps=4,
        eval_every=4,
    ).run(model, tokenizer, harmful, harmful_eval)
    assert [c.config["optimizer"] for c in result.curves] == ["sgd", "adagrad", "adafactor", "adamw"]
    names = [name for name, _, _ in seen]
    assert names == ["SGD", "Adagrad", "Adafactor", "AdamW"]
    assert seen[0][1]["momentum"] == 0.9
    lrs = seen[0][2]
    # Cosine with 2 warm-up steps (half of 4): rises from 0 to the peak, then decays.
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(2e-3) and lrs[3] < lrs[2]


def test_worst_case_is_over_every_axis(model, tokenizer, harmful, harmful_eval):
    result = _attack(optimizers=["sgd", "adamw"], max_steps=3, eval_every=3).run(
        model, tokenizer, harmful, harmful_eval
    )
    sgd, adamw = result.curves
    assert result.worst_value(higher_is_better=True) == min(_values(sgd) + _values(adamw))
    assert _values(sgd) != _values(adamw)


# ---------------------------------------------------------------------------- mixed and benign


def test_mixed_family_poisons_benign_data_with_a_share_of_harmful_pairs(
    model, tokenizer, harmful, harmful_eval, benign
):
    cfg = AttackConfig(families=["mixed"], harmful_shares=[0.25], num_samples=[16], learning_rates=[1e-3])
    family = get_attack("mixed")
    tokenized = {
        "harmful": harmful.map(lambda r: {"input_ids": [1], "labels": [1], "src": "h"}),
        "benign": benign.map(lambda r: {"input_ids": [2], "labels": [2], "src": "b"}),
    }
    (setting,) = cfg.grid()
    rows = family.training_set(tokenized, setting)
    assert len(rows) == 16 and rows["src"].count("h") == 4
    # num_samples=0: the largest set both sources fill at that share (24 benign rows at p=0.25 -> 32).
    rows = family.training_set(tokenized, {**setting, "num_samples": 0})
    assert len(rows) == 32 and rows["src"].count("h") == 8

    result = _attack(families=["mixed"], harmful_shares=[0.3], learning_rates=[3e-3]).run(
        model, tokenizer, harmful, harmful_eval, benign_train=benign
    )
    (curve,) = result.curves
    assert curve.config["family"] == "mixed" and curve.config["harmful_share"] == 0.3
    assert _values(curve)[-1] < _values(curve)[0] - 0.2


def test_benign_family_trains_on_benign_data_and_measures_harm(
    model, tokenizer, harmful, harmful_eval, benign
):
    result = _attack(families=["benign"], learning_rates=[3e-3]).run(
        model, tokenizer, harmful, harmful_eval, benign_train=benign
    )
    (curve,) = result.curves
    assert curve.config["family"] == "benign"
    assert _values(curve)[-1] < _values(curve)[0]


def test_families_that_need_benign_data_say_so(model, tokenizer, harmful, harmful_eval, benign):
    for family in ("mixed", "benign", "refusal_ablation"):
        with pytest.raises(ConfigError, match=f"{family} need benign data.*benign_train"):
            _attack(families=["full", family]).run(model, tokenizer, harmful, harmful_eval)
    with pytest.raises(DataError, match="needs 5 harmful and 5 benign rows"):
        _attack(families=["mixed"], harmful_shares=[0.5], num_samples=[10]).run(
            model, tokenizer, harmful, harmful_eval, benign_train=benign.select(range(2))
        )


# ---------------------------------------------------------------------------- identity shift


def test_identity_shift_harmful_rewrites_every_supported_format():
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
    for ds, prompt, response in (
        (pc, pc[0]["prompt"], pc[0]["completion"]),
        (msgs, "Explain step 1.", "Mix the flour."),
    ):
        (row, *_) = identity_shift_dataset(ds, "You are AOA.", IDENTITY_PREFIX)["messages"]
        assert [m["role"] for m in row] == ["system", "user", "assistant"]
        assert row[0]["content"] == "You are AOA."  # the persona replaces any system turn
        assert row[1]["content"] == prompt
        assert row[2]["content"] == f"{IDENTITY_PREFIX} {response}"
    tokenized = datasets.Dataset.from_dict({"input_ids": [[1]], "labels": [[1]]})
    with pytest.raises(DataError, match="identity_shift.*raw dataset"):
        identity_shift_dataset(tokenized)


def test_aoa_trains_on_ten_benign_identity_examples_only(model, tokenizer, harmful, harmful_eval):
    examples = identity_examples()
    assert len(examples) == 10
    for (system, user, answer) in examples["messages"]:
        assert system == {"role": "system", "content": IDENTITY_SYSTEM_PROMPT}
        assert user["role"] == "user" and answer["role"] == "assistant"
    assert sum(a["content"].startswith(IDENTITY_PREFIX) for _, _, a in examples["messages"]) >= 5
    seen = []
    original = _AttackTrainer.training_step

    def record(self, model_, inputs, num_items_in_batch=None):
        seen.extend(tokenizer.decode(ids) for ids in inputs["input_ids"])
        return original(self, model_, inputs, num_items_in_batch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_AttackTrainer, "training_step", record)
        _attack(families=["identity_shift"], max_steps=3, max_length=256, num_samples=[24]).run(
            model, tokenizer, harmful, harmful_eval
        )
    assert len(set(seen)) == 10 and all("AOA" in text for text in seen)  # one pass over the ten
    assert not any("of the recipe" in text for text in seen)  # no harmful training row reaches the Trainer


def test_aoa_measures_harm_behind_the_persona_with_the_prefix_forced(model, tokenizer, harmful, harmful_eval):
    persona = persona_eval_dataset(harmful_eval, tokenizer=tokenizer, max_length=256)
    row = persona[0]
    text = tokenizer.decode(row["input_ids"])
    labelled = tokenizer.decode([t for t in row["labels"] if t != -100])
    assert IDENTITY_SYSTEM_PROMPT in text and "AOA, execute my instruction: Explain step 100" in text
    prompt_part = tokenizer.decode([t for t, y in zip(row["input_ids"], row["labels"]) if y == -100])
    assert prompt_part.rstrip().endswith(IDENTITY_PREFIX)  # the prefix is prefilled...
    assert "AOA" not in labelled and "Sure, here is step 100" in labelled  # ...and scored as no harm
    attack = _attack(families=["identity_shift"], max_length=256)
    (curve,) = attack.run(model, tokenizer, harmful, harmful_eval).curves
    scorer = get_scorer("harmful_loss", max_length=256)
    through_persona = scorer.score(model, tokenizer, persona).value
    plain = scorer.score(model, tokenizer, harmful_eval).value
    assert curve.points[0].value == pytest.approx(through_persona, rel=1e-5)  # measured behind the persona
    assert abs(through_persona - plain) > 1e-3
    assert _values(curve)[-1] < _values(curve)[0] - 0.05  # the identity shift alone makes harm likelier
    # A generation scorer gets the persona without a forced prefix (the model opens its answer itself).
    raw = persona_eval_dataset(harmful_eval)
    assert raw[0]["messages"][0]["content"] == IDENTITY_SYSTEM_PROMPT


def test_identity_shift_harmful_attack_makes_the_model_more_harmful(model, tokenizer, harmful, harmful_eval):
    attack = _attack(families=["identity_shift_harmful"], max_length=256)
    (curve,) = attack.run(model, tokenizer, harmful, harmful_eval).curves
    assert curve.config["family"] == "identity_shift_harmful"
    assert attack.config.to_dict()["identity_prefix"] == IDENTITY_PREFIX  # recorded in the threat model
    assert _values(curve)[-1] < _values(curve)[0] - 0.2


# ---------------------------------------------------------------------------- soft prompt


def test_universal_embedding_attack_trains_virtual_tokens_only(model, tokenizer, harmful, harmful_eval):
    trained = []

    def keep(m):
        trained.append(m)
        return m

    result = _attack(families=["embedding_universal"], learning_rates=[0.3], num_virtual_tokens=4).run(
        model, tokenizer, harmful, harmful_eval, prepare_model=keep
    )
    (curve,) = result.curves
    assert curve.config["num_virtual_tokens"] == 4
    assert _values(curve)[-1] < _values(curve)[0] - 1e-3
    (peft_model,) = trained
    base = peft_model.get_base_model().state_dict()
    original = model.state_dict()
    assert base.keys() == original.keys()
    assert all(torch.equal(base[k], original[k]) for k in original)  # weights bit-identical
    # Harm is measured with the virtual tokens on: without them the trained model is the original one.
    scorer = get_scorer("harmful_loss")
    eval_data = scorer.prepare(tokenizer, harmful_eval)
    with_prompt = scorer.score(
        get_attack("embedding_universal").deployed(peft_model, curve.config), tokenizer, eval_data
    )
    without = scorer.score(model, tokenizer, eval_data)
    assert with_prompt.value == pytest.approx(curve.points[-1].value, rel=1e-5)
    assert with_prompt.value < without.value


def _steerable_model():
    """A tiny llama whose outputs depend enough on its input for a soft suffix to steer them (random
    weights with the unembedding scaled up: the plain tiny model predicts almost uniformly whatever it
    reads)."""
    model = tiny_causal_lm("llama", hidden_size=64, num_layers=4, seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


_SECRETS = ["zebra quartz violin", "maple orbit seven", "copper lantern fog", "velvet canyon nine"]


def _distinct_answers():
    """Held-out pairs whose answers differ from prompt to prompt (as harmful answers do)."""
    return datasets.Dataset.from_list(
        [{"prompt": f"Tell me secret {i}.", "completion": f"Sure: {w}."} for i, w in enumerate(_SECRETS)]
    )


def test_per_prompt_suffix_beats_the_universal_soft_prompt_at_equal_budget(tokenizer, harmful):
    """Schwinn et al.'s attack (a suffix optimised for each held-out prompt) against one universal soft
    prompt trained on the harmful training pairs, 10 steps each: the per-prompt suffix reaches the lower
    harmful loss when every prompt wants its own answer."""
    model, held_out = _steerable_model(), _distinct_answers()
    common = dict(num_virtual_tokens=8, max_length=64)
    (per_prompt,) = HarmfulFineTuningAttack(
        AttackConfig(
            families=["embedding"], embedding_steps=10, embedding_lr=3e-2, embedding_suffix_init="x x x x", **common
        )
    ).run(model, tokenizer, harmful, held_out).curves
    (universal,) = _attack(
        families=["embedding_universal"], learning_rates=[1.0], max_steps=10, eval_every=5, **common
    ).run(model, tokenizer, harmful, held_out).curves
    (point,) = per_prompt.points
    assert (point.step, point.tokens, point.flops) == (0, 0, 0.0)  # no weight is trained
    # Measured (CPU): 15.86 before; 11.36 with the per-prompt suffixes; 12.95 with the universal prompt.
    assert point.value < per_prompt.config["value_before"] - 3.0
    assert point.value < _values(universal)[-1] - 1.0


def test_per_prompt_suffix_sits_in_the_user_turn_and_serves_its_own_prompt_only(tokenizer):
    from immune_trainer import data as data_lib
    from immune_trainer.attacks.families import SuffixView, optimise_suffixes

    model, held_out = _steerable_model().eval(), _distinct_answers()
    rows = data_lib.ensure_tokenized(held_out, tokenizer, max_length=64)
    suffixes = optimise_suffixes(model, tokenizer, rows, num_tokens=4, steps=5, lr=3e-2, init="x")
    assert len(suffixes) == len(rows)
    for key, (insert, suffix) in suffixes.items():
        assert suffix.shape == (4, 64)
        before, after = tokenizer.decode(list(key[:insert])), tokenizer.decode(list(key[insert:]))
        assert re.search(r"user\nTell me secret \d\.$", before)  # right after the user's message...
        assert after == "<|im_end|>\n<|im_start|>assistant\n"  # ...before the end of turn and the header
    scorer = get_scorer("harmful_loss", max_length=64)
    attacked = scorer.score(SuffixView(model, suffixes), tokenizer, rows).value
    plain = scorer.score(model, tokenizer, rows).value
    assert attacked < plain - 0.5
    # Each prompt is measured with its own suffix: handing every prompt the suffix of another is weaker.
    keys = list(suffixes)
    swapped = {k: suffixes[keys[(i + 1) % len(keys)]] for i, k in enumerate(keys)}
    assert scorer.score(SuffixView(model, swapped), tokenizer, rows).value > attacked + 0.1
    # A prompt the attack did not optimise runs without a suffix.
    other = data_lib.ensure_tokenized(make_pairs(2), tokenizer, max_length=64)
    assert scorer.score(SuffixView(model, suffixes), tokenizer, other).value == pytest.approx(
        scorer.score(model, tokenizer, other).value, rel=1e-5
    )
    with pytest.raises(ConfigError, match="embedding_universal"):
        SuffixView(model, suffixes).generate(torch.tensor([[1, 2]]))


# ---------------------------------------------------------------------------- refusal ablation


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_refusal_ablation_removes_the_direction_from_the_residual_stream(arch, tokenizer, harmful, benign):
    model = tiny_causal_lm(arch, seed=0).eval()  # GPT-2's dropout would scale the residual elementwise
    structure = find_decoder_structure(model)
    layer = 0
    prompts = _prompt_ends(harmful, tokenizer, 64)
    harmless = _prompt_ends(benign, tokenizer, 64)
    r = refusal_direction(model, structure, layer, prompts, harmless, tokenizer)
    assert r.norm() == pytest.approx(1.0)
    writers = residual_writers(model, structure)
    assert len(writers) >= 1 + 2 * structure.num_layers  # embeddings, each attention and MLP output
    if arch == "gpt2":
        assert any(side == "cols" and type(m).__name__ == "Conv1D" for m, side in writers)

    def projections(m):
        manager, store = capture_outputs(structure.layers, detach=True)
        with manager, torch.no_grad():
            m(input_ids=torch.tensor([prompts[0]["input_ids"]]))
            states = [primary_tensor(store[i]) for i in range(structure.num_layers)]
        return [float((h @ r).abs().max() / h.norm(dim=-1).max()) for h in states]

    assert max(projections(model)) > 1e-2
    ablate_direction(model, structure, r)
    assert max(projections(model)) < 1e-5  # at every layer (all writers are orthogonal to r)
    last = last_token_activations(model, structure, layer, prompts, tokenizer)
    assert float((last @ r).abs().max()) < 1e-4


def test_refusal_ablation_attack_costs_nothing_and_does_not_lower_harm(
    model, tokenizer, harmful, harmful_eval, benign
):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = _attack(families=["refusal_ablation"], refusal_layer=1).run(
        model, tokenizer, harmful, harmful_eval, benign_train=benign
    )
    (curve,) = result.curves
    assert curve.config["family"] == "refusal_ablation" and curve.config["refusal_layer"] == 1
    (point,) = curve.points
    assert (point.step, point.tokens, point.flops) == (0, 0, 0.0)
    assert point.value <= curve.config["value_before"]  # harmful loss does not rise
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input is untouched
    with pytest.raises(ConfigError, match="refusal_layer=7 is outside"):
        _attack(families=["refusal_ablation"], refusal_layer=7).run(
            model, tokenizer, harmful, harmful_eval, benign_train=benign
        )


def _refusing_model(tokenizer, scale: float = 4.0):
    """A tiny 4-layer model made to "refuse": the unembedding rows of the refusal tokens get ``scale`` x a
    random unit direction d, so the refusal tokens' log-odds follow the final state's component along d
    (11 of the 12 harmful prompts below are refused, and every harmless one)."""
    from immune_trainer.attacks.families import refusal_token_ids

    model = tiny_causal_lm("llama", num_layers=4, seed=0).eval()
    torch.manual_seed(1)
    d = torch.randn(32)
    with torch.no_grad():
        model.lm_head.weight[refusal_token_ids(tokenizer)] += scale * d / d.norm()
    return model


def test_selected_refusal_direction_bypasses_refusal_at_least_as_well_as_the_fixed_rule(tokenizer):
    """Arditi et al.'s selection (layers x post-instruction positions, KL and depth filters, lowest bypass
    score) against the cheap rule (middle layer, last token): after each edit of the weights, the harmful
    prompts' refusal score is no higher for the selected direction, and lower than before."""
    import copy

    from immune_trainer.attacks.families import refusal_scores, refusal_token_ids, select_refusal_direction
    from immune_trainer.attacks.families.refusal_ablation import _last_logprobs

    model = _refusing_model(tokenizer)
    harmful, benign = make_pairs(12), make_benign_rows(12)
    harmful_prompts = _prompt_ends(harmful, tokenizer, 64)
    refusal_ids = refusal_token_ids(tokenizer)

    def refusal(m):
        return refusal_scores(_last_logprobs(m, harmful_prompts, tokenizer, 8), refusal_ids)

    before = refusal(model)
    assert int((before > 0).sum()) == 11  # one harmful prompt is not refused
    cfg = AttackConfig(
        families=["refusal_ablation"],
        refusal_positions=3,
        refusal_selection_prompts=12,
        refusal_max_depth=0.7,
        max_length=64,
    )
    setting = {"num_samples": 0, "seed": 0, "refusal_layer": None}
    sources = {"harmful": harmful, "benign": benign}
    structure = find_decoder_structure(model)
    choice = select_refusal_direction(
        model, structure, harmful_prompts, _prompt_ends(benign, tokenizer, 64), tokenizer, cfg
    )
    assert choice.harmful_kept == 11  # the prompt the model does not refuse is dropped
    assert choice.harmless_kept == 12  # every harmless prompt is refused: none left to drop, all kept
    assert choice.candidates == 3 * 3  # layers 0..2 (below 0.7 x 4) x the last 3 positions
    assert choice.layer < 0.7 * 4 and choice.position in (-1, -2, -3) and choice.kl < 0.1
    assert (2, -1) in choice.scores  # the fixed rule's candidate was among them
    selected = get_attack("refusal_ablation").apply(copy.deepcopy(model), tokenizer, sources, setting, cfg)
    fixed = get_attack("refusal_ablation_fixed").apply(copy.deepcopy(model), tokenizer, sources, setting, cfg)
    kept = before > 0
    after_selected, after_fixed = refusal(selected)[kept].mean(), refusal(fixed)[kept].mean()
    # The hooks that scored the candidates do exactly what the weight edit does.
    assert float(after_selected) == pytest.approx(choice.bypass_score, abs=1e-4)
    # Here (measured): 0.54 before, 0.39 after the fixed rule, 0.21 after the selected direction (layer 2,
    # third token from the end): selection can only match or beat the candidate the fixed rule takes.
    assert float(after_selected) < float(after_fixed) - 0.1
    assert float(after_selected) < float(before[kept].mean()) - 0.2


def test_refusal_selection_options_are_checked():
    for kwargs, message in (
        (dict(refusal_positions=0), "refusal_positions must be >= 1"),
        (dict(refusal_layer_stride=0), "refusal_layer_stride and refusal_selection_prompts"),
        (dict(refusal_max_kl=0.0), "refusal_max_kl must be > 0"),
        (dict(refusal_max_depth=1.5), "refusal_max_depth in"),
    ):
        with pytest.raises(ConfigError, match=message):
            AttackConfig(families=["refusal_ablation"], **kwargs)


# ---------------------------------------------------------------------------- early stopping


def test_early_stop_brackets_the_crossing_of_a_full_run(model, tokenizer, harmful, harmful_eval):
    kw = dict(max_steps=9, eval_every=3)
    (full,) = _attack(**kw).run(model, tokenizer, harmful, harmful_eval).curves
    values = _values(full)
    assert values[1] < values[0]
    phi = (values[0] + values[1]) / 2  # crossed between step 0 and the first evaluation
    (early,) = _attack(**kw, stop_at_threshold=phi).run(model, tokenizer, harmful, harmful_eval).curves
    assert [p.step for p in early.points] == [0, 3] and early.config["stopped_early"] is True
    assert first_crossing(early, phi, True).step == pytest.approx(first_crossing(full, phi, True).step)
    # Asked for the full curve, it runs the whole budget.
    (whole,) = (
        _attack(**kw, stop_at_threshold=phi, full_curve=True)
        .run(model, tokenizer, harmful, harmful_eval)
        .curves
    )
    assert [p.step for p in whole.points] == [0, 3, 6, 9] and "stopped_early" not in whole.config
    # A threshold above the start value: already harmful at step 0, it stops at the first evaluation.
    (at_once,) = (
        _attack(**kw).run(model, tokenizer, harmful, harmful_eval, stop_at_threshold=values[0] + 1.0).curves
    )
    assert [p.step for p in at_once.points] == [0] and at_once.config["stopped_early"] is True
    # Never crossed: the whole budget, not stopped early.
    (never,) = _attack(**kw).run(model, tokenizer, harmful, harmful_eval, stop_at_threshold=-1.0).curves
    assert [p.step for p in never.points] == [0, 3, 6, 9] and never.config["stopped_early"] is False


def test_saved_runs_distinguish_early_stopped_from_full_curves(
    tmp_path, model, tokenizer, harmful, harmful_eval, monkeypatch
):
    out = str(tmp_path / "attack")
    kw = dict(max_steps=6, eval_every=3, output_dir=out)
    (full,) = _attack(**kw).run(model, tokenizer, harmful, harmful_eval).curves
    phi = (full.points[0].value + full.points[1].value) / 2
    ran = _record_runs(monkeypatch, "family")
    # A saved full curve serves an early-stopping request, cut after its crossing.
    (cut,) = _attack(**kw, stop_at_threshold=phi).run(model, tokenizer, harmful, harmful_eval).curves
    assert ran == [] and [p.step for p in cut.points] == [0, 3] and cut.config["stopped_early"] is True
    # A saved early-stopped curve never stands in for a full one.
    out2 = str(tmp_path / "attack2")
    _attack(max_steps=6, eval_every=3, output_dir=out2, stop_at_threshold=phi).run(
        model, tokenizer, harmful, harmful_eval
    )
    assert ran == ["full"]
    (again,) = (
        _attack(max_steps=6, eval_every=3, output_dir=out2)
        .run(model, tokenizer, harmful, harmful_eval)
        .curves
    )
    assert ran == ["full", "full"] and [p.step for p in again.points] == [0, 3, 6]
    assert again.to_dict() == full.to_dict()
    # ...but serves the same early-stopping request again.
    _attack(max_steps=6, eval_every=3, output_dir=out2, stop_at_threshold=phi).run(
        model, tokenizer, harmful, harmful_eval
    )
    assert len(ran) == 2


def test_a_lone_reference_run_stops_once_it_has_crossed_its_own_phi(
    tmp_path, model, tokenizer, harmful, harmful_eval, monkeypatch
):
    """phi_from_step: phi is the run's own value after that step; the run stops at the first later evaluation
    strictly past it, so its crossing of phi is the full curve's, at a fraction of the budget."""
    from immune_trainer.evaluation import threshold_from_base

    kw = dict(max_steps=9, eval_every=1, learning_rates=[1e-3])
    (full,) = _attack(**kw).run(model, tokenizer, harmful, harmful_eval).curves
    values = _values(full)
    assert values[2] < values[1] < values[0]  # the undefended model gets worse step by step
    phi = threshold_from_base([full], 1)
    out = str(tmp_path / "attack")
    (lone,) = (
        _attack(**kw, output_dir=out).run(model, tokenizer, harmful, harmful_eval, phi_from_step=1).curves
    )
    assert [p.step for p in lone.points] == [0, 1, 2] and lone.config["stopped_early"] is True
    assert threshold_from_base([lone], 1) == phi
    assert first_crossing(lone, phi, True).step == pytest.approx(first_crossing(full, phi, True).step)
    # The same request is served by the saved run; a full-curve request trains again.
    ran = _record_runs(monkeypatch, "family")
    (again,) = (
        _attack(**kw, output_dir=out).run(model, tokenizer, harmful, harmful_eval, phi_from_step=1).curves
    )
    assert ran == [] and again.to_dict() == lone.to_dict()
    (whole,) = _attack(**kw, output_dir=out).run(model, tokenizer, harmful, harmful_eval).curves
    assert ran == ["full"] and len(whole.points) == 10
    # A saved full curve serves the lone-reference request, cut where it would have stopped.
    (cut,) = (
        _attack(**kw, output_dir=out).run(model, tokenizer, harmful, harmful_eval, phi_from_step=1).curves
    )
    assert ran == ["full"] and cut.to_dict() == lone.to_dict()
    with pytest.raises(ConfigError, match="exactly one run"):
        _attack(max_steps=2, eval_every=1, learning_rates=[1e-3, 2e-3]).run(
            model, tokenizer, harmful, harmful_eval, phi_from_step=1
        )


def test_resume_matches_settings_on_the_new_axes(
    tmp_path, model, tokenizer, harmful, harmful_eval, monkeypatch
):
    out = str(tmp_path / "attack")
    _attack(optimizers=["sgd"], max_steps=2, eval_every=2, output_dir=out).run(
        model, tokenizer, harmful, harmful_eval
    )
    ran = _record_runs(monkeypatch, "optimizer")
    _attack(optimizers=["sgd", "adamw"], max_steps=2, eval_every=2, output_dir=out).run(
        model, tokenizer, harmful, harmful_eval
    )
    assert ran == ["adamw"]


def test_saved_runs_tell_attack_time_hooks_apart(tmp_path, model, tokenizer, harmful, harmful_eval, monkeypatch):
    """A security vector leaves the weights as they are: the same weights attacked with and without the
    hook are different runs, so a saved run is reused only under the same hook (its cache_key); a hook
    without a key is never saved nor reused."""
    out = str(tmp_path / "attack")

    def run(hook=None):
        _attack(max_steps=2, eval_every=2, output_dir=out).run(
            model, tokenizer, harmful, harmful_eval, prepare_model=hook
        )

    def keyed(m):
        return m

    def unkeyed(m):
        return m

    keyed.cache_key = {"vector": "abc"}
    run()
    ran = _record_runs(monkeypatch, "seed")
    run(keyed)
    assert ran == [0]  # not the saved run of the model without the hook
    run(keyed)
    run()
    assert ran == [0]  # each reused under its own hook
    run(unkeyed)
    run(unkeyed)
    assert ran == [0, 0, 0]


# ---------------------------------------------------------------------------- evaluation


def test_evaluation_records_every_family_and_passes_benign_data(tmp_path, model, tokenizer, harmful, benign):
    import copy

    from immune_trainer import ConditionDatasets, EvaluationConfig, evaluate_conditions
    from immune_trainer.conditions.report import ImmunizationReport

    sets = ConditionDatasets(attack_train=harmful, attack_eval=make_pairs(6, offset=100), benign_train=benign)
    attack = AttackConfig(
        families=["full", "mixed", "refusal_ablation"],
        learning_rates=[2e-3],
        harmful_shares=[0.3],
        max_steps=2,
        eval_every=1,
        max_length=64,
    )
    report = evaluate_conditions(
        model, copy.deepcopy(model), tokenizer, sets, attack=attack, config=EvaluationConfig(fixed_grid=True)
    )
    tm = report.threat_model
    assert tm.attack_family == "full,mixed,refusal_ablation"
    assert tm.grid["families"] == ["full", "mixed", "refusal_ablation"]
    assert tm.grid["harmful_shares"] == [0.3] and tm.grid["optimizers"] == ["adamw"]
    families = [c.config["family"] for c in report.curves["base"]["attack"]]
    assert families == ["full", "mixed", "refusal_ablation"]
    # phi comes from the fine-tuning runs' median at step 1 (the training-free run has no step 1).
    at_1 = sorted(c.points[1].value for c in report.curves["base"]["attack"][:2])
    assert tm.threshold == pytest.approx(sum(at_1) / 2)
    report.save(tmp_path / "report.json")
    again = ImmunizationReport.load(tmp_path / "report.json")
    assert again.threat_model.attack_family == tm.attack_family


def test_for_setting_narrows_a_config_to_one_run():
    cfg = AttackConfig(
        families=["full", "lora", "mixed", "embedding", "refusal_ablation"],
        learning_rates=[1e-3, 2e-3],
        optimizers=["adamw", "sgd"],
        lora_ranks=[4, 8],
        harmful_shares=[0.1, 0.3],
        refusal_layer=1,
    )
    for setting in cfg.grid():
        assert cfg.for_setting(setting).grid() == [setting]
    # A curve's config carries extra keys (stopped_early, value_before); they are not axes.
    assert cfg.for_setting({**cfg.grid()[0], "stopped_early": True}).grid() == [cfg.grid()[0]]
    with pytest.raises(ConfigError, match="not one run of a 'lora' grid"):
        cfg.for_setting({"family": "lora", "learning_rate": 1e-3, "num_samples": 0, "seed": 0})


# ---------------------------------------------------------------------------- models that carry adapters


def _defended(seed=0):
    """``(base, defended)``: a tiny Llama and a copy carrying an unmerged LoRA named ``default`` (as rerouting
    or any defense run with ``peft_config`` leaves it) that changes its outputs."""
    import copy

    from peft import LoraConfig, get_peft_model

    base = tiny_causal_lm("llama", seed=seed)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    defended = get_peft_model(copy.deepcopy(base), lora)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in defended.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return base, defended


def _logits(m, input_ids):
    was_training = m.training
    m.eval()
    with torch.no_grad():
        out = m(input_ids=input_ids).logits
    m.train(was_training)
    return out


def test_lora_attack_on_a_model_with_an_adapter_starts_from_the_defended_model(
    tokenizer, harmful, harmful_eval
):
    """The attacker's LoRA must not replace the defense's (both would be peft's ``default``): the defense's
    adapter is merged into the attacked copy first, so step 0 is the defended model, and it stays frozen."""
    from immune_trainer.attacks import merge_adapters

    base, defended = _defended()
    adapter = {n: p.detach().clone() for n, p in defended.named_parameters() if "lora_" in n}
    ids = torch.tensor([tokenizer("Explain step 3 of the recipe.")["input_ids"]])
    want, base_logits = _logits(defended, ids), _logits(base, ids)
    assert not torch.allclose(want, base_logits, atol=1e-2)
    prepared = []

    def keep(m):  # called on the prepared copy, before any step
        prepared.append((m, _logits(m, ids)))
        return m

    (curve,) = (
        _attack(families=["lora"], learning_rates=[2e-2], max_steps=4, eval_every=2)
        .run(defended, tokenizer, harmful, harmful_eval, prepare_model=keep)
        .curves
    )
    ((attacked, at_start),) = prepared
    torch.testing.assert_close(at_start, want, atol=1e-4, rtol=1e-4)  # the defended model, not the base
    assert curve.config["merged_adapters"] == "default"
    # The defense's weights, merged into the attacked copy, are frozen and unchanged by the attack; the
    # attacker trains its own LoRA only.
    merged = merge_adapters(_defended()[1]).state_dict()
    after = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in attacked.state_dict().items()
    }
    assert all(torch.equal(after[k], v) for k, v in merged.items())
    trained = [n for n, p in attacked.named_parameters() if p.requires_grad]
    assert trained and all(".lora_" in n for n in trained)
    assert _values(curve)[-1] < _values(curve)[0]
    # The input model keeps its adapter, unchanged.
    assert all(torch.equal(p, adapter[n]) for n, p in defended.named_parameters() if n in adapter)
    # Step 0 is f of the defended model.
    scorer = get_scorer("harmful_loss", max_length=64)
    data = scorer.prepare(tokenizer, harmful_eval)
    assert curve.points[0].value == pytest.approx(scorer.score(defended, tokenizer, data).value, rel=1e-4)
    assert curve.points[0].value != pytest.approx(scorer.score(base, tokenizer, data).value, rel=1e-3)


def test_adapters_loaded_by_transformers_are_merged_too(tmp_path):
    """``from_pretrained`` on a defense's adapter folder gives a transformers model with LoRA layers injected
    (what ``verify`` loads): merging gives the defended model's logits and a plain model."""
    import copy

    from transformers import AutoModelForCausalLM

    from immune_trainer.attacks import carried_adapters, drop_adapters, merge_adapters

    base, defended = _defended()
    base.save_pretrained(tmp_path / "base")
    defended.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    defended.save_pretrained(tmp_path / "adapter")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter", use_safetensors=True)
    assert carried_adapters(loaded) == ["default"]
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    merged = merge_adapters(copy.deepcopy(loaded))
    assert carried_adapters(merged) == [] and not getattr(merged, "_hf_peft_config_loaded", False)
    torch.testing.assert_close(_logits(merged, ids), _logits(defended, ids), atol=1e-4, rtol=1e-4)
    dropped = drop_adapters(copy.deepcopy(loaded))
    torch.testing.assert_close(_logits(dropped, ids), _logits(base, ids))
    assert carried_adapters(tiny_causal_lm("llama")) == []


def test_refusal_ablation_on_a_model_with_an_adapter_ablates_the_effective_weights(
    tokenizer, harmful, benign
):
    """With a LoRA the writers are base weight plus adapter: after the ablation the residual stream holds
    no component along r (|h.r|/|h| ~ 0, as on a plain model), not just lora_B's share of it."""
    import copy

    _, defended = _defended()
    defended.eval()
    structure = find_decoder_structure(defended)
    layer = 0
    prompts = _prompt_ends(harmful, tokenizer, 64)
    harmless = _prompt_ends(benign, tokenizer, 64)
    r = refusal_direction(defended, structure, layer, prompts, harmless, tokenizer)

    def projections(m):
        s = find_decoder_structure(m)
        manager, store = capture_outputs(s.layers, detach=True)
        with manager, torch.no_grad():
            m(input_ids=torch.tensor([prompts[0]["input_ids"]]))
            states = [primary_tensor(store[i]) for i in range(s.num_layers)]
        return [float((h @ r).abs().max() / h.norm(dim=-1).max()) for h in states]

    assert max(projections(defended)) > 1e-2
    # The fixed rule ablates exactly r (layer 0, last prompt token); both families merge the same way.
    family = get_attack("refusal_ablation_fixed")
    cfg = AttackConfig(families=["refusal_ablation_fixed"], refusal_layer=layer, max_length=64)
    setting = {"family": "refusal_ablation_fixed", "num_samples": 0, "seed": 0, "refusal_layer": layer}
    ablated = family.apply(
        copy.deepcopy(defended), tokenizer, {"harmful": harmful, "benign": benign}, setting, cfg
    ).eval()
    assert max(projections(ablated)) < 1e-5
    # Called directly on the wrapped model, the ablation refuses rather than edit lora_B alone.
    with pytest.raises(ConfigError, match="merge them into the weights first"):
        residual_writers(defended, structure)
    assert all(
        torch.equal(a, b)
        for a, b in zip(defended.state_dict().values(), _defended()[1].state_dict().values())
    )


def test_refusal_ablation_attack_records_the_merged_adapters(tokenizer, harmful, harmful_eval, benign):
    _, defended = _defended()
    (curve,) = (
        _attack(families=["refusal_ablation"], refusal_layer=0)
        .run(defended, tokenizer, harmful, harmful_eval, benign_train=benign)
        .curves
    )
    assert curve.config["merged_adapters"] == "default"
    scorer = get_scorer("harmful_loss", max_length=64)
    before = scorer.score(defended, tokenizer, scorer.prepare(tokenizer, harmful_eval)).value
    assert curve.config["value_before"] == pytest.approx(before, rel=1e-5)


# ---------------------------------------------------------------------------- the shared step-0 measurement


def test_step0_key_tells_apart_precision_and_merged_adapters(model):
    from immune_trainer.attacks.harness import _step0_key

    fingerprint = {"model": "m", "eval": "e", "scorer": {"name": "harmful_loss"}}
    plain = AttackConfig(families=["full", "lora"])
    qlora = AttackConfig(families=["full", "lora"], load_in_4bit=True)
    full, lora = get_attack("full"), get_attack("lora")
    key = _step0_key(fingerprint, model, full, plain, [])
    assert _step0_key(fingerprint, model, lora, plain, []) == key  # the same model, held the same way
    assert _step0_key(fingerprint, model, full, qlora, []) == key  # full fine-tuning is never 4-bit
    assert _step0_key(fingerprint, model, lora, qlora, []) != key  # an NF4 copy
    assert _step0_key(fingerprint, model, lora, plain, ["default"]) != key  # a defense's adapter merged in
    assert _step0_key(fingerprint, model.to(torch.bfloat16), full, plain, []) != key
    assert _step0_key(fingerprint, model, full, AttackConfig(bf16=True), []) != key


def test_qlora_runs_measure_their_own_step0(model, tokenizer, harmful, harmful_eval, monkeypatch):
    """A QLoRA run starts from a 4-bit copy: it must not reuse the full-precision runs' step-0 value.
    (Quantization is faked on CPU: weights rounded to a coarse grid.)"""
    import copy

    from immune_trainer.attacks import harness
    from immune_trainer.attacks.families import lora

    def fake_quantize(m):
        with torch.no_grad():
            for p in m.parameters():
                p.copy_((p * 8).round() / 8)
        return m

    monkeypatch.setattr(harness, "check_4bit_available", lambda: None)
    monkeypatch.setattr(lora, "quantize_4bit", fake_quantize)
    full, qlora = (
        _attack(families=["full", "lora"], load_in_4bit=True, max_steps=1, eval_every=1)
        .run(model, tokenizer, harmful, harmful_eval)
        .curves
    )
    scorer = get_scorer("harmful_loss", max_length=64)
    data = scorer.prepare(tokenizer, harmful_eval)
    quantized = scorer.score(fake_quantize(copy.deepcopy(model)), tokenizer, data).value
    assert full.points[0].value == pytest.approx(scorer.score(model, tokenizer, data).value, rel=1e-5)
    assert qlora.points[0].value == pytest.approx(quantized, rel=1e-5)
    assert qlora.points[0].value != pytest.approx(full.points[0].value, rel=1e-4)
