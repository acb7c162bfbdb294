"""Test helpers for the monitoring plugin: the dashboard in a real headless browser
(Debian's ``chromium``, installed on first use), and a loopback webhook receiver."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp import web

from lucid.testing_internal import debian_tool

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars",
]


async def chromium(tmp_path: Path, *args: str) -> str:
    """Run headless chromium with ``args`` (``--dump-dom URL``...); its stdout."""
    binary = await asyncio.to_thread(debian_tool, "chromium", "chromium")
    proc = await asyncio.create_subprocess_exec(
        binary, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


class Receiver:
    """An Alertmanager-style webhook receiver (an upstream handler): every payload it
    was sent, in order."""

    def __init__(self) -> None:
        self.payloads: list[dict[str, Any]] = []

    async def __call__(self, request: web.Request) -> web.Response:
        self.payloads.append(await request.json())
        return web.Response(status=200)

    def states(self) -> list[str]:
        """``firing`` / ``resolved`` of each payload, in order."""
        return [p["status"] for p in self.payloads]
