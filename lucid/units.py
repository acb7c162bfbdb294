"""Human-friendly durations and sizes for config files: ``"30s"``, ``"250ms"``, ``"10MiB"``.

Operators write these by hand, so a bare number is accepted too (seconds, bytes).
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB|TB|TiB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, None: 1,
}


def parse_duration(value: object) -> float:
    """Seconds as a float, from a number or a string such as ``"1.5s"``, ``"200ms"``, ``"5m"``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30, '30s', '250ms' or '5m'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError("expected a duration such as 30, '30s', '250ms' or '5m'")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(value: object) -> int:
    """Bytes as an int, from a number or a string such as ``"10MiB"`` or ``"512KB"``."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 1048576, '512KiB' or '10MiB'")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        unit = m.group(2).lower() if m.group(2) else None
        size = int(float(m.group(1)) * _SIZE_UNITS[unit])
    else:
        raise ValueError("expected a size such as 1048576, '512KiB' or '10MiB'")
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds; accepts ``30``, ``"30s"``, ``"250ms"``, ``"5m"``, ``"1h"``."""

ByteSize = Annotated[int, BeforeValidator(parse_size)]
"""Bytes; accepts ``1048576``, ``"512KiB"``, ``"10MiB"``, ``"1GB"``."""
