"""Representation rerouting (circuit breakers): loss against an independent computation, training direction."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import defense_config, make_pairs
from peft import LoraConfig

from immune_trainer.defenses import ReroutingConfig, ReroutingTrainer, get_defense
from immune_trainer.defenses.rerouting import default_target_layers
from immune_trainer.errors import ConfigError
from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer


def _config(tmp_path, **kw):
    return defense_config(ReroutingConfig, tmp_path, **{"learning_rate": 1e-2, **kw})


def _batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def test_default_layers_map_the_reference_depth():
    assert default_target_layers(32) == [9, 19]  # hidden states 10 and 20 of a 32-layer model
    assert default_target_layers(4) == [0, 1]
    assert default_target_layers(1) == [0]
    assert get_defense("rerouting").trainer_class is ReroutingTrainer


def test_loss_matches_an_independent_computation(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_causal_lm("llama", num_layers=4, seed=0)
    trainer = ReroutingTrainer(
        model=model, args=_config(tmp_path, max_steps=10), harmful_dataset=make_pairs(8), processing_class=tok
    )
    peft_model = trainer.model
    torch.manual_seed(1)
    with torch.no_grad():  # a non-trivial adapter (LoRA B starts at zero)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    trainer.state.max_steps, trainer.state.global_step = 10, 5
    inputs = _batch(trainer)
    peft_model.eval()
    terms = trainer.compute_defense_loss(peft_model, inputs)

    # Independent: hidden_states[l + 1] is the output of decoder layer l (l is not the last layer here).
    layers = [0, 1]
    assert trainer.target_layers == layers

    def states(side, disabled):
        kwargs = dict(
            input_ids=inputs[f"{side}_input_ids"],
            attention_mask=inputs[f"{side}_attention_mask"],
            output_hidden_states=True,
        )
        with torch.no_grad():
            if disabled:
                with peft_model.disable_adapter():
                    return peft_model(**kwargs).hidden_states
            return peft_model(**kwargs).hidden_states

    h, h0 = states("harmful", False), states("harmful", True)

    def rerouting(mask):
        # The reference: normalise, multiply by the mask repeated over layers, ReLU of the per-token sum,
        # divided by the mask's total over layers.
        a, b = torch.stack([h[l_ + 1] for l_ in layers]), torch.stack([h0[l_ + 1] for l_ in layers])
        m = mask.float().repeat(len(layers), 1, 1).unsqueeze(-1)
        inner = (a / a.norm(dim=-1, keepdim=True)) * (b / b.norm(dim=-1, keepdim=True)) * m
        return torch.relu(inner.sum(-1)).sum() / m.sum()

    # The rerouting mask is the whole harmful example (request and response), not the response alone.
    expected_rr = rerouting(inputs["harmful_attention_mask"])
    response_only = rerouting(inputs["harmful_labels"] != -100)
    assert abs(float(expected_rr) - float(response_only)) > 1e-4

    # Retain: every hidden state from the embeddings to the output of the last target layer (1 + 2 = 3).
    g, g0 = states("harmless", False), states("harmless", True)
    att = inputs["harmless_attention_mask"].float()
    l2_terms = [
        (((g[i] - g0[i]) ** 2).sum(-1).sqrt() * att).sum() / att.sum() for i in range(max(layers) + 2)
    ]
    assert len(l2_terms) == 3 and float(l2_terms[0]) == 0.0  # the embeddings do not move under LoRA
    expected_retain = sum(l2_terms) / len(l2_terms)

    assert torch.allclose(terms["rerouting"], expected_rr, atol=1e-5)
    assert torch.allclose(terms["retain_l2"], expected_retain, atol=1e-5)
    # Schedule: progress = 5 / (2 * 10) = 0.25 -> c_rr = 7.5, c_retain = 2.5 (alpha = 10).
    assert trainer.coefficients() == pytest.approx((7.5, 2.5))
    assert torch.allclose(terms["loss"], 7.5 * expected_rr + 2.5 * expected_retain, atol=1e-4)
    assert 0.0 < float(expected_rr) < 1.0 and float(expected_retain) > 0.0


def _cos_and_drift(peft_model, inputs, side):
    """Mean cosine to the original and mean L2 drift at decoder layer 1's output, over response tokens."""
    peft_model.eval()
    kwargs = dict(
        input_ids=inputs[f"{side}_input_ids"],
        attention_mask=inputs[f"{side}_attention_mask"],
        output_hidden_states=True,
    )
    with torch.no_grad():
        h = peft_model(**kwargs).hidden_states[2]
        with peft_model.disable_adapter():
            h0 = peft_model(**kwargs).hidden_states[2]
    resp = inputs[f"{side}_labels"] != -100
    return float(F.cosine_similarity(h, h0, dim=-1)[resp].mean()), float((h - h0).norm(dim=-1)[resp].mean())


@pytest.mark.slow
def test_training_reroutes_harmful_more_than_harmless(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_causal_lm("llama", num_layers=4, seed=0)
    # Hidden states of a tiny random model have norms ~0.1 (a real LLM's are ~10-100), so the L2 retain
    # term is scaled up with harmless_weight to weigh as it does at scale.
    trainer = ReroutingTrainer(
        model=model,
        args=_config(tmp_path, max_steps=20, learning_rate=5e-3, harmless_weight=5.0),
        harmful_dataset=make_pairs(24),
        processing_class=tok,
    )
    probe = ReroutingTrainer(
        model=tiny_causal_lm("llama", num_layers=4, seed=0),
        args=_config(tmp_path / "p", per_device_train_batch_size=8),
        harmful_dataset=make_pairs(8, offset=100),
        processing_class=tok,
    )
    inputs = _batch(probe)
    trainer.train()
    harm_cos, harm_drift = _cos_and_drift(trainer.model, inputs, "harmful")
    safe_cos, safe_drift = _cos_and_drift(trainer.model, inputs, "harmless")
    # Held-out harmful responses are rerouted (cosine 1 before training; measured 0.32) ...
    assert harm_cos < 0.6
    # ... and the harmless (refusal) responses less (measured 0.50 and 75% of the harmful drift). The
    # reference's mask reroutes the request too, and here the refusals share the harmful prompts, so they
    # move more than under a response-only mask (0.72 and 60% with that mask).
    assert safe_cos > harm_cos + 0.15
    assert safe_drift < 0.8 * harm_drift
    logged = [h for h in trainer.state.log_history if "loss/rerouting" in h]
    assert logged and "loss/retain_l2" in logged[-1]


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "gemma"])
def test_architectures_user_lora_and_gradient_accumulation(tmp_path, arch):
    tok = tiny_tokenizer()
    model = tiny_causal_lm(arch, num_layers=3, seed=0)
    trainer = ReroutingTrainer(
        model=model,
        args=_config(tmp_path, max_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=2),
        harmful_dataset=make_pairs(8),
        retain_dataset=make_pairs(8, offset=50),
        processing_class=tok,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    trainer.train()
    params = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], params[n]) for n in before)
    assert all(torch.equal(frozen[n], params[n]) for n in frozen)  # base weights untouched
    for module in trainer.model.modules():  # every hook removed after each step
        assert not module._forward_hooks or all(
            "capture" not in getattr(h, "__qualname__", "") for h in module._forward_hooks.values()
        )


def test_bad_configuration_is_a_config_error(tmp_path):
    tok = tiny_tokenizer()
    with pytest.raises(ConfigError, match="alpha"):
        _config(tmp_path, alpha=0.0)
    with pytest.raises(ConfigError, match="target_layers contains 7"):
        ReroutingTrainer(
            model=tiny_causal_lm("llama", num_layers=2),
            args=_config(tmp_path, target_layers=[7]),
            harmful_dataset=make_pairs(4),
            processing_class=tok,
        )
