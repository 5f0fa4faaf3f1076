"""Process settings that make CPU training cheaper; applied by the ``immune-trainer`` commands.

glibc's allocator serves every block above a threshold (128 KB to 32 MB) with a fresh ``mmap`` and hands
it back to the kernel on free, so each activation, gradient and optimizer temporary of a training step is
page-faulted in again, every step (a default demo run took tens of millions of minor page faults). Keeping
freed memory in the process instead is what PyTorch's CPU performance guide gets from jemalloc or tcmalloc;
on glibc a few ``mallopt`` calls do it (no ``mmap`` for large blocks, no trimming, the heap grown
256 MB at a time). Memory that was in use stays reserved until the process ends, so a
command's resident size is its peak. Set ``IMMUNE_TRAINER_KEEP_FREED_MEMORY=0`` to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_applied = False


def keep_freed_memory() -> bool:
    """Ask glibc to serve large blocks from the heap and keep freed memory for reuse.

    Returns:
        True when the settings were applied (Linux with glibc, not disabled by the environment variable).
    """
    global _applied
    if _applied:
        return True
    if os.environ.get("IMMUNE_TRAINER_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 256 * 2**20))
    if not all(mallopt(option, value) == 1 for option, value in settings):
        logger.debug("mallopt refused the settings; allocator left as it is")
        return False
    _applied = True
    return True
