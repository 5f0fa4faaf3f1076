"""CRL (triplet): the loss against a hand computation, training direction, configuration errors."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import defense_config, make_benign, make_pairs

from immune_trainer.defenses import CRLConfig, CRLTrainer, get_defense
from immune_trainer.defenses.crl import crl_triplet_losses, default_representation_layers
from immune_trainer.errors import ConfigError
from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer


def _config(tmp_path, **kw):
    return defense_config(CRLConfig, tmp_path, **{"learning_rate": 1e-2, "lora_dropout": 0.0, **kw})


def _batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def test_default_layers_map_the_reference_depth():
    assert default_representation_layers(32) == list(range(19, 31))  # hidden states 20..31 of 32
    assert default_representation_layers(4) == [2]
    assert default_representation_layers(1) == [0]
    assert get_defense("crl").trainer_class is CRLTrainer
    assert get_defense("crl").paper["id"] == "2506.11938"


def test_triplet_loss_matches_a_hand_computation():
    # Harmful tokens (new, original) and benign tokens (new, original), 2-d so the cosines are by hand.
    hn = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    ho = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 5.0]])
    bn = torch.tensor([[0.0, -1.0], [2.0, 2.0]])
    bo = torch.tensor([[0.0, -4.0], [1.0, 0.0]])
    mh, mb = 0.5, 0.3

    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    def dist(a, b):
        return 1.0 - sum(x * y for x, y in zip(unit(a), unit(b)))

    mu = [sum(row[k] for row in hn.tolist()) / 3 for k in range(2)]  # (4/3, 1): the new harmful mean
    harm = [max(0.0, dist(a, mu) - dist(a, b) + mh) for a, b in zip(hn.tolist(), ho.tolist())]
    benign = [max(0.0, dist(a, b) - dist(a, mu) + mb) for a, b in zip(bn.tolist(), bo.tolist())]
    # By hand: mu/|mu| = (0.8, 0.6); d(hn_i, mu) = 0.2, 0.4, 1 - 1.4/sqrt2; d(hn_i, ho_i) = 0, 1 - 1/sqrt2,
    # 1 - 1/sqrt2; d(bn_j, bo_j) = 0, 1 - 1/sqrt2; d(bn_j, mu) = 1.6, 1 - 1.4/sqrt2.
    r = 1 / math.sqrt(2)
    assert harm == pytest.approx([0.2 + 0.5, 0.4 - (1 - r) + 0.5, (1 - 1.4 * r) - (1 - r) + 0.5])
    assert benign == pytest.approx([0.0, (1 - r) - (1 - 1.4 * r) + 0.3])  # the first is clipped by the ReLU
    got_harm, got_benign = crl_triplet_losses(hn, ho, bn, bo, mh, mb)
    assert float(got_harm) == pytest.approx(sum(harm) / 3, abs=1e-6)
    assert float(got_benign) == pytest.approx(sum(benign) / 2, abs=1e-6)


def _cos_dist(peft_model, inputs, side, layer):
    """Mean cosine distance of the adapted to the original output of decoder ``layer`` on response tokens."""
    kwargs = dict(
        input_ids=inputs[f"{side}_input_ids"],
        attention_mask=inputs[f"{side}_attention_mask"],
        output_hidden_states=True,
    )
    peft_model.eval()
    with torch.no_grad():
        h = peft_model(**kwargs).hidden_states[layer + 1]
        with peft_model.disable_adapter():
            h0 = peft_model(**kwargs).hidden_states[layer + 1]
    resp = inputs[f"{side}_labels"] != -100
    return float((1 - F.cosine_similarity(h, h0, dim=-1))[resp].mean())


def test_loss_terms_match_an_independent_computation_and_training_separates(tmp_path):
    tok = tiny_tokenizer()
    trainer = CRLTrainer(
        model=tiny_causal_lm("llama", num_layers=4, seed=0),
        args=_config(tmp_path, max_steps=12, representation_layers=[1, 2]),
        harmful_dataset=make_pairs(16),
        retain_dataset=make_benign(16),
        processing_class=tok,
    )
    peft_model = trainer.model
    inputs = _batch(trainer)

    # Before training: the adapter is the identity (LoRA B = 0), so the KL is 0 and d(h', h) = 0: the
    # harmful term is mean ReLU(d(h', mu) + margin) = mean d(h', mu) + 0.5 on each layer.
    peft_model.eval()
    trainer._retain_iterator = None
    with torch.no_grad():
        terms0 = trainer.compute_defense_loss(peft_model, inputs)
    assert float(terms0["kl"].detach()) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        hs = peft_model(
            input_ids=inputs["harmful_input_ids"],
            attention_mask=inputs["harmful_attention_mask"],
            output_hidden_states=True,
        ).hidden_states
    resp = inputs["harmful_labels"] != -100
    expected = []
    for layer in (1, 2):
        h = hs[layer + 1][resp]
        mu = h.mean(0, keepdim=True)
        expected.append((1 - F.cosine_similarity(h, mu, dim=-1)).mean() + 0.5)
    assert float(terms0["triplet_harmful"]) == pytest.approx(float(sum(expected) / 2), abs=1e-5)

    trainer._retain_iterator = None
    trainer.train()
    peft_model.eval()
    trainer._retain_iterator = None
    with torch.no_grad():
        terms1 = trainer.compute_defense_loss(peft_model, inputs)
    assert float(terms1["loss"]) < float(terms0["loss"])
    assert float(terms1["triplet_harmful"]) < float(terms0["triplet_harmful"])
    # The harmful responses' states moved away from the original model's (cosine distance 0 before) ...
    # (measured 0.44), more than the refusals' (benign triplet; measured 0.13) ...
    harm_dist = _cos_dist(peft_model, inputs, "harmful", 2)
    assert harm_dist > 0.3
    assert _cos_dist(peft_model, inputs, "harmless", 2) < 0.5 * harm_dist
    # ... while the output distribution on benign data stays close to the original's (KL measured 0.0024).
    assert 0.0 < float(terms1["kl"]) < 0.05
    logged = [h for h in trainer.state.log_history if "loss/triplet_harmful" in h]
    assert logged and {"loss/triplet_benign", "loss/kl"} <= set(logged[-1])


def test_bad_configuration_is_a_config_error(tmp_path):
    tok = tiny_tokenizer()
    with pytest.raises(ConfigError, match="margin_harmful"):
        _config(tmp_path, margin_harmful=-0.1)
    with pytest.raises(ConfigError, match="margin_benign"):
        _config(tmp_path, margin_benign=3.0)
    with pytest.raises(ConfigError, match="gamma"):
        _config(tmp_path, gamma=float("nan"))
    with pytest.raises(ConfigError, match="beta must be positive"):
        _config(tmp_path, beta=0.0)
    with pytest.raises(ConfigError, match="representation_layers contains 7"):
        CRLTrainer(
            model=tiny_causal_lm("llama", num_layers=2),
            args=_config(tmp_path, representation_layers=[7]),
            harmful_dataset=make_pairs(4),
            processing_class=tok,
        )
    with pytest.raises(ConfigError, match="benign data"):
        CRLTrainer(
            model=tiny_causal_lm("llama", num_layers=2),
            args=_config(tmp_path, harmless_weight=0.0),
            harmful_dataset=make_pairs(4),
            processing_class=tok,
        )


def test_cli_help_lists_the_crl_options(capsys):
    from immune_trainer.cli import main

    try:
        code = main(["immunize", "--defense", "crl", "--help"])
    except SystemExit as stop:
        code = stop.code or 0
    text = capsys.readouterr().out
    assert code == 0
    assert all(
        f"--{name}" in text for name in ("margin_harmful", "margin_benign", "gamma", "representation_layers")
    )


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_default_lora_architectures_and_gradient_accumulation(tmp_path, arch):
    trainer = CRLTrainer(
        model=tiny_causal_lm(arch, num_layers=3, seed=0),
        args=_config(tmp_path, max_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=2),
        harmful_dataset=make_pairs(8),
        retain_dataset=make_benign(8),
        processing_class=tiny_tokenizer(),
    )
    assert trainer.representation_layers == default_representation_layers(3) == [1]
    # The default LoRA covers every decoder layer (the KL reads the logits).
    lora_layers = {
        re.search(r"\.(?:h|layers)\.(\d+)\.", n).group(1)
        for n, _ in trainer.model.named_parameters()
        if "lora_A" in n
    }
    assert lora_layers == {"0", "1", "2"}
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    trainer.train()
    params = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], params[n]) for n in before)
    assert all(torch.equal(frozen[n], params[n]) for n in frozen)
