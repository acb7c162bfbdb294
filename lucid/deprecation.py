"""Names that moved to another module keep answering from the old one for at least
one release, with a :class:`DeprecationWarning` naming the new place."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any


def moved(module: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``module``: each name in ``names`` (name -> the
    module it lives in now) is imported from there on use, with a warning; any other
    name is an AttributeError, as without it."""

    def __getattr__(name: str) -> Any:
        where = names.get(name)
        if where is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warnings.warn(f"{module}.{name} moved to {where}.{name}", DeprecationWarning,
                      stacklevel=2)
        return getattr(importlib.import_module(where), name)

    return __getattr__
