"""The benchmark's FLOPs floor (benchmarks/defense_step.py) against a count written from the config."""

from __future__ import annotations

import pytest
import torch
from conftest import load_script
from transformers import AutoConfig, AutoModelForCausalLM

from immune_trainer.defenses import get_defense


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/defense_step.py")


def _meta_model(**shape):
    config = AutoConfig.for_model("llama", **shape)
    with torch.device("meta"):  # shapes only: nothing allocated
        return AutoModelForCausalLM.from_config(config), config


def _args(name, tmp_path, **kw):
    return get_defense(name).config_class(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kw)


def test_repnoise_floor_matches_a_count_from_the_config(bench, tmp_path):
    model, c = _meta_model(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        tie_word_embeddings=True,
    )
    b, s, prompt = 2, 16, 8
    d, head_dim = c.hidden_size, c.hidden_size // c.num_attention_heads
    per_layer = 2 * d * d + 2 * d * c.num_key_value_heads * head_dim + 3 * d * c.intermediate_size
    tokens = b * s
    forward = 2 * tokens * (c.num_hidden_layers * per_layer + c.vocab_size * d) + 2 * tokens * 3 * s * d
    lens = 6 * b * (s - prompt) * d * c.vocab_size  # one logit lens, forward + backward
    # The lens of all N + 1 hidden states (the reference's average; the output logits are in the 2 passes).
    expected = 2 + (c.num_hidden_layers + 1) * lens / (3 * forward)
    got = bench.flops_floor("repnoise", model, _args("repnoise", tmp_path), b, s, prompt)
    assert got == pytest.approx(expected, rel=1e-12)
    # Every other layer (plus the last) halves the lens work, roughly; the pass counts are fixed.
    strided = bench.flops_floor("repnoise", model, _args("repnoise", tmp_path, layer_stride=2), b, s, prompt)
    assert strided == pytest.approx(2 + 3 * lens / (3 * forward), rel=1e-12)
    once = _args("repnoise", tmp_path, lens_output_once=True, lens_skip_embedding=True)
    assert bench.flops_floor("repnoise", model, once, b, s, prompt) == pytest.approx(
        2 + (c.num_hidden_layers - 1) * lens / (3 * forward), rel=1e-12
    )
    assert bench.flops_floor("booster", model, _args("booster", tmp_path), b, s, prompt) == 3.0
    # TAR, K = 8, tr_every = 4: (8 + 2) / 2 + 1 + 1/3 with max_entropy; the default dpo adds a second side to
    # each of the 2 tamper-resistance passes and the starting model's forward of both sides.
    tar = {
        loss: bench.flops_floor("tar", model, _args("tar", tmp_path, tamper_loss=loss), b, s, prompt)
        for loss in ("max_entropy", "dpo")
    }
    assert tar["max_entropy"] == pytest.approx((8 + 2) / 2 + 1 + 1 / 3, rel=1e-12)
    assert tar["dpo"] == pytest.approx((8 + 4) / 2 + 1 + 2 / 3, rel=1e-12)
    assert (
        bench.flops_floor("repnoise:lens_chunk_size=-1", model, _args("repnoise", tmp_path), b, s, prompt)
        == got
    )


def test_variant_names_parse(bench):
    assert bench._parse_variant("repnoise:lens_chunk_size=-1:layer_stride=2") == (
        "repnoise",
        {"lens_chunk_size": -1, "layer_stride": 2},
    )
    assert bench._parse_variant("booster") == ("booster", {})
    with pytest.raises(SystemExit, match="key=value"):
        bench._parse_variant("repnoise:oops")
