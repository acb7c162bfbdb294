"""The fast engine's floor: a bare ASGI reverse proxy on Lucid's fast data plane.

``bench/floor.py`` is Lucid's old stack with nothing on top (Hypercorn + aiohttp);
this is the new one with nothing on top: the fast engine (``lucid.engine``, llhttp
on uvloop) serving clients and the lean pool (``lucid.upstream``) calling the
upstream, with the same forwarding as floor.py (hop-by-hop headers dropped, bodies
streamed both ways). Lucid's full chain on the fast engine is measured against it:
what Lucid's own code costs on the new stack.

Usage: python bench/floor_fast.py --listen 127.0.0.1:8080 --upstream http://127.0.0.1:8081
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
from types import SimpleNamespace
from typing import Any

from floor import Receive, Scope, Send, _request_body, _request_headers, _response_headers
from floor import _send_bad_gateway as send_bad_gateway
from yarl import URL

from lucid.engine import serve_fast
from lucid.upstream import UpstreamPool


class FastFloorProxy:
    """Raw ASGI callable forwarding every request to one upstream base URL."""

    def __init__(self, upstream: str, pool_size: int) -> None:
        self.upstream = upstream.rstrip("/")
        self.pool_size = pool_size
        self.pool: UpstreamPool | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.pool is None:
            self.pool = UpstreamPool(self.pool_size, 30.0)
        url = self.upstream + scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode("latin-1")
        try:
            body = await _request_body(receive)
            response = await self.pool.request(scope["method"], URL(url, encoded=True),
                                               _request_headers(scope), body)
        except (TimeoutError, ConnectionError):
            await send_bad_gateway(send)
            return
        try:
            await send({"type": "http.response.start", "status": response.status,
                        "headers": _response_headers(tuple(response.raw_headers))})
            while chunk := await response.read_chunk():
                more = not response.at_eof()
                await send({"type": "http.response.body", "body": chunk, "more_body": more})
                if not more:
                    return
            await send({"type": "http.response.body", "body": b""})
        finally:
            response.release()


async def run(listen: str, upstream: str, pool_size: int) -> None:
    host, _, port = listen.rpartition(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, int(port)))
    sock.listen(2048)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    limits: Any = SimpleNamespace(max_request_header_size=65536, max_request_headers=100,
                                  request_head_timeout=20.0, grace_period=5.0)
    await serve_fast(FastFloorProxy(upstream, pool_size), sock, limits, stop.wait)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:8080", help="host:port to bind")
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:8081")
    parser.add_argument("--pool-size", type=int, default=1024,
                        help="upstream connection pool limit")
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(run(args.listen, args.upstream, args.pool_size))


if __name__ == "__main__":
    main()
