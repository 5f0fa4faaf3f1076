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


def _read_keyed(path: Path | None, key: dict[str, Any], what: str) -> dict | None:
    """The JSON object at ``path`` when it was stored under ``key`` (its ``"key"`` field); None when absent,
    stored under another key, or unreadable (logged, naming ``what`` it was)."""
    if path is None or not path.exists():
        return None
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        logger.warning("ignoring unreadable %s %s", what, path)
        return None
    if not isinstance(payload, dict) or payload.get("key") != _normalized(key):
        return None
    return payload


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
        payload = _read_keyed(self.path(kind, key), key, "cached result")
        return None if payload is None else payload.get("value")

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


# The record beside a model that a run wrote into its own output folder (see record_training), and the one
# beside each ModelCache entry.
TRAINING_RECORD = "training_key.json"
_ENTRY = "entry.json"


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
        extra = None if path is None else recorded_training(path, key, name=_ENTRY)
        if extra is None:
            return None
        path.touch()  # most recently used
        return path, extra

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
            record_training(tmp, key, extra, name=_ENTRY)
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


def record_training(
    folder: str | Path, key: dict[str, Any], extra: dict | None = None, name: str = TRAINING_RECORD
) -> None:
    """Write beside the model saved in ``folder`` the key of everything its training depended on (as
    :class:`ModelCache` keys it) and ``extra`` (e.g. the training log), so a later run writing to the same
    folder can reuse it (:func:`recorded_training`) after the cache has evicted its copy."""
    record = {"key": _normalized(key), "extra": extra or {}}
    (Path(folder) / name).write_text(json.dumps(record, indent=1, default=str))


def recorded_training(folder: str | Path, key: dict[str, Any], name: str = TRAINING_RECORD) -> dict | None:
    """The extras recorded with the model in ``folder`` when it was trained with ``key``; None when the folder
    holds no record, an unreadable one (logged), or one of another training."""
    record = _read_keyed(Path(folder) / name, key, "record of a trained model")
    return None if record is None else record.get("extra", {})
