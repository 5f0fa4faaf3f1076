"""A prompt prefix shared by every row (a chat template's system prompt) is computed once per batch in
modeling.response_loss: the same loss and gradients as computing every row whole, and only where that holds."""

import functools

import pytest
import torch

from immune_trainer.modeling import response_loss, shared_prefix_length, sharing_prompt_prefix
from immune_trainer.testing import TINY_ARCHITECTURES, tiny_causal_lm, tiny_softcapped_gemma2

PREFIX = 6


def _batch(rows=4, length=16, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, vocab, (rows, length), generator=g)
    input_ids[:, :PREFIX] = input_ids[0, :PREFIX]  # the shared "system prompt"
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 12:] = 0  # right padding
    labels = input_ids.clone()
    labels[:, : PREFIX + 2] = -100  # the prompt: the shared part and each row's own question
    labels[2, : PREFIX + 5] = -100
    labels[attention_mask == 0] = -100
    return input_ids, attention_mask, labels


def _counting(model):
    """Record the (rows, length) of every forward call of ``model``."""
    calls = []
    forward = model.forward

    @functools.wraps(forward)  # keeps the signature (response_loss reads its cache argument)
    def counted(*args, **kwargs):
        calls.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)

    model.forward = counted
    return calls


def _loss_and_grads(model, batch, share, **kwargs):
    model.zero_grad()
    with sharing_prompt_prefix(share):
        loss, _ = response_loss(model, *batch, **kwargs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def _assert_same(a, b):
    assert a[0] == pytest.approx(b[0], rel=1e-5)
    assert set(a[1]) == set(b[1])
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=1e-4, atol=1e-6, msg=name)


def _model(kind):
    import transformers

    if kind == "gemma2_softcap":
        return tiny_softcapped_gemma2()
    if kind in ("mistral_sliding", "gemma2_sliding"):
        # A window shorter than the sequence: the shared prefix falls out of it for the last positions.
        cls, cfg = {
            "mistral_sliding": (transformers.MistralForCausalLM, transformers.MistralConfig),
            "gemma2_sliding": (transformers.Gemma2ForCausalLM, transformers.Gemma2Config),
        }[kind]
        torch.manual_seed(0)
        return cls(
            cfg(
                vocab_size=512,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=8,
                sliding_window=5,
                pad_token_id=3,
            )
        )
    return tiny_causal_lm(kind, seed=0)


@pytest.mark.parametrize("kind", [*TINY_ARCHITECTURES, "gemma2_softcap", "mistral_sliding", "gemma2_sliding"])
def test_same_loss_and_gradients_with_the_prefix_computed_once(kind):
    model = _model(kind).eval()  # eval: no dropout; gradients still flow
    batch = _batch()
    calls = _counting(model)
    shared = _loss_and_grads(model, batch, True)
    assert calls == [(1, PREFIX), (4, 16 - PREFIX)]  # the prefix for one row, then every row's rest
    calls.clear()
    whole = _loss_and_grads(model, batch, False)
    assert calls == [(4, 16)]
    _assert_same(shared, whole)


def test_num_items_in_batch_and_no_grad_scoring():
    model = tiny_causal_lm("llama", seed=0).eval()
    batch = _batch()
    n = torch.tensor(23)
    shared = _loss_and_grads(model, batch, True, num_items_in_batch=n)
    whole = _loss_and_grads(model, batch, False, num_items_in_batch=n)
    _assert_same(shared, whole)
    with torch.inference_mode():
        a, _ = response_loss(model, *batch)
        with sharing_prompt_prefix(False):
            b, _ = response_loss(model, *batch)
    assert float(a) == pytest.approx(float(b), rel=1e-5)


def test_lora_model_shares_the_prefix():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_causal_lm("llama", seed=0),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # a LoRA that changes the outputs
    model.train()
    batch = _batch()
    calls = _counting(model)
    shared = _loss_and_grads(model, batch, True)
    assert calls == [(1, PREFIX), (4, 16 - PREFIX)]
    whole = _loss_and_grads(model, batch, False)
    _assert_same(shared, whole)
    assert any("lora_A" in n for n in shared[1])


def test_shared_prefix_length():
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 1, 2], [5, 6, 7, 8, 3]])
    none = torch.zeros_like(ids, dtype=torch.bool)
    assert shared_prefix_length(ids, None, none) == 3  # the first column where a row differs
    mask = torch.ones_like(ids)
    mask[2, 1:] = 0  # a row padded after one token: only its attended tokens are shared
    assert shared_prefix_length(ids, mask, none) == 1
    predict = none.clone()
    predict[0, 1] = True  # position 1 predicts a label: its logits are needed for that row
    assert shared_prefix_length(ids, None, predict) == 1
    assert shared_prefix_length(ids[:1], None, none) == 5


def _hooked(model):
    model.model.layers[0].register_forward_hook(lambda module, args, out: None)
    return model


def _dropout(model):
    model.config.attention_dropout = 0.1
    return model.train()


def _checkpointed(model):
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    return model.train()


@pytest.mark.parametrize(
    "case",
    [
        "two_rows",  # the extra one-row forward would cost about what it saves
        "short_prefix",  # under SHARED_PREFIX_MIN_SAVING of the tokens
        "activation_hook",  # a defense capturing or perturbing whole-sequence activations
        "dropout_in_training",  # one dropout mask would serve every row
        "gradient_checkpointing",  # turns the cache off
        "other_forward_argument",  # e.g. output_hidden_states: the caller wants every position
        "turned_off",
    ],
)
def test_rows_are_computed_whole_where_sharing_could_change_the_result_or_not_pay(case):
    model = tiny_causal_lm("llama", seed=0).eval()
    batch = _batch()
    kwargs = {}
    if case == "two_rows":
        batch = tuple(t[:2] for t in batch)
    elif case == "short_prefix":
        batch = _batch(length=64)
    elif case == "activation_hook":
        model = _hooked(model)
    elif case == "dropout_in_training":
        model = _dropout(model)
    elif case == "gradient_checkpointing":
        model = _checkpointed(model)
    elif case == "other_forward_argument":
        kwargs["output_hidden_states"] = True
    calls = _counting(model)
    with sharing_prompt_prefix(case != "turned_off"):
        loss, outputs = response_loss(model, *batch, **kwargs)
    assert calls == [tuple(batch[0].shape)]
    assert torch.isfinite(loss)
    if case == "other_forward_argument":
        assert outputs.hidden_states[0].shape[:2] == batch[0].shape


def test_a_model_without_a_repeatable_cache_falls_back_once_and_is_not_retried():
    import transformers

    class NoCache(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, cache=None, use_cache=None, **kwargs):
            out = super().forward(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs
            )
            out["cache"] = None
            return out

    reference = tiny_causal_lm("llama", seed=0).eval()
    model = NoCache(reference.config).eval()
    model.load_state_dict(reference.state_dict())
    batch = _batch()
    calls = _counting(model)
    with torch.no_grad():
        first, _ = response_loss(model, *batch)
        assert calls == [(1, PREFIX), (4, 16)]  # tried, no cache came back: every row computed whole
        calls.clear()
        second, _ = response_loss(model, *batch)
        assert calls == [(4, 16)]  # not tried again for this model class
        expected, _ = response_loss(reference, *batch)
    assert float(first) == pytest.approx(float(expected), rel=1e-5)
    assert float(second) == pytest.approx(float(expected), rel=1e-5)


def test_a_model_that_fails_to_continue_from_the_cache_warns_once_and_computes_rows_whole():
    import transformers

    class Fussy(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, cache=None, use_cache=None, **kwargs):
            if cache is not None:
                raise ValueError("this architecture takes no cache here")
            return super().forward(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache, **kwargs
            )

    reference = tiny_causal_lm("llama", seed=0).eval()
    model = Fussy(reference.config).eval()
    model.load_state_dict(reference.state_dict())
    batch = _batch()
    with torch.no_grad():
        with pytest.warns(
            RuntimeWarning, match="Fussy could not continue a forward from a shared prompt prefix"
        ):
            first, _ = response_loss(model, *batch)
        calls = _counting(model)
        second, _ = response_loss(model, *batch)  # no second try, no second warning
        expected, _ = response_loss(reference, *batch)
    assert calls == [(4, 16)]
    assert float(first) == pytest.approx(float(expected), rel=1e-5)
    assert float(second) == pytest.approx(float(expected), rel=1e-5)


def test_a_defense_trains_through_the_shared_prefix_to_the_same_weights(tmp_path):
    """GradientAscentTrainer (no activation hooks) on pairs whose prompts share their opening: the Trainer's
    loss terms take the shared path, and two SGD steps land on the same weights as with every row whole."""
    import datasets
    from conftest import defense_config

    from immune_trainer.defenses import GradientAscentTrainer
    from immune_trainer.testing import tiny_tokenizer

    system = "Answer plainly."
    rows = [
        {
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": f"Explain step {i} of the recipe."},
                {"role": "assistant", "content": f"Sure, step {i}: mix the flour and water, then bake."},
            ]
        }
        for i in range(8)
    ]
    weights = {}
    for share in (True, False):
        model = tiny_causal_lm("llama", seed=0)
        calls = _counting(model)
        args = defense_config(
            GradientAscentTrainer.config_class,
            tmp_path / str(share),
            max_steps=2,
            optim="sgd",
            learning_rate=0.1,
        )
        trainer = GradientAscentTrainer(
            model=model,
            args=args,
            harmful_dataset=datasets.Dataset.from_list(rows),
            processing_class=tiny_tokenizer(),
        )
        with sharing_prompt_prefix(share):
            trainer.train()
        one_row = [c for c in calls if c[0] == 1]
        assert bool(one_row) == share  # the prefix ran once per loss term, for one row
        weights[share] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, value in weights[True].items():
        torch.testing.assert_close(value, weights[False][name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(
        not torch.equal(v, tiny_causal_lm("llama", seed=0).state_dict()[n]) for n, v in weights[True].items()
    )
