"""Security Vectors: training fits the vector to harmful data with the base frozen; applied frozen during an
attack, it keeps the base model from learning the harmful responses; both attack families are handled."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import defense_config, make_pairs

from immune_trainer.defenses import (
    SecurityVectorConfig,
    SecurityVectorTrainer,
    drop_security_vector,
    get_defense,
    security_vector_hook,
)
from immune_trainer.errors import ConfigError
from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer


def _config(tmp_path, **kw):
    return defense_config(
        SecurityVectorConfig,
        tmp_path,
        **{
            "max_steps": 30,
            "per_device_train_batch_size": 8,
            "learning_rate": 1e-2,
            "logging_steps": 10,
            **kw,
        },
    )


def _harm_batch(tok, n=8, offset=0):
    probe = SecurityVectorTrainer(
        model=tiny_causal_lm("llama"),
        args=_config(Path("/tmp/sv_probe"), per_device_train_batch_size=n),
        harmful_dataset=make_pairs(n, offset=offset),
        processing_class=tok,
    )
    batch = probe._prepare_inputs(next(iter(probe.get_train_dataloader())))
    return probe.side(batch, "harmful")


def _loss(model, batch):
    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


def _attack(model, batch, steps=15, lr=3e-3):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    return model


@pytest.fixture(scope="module")
def vector(tmp_path_factory):
    """A trained security vector on a tiny Llama: (base model, vector path, harmful batch, base state)."""
    tmp = tmp_path_factory.mktemp("sv")
    tok = tiny_tokenizer()
    model = tiny_causal_lm("llama", seed=0)
    with torch.no_grad():  # a random tiny head caps logits near 0.6: sharpen it so losses can move.
        model.lm_head.weight.mul_(20.0)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    batch = _harm_batch(tok)
    trainer = SecurityVectorTrainer(
        model=model,
        args=_config(tmp, lora_target_modules="all-linear", learning_rate=3e-2),
        harmful_dataset=make_pairs(8),
        processing_class=tok,
    )
    before = _loss(trainer.model, batch)
    trainer.train()
    after = _loss(trainer.model, batch)
    trainer.save_model(str(tmp / "vector"))
    base = trainer.model.unload()
    return {
        "base": base,
        "path": tmp / "vector",
        "batch": batch,
        "base_state": base_state,
        "before": before,
        "after": after,
    }


def test_training_fits_the_vector_and_freezes_the_base(vector):
    assert vector["after"] < vector["before"] - 1.0  # harmful loss with the vector active
    for k, v in vector["base"].state_dict().items():  # base weights untouched
        assert torch.equal(v, vector["base_state"][k]), k
    assert (vector["path"] / "adapter_config.json").exists()
    assert get_defense("security_vectors").attack_time_hook is not None


@pytest.mark.parametrize("family", ["full", "lora"])
def test_attack_with_the_vector_learns_less_harm(vector, family):
    from peft import LoraConfig, get_peft_model

    batch, hook = vector["batch"], security_vector_hook(vector["path"])

    def attacked(with_vector):
        torch.manual_seed(0)
        m = copy.deepcopy(vector["base"]).requires_grad_(True)  # as FullFineTuning.prepare does
        if family == "lora":
            m = get_peft_model(
                m, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
            )
        if with_vector:
            m = hook(m)
            vec = {n: p.detach().clone() for n, p in m.named_parameters() if ".security_vector." in n}
            assert vec and not any(p.requires_grad for n, p in m.named_parameters() if n in vec)
            assert any(p.requires_grad for p in m.parameters())
        m = _attack(m, batch)
        if with_vector:
            assert all(torch.equal(p, vec[n]) for n, p in m.named_parameters() if n in vec)  # stayed frozen
            m = drop_security_vector(m)
            assert not any(".security_vector." in n for n, _ in m.named_parameters())
        return _loss(m, batch)

    start = _loss(copy.deepcopy(vector["base"]), batch)
    plain, protected = attacked(False), attacked(True)
    # Without the vector the attacker drives the harmful loss down; with it, the model used at inference
    # (vector dropped) learns far less.
    assert plain < start - 1.0
    assert protected > plain + 0.5


def test_attack_harness_measures_harm_without_the_vector(vector):
    """Through HarmfulFineTuningAttack with the registry's hook: f is measured as at inference (vector
    dropped), and the protected attack leaves a higher harmful loss than the plain one."""
    from immune_trainer.attacks import AttackConfig, HarmfulFineTuningAttack

    tok = tiny_tokenizer()
    hook = get_defense("security_vectors").attack_time_hook(vector["path"])
    attack = HarmfulFineTuningAttack(
        AttackConfig(learning_rates=[3e-3], max_steps=10, eval_every=10, batch_size=8, max_length=64)
    )
    data = make_pairs(8)
    plain = attack.run(vector["base"], tok, data, data).curves[0].points
    protected = attack.run(vector["base"], tok, data, data, prepare_model=hook).curves[0].points
    # At step 0 the measured model is the base model in both runs (the vector is not counted).
    assert protected[0].value == pytest.approx(plain[0].value, rel=1e-5)
    assert plain[-1].value < plain[0].value - 1.0
    assert protected[-1].value > plain[-1].value + 0.5


def test_errors(tmp_path, vector):
    with pytest.raises(ConfigError, match="harmless_weight"):
        _config(tmp_path, harmless_weight=1.0)
    with pytest.raises(ConfigError, match="no security vector"):
        drop_security_vector(copy.deepcopy(vector["base"]))
    with pytest.raises(ConfigError, match="adapter_config.json"):
        security_vector_hook(tmp_path)


def _one_step(model, batch, lr=1e-2):
    """One plain SGD step of the attacker on every trainable parameter; returns {param: value before}."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    before = {id(p): p.detach().clone() for p in model.parameters()}
    opt = torch.optim.SGD(params, lr=lr)
    opt.zero_grad()
    model(**batch).loss.backward()
    opt.step()
    return before


@pytest.mark.parametrize("family", ["full", "lora"])
def test_hook_leaves_the_attacker_every_weight_a_plain_attack_trains(vector, family):
    """Under the hook the attacker trains exactly what a plain attack of the same family trains (a full attack:
    every base weight, including the projections peft wraps and renames to ``base_layer``); only the
    security vector's own parameters are added, and they stay frozen."""
    from peft import LoraConfig, get_peft_model

    batch, hook = vector["batch"], security_vector_hook(vector["path"])

    def prepared():
        torch.manual_seed(0)
        m = copy.deepcopy(vector["base"]).requires_grad_(True)  # as FullFineTuning.prepare does
        if family == "lora":
            m = get_peft_model(
                m, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM")
            )
        return m

    # The plain attack: which weights (by their name before any wrapping) does one step change?
    plain = prepared()
    named = list(plain.named_parameters())
    before = _one_step(plain, batch)
    trained_plain = {n for n, p in named if not torch.equal(p, before[id(p)])}
    assert trained_plain

    # The same attack under the hook. The parameters are the objects of the model handed to the hook.
    model = prepared()
    named = list(model.named_parameters())  # names before peft wraps (and renames) the projections
    hooked = hook(model)
    vector_params = [p for n, p in hooked.named_parameters() if ".security_vector." in n]
    assert vector_params and not any(p.requires_grad for p in vector_params)
    known = {id(p) for _, p in named}
    # Nothing but the security vector was added, and nothing else is frozen that the plain attack trains.
    assert {id(p) for p in hooked.parameters()} - known == {id(p) for p in vector_params}
    wrapped_names = [n for n, _ in hooked.named_parameters() if ".base_layer." in n]
    assert wrapped_names  # peft did wrap (and rename) projections: the case that used to be frozen
    before = _one_step(hooked, batch)
    trained_hooked = {n for n, p in named if not torch.equal(p, before[id(p)])}
    requires_grad = {n for n, p in named if p.requires_grad}
    assert requires_grad == {n for n, p in prepared().named_parameters() if p.requires_grad}
    assert trained_hooked == trained_plain
    assert all(torch.equal(p, before[id(p)]) for p in vector_params)
    if family == "full":
        projections = {n for n, _ in named if n.endswith("proj.weight")}
        assert projections and projections <= trained_hooked


@pytest.fixture(scope="module")
def vector_card(vector, tmp_path_factory):
    """A published Security Vectors folder: the vector's adapter (over a local base model), the tokenizer,
    the report of ``evaluate_conditions(base, base, prepare_immunized=hook)`` and its card."""
    import json
    import shutil

    from immune_trainer.attacks import AttackConfig
    from immune_trainer.evaluation import ConditionDatasets, EvaluationConfig, evaluate_conditions
    from immune_trainer.hub.card import write_model_card

    root = tmp_path_factory.mktemp("sv_card")
    tok = tiny_tokenizer()
    vector["base"].save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    folder = root / "model"
    shutil.copytree(vector["path"], folder)
    (folder / "README.md").unlink(missing_ok=True)  # peft's adapter card: the model card replaces it
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(root / "base")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tok.save_pretrained(folder)
    train, ev = make_pairs(8), make_pairs(4, offset=100)
    train.save_to_disk(str(root / "train"))
    ev.save_to_disk(str(root / "eval"))
    hook = get_defense("security_vectors").attack_time_hook(folder)
    report = evaluate_conditions(
        vector["base"],
        copy.deepcopy(vector["base"]),  # the deployed model: the base weights, without the vector
        tok,
        ConditionDatasets(attack_train=train, attack_eval=ev),
        attack=AttackConfig(learning_rates=[3e-3], max_steps=4, eval_every=2, batch_size=8, max_length=64),
        config=EvaluationConfig(side_effects=False, fixed_grid=True),
        threshold=0.5,
        defense={"name": "security_vectors", "config": {}},
        prepare_immunized=hook,
    )
    report.datasets = {"attack_train": str(root / "train"), "attack_eval": str(root / "eval")}
    write_model_card(folder, report, plot=False)
    return {"folder": folder, "report": report, "hook": hook, "train": train, "ev": ev, "base": root / "base"}


def test_evaluation_attacks_the_immunized_model_through_the_hook(vector, vector_card):
    """evaluate_conditions(prepare_immunized=hook): the immunized curves are the protected attack's (harm
    measured without the vector), the base curves the plain attack's, on the same weights."""
    from immune_trainer.attacks import AttackConfig, HarmfulFineTuningAttack

    tok, report = tiny_tokenizer(), vector_card["report"]
    attack = HarmfulFineTuningAttack(
        AttackConfig(learning_rates=[3e-3], max_steps=4, eval_every=2, batch_size=8, max_length=64)
    )
    train, ev = vector_card["train"], vector_card["ev"]
    protected = attack.run(vector["base"], tok, train, ev, prepare_model=vector_card["hook"]).curves[0]
    plain = attack.run(vector["base"], tok, train, ev).curves[0]
    (imm,), (base,) = report.curves["immunized"]["attack"], report.curves["base"]["attack"]
    assert [p.value for p in imm.points] == pytest.approx([p.value for p in protected.points], rel=1e-5)
    assert [p.value for p in base.points] == pytest.approx([p.value for p in plain.points], rel=1e-5)
    assert imm.points[-1].value > base.points[-1].value + 0.5
    assert report.extra["prepare_immunized"] == vector_card["hook"].cache_key


def test_verify_reruns_a_security_vectors_card_through_its_hook(vector_card, tmp_path):
    """verify builds the hook from the folder (the registry's factory, called with the vector's path, not
    passed as the hook) and attacks the folder's weights without the vector: the claims re-measure."""
    from immune_trainer.hub.verify import verify

    result = verify(str(vector_card["folder"]), base_model=str(vector_card["base"]))
    curves = [c for c in result.checks if c.claim.endswith("attack curves")]
    assert len(curves) == 2 and all(c.passed for c in curves), result.table()
    assert result.passed, result.table()
    # A folder without the vector cannot be re-run through the hook: a clear ConfigError, no TypeError.
    from immune_trainer.hub.verify import _attack_time_hook

    tiny_causal_lm("llama").save_pretrained(tmp_path / "plain")
    with pytest.raises(ConfigError, match="verify builds that hook from the model folder"):
        _attack_time_hook(get_defense("security_vectors"), str(tmp_path / "plain"), tiny_causal_lm("llama"))


def test_the_evaluate_command_builds_the_hook_from_the_model_folder(vector_card):
    """`immune-trainer evaluate --defense security_vectors`: the hook comes from --model's folder, the model is
    attacked as deployed (without the vector), and the curves are the ones evaluate_conditions gave with the
    hook; without --defense the evaluation refuses nothing but records no defense."""
    from immune_trainer.attacks import AttackConfig
    from immune_trainer.data.loading import ModelArguments
    from immune_trainer.evaluation import EvaluationConfig, EvaluationData, evaluate_from_specs

    root = vector_card["base"].parent
    data = EvaluationData(
        base_model=str(vector_card["base"]),
        dataset=str(root / "train"),
        eval_dataset=str(root / "eval"),
        benign_requests="none",
        defense="security_vectors",
    )
    report = evaluate_from_specs(
        ModelArguments(model=str(vector_card["folder"])),
        data,
        AttackConfig(learning_rates=[3e-3], max_steps=4, eval_every=2, batch_size=8, max_length=64),
        EvaluationConfig(side_effects=False, fixed_grid=True, threshold=0.5),
    )
    assert report.defense["name"] == "security_vectors"
    assert report.extra["prepare_immunized"] == vector_card["hook"].cache_key
    (imm,), (want,) = report.curves["immunized"]["attack"], vector_card["report"].curves["immunized"]["attack"]
    assert [p.value for p in imm.points] == pytest.approx([p.value for p in want.points], rel=1e-5)
    with pytest.raises(ConfigError, match="no_such_defense"):
        evaluate_from_specs(
            ModelArguments(model=str(vector_card["folder"])),
            EvaluationData(base_model=str(vector_card["base"]), defense="no_such_defense"),
            AttackConfig(),
            EvaluationConfig(),
        )
