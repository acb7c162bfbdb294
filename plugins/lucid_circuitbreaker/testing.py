"""Test helpers for the breaker (ours and plugin authors'): a hand-driven clock, an
upstream whose status can be switched mid-test, and a guarded service's config."""

from __future__ import annotations

from typing import Any

from aiohttp import web


class ManualClock:
    """Stands in for ``time.monotonic`` on the plugin: time moves only when told."""

    def __init__(self, start: float = 10_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Switch:
    """An upstream handler answering ``status`` (changeable mid-test)."""

    def __init__(self, status: int = 200, body: str = "ok"):
        self.status = status
        self.body = body
        self.calls = 0

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        return web.Response(status=self.status, text=self.body)


def plugin_of(gateway: Any) -> Any:
    return gateway.runtime.plugin_set.pm.get_plugin("circuitbreaker")


def guarded(upstreams: list[str], circuit: str, head: str = "") -> str:
    """A config (TOML) of one service ``svc`` on ``upstreams``, a catch-all route with
    one attempt, and circuit ``cb`` guarding it with ``circuit`` (its TOML lines);
    ``head`` goes first (e.g. a ``[cluster]`` section)."""
    instances = ", ".join(f'"{url}"' for url in upstreams)
    return f"""{head}
[gateway.services.svc]
instances = [{instances}]

[[gateway.routes]]
prefix = "/"
service = "svc"
retries = {{ attempts = 1 }}

[circuitbreaker.circuits.cb]
service = "svc"
{circuit}
"""
