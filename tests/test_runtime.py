"""The allocator setting the commands apply: freed memory is reused, not page-faulted in again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from immune_trainer.runtime import keep_freed_memory
applied = keep_freed_memory()
for _ in range(12):  # warm-up: the heap grows to the working set
    x = torch.ones(16 * 2**20)  # 64 MB, far above glibc's mmap threshold
    del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    x = torch.ones(16 * 2**20)
    del x
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(env_value: str) -> tuple[str, int]:
    env = {**os.environ, "IMMUNE_TRAINER_KEEP_FREED_MEMORY": env_value}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    applied, kept = _faults("1")
    off, default = _faults("0")
    assert applied == "True" and off == "False"
    # 10 x 64 MB: about 160k page faults with the default allocator, none once freed memory is kept
    assert default > 50_000
    assert kept < default / 20
