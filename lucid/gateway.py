"""Deprecated: the running gateway moved to :mod:`lucid.runtime`, and
:class:`~lucid.model.Generation` to :mod:`lucid.model`. Kept for one release so
plugins that import from here keep working; each use warns."""

from __future__ import annotations

from lucid.deprecation import moved

__getattr__ = moved(__name__, {
    "Runtime": "lucid.runtime",
    "load_plugins_and_config": "lucid.runtime",
    "Generation": "lucid.model",
})
