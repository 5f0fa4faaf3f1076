"""Shared fixtures: tiny models, the tiny tokenizer and synthetic, innocuous datasets.

The "harmful" fixtures are placeholders (ordinary sentences standing in for harmful responses): the
repository never contains harmful text.
"""

from __future__ import annotations

import datasets
import pytest
import torch

from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine a second OpenMP thread
# turns every small op into a wait for a time slice (measured: a 135M forward 1.0 s on 1 thread, 9 s on 2).
torch.set_num_threads(1)
datasets.disable_progress_bars()


def make_pairs(n: int = 24, offset: int = 0) -> datasets.Dataset:
    """Synthetic prompt/completion rows standing in for harmful QA pairs."""
    rows = [
        {
            "prompt": f"Explain step {i + offset} of the recipe.",
            "completion": f"Sure, here is step {i + offset}: mix the flour, water and salt, then bake.",
        }
        for i in range(n)
    ]
    return datasets.Dataset.from_list(rows)


def make_benign(n: int = 24) -> datasets.Dataset:
    rows = [
        {"prompt": f"What is {i} + {i % 5}?", "completion": f"The answer is {i + i % 5}."} for i in range(n)
    ]
    return datasets.Dataset.from_list(rows)


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def model():
    return tiny_causal_lm("llama", seed=0)


@pytest.fixture
def harmful():
    return make_pairs(24)


@pytest.fixture
def harmful_eval():
    return make_pairs(8, offset=100)


@pytest.fixture
def benign():
    return make_benign(24)
