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

from .files import atomic_write

logger = logging.getLogger(__name__)
T = TypeVar("T")

CACHE_VERSION = 2
"""Part of every cache key (measurements, attack runs, models): bumped whenever a change to the library
changes what a measurement computes, even in the last digits (2: fused AdamW for the attacker, response-only
output projection in the loss scorers, length-sorted batches), so that no stale result is reused."""


def content_hash(dataset) -> str:
    """A hash of a dataset's rows (stable across processes, unlike ``datasets``' in-memory fingerprints)."""
    h = hashlib.sha256()
    rows = dataset if isinstance(dataset, (list, tuple)) else (dataset[i] for i in range(len(dataset)))
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _normalized(key: dict[str, Any]) -> Any:
    return json.loads(json.dumps({**key, "cache_version": CACHE_VERSION}, sort_keys=True, default=str))


def _digest(key: dict[str, Any]) -> str:
    """The file or folder name of a cache entry: a hash of its normalized key."""
    return hashlib.sha256(json.dumps(_normalized(key), sort_keys=True).encode()).hexdigest()[:20]


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
        return self.root / kind / f"{_digest(key)}.json"


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


class ModelCache:
    """Trained models kept by a hash of everything their training depended on, the most recent ``keep``.

    An entry is a directory (``save_pretrained`` output plus ``entry.json`` with the key and whatever
    the caller records, e.g. the training log). It is written under a temporary name and renamed, so a
    killed run never leaves a half-written model behind; an entry whose recorded key does not match is
    ignored. ``None`` as root caches nothing.
    """

    def __init__(self, root: str | Path | None, kind: str = "models", keep: int = 2):
        self.root = Path(root).expanduser() / kind if root else None
        self.keep = keep

    def path(self, key: dict[str, Any]) -> Path | None:
        if self.root is None:
            return None
        return self.root / _digest(key)

    def get(self, key: dict[str, Any]) -> tuple[Path, dict] | None:
        """``(directory, recorded extras)`` of the entry for ``key``, or None."""
        path = self.path(key)
        if path is None or not (path / "entry.json").exists():
            return None
        try:
            entry = json.loads((path / "entry.json").read_text())
        except (OSError, json.JSONDecodeError):
            logger.warning("ignoring unreadable cached model %s", path)
            return None
        if entry.get("key") != _normalized(key):
            return None
        path.touch()  # most recently used
        return path, entry.get("extra", {})

    def put(
        self, key: dict[str, Any], save: Callable[[Path], None], extra: dict | None = None
    ) -> Path | None:
        """Store what ``save(directory)`` writes under ``key``; keep the ``keep`` most recent entries."""
        import shutil
        import tempfile

        path = self.path(key)
        if path is None:
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".partial-"))
        try:
            save(tmp)
            (tmp / "entry.json").write_text(
                json.dumps({"key": _normalized(key), "extra": extra or {}}, indent=1, default=str)
            )
            if path.exists():
                shutil.rmtree(path)
            tmp.rename(path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        entries = sorted(
            (p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        for old in entries[self.keep :]:
            shutil.rmtree(old, ignore_errors=True)
        return path


# The record beside a model that a run wrote into its own output folder (see record_training).
TRAINING_RECORD = "training_key.json"


def record_training(folder: str | Path, key: dict[str, Any], extra: dict | None = None) -> None:
    """Write beside the model saved in ``folder`` the key of everything its training depended on (as
    :class:`ModelCache` keys it), so a later run writing to the same folder can reuse it
    (:func:`recorded_training`) after the cache has evicted its copy."""
    record = {"key": _normalized(key), "extra": extra or {}}
    (Path(folder) / TRAINING_RECORD).write_text(json.dumps(record, indent=1, default=str))


def recorded_training(folder: str | Path, key: dict[str, Any]) -> dict | None:
    """The extras recorded with the model in ``folder`` when it was trained with ``key``; None when the folder
    holds no record, an unreadable one, or one of another training."""
    path = Path(folder) / TRAINING_RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or record.get("key") != _normalized(key):
        return None
    return record.get("extra", {})
