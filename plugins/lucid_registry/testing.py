"""Helpers for tests of the registry's admin API."""

from __future__ import annotations

from typing import Any


async def next_event(stream: Any) -> dict[str, str] | None:
    """The next SSE event's fields (comments skipped), or None when the stream ends."""
    fields: dict[str, str] = {}
    while True:
        raw = await stream.content.readline()
        if not raw:
            return None
        line = raw.decode().rstrip("\n")
        if not line:
            if fields:
                return fields
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(": ")
        fields[key] = value
