"""Packages whose public names are imported on first use (PEP 562): ``import immune_trainer`` or
``import immune_trainer.data`` stays cheap (no torch, no datasets) until a name is asked for."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``, for ``exports``: public name -> the module that
    defines it (relative to the package, or an absolute ``immune_trainer....`` path). A name is imported
    once, then kept in the package's namespace."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        target = module if module.startswith("immune_trainer") else f".{module}"
        value = getattr(importlib.import_module(target, package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
