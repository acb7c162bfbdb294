"""The "floor": a bare ASGI reverse proxy on the same stack as Lucid.

Lucid serves its proxy with Hypercorn on uvloop and forwards with aiohttp.
This file does exactly that and nothing else -- no routing table, no plugins,
no Quart -- so its throughput is the best Lucid can hope for on this stack.
The benchmark reports Lucid's req/s as a fraction of this floor; the goal is
>= 0.90, i.e. everything Lucid adds on top of the bare forwarding path should
cost at most ~10%.

It is deliberately a *fair* floor, not a toy: it streams the request body from
ASGI ``receive`` and the response body back with ``iter_chunked``, copies
headers minus the hop-by-hop ones, and keeps one long-lived ``ClientSession``
with a keep-alive connection pool, as a real proxy must.

Usage: python bench/floor.py --listen 127.0.0.1:8080 --upstream http://127.0.0.1:8081
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from hypercorn.asyncio import serve
from hypercorn.config import Config
from yarl import URL

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# RFC 9110 7.6.1 connection-specific fields, plus Host (aiohttp sets the
# upstream's) -- forwarding them would break framing or keep-alive.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)
HOP_BY_HOP_BYTES = frozenset(name.encode() for name in HOP_BY_HOP)
CHUNK_SIZE = 64 * 1024


def _request_headers(scope: Scope) -> list[tuple[str, str]]:
    """Client headers to forward upstream (ASGI gives lowercase latin-1 bytes)."""
    return [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in scope["headers"]
        if name not in HOP_BY_HOP_BYTES
    ]


def _response_headers(raw: tuple[tuple[bytes, bytes], ...]) -> list[tuple[bytes, bytes]]:
    """Upstream headers to send back; raw bytes avoid a decode/encode round trip."""
    return [(name, value) for name, value in raw if name.lower() not in HOP_BY_HOP_BYTES]


async def _stream_body(first: bytes, receive: Receive) -> AsyncIterator[bytes]:
    """Yield the rest of a multi-message ASGI request body as it arrives."""
    if first:
        yield first
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body = message.get("body", b"")
        if body:
            yield body
        if not message.get("more_body", False):
            return


async def _request_body(receive: Receive) -> bytes | AsyncIterator[bytes] | None:
    """Pick the cheapest body form: None / bytes when the body fits one message.

    Most proxied requests have no body or a small one that arrives in a single
    ASGI message; only larger bodies need the streaming generator.
    """
    message = await receive()
    body = message.get("body", b"")
    if message.get("more_body", False):
        return _stream_body(body, receive)
    return body or None


class FloorProxy:
    """Raw ASGI callable forwarding every request to one upstream base URL."""

    def __init__(self, upstream: str, pool_size: int) -> None:
        self.upstream = upstream.rstrip("/")
        self.pool_size = pool_size
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._proxy(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """Open the session inside the server's loop; close it on shutdown."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.session = self._new_session()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.session is not None:
                    await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _new_session(self) -> aiohttp.ClientSession:
        """One pooled keep-alive session, sized so requests never queue on it."""
        connector = aiohttp.TCPConnector(
            limit=self.pool_size,
            limit_per_host=self.pool_size,
            keepalive_timeout=60,
            ttl_dns_cache=None,
        )
        return aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # pass bytes through untouched
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60),
        )

    def _url(self, scope: Scope) -> str:
        url = self.upstream + scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode("latin-1")
        return url

    async def _proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Forward one request and stream the response back."""
        assert self.session is not None, "lifespan startup did not run"
        try:
            body = await _request_body(receive)
            async with self.session.request(
                scope["method"],
                URL(self._url(scope), encoded=True),
                headers=_request_headers(scope),
                data=body,
                allow_redirects=False,
            ) as upstream:
                await send(
                    {
                        "type": "http.response.start",
                        "status": upstream.status,
                        "headers": _response_headers(upstream.raw_headers),
                    }
                )
                async for chunk in upstream.content.iter_chunked(CHUNK_SIZE):
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
        except (TimeoutError, aiohttp.ClientError):
            await _send_bad_gateway(send)


async def _send_bad_gateway(send: Send) -> None:
    """502 when the upstream fails before we started answering.

    If the response had already started, sending a new start raises; the
    server then aborts the connection, which is the right signal to the client.
    """
    body = b"bad gateway\n"
    await send(
        {
            "type": "http.response.start",
            "status": 502,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _config(listen: str, max_requests: int) -> Config:
    """Hypercorn settings: quiet, keep-alive on, and not the limiting factor."""
    config = Config()
    config.bind = [listen]
    config.accesslog = None
    config.errorlog = "-"
    config.backlog = 1024
    config.keep_alive_timeout = 75
    # Hypercorn's default closes a keep-alive connection after 1000 requests,
    # which adds reconnect churn unrelated to proxying.
    config.keep_alive_max_requests = max_requests
    return config


def _install_uvloop() -> None:
    """Lucid runs on uvloop, so the floor must too (or the ratio is meaningless)."""
    import uvloop

    uvloop.install()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:8080", help="host:port to bind")
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:8081")
    parser.add_argument(
        "--pool-size", type=int, default=1024, help="upstream connection pool limit"
    )
    parser.add_argument(
        "--keep-alive-max-requests",
        type=int,
        default=1_000_000,
        help="requests per client connection before Hypercorn closes it",
    )
    args = parser.parse_args(argv)
    _install_uvloop()
    app = FloorProxy(args.upstream, args.pool_size)
    config = _config(args.listen, args.keep_alive_max_requests)
    # serve() installs SIGINT/SIGTERM handlers and shuts down gracefully.
    # (The ignore: Hypercorn types scopes as TypedDicts, we use plain dicts.)
    asyncio.run(serve(app, config, mode="asgi"))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
