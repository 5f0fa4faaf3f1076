"""Shared fixtures: tiny models, the tiny tokenizer and synthetic, innocuous datasets.

The "harmful" fixtures are placeholders (ordinary sentences standing in for harmful responses): the
repository never contains harmful text.
"""

from __future__ import annotations

import gc
import os
import socket
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer

if TYPE_CHECKING:
    import datasets

# torch, datasets and sqlalchemy are imported in pytest_configure, not here: pytest-xdist's controller
# (scripts/test.sh) loads this file too, only to hand the tests to its workers, and importing torch there
# would delay every worker's start by ~2.5 s (~8 s on a slow machine).


def _is_xdist_controller(config) -> bool:
    return bool(getattr(config.option, "tx", None)) and not hasattr(config, "workerinput")


def pytest_configure(config):
    os.environ.setdefault("IMMUNE_TRAINER_NO_PROGRESS", "1")  # tests that want bars unset it themselves
    if _is_xdist_controller(config):
        return
    import datasets
    import torch
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    # Tiny models gain nothing from intra-op threads, and on a busy 2-core machine a second OpenMP thread
    # turns every small op into a wait for a time slice (measured: a 135M forward 1.0 s on 1 thread, 9 s
    # on 2).
    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    if not event.contains(Engine, "connect", _sqlite_without_fsync):
        event.listen(Engine, "connect", _sqlite_without_fsync)


def _sqlite_without_fsync(dbapi_connection, _record):
    """Optuna's SQLite storages (attack searches, sweeps) commit a few times per trial, and each commit waits
    for two fsyncs: 5-10 ms on this disk, ~10 s of the fast suite. Without fsync a commit is still atomic
    and visible to every other connection and process, and survives a killed process (what the resume
    tests do); only a power cut could lose it."""
    if isinstance(dbapi_connection, sqlite3.Connection):
        dbapi_connection.execute("PRAGMA synchronous=OFF")


def free_port() -> int:
    """A TCP port free on localhost now, for a torchrun rendezvous: a fixed port (29500) collides when two
    DDP tests run at once (pytest-xdist workers, two checkouts on one machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_script(relative: str):
    """A repository script that is not part of the package (``benchmarks/NAME.py``), imported as a module."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_pairs(n: int = 24, offset: int = 0) -> datasets.Dataset:
    """Synthetic prompt/completion rows standing in for harmful QA pairs."""
    rows = [
        {
            "prompt": f"Explain step {i + offset} of the recipe.",
            "completion": f"Sure, here is step {i + offset}: mix the flour, water and salt, then bake.",
        }
        for i in range(n)
    ]
    import datasets

    return datasets.Dataset.from_list(rows)


def make_benign(n: int = 24) -> datasets.Dataset:
    rows = [
        {"prompt": f"What is {i} + {i % 5}?", "completion": f"The answer is {i + i % 5}."} for i in range(n)
    ]
    import datasets

    return datasets.Dataset.from_list(rows)


def defense_config(config_class, tmp_path, **overrides):
    """A defense config for tiny-model tests: 4 steps of batch 4 at lr 2e-3, nothing saved or reported."""
    values = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=2e-3,
        logging_steps=2,
        save_strategy="no",
        report_to="none",
        max_length=64,
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    values.update(overrides)
    return config_class(**values)


def train_on_identical_batches(
    trainer_class,
    out_dir,
    *,
    gradient_accumulation_steps,
    arch="qwen2",
    max_steps=2,
    peft_config=None,
    retain=False,
    dtype=None,
    **config,
):
    """Train a defense with SGD on a dataset of one repeated row: every micro-batch is the same batch, so
    correct gradient accumulation gives the same weights for any number of accumulation steps. ``retain``
    adds a repeated benign row as the retain set; ``dtype`` casts the model (e.g. float64); ``config`` sets
    more fields of the defense's config.

    Returns ``(model, parameters before training)``."""
    import datasets

    row = {"prompt": "Explain the step.", "completion": "Mix and bake.", "refusal": "I can't help with that."}
    args = trainer_class.config_class(
        output_dir=str(out_dir),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=gradient_accumulation_steps,
        optim="sgd",
        learning_rate=0.1,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        refusal_column="refusal",
        max_length=64,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        **config,
    )
    model = tiny_causal_lm(arch, seed=1)
    benign = [{"prompt": "What is 2 + 2?", "completion": "4."}] * 16
    trainer = trainer_class(
        model=model.to(dtype) if dtype is not None else model,
        args=args,
        harmful_dataset=datasets.Dataset.from_list([row] * 16),
        retain_dataset=datasets.Dataset.from_list(benign) if retain else None,
        processing_class=tiny_tokenizer(),
        peft_config=peft_config,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    return trainer.model, before


def flat_parameters(model):
    import torch

    return torch.cat([p.detach().flatten() for p in model.parameters()])


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


def _usable_cpus() -> int:
    """CPUs this process may run on: its affinity, lowered to a container's CPU quota (cgroup v2)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            n = min(n, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return n


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (scripts/test.sh): one worker per usable CPU, at most 4, none (in-process) with one CPU.

    Each worker imports torch and the rest once (~6 s of CPU, ~0.7 GB): more than 4 buy little, and more
    workers than CPUs cost time (2 CPUs: 32 s with 2 workers, 44 s with 4). psutil's count, xdist's
    default, ignores container CPU quotas. PYTEST_XDIST_AUTO_NUM_WORKERS still chooses the number."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    n = min(_usable_cpus(), 4)
    return n if n > 1 else 0


def _freeze_the_heap():
    gc.collect()
    gc.freeze()


def pytest_collection_finish(session):
    # Every Trainer.train() runs a full gc.collect() (accelerate's free_memory), which walks every object
    # alive: with torch, transformers, trl and peft imported that is ~0.3 s, ~250 times in the fast suite
    # (70 of its 135 s). gc.freeze() moves what exists now (modules, classes, test data) out of the
    # collector's sight; objects the tests create are collected as before.
    _freeze_the_heap()


@pytest.fixture(autouse=True, scope="module")
def _freeze_between_modules():
    """Freeze again before each test module: the modules the previous ones imported lazily (tensorboard,
    matplotlib, optuna's storage, ...) would otherwise be walked again by every later gc.collect()."""
    _freeze_the_heap()
