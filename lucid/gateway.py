"""Deprecated: the running gateway moved to :mod:`lucid.runtime`, and
:class:`~lucid.model.Generation` to :mod:`lucid.model`. Kept for one release so
plugins that import from here keep working; each use warns."""

from __future__ import annotations

import warnings
from typing import Any

_MOVED = {
    "Runtime": "lucid.runtime",
    "load_plugins_and_config": "lucid.runtime",
    "Generation": "lucid.model",
}


def __getattr__(name: str) -> Any:
    where = _MOVED.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"lucid.gateway.{name} moved to {where}.{name}", DeprecationWarning,
                  stacklevel=2)
    import importlib

    return getattr(importlib.import_module(where), name)
