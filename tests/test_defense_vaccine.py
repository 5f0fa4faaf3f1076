"""Vaccine / T-Vaccine: perturbation norm, second-pass gradient vs a manual computation, training, LoRA, GA."""

from __future__ import annotations

import pytest
import torch
from conftest import defense_config, flat_parameters, make_pairs, train_on_identical_batches
from peft import LoraConfig
from transformers import TrainerCallback

from immune_trainer.defenses import VaccineConfig, VaccineTrainer, get_defense
from immune_trainer.errors import ConfigError
from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer


def _config(tmp_path, **kw):
    return defense_config(VaccineConfig, tmp_path, **kw)


def _trainer(tmp_path, arch="llama", num_layers=3, **kw):
    model = tiny_causal_lm(arch, num_layers=num_layers, seed=2)
    for module in model.modules():  # training_step calls model.train(): no dropout, identical forwards
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    trainer = VaccineTrainer(
        model=model,
        args=_config(tmp_path, **kw),
        harmful_dataset=make_pairs(8),
        processing_class=tiny_tokenizer(),
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    return model, trainer, batch


def _attn_blocks(model, arch):
    return (
        [b.attn for b in model.transformer.h] if arch == "gpt2" else [b.self_attn for b in model.model.layers]
    )


def _harmless_loss(model, batch):
    return model(
        input_ids=batch["harmless_input_ids"],
        attention_mask=batch["harmless_attention_mask"],
        labels=batch["harmless_labels"],
    ).loss


def _with_deltas(model, arch, deltas, fn):
    """Run fn() with deltas[i] added to attention block i's output (hooks written here, not modeling.py)."""

    def make(delta):
        def hook(_m, _a, out):
            return (out[0] + delta, *out[1:])

        return hook

    handles = [b.register_forward_hook(make(d)) for b, d in zip(_attn_blocks(model, arch), deltas)]
    try:
        return fn()
    finally:
        for h in handles:
            h.remove()


def _manual_vaccine_grads(model, arch, batch, rho):
    """dL/dtheta at h + rho * g/||g||, with g from zero 'probe' tensors added to each attention output."""
    n = len(_attn_blocks(model, arch))
    shape = (*batch["harmless_input_ids"].shape, model.config.hidden_size)
    probes = [torch.zeros(shape, requires_grad=True) for _ in range(n)]
    loss = _with_deltas(model, arch, probes, lambda: _harmless_loss(model, batch))
    g = torch.autograd.grad(loss, probes)
    norm = torch.sqrt(sum((x**2).sum() for x in g))
    eps = [rho * x / norm for x in g]
    model.zero_grad()
    _with_deltas(model, arch, eps, lambda: _harmless_loss(model, batch)).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return eps, grads


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])
def test_perturbation_and_second_pass_gradient_match_manual(tmp_path, arch):
    model, trainer, batch = _trainer(tmp_path, arch=arch, rho=2.0)
    eps, _ = trainer.compute_perturbation(model, batch)
    assert sorted(eps) == list(range(3))
    torch.testing.assert_close(
        torch.sqrt(sum((e.double() ** 2).sum() for e in eps.values())).float(), torch.tensor(2.0)
    )
    eps_ref, grads_ref = _manual_vaccine_grads(model, arch, batch, rho=2.0)
    for i, e in enumerate(eps_ref):
        torch.testing.assert_close(eps[i], e, rtol=1e-4, atol=1e-6)
    model.zero_grad()
    trainer.training_step(model, batch)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)
    # The perturbation matters: the gradient differs from the unperturbed one.
    model.zero_grad()
    _harmless_loss(model, batch).backward()
    assert any(not torch.allclose(p.grad, grads_ref[n], atol=1e-6) for n, p in model.named_parameters())


def _ref_layer_probabilities(model, arch, batch):
    """||dL_harm/dh_l|| / sum_j ||dL_harm/dh_j|| from zero probes added to each attention output."""
    n = len(_attn_blocks(model, arch))
    shape = (*batch["harmful_input_ids"].shape, model.config.hidden_size)
    probes = [torch.zeros(shape, requires_grad=True) for _ in range(n)]

    def harmful_loss():
        return model(
            input_ids=batch["harmful_input_ids"],
            attention_mask=batch["harmful_attention_mask"],
            labels=batch["harmful_labels"],
        ).loss

    grads = torch.autograd.grad(_with_deltas(model, arch, probes, harmful_loss), probes)
    norms = torch.tensor([float(g.norm()) for g in grads])
    return norms / norms.sum()


def test_t_vaccine_probabilities_follow_harmful_gradient_norms(tmp_path):
    model, trainer, batch = _trainer(tmp_path, num_layers=4, layer_sampling=True, num_sampled_layers=2)
    assert trainer.args.rho == 3.0
    assert (trainer.args.probability_refresh_steps, trainer.args.resample_steps) == (200, 20)  # reference
    expected = _ref_layer_probabilities(model, "llama", batch)
    torch.testing.assert_close(
        trainer.compute_layer_probabilities(model, trainer.side(batch, "harmful")), expected
    )
    # The harmless side gives other probabilities: they are measured on the harmful batch.
    harmless = trainer.compute_layer_probabilities(model, trainer.side(batch, "harmless"))
    assert not torch.allclose(harmless, expected)

    # In training, the first step measures them on the harmful side of its batch and draws 2 layers.
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    trainer.training_step(model, batch)
    torch.testing.assert_close(trainer.layer_probabilities, expected)
    assert trainer.probability_refreshes == [0] and len(trainer.active_layers) == 2
    # Only the drawn layers are perturbed, with the joint norm rho over them.
    eps, _ = trainer.compute_perturbation(model, batch)
    assert sorted(eps) == trainer.active_layers
    torch.testing.assert_close(torch.sqrt(sum((e**2).sum() for e in eps.values())), torch.tensor(3.0))
    # Draws follow the probabilities (2 of 4 without replacement, seeded by the step).
    counts = torch.zeros(4)
    for step in range(400):
        trainer.state.global_step = step
        counts[trainer._draw_layers(torch.tensor([0.7, 0.2, 0.05, 0.05]))] += 1
    assert counts[0] > counts[1] > counts[2] and counts[0] > 350 and counts.sum() == 800


def test_t_vaccine_redraws_on_schedule_and_freezes_undrawn_layers(tmp_path):
    model, trainer, _ = _trainer(
        tmp_path,
        num_layers=4,
        layer_sampling=True,
        num_sampled_layers=2,
        resample_steps=3,
        probability_refresh_steps=6,
        max_steps=7,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
    )
    snapshots = {}
    layers = model.model.layers

    class Snapshot(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            snapshots[state.global_step] = [
                {
                    part: [p.detach().clone() for p in getattr(layer, part).parameters()]
                    for part in ("self_attn", "mlp")
                }
                for layer in layers
            ]

    trainer.add_callback(Snapshot())
    trainer.train()
    # Probabilities refreshed at steps 0 and 6, layers drawn at steps 0, 3 and 6 (once per optimizer step,
    # although each step runs two micro-batches).
    assert trainer.probability_refreshes == [0, 6]
    assert [step for step, _ in trainer.layer_draws] == [0, 3, 6]
    assert all(len(drawn) == 2 for _, drawn in trainer.layer_draws)
    # Over the interval [0, 3) only the drawn layers' attention blocks change, the others' are exactly as they
    # were; every layer's MLP keeps training (the reference freezes only the undrawn attention).
    drawn = trainer.layer_draws[0][1]
    for idx in range(4):
        for part in ("self_attn", "mlp"):
            same = all(torch.equal(a, b) for a, b in zip(snapshots[0][idx][part], snapshots[3][idx][part]))
            assert same == (part == "self_attn" and idx not in drawn), (idx, part, drawn)
    # After training every parameter is trainable again.
    assert all(p.requires_grad for p in model.parameters())


def _perturbed_loss(trainer, model, batch):
    model.eval()
    eps, _ = trainer.compute_perturbation(model, batch)
    from immune_trainer.modeling import add_to_outputs

    with torch.no_grad(), add_to_outputs(trainer.decoder_structure(model).attention, eps):
        return float(_harmless_loss(model, batch))


def test_training_makes_alignment_robust_to_perturbation(tmp_path):
    """Vaccine (rho=2) vs plain alignment (rho=0) for the same steps: lower loss under the perturbation."""
    results = {}
    for rho in (0.0, 2.0):
        model, trainer, batch = _trainer(tmp_path / str(rho), num_layers=2, rho=rho, max_steps=12)
        clean0 = float(_harmless_loss(model, batch).detach())
        trainer.train()
        probe = VaccineTrainer(
            model=model,
            args=_config(tmp_path / "probe", rho=2.0),
            harmful_dataset=make_pairs(8),
            processing_class=tiny_tokenizer(),
        )
        results[rho] = (_perturbed_loss(probe, model, batch), float(_harmless_loss(model, batch)), clean0)
    vacc, plain = results[2.0], results[0.0]
    assert vacc[0] < plain[0], results  # more robust to the worst-case hidden perturbation
    assert vacc[1] < vacc[2]  # the alignment (refusal) loss still goes down
    assert vacc[1] < plain[1] * 1.1  # and costs at most 10% of clean alignment loss vs plain


def test_lora_and_gradient_accumulation(tmp_path):
    (one, _), (two, _) = (
        train_on_identical_batches(VaccineTrainer, tmp_path / f"ga{ga}", gradient_accumulation_steps=ga)
        for ga in (1, 2)
    )
    torch.testing.assert_close(flat_parameters(one), flat_parameters(two), atol=1e-6, rtol=1e-5)
    lora, _ = train_on_identical_batches(
        VaccineTrainer,
        tmp_path / "lora",
        gradient_accumulation_steps=1,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj"]),
    )
    assert any("lora_" in n and p.requires_grad for n, p in lora.named_parameters())
    attn = [m for n, m in lora.named_modules() if n.endswith("self_attn")]
    assert attn and all(len(m._forward_hooks) == 0 for m in attn)


def test_config_errors(tmp_path):
    assert get_defense("vaccine").trainer_class is VaccineTrainer
    with pytest.raises(ConfigError, match="rho"):
        _config(tmp_path, rho=-1.0)
    with pytest.raises(ConfigError, match="num_sampled_layers"):
        _config(tmp_path, num_sampled_layers=0)
    with pytest.raises(ConfigError, match="resample_steps"):
        _config(tmp_path, resample_steps=0)


def test_t_vaccine_with_lora_trains_only_the_drawn_layers_adapters(tmp_path):
    model = tiny_causal_lm("qwen2", num_layers=4, seed=2)
    trainer = VaccineTrainer(
        model=model,
        args=_config(tmp_path, layer_sampling=True, num_sampled_layers=1, resample_steps=5, max_steps=3),
        harmful_dataset=make_pairs(8),
        processing_class=tiny_tokenizer(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    (drawn,) = trainer.layer_draws[0][1]
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_" in n and f"layers.{drawn}." in n for n in changed)
    assert all(p.requires_grad == ("lora_" in n) for n, p in trainer.model.named_parameters())


def test_t_vaccine_keeps_training_the_mlp_adapters_of_undrawn_layers(tmp_path):
    """The reference (Lslland/T-Vaccine, LoRA on q/k/v/o and gate/up/down) freezes only the LoRA of the undrawn
    layers' ATTENTION modules: an undrawn layer's MLP adapter gets a gradient and moves at every step, its
    attention adapter gets none and stays put."""
    model = tiny_causal_lm("llama", num_layers=4, seed=2)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    trainer = VaccineTrainer(
        model=model,
        args=_config(tmp_path, layer_sampling=True, num_sampled_layers=1, resample_steps=5, max_steps=3),
        harmful_dataset=make_pairs(8),
        processing_class=tiny_tokenizer(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=targets),
    )
    grads = []

    class Grads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            # lora_A's first gradient is zero (lora_B starts at zero): "a gradient" means one was computed.
            grads.append({n: p.grad is not None for n, p in model.named_parameters()})

    trainer.add_callback(Grads())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    (drawn,) = trainer.layer_draws[0][1]
    undrawn = next(i for i in range(4) if i != drawn)
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)}

    def adapters(layer, kind):
        names = [
            n
            for n in before
            if "lora_" in n and f"layers.{layer}." in n and (".self_attn." in n) == (kind == "attention")
        ]
        assert names
        return names

    assert len(grads) == 3
    for name in adapters(undrawn, "mlp"):
        assert all(g[name] for g in grads), name  # a gradient at every step
        assert name in changed, name
    for name in adapters(undrawn, "attention"):
        assert not any(g[name] for g in grads), name
        assert name not in changed, name
    assert set(adapters(drawn, "attention")) & changed  # the drawn layer's attention adapter trains
    assert all(p.requires_grad == ("lora_" in n) for n, p in trainer.model.named_parameters())
