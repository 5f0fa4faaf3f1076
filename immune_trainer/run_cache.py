"""Measurements that depend only on a model, the data and the settings, computed once and reused.

An evaluation measures the base model exactly as it measured it last time when nothing it depends on
changed: the base model's attack curves, its capability on the reference sets, its benign fine-tuning
curve and its side-effect probe. :class:`RunCache` keeps each such result as one JSON file named by a
hash of everything it depends on (the model's weight fingerprint, the data's content hash, the scorer
and its settings), so a second run with another defense, or the same demo again, reuses them. A file
whose recorded key does not match is ignored, never trusted; writes are atomic.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .report import atomic_write

logger = logging.getLogger(__name__)
T = TypeVar("T")


def content_hash(dataset) -> str:
    """A hash of a dataset's rows (stable across processes, unlike ``datasets``' in-memory fingerprints)."""
    h = hashlib.sha256()
    rows = dataset if isinstance(dataset, (list, tuple)) else (dataset[i] for i in range(len(dataset)))
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _normalized(key: dict[str, Any]) -> Any:
    return json.loads(json.dumps(key, sort_keys=True, default=str))


class RunCache:
    """One JSON file per (kind, key) under ``root``; ``None`` as root caches nothing.

    Example::

        cache = RunCache("~/.cache/immune_trainer/runs")
        value = cache.get_or_compute("capability", {"model": fp, "data": h, "scorer": "perplexity"},
                                     lambda: scorer.score(model, tok, ref).value)
    """

    def __init__(self, root: str | Path | None):
        self.root = Path(root).expanduser() if root else None
        self.hits = 0
        self.misses = 0

    def path(self, kind: str, key: dict[str, Any]) -> Path | None:
        if self.root is None:
            return None
        digest = hashlib.sha256(json.dumps(_normalized(key), sort_keys=True).encode()).hexdigest()[:20]
        return self.root / kind / f"{digest}.json"

    def get(self, kind: str, key: dict[str, Any]) -> Any | None:
        """The stored value for ``key``, or None when absent, unreadable or stored under another key."""
        path = self.path(kind, key)
        if path is None or not path.exists():
            return None
        try:
            payload = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            logger.warning("ignoring unreadable cached result %s", path)
            return None
        if payload.get("key") != _normalized(key):
            return None
        return payload.get("value")

    def put(self, kind: str, key: dict[str, Any], value: Any) -> None:
        path = self.path(kind, key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps({"kind": kind, "key": _normalized(key), "value": value}, indent=1))

    def get_or_compute(
        self,
        kind: str,
        key: dict[str, Any],
        compute: Callable[[], T],
        encode: Callable[[T], Any] = lambda v: v,
        decode: Callable[[Any], T] = lambda v: v,
    ) -> T:
        """Return the cached value for ``key`` or compute, store and return it."""
        stored = self.get(kind, key)
        if stored is not None:
            self.hits += 1
            return decode(stored)
        self.misses += 1
        value = compute()
        self.put(kind, key, encode(value))
        return value
