"""Booster: gradient vs finite differences of the first-order objective, training direction, LoRA, GA."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.utils._python_dispatch
import torch.utils._pytree
from conftest import defense_config, flat_parameters, make_pairs, train_on_identical_batches
from peft import LoraConfig

from immune_trainer.defenses import BoosterConfig, BoosterTrainer, get_defense
from immune_trainer.errors import ConfigError
from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer


def _config(tmp_path, **kw):
    return defense_config(BoosterConfig, tmp_path, **kw)


def _loss(model, batch, side):
    """Response CE computed in the logits' dtype (transformers' own loss upcasts to float32 only)."""
    logits = model(
        input_ids=batch[f"{side}_input_ids"], attention_mask=batch[f"{side}_attention_mask"]
    ).logits
    labels = batch[f"{side}_labels"][:, 1:]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )


# Llama's RMSNorm computes in float32 even in a float64 model, which limits the finite differences.
@pytest.mark.parametrize("arch,h,tol", [("gpt2", 1e-6, 1e-5), ("llama", 1e-4, 2e-3)])
def test_gradient_matches_finite_differences_float64(tmp_path, arch, h, tol):
    model = tiny_causal_lm(arch, hidden_size=16, num_layers=2, seed=3).double()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    lamb, alpha = 5.0, 0.1
    trainer = BoosterTrainer(
        model=model,
        args=_config(tmp_path, lamb=lamb, alpha=alpha),
        harmful_dataset=make_pairs(4),
        processing_class=tiny_tokenizer(),
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    params = [p for p in model.parameters() if p.requires_grad]
    w0 = [p.detach().clone() for p in params]
    model.zero_grad()
    trainer.training_step(model, batch)
    grad = [p.grad.detach().clone() for p in params]
    for p, w in zip(params, w0):  # the step put the weights back
        torch.testing.assert_close(p.detach(), w, rtol=0, atol=1e-12)

    # The perturbation direction d = -alpha g/||g||, computed once at w0 and held fixed.
    g = torch.autograd.grad(_loss(model, batch, "harmful"), params)
    norm = torch.sqrt(sum((x**2).sum() for x in g))
    d = [-alpha * x / norm for x in g]

    def objective(shift):
        with torch.no_grad():
            for p, w, s in zip(params, w0, shift):
                p.copy_(w + s)
            align = _loss(model, batch, "harmless")
            harm = _loss(model, batch, "harmful")
            for p, w, s, dd in zip(params, w0, shift, d):
                p.copy_(w + s + dd)
            harm_perturbed = _loss(model, batch, "harmful")
        return float(align + lamb * (harm - harm_perturbed))

    torch.manual_seed(0)
    for _ in range(2):
        v = [torch.randn_like(p) for p in params]
        fd = (objective([h * x for x in v]) - objective([-h * x for x in v])) / (2 * h)
        analytic = float(sum((a * x).sum() for a, x in zip(grad, v)))
        assert abs(fd - analytic) <= tol * max(1.0, abs(fd)), (fd, analytic)


def test_booster_attenuates_the_harmful_perturbation(tmp_path):
    """After training, one normalised harmful step lowers the harmful loss less than after plain alignment."""
    results = {}
    for lamb in (0.0, 5.0):
        model = tiny_causal_lm("llama", seed=0)
        trainer = BoosterTrainer(
            model=model,
            args=_config(tmp_path / str(lamb), lamb=lamb, max_steps=10),
            harmful_dataset=make_pairs(16),
            processing_class=tiny_tokenizer(),
        )
        trainer.train()
        logged = [h for h in trainer.state.log_history if "loss/attenuation" in h]
        results[lamb] = (logged[-1]["loss/attenuation"], logged[-1]["loss/harmless"])
    assert results[5.0][0] < results[0.0][0], results
    assert results[5.0][1] < results[0.0][1] * 1.1, results  # alignment loss within 10% of plain alignment


def test_lora_and_gradient_accumulation(tmp_path):
    (one, _), (two, _) = (
        train_on_identical_batches(BoosterTrainer, tmp_path / f"ga{ga}", gradient_accumulation_steps=ga)
        for ga in (1, 2)
    )
    torch.testing.assert_close(flat_parameters(one), flat_parameters(two), atol=1e-6, rtol=1e-5)
    lora, before = train_on_identical_batches(
        BoosterTrainer,
        tmp_path / "lora",
        gradient_accumulation_steps=1,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    changed = {n for n, p in lora.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all("lora_" in n for n in changed)


def test_config_errors(tmp_path):
    assert get_defense("booster").trainer_class is BoosterTrainer
    cfg = BoosterConfig(output_dir=str(tmp_path), report_to="none")
    assert (cfg.lamb, cfg.alpha) == (5.0, 0.1)
    with pytest.raises(ConfigError, match="alpha"):
        _config(tmp_path, alpha=float("nan"))


def _booster_and_batch(tmp_path, hidden_size=32, **kw):
    model = tiny_causal_lm("llama", hidden_size=hidden_size, num_layers=2, seed=4)
    trainer = BoosterTrainer(
        model=model,
        args=_config(tmp_path, **kw),
        harmful_dataset=make_pairs(4),
        processing_class=tiny_tokenizer(),
    )
    return model, trainer, trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def test_weights_restored_when_the_perturbed_pass_fails(tmp_path):
    model, trainer, batch = _booster_and_batch(tmp_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []
    original = trainer.lm_loss

    def failing_second_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory in pass 2")
        return original(*args, **kwargs)

    trainer.lm_loss = failing_second_call
    with pytest.raises(RuntimeError, match="pass 2"):
        trainer.training_step(model, batch)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=1e-6, msg=n)


def test_alpha_zero_leaves_only_the_alignment_gradient(tmp_path):
    """With alpha = 0 the attenuation L_harm(w) - L_harm(w) vanishes, so must its gradient."""
    model, trainer, batch = _booster_and_batch(tmp_path, alpha=0.0)
    model.zero_grad()
    trainer.training_step(model, batch)
    got = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad()
    _loss(model, batch, "harmless").backward()
    for a, p in zip(got, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-7)


class _LiveTensorBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of the tensors created while active (CPU stand-in for ``torch.cuda.max_memory_allocated``)."""

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0

    def _free(self, key):
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t._is_view():
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if storage.nbytes() and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(t, self._free, key)
        return out


def test_step_holds_at_most_one_extra_parameter_sized_buffer(tmp_path):
    """Over a plain step (forward + backward of the alignment loss), Booster's peak grows by about one copy
    of the parameters (its weight step d), not two (d kept beside pass 2's gradient during pass 3)."""
    model, trainer, batch = _booster_and_batch(tmp_path, hidden_size=128)  # parameters outweigh activations
    trainer.current_gradient_accumulation_steps = 1
    model.zero_grad(set_to_none=True)
    with _LiveTensorBytes() as plain:
        _loss(model, batch, "harmless").backward()
        model.zero_grad(set_to_none=True)
    with _LiveTensorBytes() as booster:
        trainer.training_step(model, batch)
        model.zero_grad(set_to_none=True)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert booster.peak - plain.peak <= 1.4 * param_bytes, (plain.peak, booster.peak, param_bytes)
