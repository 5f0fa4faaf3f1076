"""RepNoise's logit-lens CE through the fused chunked linear + CE equals the unfused computation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import defense_config, make_pairs

from immune_trainer.defenses import RepNoiseConfig, RepNoiseTrainer
from immune_trainer.defenses.repnoise import _lens_ce
from immune_trainer.errors import ConfigError
from immune_trainer.modeling import find_decoder_structure
from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer


def _terms_and_grads(tmp_path, arch, chunk):
    model = tiny_causal_lm(arch, num_layers=3, seed=1).double()
    model.eval()
    trainer = RepNoiseTrainer(
        model=model,
        args=defense_config(RepNoiseConfig, tmp_path / str(chunk), lens_chunk_size=chunk),
        harmful_dataset=make_pairs(8),
        processing_class=tiny_tokenizer(),
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    torch.manual_seed(0)
    terms = trainer.compute_defense_loss(model, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(terms["loss"], params, allow_unused=True)
    return terms, grads


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fused_lens_equals_unfused_in_the_trainer(tmp_path, arch):
    """Loss terms and every parameter's gradient (tied unembedding included) agree with the unfused path,
    for the automatic chunk and for a chunk of 5 rows that does not divide the response positions."""
    ref_terms, ref_grads = _terms_and_grads(tmp_path, arch, -1)
    for chunk in (0, 5):
        terms, grads = _terms_and_grads(tmp_path, arch, chunk)
        for name in ("ascent", "noise", "loss"):
            torch.testing.assert_close(terms[name], ref_terms[name], msg=name)
        for a, b in zip(grads, ref_grads):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_fused_lens_reproduces_head_scaling_and_softcapping():
    model = tiny_causal_lm("llama", seed=2).double()
    structure = dataclasses.replace(
        find_decoder_structure(model), final_logit_softcapping=4.0, logit_multiplier=0.5
    )
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, model.config.hidden_size, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, model.config.vocab_size, (7,), generator=g)
    fused = _lens_ce(structure, hidden, targets, 3)
    unfused = _lens_ce(structure, hidden, targets, -1)
    torch.testing.assert_close(fused, unfused)
    torch.testing.assert_close(torch.autograd.grad(fused, hidden)[0], torch.autograd.grad(unfused, hidden)[0])


def test_lens_chunk_size_must_be_valid(tmp_path):
    with pytest.raises(ConfigError, match="lens_chunk_size"):
        defense_config(RepNoiseConfig, tmp_path, lens_chunk_size=-2)
