"""TAR: step weights, the first-order tamper-resistance gradient against a manual computation, no side
effects of the simulated attacker, and the direction of training."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import defense_config, make_pairs

from immune_trainer.defenses import TARConfig, TARTrainer, get_defense
from immune_trainer.errors import ConfigError
from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer


def _config(tmp_path, **kw):
    return defense_config(
        TARConfig,
        tmp_path,
        **{
            "max_steps": 2,
            "learning_rate": 1e-3,
            "logging_steps": 1,
            "inner_steps": 2,
            "tr_every": 1,
            "adversary_learning_rates": [1e-2],
            **kw,
        },
    )


def _trainer(tmp_path, model, **kw):
    return TARTrainer(
        model=model,
        args=_config(tmp_path, **kw),
        harmful_dataset=make_pairs(8),
        processing_class=tiny_tokenizer(),
    )


def test_step_weights_and_cost():
    spec = get_defense("tar")
    assert spec.trainer_class is TARTrainer and spec.paper["id"] == "2408.00761"
    cfg = TARConfig(output_dir="/tmp/unused", report_to="none")
    assert (cfg.inner_steps, cfg.tr_every, cfg.lambda_tr, cfg.lambda_retain) == (8, 4, 4.0, 1.0)
    assert cfg.adversary_learning_rates == [2e-6, 2e-5, 4e-5]
    with pytest.raises(ConfigError, match="inner_steps|K="):
        TARConfig(output_dir="/tmp/unused", report_to="none", inner_steps=2, tr_every=4)


def test_first_order_gradient_matches_a_manual_computation(tmp_path):
    model = tiny_causal_lm("llama", seed=0)
    trainer = _trainer(tmp_path, model, lambda_tr=4.0)
    trainer.model.eval()  # no dropout in either computation
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    adversary, held = trainer.split_harmful(inputs)
    before = [p.detach().clone() for p in model.parameters()]
    grads, terms = trainer.tamper_resistance_grads(trainer.model, adversary, held, lr=1e-2)

    # Manual: a deep copy attacked by torch AdamW through ordinary forward/backward calls.
    attacked = copy.deepcopy(model)
    opt = torch.optim.AdamW(attacked.parameters(), lr=1e-2, weight_decay=0.0)
    expected = [torch.zeros_like(p) for p in attacked.parameters()]
    K = 2
    for k in range(K):
        opt.zero_grad()
        attacked(**adversary).loss.backward()
        opt.step()
        opt.zero_grad()
        logits = attacked(input_ids=held["input_ids"], attention_mask=held["attention_mask"]).logits
        shift = logits[:, :-1]
        resp = (held["labels"][:, 1:] != -100).float()
        p = shift.softmax(-1)
        ent = -(p * p.log()).sum(-1)
        (-(ent * resp).sum() / resp.sum()).backward()
        w = math.exp(0.0625 * (k - (K - 1)))
        for e, q in zip(expected, attacked.parameters()):
            if q.grad is not None:
                e.add_(4.0 * w * q.grad)
    got = [torch.zeros_like(p) if g is None else g for p, g in zip(model.parameters(), grads)]
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, atol=1e-5, rtol=1e-4)
    assert any(float(e.abs().sum()) > 0 for e in expected)
    # The simulated attacker did not touch the real weights.
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert -math.log(512) <= float(terms["tamper_resistance"]) <= 0.0


@pytest.mark.parametrize("arch,lora", [("gpt2", False), ("qwen2", True), ("llama", True)])
def test_training_step_architectures_lora_and_accumulation(tmp_path, arch, lora):
    from peft import LoraConfig

    model = tiny_causal_lm(arch, seed=0)
    peft_config = (
        LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", target_modules="all-linear") if lora else None
    )
    trainer = TARTrainer(
        model=model,
        args=_config(
            tmp_path, gradient_accumulation_steps=2, per_device_train_batch_size=2, inner_batch_size=1
        ),
        harmful_dataset=make_pairs(8),
        retain_dataset=make_pairs(8, offset=40),
        processing_class=tiny_tokenizer(),
        peft_config=peft_config,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed
    if lora:
        assert all("lora_" in n for n in changed)
    logged = [h for h in trainer.state.log_history if "loss/tamper_resistance" in h]
    assert logged and {"loss/representation", "loss/harmless", "loss/retain"} <= set(logged[-1])
    assert trainer.plain_steps_per_step == pytest.approx(2 + 2 + 2 + 2 / 3)


def _post_attack_entropy(model, batch, steps=4, lr=1e-2):
    attacked = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(attacked.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        attacked(**batch).loss.backward()
        opt.step()
    attacked.eval()
    with torch.no_grad():
        logits = attacked(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    resp = batch["labels"][:, 1:] != -100
    p = logits.softmax(-1)
    return float((-(p * p.log()).sum(-1))[resp].mean())


@pytest.mark.slow
def test_training_raises_post_attack_entropy(tmp_path):
    tok = tiny_tokenizer()
    # A "capable" starting model: fitted a little to the harmful responses, so its entropy is low.
    model = tiny_causal_lm("llama", seed=0)
    trainer = _trainer(tmp_path / "probe", model, per_device_train_batch_size=8)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    harm = trainer.side(batch, "harmful")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(15):
        opt.zero_grad()
        model(**harm).loss.backward()
        opt.step()
    control = copy.deepcopy(model)
    tar = TARTrainer(
        model=model,
        args=_config(tmp_path, max_steps=8, inner_steps=4, tr_every=2, learning_rate=3e-3),
        harmful_dataset=make_pairs(8),
        processing_class=tok,
    )
    tar.train()
    assert _post_attack_entropy(model, harm) > _post_attack_entropy(control, harm) + 0.1
