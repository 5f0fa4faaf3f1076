"""RepNoise: the loss against an independent reference, training direction, LoRA, accumulation, hooks."""

from __future__ import annotations

import datasets
import pytest
import torch
import torch.nn.functional as F
from conftest import defense_config, make_pairs
from peft import LoraConfig

from immune_trainer.defenses import RepNoiseConfig, RepNoiseTrainer, get_defense
from immune_trainer.defenses.repnoise import selected_layers
from immune_trainer.errors import ConfigError
from immune_trainer.scoring import get_scorer
from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer

REFUSAL = "I can't help with that."


def _config(tmp_path, **kw):
    return defense_config(RepNoiseConfig, tmp_path, **kw)


def _with_refusal(ds):
    return ds.add_column("refusal", [REFUSAL] * len(ds))


def _ref_ce(logits, labels):
    logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100
    )


def _ref_mmd(x, y):
    """Biased MMD^2 with 5 Gaussian bandwidths, from pairwise cdist distances (written independently)."""
    z = torch.cat([x.flatten(1), y.flatten(1)]).float()
    d = torch.cdist(z, z) ** 2
    n = z.shape[0]
    base = d.detach().sum() / (n * n - n) / 4.0
    k = sum(torch.exp(-d / (base * 2.0**i)) for i in range(5))
    nx = x.shape[0]
    return k[:nx, :nx].mean() + k[nx:, nx:].mean() - 2 * k[:nx, nx:].mean()


def _ref_repnoise(model, batch, alpha, beta, arch, skip_embedding=False, output_once=False):
    """RepNoise written from the reference's ``rep_noise_loss`` (domenicrosati/representation-noising,
    ``representation_noising/loss.py``) with the model's own module names (not modeling.py):
    ``harmful_losses = CE(logits) + sum over ALL hidden states h of CE(lm_head(norm(h)))``, then
    ``harmful_losses / len(hidden_states) + 1`` under the log (the last hidden state, already normed by
    transformers, normed a second time).

    ``skip_embedding``: hidden_states[0] left out of the sum and of the divisor. ``output_once``: the library's
    earlier form, the mean of the lens CEs of hidden_states[0..N-1] and the output CE."""
    if arch == "gpt2":
        blocks, norm = model.transformer.h, model.transformer.ln_f
    else:
        blocks, norm = model.model.layers, model.model.norm
    acts = []
    handles = [b.mlp.register_forward_hook(lambda m, a, o: acts.append(o)) for b in blocks]
    try:
        out = model(
            input_ids=batch["harmful_input_ids"],
            attention_mask=batch["harmful_attention_mask"],
            output_hidden_states=True,
        )
    finally:
        for h in handles:
            h.remove()
    labels = batch["harmful_labels"]
    m = (labels != -100).unsqueeze(-1).float()
    noise = torch.stack([_ref_mmd(a * m, torch.randn_like(a) * m) for a in acts]).mean()
    states = out.hidden_states[1:] if skip_embedding else out.hidden_states
    if output_once:
        ces = [_ref_ce(model.lm_head(norm(h)), labels) for h in states[:-1]] + [_ref_ce(out.logits, labels)]
        ascent = torch.log(sum(ces) / len(ces) + 1)
    else:
        harmful_losses = _ref_ce(out.logits, labels)
        for h in states:
            harmful_losses = harmful_losses + _ref_ce(model.lm_head(norm(h)), labels)
        ascent = torch.log(harmful_losses / len(states) + 1)
    harmless = model(
        input_ids=batch["harmless_input_ids"],
        attention_mask=batch["harmless_attention_mask"],
        labels=batch["harmless_labels"],
    ).loss
    return {
        "noise": noise,
        "ascent": ascent,
        "harmless": harmless,
        "loss": harmless + beta * noise - alpha * ascent,
    }


def _random_norms(model):
    """Norm weights (and biases) away from 1 (0): the reference's second norm of the last hidden state then
    changes its lens CE, and the output CE is not simply counted twice."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and ("norm" in name or "ln_" in name):
                param.add_(0.5 * torch.randn(param.shape, generator=generator))
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_loss_matches_independent_reference(tmp_path, arch):
    tok = tiny_tokenizer()
    model = _random_norms(tiny_causal_lm(arch, num_layers=3, seed=1))
    trainer = RepNoiseTrainer(
        model=model,
        args=_config(tmp_path, alpha=0.7, beta=0.5),
        harmful_dataset=make_pairs(8),
        processing_class=tok,
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.eval()
    torch.manual_seed(123)
    ours = trainer.compute_defense_loss(model, batch)
    torch.manual_seed(123)
    ref = _ref_repnoise(model, batch, alpha=0.7, beta=0.5, arch=arch)
    for name in ("noise", "ascent", "harmless", "loss"):
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)
    # The gradients agree as well.
    g_ours = torch.autograd.grad(ours["loss"], list(model.parameters()), allow_unused=True)
    g_ref = torch.autograd.grad(ref["loss"], list(model.parameters()), allow_unused=True)
    for a, b in zip(g_ours, g_ref):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_training_raises_harmful_loss_and_keeps_harmless(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_causal_lm("llama", seed=0)
    loss = get_scorer("harmful_loss")
    ev = make_pairs(8, offset=100)
    ev_refusal = datasets.Dataset.from_list([{"prompt": r["prompt"], "completion": REFUSAL} for r in ev])
    harm0, harmless0 = loss.score(model, tok, ev).value, loss.score(model, tok, ev_refusal).value
    trainer = RepNoiseTrainer(
        model=model,
        args=_config(tmp_path, max_steps=12, refusal_column="refusal", alpha=2.0, beta=0.01),
        harmful_dataset=_with_refusal(make_pairs(24)),
        processing_class=tok,
    )
    trainer.train()
    harm1, harmless1 = loss.score(model, tok, ev).value, loss.score(model, tok, ev_refusal).value
    # Intended direction: harmful responses get less likely; refusals do not get worse (bound: +5%).
    assert harm1 > harm0 + 0.3, (harm0, harm1)
    assert harmless1 < harmless0 * 1.05
    logged = [h for h in trainer.state.log_history if "loss/noise" in h]
    assert logged and {"loss/ascent", "loss/harmful", "loss/harmless"} <= set(logged[-1])


def test_lora_gradient_accumulation_and_hooks_removed(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_causal_lm("gemma", seed=0)
    trainer = RepNoiseTrainer(
        model=model,
        args=_config(tmp_path, max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2),
        harmful_dataset=make_pairs(8),
        processing_class=tok,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all("lora_" in n for n in changed)
    mlps = [m for n, m in trainer.model.named_modules() if n.endswith("mlp")]
    assert mlps and all(len(m._forward_hooks) == 0 for m in mlps)


def test_layer_stride_and_config_errors(tmp_path):
    assert selected_layers(5, 1) == [0, 1, 2, 3, 4]
    assert selected_layers(5, 2) == [0, 2, 4]
    assert selected_layers(6, 4) == [0, 4, 5]
    assert get_defense("repnoise").trainer_class is RepNoiseTrainer
    assert RepNoiseConfig(output_dir=str(tmp_path), report_to="none").learning_rate == 2e-5
    with pytest.raises(ConfigError, match="beta"):
        _config(tmp_path, beta=-1.0)
    with pytest.raises(ConfigError, match="layer_stride"):
        _config(tmp_path, layer_stride=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lens_options_match_independent_reference(tmp_path, arch):
    """lens_skip_embedding=True leaves hidden_states[0] out of the ascent's sum and divisor;
    lens_output_once=True is the library's earlier average (N + 1 distinct CEs); the noise term and the
    harmless loss are unchanged by either."""
    tok = tiny_tokenizer()
    model = _random_norms(tiny_causal_lm(arch, num_layers=3, seed=1))
    model.eval()
    results = {}
    for skip in (False, True):
        for once in (False, True):
            trainer = RepNoiseTrainer(
                model=model,
                args=_config(tmp_path, alpha=0.7, beta=0.5, lens_skip_embedding=skip, lens_output_once=once),
                harmful_dataset=make_pairs(8),
                processing_class=tok,
            )
            batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
            torch.manual_seed(5)
            ours = trainer.compute_defense_loss(model, batch)
            torch.manual_seed(5)
            ref = _ref_repnoise(
                model, batch, alpha=0.7, beta=0.5, arch=arch, skip_embedding=skip, output_once=once
            )
            for name in ("noise", "ascent", "harmless", "loss"):
                torch.testing.assert_close(
                    ours[name], ref[name], rtol=1e-4, atol=1e-5, msg=f"{name} skip={skip} once={once}"
                )
            results[skip, once] = ours
    ascents = [float(r["ascent"].detach()) for r in results.values()]
    assert len({round(a, 5) for a in ascents}) == 4  # four different averages
    torch.testing.assert_close(results[True, True]["noise"], results[False, False]["noise"])


def test_authors_demo_preset(tmp_path):
    cfg = RepNoiseConfig.authors_demo(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    assert (cfg.learning_rate, cfg.lr_scheduler_type, cfg.per_device_train_batch_size) == (1e-4, "cosine", 4)
    assert (cfg.alpha, cfg.beta, cfg.max_steps) == (1.0, 0.001, 250)
    assert cfg.get_warmup_steps(cfg.max_steps) == 25  # 10% warm-up
    assert cfg.lens_skip_embedding is False and cfg.lens_output_once is False  # departures are opt-in
    overridden = RepNoiseConfig.authors_demo(
        output_dir=str(tmp_path), report_to="none", alpha=2.0, max_steps=-1
    )
    assert (overridden.alpha, overridden.max_steps, overridden.learning_rate) == (2.0, -1, 1e-4)
    with pytest.raises(ConfigError, match="alpha"):
        RepNoiseConfig.authors_demo(output_dir=str(tmp_path), report_to="none", alpha=-1.0)
