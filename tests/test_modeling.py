"""Finding decoder blocks generically, hooking them safely, and unembedding hidden states."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
import transformers
from torch import nn

from immune_trainer.errors import ConfigError, ModelStructureError
from immune_trainer.modeling import (
    DecoderStructure,
    HookManager,
    add_to_outputs,
    capture_outputs,
    find_decoder_structure,
    hidden_states_via_unembedding,
    unembed,
    unwrap_model,
)
from immune_trainer.testing import TINY_ARCHITECTURES, tiny_causal_lm

HIDDEN = 32
NUM_LAYERS = 3


def _lora(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's Conv1D fan_in_fan_out notice on GPT-2
        return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))


def _make(arch, lora):
    model = tiny_causal_lm(arch, hidden_size=HIDDEN, num_layers=NUM_LAYERS).eval()
    if lora:
        model = _lora(model)
        # Non-zero LoRA B so that the adapters change the outputs the hooks see.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5)
    return model


def _ids(batch=2, seq=7):
    return torch.randint(4, 500, (batch, seq), generator=torch.Generator().manual_seed(0))


def _count_hooks(model):
    """Forward hooks on the model, not counting transformers 5's own output-recording hooks."""
    return sum(
        1
        for m in model.modules()
        for hook in m._forward_hooks.values()
        if "output_capturing_hook" not in getattr(hook, "__qualname__", "")
    )


@pytest.fixture(scope="module", params=[(a, lora) for a in TINY_ARCHITECTURES for lora in (False, True)])
def model(request):
    arch, lora = request.param
    return _make(arch, lora)


def test_structure_found_on_every_architecture(model):
    structure = find_decoder_structure(model)
    assert isinstance(structure, DecoderStructure)
    assert structure.num_layers == NUM_LAYERS
    assert len(structure.attention) == len(structure.mlp) == NUM_LAYERS
    assert structure.unembedding is unwrap_model(model).get_output_embeddings()
    assert structure.final_norm is not None
    layer_list = unwrap_model(model).get_submodule(structure.layers_path)
    assert list(layer_list) == structure.layers
    for layer, attention, mlp in zip(structure.layers, structure.attention, structure.mlp):
        owned = {id(m) for m in layer.modules()}
        assert id(attention) in owned and id(mlp) in owned and attention is not mlp
        # The attention block holds the query projection, the MLP does not.
        assert any(n.endswith(("q_proj", "c_attn")) for n, _ in attention.named_modules())
        assert not any(n.endswith(("q_proj", "c_attn")) for n, _ in mlp.named_modules())


def test_lora_modules_stay_inside_the_found_blocks():
    model = _make("llama", lora=True)
    structure = find_decoder_structure(model)
    assert any(isinstance(m, peft.tuners.lora.LoraLayer) for m in structure.attention[0].modules())
    assert any(isinstance(m, peft.tuners.lora.LoraLayer) for m in structure.mlp[0].modules())


def test_unwrap_model_peels_wrappers():
    base = tiny_causal_lm("qwen2", num_layers=2)

    class Wrapper(nn.Module):  # what DDP / accelerate look like: the model under `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert unwrap_model(Wrapper(base)) is base
    peft_model = _lora(base)
    assert unwrap_model(Wrapper(peft_model)) is peft_model.get_base_model()
    assert find_decoder_structure(Wrapper(peft_model)).num_layers == 2


def test_capture_mlp_outputs_shape_and_values(model):
    structure = find_decoder_structure(model)
    hooks, acts = capture_outputs(structure.mlp)
    ids = _ids()
    with torch.no_grad(), hooks:
        model(input_ids=ids)
    assert sorted(acts) == list(range(NUM_LAYERS))
    for tensor in acts.values():
        assert tensor.shape == (*ids.shape, HIDDEN)
    # Captured decoder-layer outputs are the model's own hidden states.
    layer_hooks, layer_out = capture_outputs(structure.layers)
    attn_hooks, attn = capture_outputs(structure.attention)
    with torch.no_grad(), layer_hooks, attn_hooks:
        out = model(input_ids=ids, output_hidden_states=True)
    for i in range(NUM_LAYERS - 1):  # the last hidden state is returned after the final norm
        torch.testing.assert_close(layer_out[i], out.hidden_states[i + 1])
    assert attn[0].shape == (*ids.shape, HIDDEN)  # tuple outputs (out, weights) are unpacked
    assert _count_hooks(model) == 0


def test_captured_tensors_keep_the_graph():
    model = _make("llama", lora=False)
    structure = find_decoder_structure(model)
    hooks, acts = capture_outputs(structure.attention)
    with hooks:
        out = model(input_ids=_ids())
    grads = torch.autograd.grad(out.logits.sum(), [acts[i] for i in range(NUM_LAYERS)])
    assert all(g.shape == acts[0].shape and g.abs().sum() > 0 for g in grads)
    hooks, acts = capture_outputs(structure.attention, detach=True)
    with hooks:
        model(input_ids=_ids())
    assert not acts[0].requires_grad


@pytest.mark.parametrize("target", ["attention", "mlp"])
def test_add_to_outputs_changes_logits_and_removal_restores_them(model, target):
    structure = find_decoder_structure(model)
    modules = getattr(structure, target)
    ids = _ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        delta = torch.randn(*ids.shape, HIDDEN, generator=torch.Generator().manual_seed(1))
        with add_to_outputs(modules, {0: delta, NUM_LAYERS - 1: 0.5 * delta}):
            perturbed = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert not torch.allclose(perturbed, before, atol=1e-3)
    assert torch.equal(after, before)
    assert _count_hooks(model) == 0


@pytest.mark.parametrize("arch", ["gpt2", "gemma"])
def test_add_to_outputs_adds_exactly_the_delta(arch):
    model = _make(arch, lora=False)
    structure = find_decoder_structure(model)
    ids = _ids()
    last = NUM_LAYERS - 1
    delta = torch.linspace(-1, 1, HIDDEN)  # broadcasts over batch and sequence
    plain_hooks, plain = capture_outputs(structure.layers)
    with torch.no_grad(), plain_hooks:
        model(input_ids=ids, output_hidden_states=True)  # transformers installs its recording hooks
    # A capture declared after the additive hook sees the perturbed output.
    manager = add_to_outputs(structure.layers, {last: delta})
    perturbed = manager.capture(structure.layers)
    with torch.no_grad(), manager:
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(perturbed[0], plain[0])  # earlier blocks untouched
    torch.testing.assert_close(perturbed[last], plain[last] + delta)
    with torch.no_grad():
        torch.testing.assert_close(logits, unembed(structure, plain[last] + delta), atol=1e-5, rtol=1e-5)
        # transformers' own hidden-state recording (hooks of its own) also sees the perturbation.
        with add_to_outputs(structure.layers, {0: delta}):
            out = model(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[1], plain[0] + delta)


def test_hooks_removed_after_exception():
    model = _make("mistral", lora=False)
    structure = find_decoder_structure(model)
    hooks, acts = capture_outputs(structure.layers)
    hooks.add(structure.mlp, {0: torch.zeros(HIDDEN)})
    with pytest.raises(RuntimeError, match="boom"), hooks:
        assert _count_hooks(model) == NUM_LAYERS + 1
        raise RuntimeError("boom")
    assert _count_hooks(model) == 0 and not hooks.active


def test_hook_manager_reusable_without_leaking():
    model = _make("llama", lora=False)
    structure = find_decoder_structure(model)
    hooks, acts = capture_outputs(structure.mlp)
    for step in range(3):
        with torch.no_grad(), hooks:
            with hooks:  # nested entry installs nothing more
                assert _count_hooks(model) == NUM_LAYERS
            assert hooks.active
            model(input_ids=_ids(seq=4 + step))
        assert _count_hooks(model) == 0
        assert acts[0].shape[1] == 4 + step  # refreshed each step


def test_bad_perturbations_raise_config_error():
    model = _make("llama", lora=False)
    structure = find_decoder_structure(model)
    with pytest.raises(ConfigError, match="outside"):
        add_to_outputs(structure.mlp, {NUM_LAYERS: torch.zeros(HIDDEN)})
    with pytest.raises(ConfigError, match="does not broadcast"):
        with add_to_outputs(structure.mlp, {0: torch.zeros(HIDDEN + 1)}), torch.no_grad():
            model(input_ids=_ids())
    assert _count_hooks(model) == 0
    with pytest.raises(ConfigError):
        HookManager().add_hook("not a module", lambda *a: None)


def test_unembed_of_last_layer_equals_model_logits(model):
    structure = find_decoder_structure(model)
    hooks, acts = capture_outputs(structure.layers)
    with torch.no_grad(), hooks:
        out = model(input_ids=_ids(), output_hidden_states=True)
        logits = unembed(structure, acts[NUM_LAYERS - 1])
        per_layer = hidden_states_via_unembedding(model, out)
        layer0 = unembed(structure, acts[0])
    torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=1e-5)
    assert len(per_layer) == NUM_LAYERS + 1
    torch.testing.assert_close(per_layer[1], layer0, atol=1e-5, rtol=1e-5)
    assert per_layer[-1] is out.logits


def test_unembed_applies_softcapping_from_config():
    config = transformers.Gemma2Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        final_logit_softcapping=0.5,  # small cap: the raw logits exceed it
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    structure = find_decoder_structure(model)
    assert structure.final_logit_softcapping == 0.5
    hooks, acts = capture_outputs(structure.layers)
    with torch.no_grad(), hooks:
        out = model(input_ids=torch.randint(1, 64, (1, 5)))
        logits = unembed(structure, acts[1])
    torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=1e-5)
    assert out.logits.abs().max() <= 0.5


def test_explicit_paths():
    model = tiny_causal_lm("llama", num_layers=2)
    structure = find_decoder_structure(
        model, layers_path="model.layers", attention_name="self_attn", mlp_name="mlp", final_norm_path=""
    )
    assert structure.layers_path == "model.layers" and structure.final_norm is None
    assert structure.mlp[1] is model.model.layers[1].mlp
    with pytest.raises(ModelStructureError, match="layers_path"):
        find_decoder_structure(model, layers_path="model.blocks")
    with pytest.raises(ModelStructureError, match="'attn_block'"):
        find_decoder_structure(model, layers_path="model.layers", attention_name="attn_block")


def test_models_without_decoder_layers_raise():
    with pytest.raises(ModelStructureError, match="Sequential.*layers_path="):
        find_decoder_structure(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)))
    bert = transformers.BertForMaskedLM(
        transformers.BertConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
        )
    )
    with pytest.raises(ModelStructureError, match="BertForMaskedLM"):
        find_decoder_structure(bert)
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    )
    with pytest.raises(ModelStructureError, match="encoder-decoder"):
        find_decoder_structure(t5)
    assert issubclass(ModelStructureError, ValueError)


def test_hooks_work_under_gradient_checkpointing():
    """Checkpointed blocks run again in backward: the perturbation must be re-applied identically."""
    results = []
    for checkpointing in (False, True):
        model = tiny_causal_lm("llama", hidden_size=HIDDEN, num_layers=NUM_LAYERS).train()
        if checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
                model.activation_checkpointing_enable(
                    activation_checkpointing_kwargs={"use_reentrant": False}
                )
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        structure = find_decoder_structure(model)
        ids = _ids()
        baseline = _count_hooks(model)  # activation checkpointing may install hooks of its own
        hooks, acts = capture_outputs(structure.attention)
        hooks.add(
            structure.attention,
            {1: torch.randn(*ids.shape, HIDDEN, generator=torch.Generator().manual_seed(1))},
        )
        with hooks:
            loss = model(input_ids=ids, labels=ids).loss
            (grad_h0,) = torch.autograd.grad(loss, [acts[0]], retain_graph=True)
            loss.backward()
        results.append((loss.detach(), grad_h0, model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
        assert _count_hooks(model) == baseline
    for plain, checkpointed in zip(*results):
        torch.testing.assert_close(plain, checkpointed)
