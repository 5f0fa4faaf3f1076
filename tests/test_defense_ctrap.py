"""CTRAP: the collapse loss by hand, the first-order gradient, the trap's direction, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import defense_config, make_benign, make_pairs, train_on_identical_batches

from immune_trainer.defenses import CTRAPConfig, CTRAPTrainer, get_defense
from immune_trainer.defenses.ctrap import collapse_loss
from immune_trainer.errors import ConfigError
from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer


def _config(tmp_path, **kw):
    return defense_config(CTRAPConfig, tmp_path, **kw)


def _ce(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )


def test_collapse_loss_by_hand():
    """-mean over the positions that predict a response token of log softmax(logits)[e]."""
    logits = torch.tensor(
        [
            [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.5, 0.5, 3.0], [9.0, 9.0, 9.0]],
            [[0.0, 0.0, 1.0], [1.0, 1.0, 1.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
        ]
    )
    # Row 0 predicts labels at t = 2, 3 (positions 1, 2); row 1 at t = 1 (position 0); the last position
    # and prompt / padding positions (-100) are not scored.
    labels = torch.tensor([[-100, -100, 1, 0], [-100, 2, -100, -100]])

    def log_p(z, e):
        return z[e] - math.log(sum(math.exp(v) for v in z))

    e = 2
    expected = -(log_p([0.0, 2.0, 0.0], e) + log_p([0.5, 0.5, 3.0], e) + log_p([0.0, 0.0, 1.0], e)) / 3
    assert float(collapse_loss(logits, labels, e)) == pytest.approx(expected, rel=1e-6)
    assert float(collapse_loss(logits, torch.full_like(labels, -100), e)) == 0.0
    with pytest.raises(ConfigError, match="vocabulary"):
        collapse_loss(logits, labels, 3)


@pytest.mark.parametrize("normalize", [True, False])
def test_gradient_is_align_plus_lambda_collapse_at_the_lookahead(tmp_path, normalize):
    """One step's gradient = grad L_align(theta) + lambda grad L_collapse(theta + d) with the step
    d = -alpha g/||g|| (or -alpha g), g = grad L_harm(theta), computed here independently (first-order, as
    documented); the weights are put back."""
    model = tiny_causal_lm("gpt2", hidden_size=16, num_layers=2, seed=3).double()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    lamb, alpha = 2.0, 0.3
    trainer = CTRAPTrainer(
        model=model,
        args=_config(tmp_path, lamb=lamb, alpha=alpha, normalize_step=normalize),
        harmful_dataset=make_pairs(4),
        retain_dataset=make_benign(4),
        processing_class=tiny_tokenizer(),
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    retain = trainer._next_retain_batch()
    trainer._next_retain_batch = lambda: retain
    params = [p for p in model.parameters() if p.requires_grad]
    w0 = [p.detach().clone() for p in params]
    model.zero_grad()
    trainer.training_step(model, batch)
    got = [p.grad.detach().clone() for p in params]
    for p, w in zip(params, w0):
        torch.testing.assert_close(p.detach(), w, rtol=0, atol=1e-12)

    e = tiny_tokenizer().eos_token_id
    g = torch.autograd.grad(_ce(model, trainer.side(batch, "harmful")), params)
    align = _ce(model, trainer.side(batch, "harmless")) + _ce(model, retain)
    expected = list(torch.autograd.grad(align, params))
    norm = torch.sqrt(sum((x**2).sum() for x in g)) if normalize else 1.0
    with torch.no_grad():
        for p, w, x in zip(params, w0, g):
            p.copy_(w - alpha * x / norm)
    logits = model(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"]).logits
    shifted = torch.autograd.grad(collapse_loss(logits, retain["labels"], e), params)
    with torch.no_grad():
        for p, w in zip(params, w0):
            p.copy_(w)
    for a, b, c in zip(got, expected, shifted):
        # lm_loss takes the CE in float32: float32 rounding, not float64's
        torch.testing.assert_close(a, b + lamb * c, rtol=1e-5, atol=1e-6)


def test_a_harmful_step_springs_the_trap_a_benign_step_does_not(tmp_path):
    """After CTRAP, the simulated harmful step raises log p(e) on general data (lowers the collapse loss)
    more than a benign step of the same length does, and more than on the undefended model."""
    undefended = tiny_causal_lm("llama", seed=0)
    alpha = 0.5  # the step's length; 0.1 moves this tiny model too little to set a trap in 10 steps
    trainer = CTRAPTrainer(
        model=tiny_causal_lm("llama", seed=0),
        args=_config(tmp_path, lamb=1.0, alpha=alpha, max_steps=10),
        harmful_dataset=make_pairs(16),
        retain_dataset=make_benign(16),
        processing_class=tiny_tokenizer(),
    )
    harmful = trainer.side(trainer._prepare_inputs(next(iter(trainer.get_train_dataloader()))), "harmful")
    probe, other_benign = trainer._next_retain_batch(), trainer._next_retain_batch()
    trainer._retain_iterator = None  # training draws the retain set from its start
    trainer.train()

    def collapse_drop(model, step_batch, length):
        """How much one step of the given length along -grad CE(step_batch) lowers the probe's collapse loss."""
        params = [p for p in model.parameters() if p.requires_grad]
        before = float(trainer.collapse_of(model, probe).detach())
        g = torch.autograd.grad(_ce(model, step_batch), params)
        norm = torch.sqrt(sum((x**2).sum() for x in g))
        with torch.no_grad():
            for p, x in zip(params, g):
                p.sub_(length * x / norm)
            after = float(trainer.collapse_of(model, probe))
            for p, x in zip(params, g):
                p.add_(length * x / norm)
        return before - after, float(norm)

    model = trainer.model
    length = alpha  # the simulated harmful step of training: length alpha along -g/||g||
    harmful_drop, _ = collapse_drop(model, harmful, length)
    benign_drop, _ = collapse_drop(model, other_benign, length)
    base_drop, _ = collapse_drop(undefended, harmful, length)
    assert harmful_drop > 0.1, (harmful_drop, benign_drop, base_drop)
    assert harmful_drop > benign_drop + 0.1, (harmful_drop, benign_drop)
    assert harmful_drop > base_drop + 0.1, (harmful_drop, base_drop)


def test_registry_defaults_and_bad_input(tmp_path):
    spec = get_defense("ctrap")
    assert spec.trainer_class is CTRAPTrainer and spec.paper["id"] == "2505.16559"
    cfg = CTRAPConfig(output_dir=str(tmp_path), report_to="none")
    assert (cfg.lamb, cfg.alpha, cfg.normalize_step, cfg.collapse_token) == (0.1, 0.1, True, None)
    with pytest.raises(ConfigError, match="lamb"):
        _config(tmp_path, lamb=0.0)
    with pytest.raises(ConfigError, match="alpha"):
        _config(tmp_path, alpha=float("inf"))
    with pytest.raises(ConfigError, match="one"):
        CTRAPTrainer(
            model=tiny_causal_lm("llama", seed=0),
            args=_config(tmp_path, collapse_token="not a single token at all"),
            harmful_dataset=make_pairs(4),
            processing_class=tiny_tokenizer(),
        )


def _train_identical(out_dir, ga, peft_config=None):
    """SGD on one repeated harmful row and one repeated benign row (conftest's helper)."""
    return train_on_identical_batches(
        CTRAPTrainer, out_dir, gradient_accumulation_steps=ga, peft_config=peft_config, retain=True, lamb=1.0,
        alpha=0.5,
    )


def test_gradient_accumulation_and_lora(tmp_path):
    from peft import LoraConfig

    (one, _), (two, _) = (_train_identical(tmp_path / f"ga{ga}", ga) for ga in (1, 2))
    torch.testing.assert_close(
        torch.cat([p.detach().flatten() for p in one.parameters()]),
        torch.cat([p.detach().flatten() for p in two.parameters()]),
        atol=1e-6,
        rtol=1e-5,
    )
    lora, before = _train_identical(
        tmp_path / "lora", 1, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    changed = {n for n, p in lora.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all("lora_" in n for n in changed)


def test_weights_restored_when_the_lookahead_pass_fails(tmp_path):
    model = tiny_causal_lm("llama", seed=4)
    trainer = CTRAPTrainer(
        model=model,
        args=_config(tmp_path, alpha=0.5),
        harmful_dataset=make_pairs(4),
        retain_dataset=make_benign(4),
        processing_class=tiny_tokenizer(),
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def failing(*args, **kwargs):
        raise RuntimeError("out of memory at the look-ahead weights")

    trainer.collapse_of = failing
    with pytest.raises(RuntimeError, match="look-ahead"):
        trainer.training_step(model, batch)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=1e-6, msg=n)
