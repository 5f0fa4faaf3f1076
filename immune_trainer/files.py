"""Files written so that a reader never sees half of one: :func:`atomic_write` (reports, cards, tables,
caches)."""

from __future__ import annotations

import os
import tempfile

from .errors import OutputError

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike, data: str | bytes, what: str | None = None) -> str:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically and return the path.

    The data goes to a temporary file in the same folder, is flushed to disk, then renamed over ``path``
    with ``os.replace``: readers see the old file or the new one, never a half-written one, and a failed
    write leaves the previous file intact and no temporary file behind.

    Raises:
        OutputError: the folder does not exist or cannot be written (``what`` names the file in the message).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise OutputError(
            f"cannot write {what or name} to {path}: {e.strerror or e}. Choose a writable location."
        ) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path
