"""The HTTP/1.1 conformance module: framing, sizes, timeouts and identity headers,
tested against a real ``lucid serve`` through its sockets only, never against Lucid's
objects, so that every proxy engine Lucid serves with passes the same module (the
``engine`` fixture names it; each test runs once per engine).
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from lucid.testing import GatewayProcess
from lucid.testing_http import Client, RawUpstream, Responder, answer_ok

# The proxy engines (``[server] engine``): the default first.
ENGINES = ["fast", "hypercorn"]


@dataclass
class Served:
    """A ``lucid serve`` process and a raw client of its proxy listener."""

    process: GatewayProcess
    client: Client
    engine: str


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """The proxy engine under test; every conformance test runs once per engine."""
    return str(request.param)


@pytest_asyncio.fixture
async def raw_upstream() -> AsyncIterator[Callable[..., Awaitable[RawUpstream]]]:
    """Factory: ``await raw_upstream(respond=None)`` starts a recording upstream."""
    started: list[RawUpstream] = []

    async def factory(respond: Responder | None = None) -> RawUpstream:
        upstream = await RawUpstream(respond or answer_ok).start()
        started.append(upstream)
        return upstream

    yield factory
    for upstream in started:
        await upstream.close()


@pytest.fixture
def serve(lucid_process: Callable[..., GatewayProcess], engine: str
          ) -> Iterator[Callable[..., Served]]:
    """Factory: ``serve(toml_text, **server_settings)`` runs ``lucid serve`` on it."""

    def factory(text: str, **server: Any) -> Served:
        server.setdefault("engine", engine)
        process = lucid_process(text, **server)
        host, _, port = process.proxy_url.removeprefix("http://").rpartition(":")
        served = Served(process, Client(host.strip("[]"), int(port)), engine)
        _wait_listening(served.client)
        return served

    yield factory


def _wait_listening(client: Client, timeout: float = 10.0) -> None:
    """A forked worker announces its listener just before it accepts; wait for it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((client.host, client.port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
