"""The response-only output layer (modeling.response_loss): the loss and its gradients are the model's own,
but the vocabulary projection runs only where a labelled token is predicted."""

import pytest
import torch

from immune_trainer.modeling import logits_at, response_loss
from immune_trainer.testing import TINY_ARCHITECTURES, tiny_causal_lm, tiny_softcapped_gemma2


def _batch(vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, vocab, (3, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0  # right padding
    labels = input_ids.clone()
    labels[:, :5] = -100  # the prompt
    labels[2, :8] = -100  # a longer prompt
    labels[attention_mask == 0] = -100
    return input_ids, attention_mask, labels


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_same_loss_and_gradients_as_the_models_own_loss(arch):
    input_ids, attention_mask, labels = _batch()
    model = tiny_causal_lm(arch, seed=0).train()
    torch.manual_seed(1)  # the same dropout masks in both passes
    own = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    own.backward()
    expected = _grads(model)
    model.zero_grad()

    rows = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: rows.append(args[0].shape[:-1].numel())
    )
    torch.manual_seed(1)
    try:
        loss, _ = response_loss(model, input_ids, attention_mask, labels)
    finally:
        handle.remove()
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(own.detach()), rel=1e-5)
    assert rows == [int((labels[:, 1:] != -100).sum())]  # projected: the predicting positions only
    got = _grads(model)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_num_items_in_batch_divides_the_sum_as_the_model_does():
    input_ids, attention_mask, labels = _batch()
    model = tiny_causal_lm("llama", seed=0)
    n = torch.tensor(40)
    own = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, num_items_in_batch=n).loss
    loss, _ = response_loss(model, input_ids, attention_mask, labels, num_items_in_batch=n)
    assert float(loss.detach()) == pytest.approx(float(own.detach()), rel=1e-5)


def test_soft_capped_gemma2_keeps_its_cap():
    model = tiny_softcapped_gemma2()
    input_ids, attention_mask, labels = _batch()
    own = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    loss, _ = response_loss(model, input_ids, attention_mask, labels)
    assert float(loss.detach()) == pytest.approx(float(own.detach()), rel=1e-5)


def test_a_head_that_cannot_be_hooked_falls_back_to_the_full_logits(monkeypatch):
    input_ids, attention_mask, labels = _batch()
    model = tiny_causal_lm("llama", seed=0)
    own = float(model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.detach())
    monkeypatch.setattr(type(model), "get_output_embeddings", lambda self: None)
    loss, _ = response_loss(model, input_ids, attention_mask, labels)
    assert float(loss.detach()) == pytest.approx(own, rel=1e-5)


def test_a_model_whose_logits_do_not_line_up_computes_its_own_loss():
    """A wrapper that prepends positions inside its forward (a soft prompt) gets the model's own loss."""
    input_ids, attention_mask, labels = _batch()
    model = tiny_causal_lm("llama", seed=0)

    class Prepending(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
            ids = torch.cat([input_ids[:, :1], input_ids], dim=1)
            mask = torch.cat([attention_mask[:, :1], attention_mask], dim=1)
            lab = None if labels is None else torch.cat([torch.full_like(labels[:, :1], -100), labels], dim=1)
            return self.inner(input_ids=ids, attention_mask=mask, labels=lab, **kwargs)

    wrapped = Prepending(model)
    own = float(wrapped(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.detach())
    loss, _ = response_loss(wrapped, input_ids, attention_mask, labels)
    assert float(loss.detach()) == pytest.approx(own, rel=1e-5)


def test_logits_at_selects_rows_in_order():
    input_ids, attention_mask, labels = _batch()
    model = tiny_causal_lm("qwen2", seed=0).eval()
    predict = torch.zeros_like(labels, dtype=torch.bool)
    predict[0, 3] = predict[2, 7] = predict[2, 10] = True
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask).logits
        rows, _ = logits_at(model, predict, input_ids=input_ids, attention_mask=attention_mask)
    torch.testing.assert_close(rows, full[predict], rtol=1e-5, atol=1e-6)


def test_attack_trainer_loss_is_the_plain_trainers(tmp_path, tokenizer):
    """The attacker's Trainer computes the same loss as transformers.Trainer, with gradient accumulation."""
    from transformers import Trainer, TrainingArguments

    from immune_trainer.attacks.harness import _AttackTrainer

    input_ids, attention_mask, labels = _batch()
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", gradient_accumulation_steps=2
    )
    model = tiny_causal_lm("llama", seed=0)
    n = torch.tensor(30)
    for items in (None, n):
        plain = Trainer(model=model, args=args).compute_loss(model, dict(inputs), num_items_in_batch=items)
        ours = _AttackTrainer(model=model, args=args).compute_loss(
            model, dict(inputs), num_items_in_batch=items
        )
        assert float(ours.detach()) == pytest.approx(float(plain.detach()), rel=1e-5)


def test_per_token_losses_sum_to_the_mean_and_follow_the_mask(monkeypatch):
    from immune_trainer.losses import response_prediction_mask

    input_ids, attention_mask, labels = _batch()
    model = tiny_causal_lm("llama", seed=0)
    n = int(response_prediction_mask(labels).sum())
    with torch.no_grad():
        mean, _ = response_loss(model, input_ids, attention_mask, labels)
        nll, _ = response_loss(model, input_ids, attention_mask, labels, per_token=True)
        assert nll.shape == (n,) and float(nll.mean()) == pytest.approx(float(mean), rel=1e-5)
        monkeypatch.setattr(type(model), "get_output_embeddings", lambda self: None)  # the full-logits path
        full, _ = response_loss(model, input_ids, attention_mask, labels, per_token=True)
    torch.testing.assert_close(full, nll, rtol=1e-4, atol=1e-5)
