"""SEAM: the Hessian-free coupling gradient against autograd's exact one, the self-destruction direction,
the ascent term by hand, and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import defense_config, make_benign, make_pairs, train_on_identical_batches

from immune_trainer.defenses import SEAMConfig, SEAMTrainer, get_defense
from immune_trainer.defenses.seam import logit_lens_ascent
from immune_trainer.errors import ConfigError
from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer


def _config(tmp_path, **kw):
    return defense_config(SEAMConfig, tmp_path, **kw)


def _ce(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )


def _trainer_with_fixed_batches(tmp_path, model, **kw):
    trainer = SEAMTrainer(
        model=model,
        args=_config(tmp_path, **kw),
        harmful_dataset=make_pairs(4),
        retain_dataset=make_benign(4),
        processing_class=tiny_tokenizer(),
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    benign = trainer._next_retain_batch()
    trainer._next_retain_batch = lambda: benign  # the same benign batch in the step and in the check
    return trainer, batch, benign


def _float64_gpt2():
    model = tiny_causal_lm("gpt2", hidden_size=16, num_layers=2, seed=3).double()
    model.set_attn_implementation("eager")  # SDPA's CPU kernel has no double backward
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def test_hessian_free_estimate_matches_exact_gradient_within_its_bound(tmp_path):
    """The step's gradient = -grad ascent + alpha grad CE(refusal) + beta grad cos(g_a, g_b), the last
    estimated by forward differences. Its error against autograd's exact gradient (double backward) must be
    within the stated bound beta eps/2 (||D3L_a[v_a,v_a]||/||g_a|| + ||D3L_b[v_b,v_b]||/||g_b||) (+ O(eps^2)),
    with the third derivatives from a third backward, and shrink linearly with eps."""
    model = _float64_gpt2()
    beta, alpha = 0.5, 1.0
    params = [p for p in model.parameters() if p.requires_grad]
    w0 = [p.detach().clone() for p in params]
    errors, bounds = {}, {}
    for eps in (1e-3, 1e-4):
        trainer, batch, benign = _trainer_with_fixed_batches(
            tmp_path / str(eps), model, beta=beta, epsilon=eps, harmless_weight=alpha
        )
        harmful = trainer.side(batch, "harmful")
        harmless = trainer.side(batch, "harmless")
        model.zero_grad()
        trainer.training_step(model, batch)
        estimate = [p.grad.detach().clone() for p in params]
        for p, w in zip(params, w0):  # the perturbations were taken off again
            torch.testing.assert_close(p.detach(), w, rtol=0, atol=1e-12)

        # Exact: gradients with their graphs, cos, and its gradient by a second backward.
        g_a = torch.autograd.grad(_ce(model, harmful), params, create_graph=True)
        g_b = torch.autograd.grad(_ce(model, benign), params, create_graph=True)
        dot = sum((x * y).sum() for x, y in zip(g_a, g_b))
        n_a = torch.sqrt(sum((x * x).sum() for x in g_a))
        n_b = torch.sqrt(sum((y * y).sum() for y in g_b))
        cos = dot / (n_a * n_b + 1e-8)
        ascent, _ = logit_lens_ascent(model, trainer.decoder_structure(model), harmful)
        objective = -ascent + alpha * _ce(model, harmless) + beta * cos
        exact = torch.autograd.grad(objective, params, retain_graph=True)
        err = torch.sqrt(sum(((e - x) ** 2).sum() for e, x in zip(estimate, exact)))
        coupling = torch.autograd.grad(beta * cos, params, retain_graph=True)
        coupling_norm = torch.sqrt(sum((x**2).sum() for x in coupling))

        # The bound: third derivatives along v (v held fixed) by differentiating v^T H v.
        c = cos.detach()
        u_a = [x.detach() / n_a.detach() for x in g_a]
        u_b = [y.detach() / n_b.detach() for y in g_b]
        v_a = [ub - c * ua for ua, ub in zip(u_a, u_b)]
        v_b = [ua - c * ub for ua, ub in zip(u_a, u_b)]
        bound = 0.0
        for g, v, n in ((g_a, v_a, n_a), (g_b, v_b, n_b)):
            hv = torch.autograd.grad(sum((x * y).sum() for x, y in zip(g, v)), params, create_graph=True)
            t = torch.autograd.grad(sum((x * y).sum() for x, y in zip(hv, v)), params, retain_graph=True)
            bound += beta * eps / 2 * float(torch.sqrt(sum((x**2).sum() for x in t))) / float(n.detach())
        errors[eps], bounds[eps] = float(err), bound
        assert float(err) <= 1.5 * bound + 1e-9, (eps, float(err), bound)
        assert float(err) < 0.05 * float(coupling_norm), (eps, float(err), float(coupling_norm))
    assert errors[1e-3] / errors[1e-4] > 5, errors  # first order in eps


def test_seam_makes_a_harmful_step_raise_the_benign_loss(tmp_path):
    """After SEAM, one normalised gradient step on harmful data raises the benign loss, and more than the
    same step on the undefended model (the coupling's intended direction)."""

    def benign_rise(model, harmful, benign, step=0.5):
        params = [p for p in model.parameters() if p.requires_grad]
        before = float(_ce(model, benign))
        g = torch.autograd.grad(_ce(model, harmful), params)
        norm = torch.sqrt(sum((x**2).sum() for x in g))
        with torch.no_grad():
            for p, x in zip(params, g):
                p.sub_(step * x / norm)
            after = float(_ce(model, benign))
            for p, x in zip(params, g):
                p.add_(step * x / norm)
        return after - before

    undefended = tiny_causal_lm("llama", seed=0)
    trainer = SEAMTrainer(
        model=tiny_causal_lm("llama", seed=0),
        args=_config(tmp_path, beta=1.0, max_steps=8, logging_steps=1),
        harmful_dataset=make_pairs(16),
        retain_dataset=make_benign(16),
        processing_class=tiny_tokenizer(),
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    benign = trainer._next_retain_batch()
    harmful = trainer.side(batch, "harmful")
    trainer._retain_iterator = None  # training draws the retain set from its start
    trainer.train()
    cosines = [h["loss/grad_cosine"] for h in trainer.state.log_history if "loss/grad_cosine" in h]
    assert cosines[-1] < -0.5 < cosines[0], cosines
    defended, base = benign_rise(trainer.model, harmful, benign), benign_rise(undefended, harmful, benign)
    assert defended > 0 and defended > base + 0.05, (defended, base)


def test_ascent_term_by_hand(tmp_path):
    """log(1 + mean CE over the embeddings' and each layer input's logit lens and the output logits)."""
    model = tiny_causal_lm("llama", num_layers=2, seed=1)
    trainer, batch, _ = _trainer_with_fixed_batches(tmp_path, model)
    harmful = trainer.side(batch, "harmful")
    ascent, output_ce = logit_lens_ascent(model, trainer.decoder_structure(model), harmful)
    with torch.no_grad():
        out = model(**{k: harmful[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
        labels = harmful["labels"][:, 1:].reshape(-1)
        ces = []
        for h in out.hidden_states[:-1]:  # embeddings, input of layer 1 (the last entry is the output)
            lens = model.lm_head(model.model.norm(h))[:, :-1]
            ces.append(F.cross_entropy(lens.reshape(-1, lens.shape[-1]), labels, ignore_index=-100))
        ces.append(
            F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), labels, ignore_index=-100)
        )
    assert len(ces) == 3
    torch.testing.assert_close(output_ce, ces[-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ascent, torch.log1p(torch.stack(ces).mean()), rtol=1e-5, atol=1e-5)


def test_registry_defaults_and_bad_input(tmp_path):
    spec = get_defense("seam")
    assert spec.trainer_class is SEAMTrainer and spec.paper["id"] == "2505.12186"
    cfg = SEAMConfig(output_dir=str(tmp_path), report_to="none")
    assert (cfg.beta, cfg.epsilon, cfg.harmless_weight, cfg.retain_weight, cfg.learning_rate) == (
        0.01,
        1e-3,
        1.0,
        0.0,
        2e-5,
    )
    ref = SEAMConfig.reference(output_dir=str(tmp_path), report_to="none")
    assert (ref.lr_scheduler_type, ref.warmup_steps, ref.max_grad_norm) == ("cosine", 0.1, 0.0)
    with pytest.raises(ConfigError, match="epsilon"):
        _config(tmp_path, epsilon=0.0)
    with pytest.raises(ConfigError, match="beta"):
        _config(tmp_path, beta=float("nan"))
    with pytest.raises(ConfigError, match="retain_dataset"):
        SEAMTrainer(
            model=tiny_causal_lm("llama", seed=0),
            args=_config(tmp_path),
            harmful_dataset=make_pairs(4),
            processing_class=tiny_tokenizer(),
        )


def _train_identical(trainer_class, out_dir, ga, peft_config=None):
    """SGD on one repeated harmful row and one repeated benign row (conftest's helper); float64: the finite
    differences divide rounding noise by eps (1e-3); in float32 the two runs' different summation orders
    alone move the weights by ~1e-5."""
    import torch

    extra = {"beta": 1.0} if trainer_class is SEAMTrainer else {}
    return train_on_identical_batches(
        trainer_class, out_dir, gradient_accumulation_steps=ga, peft_config=peft_config, retain=True,
        dtype=torch.float64, **extra,
    )


def test_gradient_accumulation_and_lora(tmp_path):
    from peft import LoraConfig

    (one, _), (two, _) = (_train_identical(SEAMTrainer, tmp_path / f"ga{ga}", ga) for ga in (1, 2))
    torch.testing.assert_close(
        torch.cat([p.detach().flatten() for p in one.parameters()]),
        torch.cat([p.detach().flatten() for p in two.parameters()]),
        atol=1e-6,
        rtol=1e-5,
    )
    lora, before = _train_identical(
        SEAMTrainer, tmp_path / "lora", 1, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    changed = {n for n, p in lora.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all("lora_" in n for n in changed)


def test_weights_restored_when_a_perturbed_pass_fails(tmp_path):
    model = tiny_causal_lm("llama", seed=4)
    trainer, batch, _ = _trainer_with_fixed_batches(tmp_path, model, beta=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls, original = [], trainer.lm_loss

    def failing_second_call(*args, **kwargs):  # lm_loss: g_b, then the first perturbed pass
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory in the perturbed pass")
        return original(*args, **kwargs)

    trainer.lm_loss = failing_second_call
    with pytest.raises(RuntimeError, match="perturbed pass"):
        trainer.training_step(model, batch)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=1e-6, msg=n)
