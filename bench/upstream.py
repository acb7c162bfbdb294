"""Minimal HTTP/1.1 keep-alive responder used as the benchmark upstream.

The proxy benchmark needs an upstream that is much cheaper per request than
the proxies it measures, so that the proxy -- not the upstream -- is the
bottleneck.  nginx is preferred; this file is the fallback when nginx is not
installed.  It answers every request with the same small 200 response and
does as little work as possible: a raw ``asyncio.Protocol`` (no HTTP library),
uvloop when available, and just enough parsing to find request boundaries
(headers, ``Content-Length`` bodies, chunked bodies) so that pipelined or
keep-alive requests stay in sync.

Usage: python bench/upstream.py --listen 127.0.0.1:8081
"""

from __future__ import annotations

import argparse
import asyncio
import signal

BODY = b"ok\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: " + str(len(BODY)).encode() + b"\r\n"
    b"\r\n" + BODY
)
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
MAX_HEADER_BYTES = 64 * 1024


class _Incomplete(Exception):
    """More bytes are needed before the current request can be answered."""


class _BadRequest(Exception):
    """The bytes on the wire are not a request we can frame."""


def _parse_head(head: bytes) -> tuple[int | None, bool, bool]:
    """Return (content_length, chunked, close) for one request head.

    Only the headers that decide where the request ends and whether the
    connection stays open are looked at; everything else is ignored on
    purpose, because the response never depends on the request.
    """
    lines = head.split(b"\r\n")
    version = lines[0].rsplit(b" ", 1)[-1].upper()
    close = version == b"HTTP/1.0"
    length: int | None = None
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        value = value.strip().lower()
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError as exc:
                raise _BadRequest from exc
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value
        elif name == b"connection":
            if b"close" in value:
                close = True
            elif b"keep-alive" in value:
                close = False
    return length, chunked, close


def _chunked_end(buf: bytearray, start: int) -> int:
    """Return the offset just past a chunked body that begins at ``start``."""
    pos = start
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            raise _Incomplete
        size_text = bytes(buf[pos:eol]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError as exc:
            raise _BadRequest from exc
        if size == 0:
            # Skip optional trailers up to the blank line that ends the body.
            end = buf.find(b"\r\n\r\n", eol)
            if end < 0:
                raise _Incomplete
            return end + 4
        pos = eol + 2 + size + 2
        if pos > len(buf):
            raise _Incomplete


def _take_request(buf: bytearray) -> bool:
    """Remove one complete request from ``buf``; return whether to close after it."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        if len(buf) > MAX_HEADER_BYTES:
            raise _BadRequest
        raise _Incomplete
    length, chunked, close = _parse_head(bytes(buf[:head_end]))
    body_start = head_end + 4
    if chunked:
        end = _chunked_end(buf, body_start)
    else:
        end = body_start + (length or 0)
        if end > len(buf):
            raise _Incomplete
    del buf[:end]
    return close


class Responder(asyncio.Protocol):
    """Answer each request on a connection with the fixed 200 response."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        # Bounded: each iteration consumes at least one request head from buf.
        while self.buf:
            try:
                close = _take_request(self.buf)
            except _Incomplete:
                return
            except _BadRequest:
                self.transport.write(BAD_REQUEST)
                self.transport.close()
                return
            self.transport.write(RESPONSE)
            if close:
                self.transport.close()
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


def _install_fast_loop() -> str:
    """Use uvloop when present: the upstream must not be the bottleneck."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    uvloop.install()
    return "uvloop"


async def serve(host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM so the bench can stop us cleanly."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(Responder, host, port, backlog=1024, reuse_address=True)
    async with server:
        await stop.wait()


def _split_hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:8081", help="host:port to bind")
    args = parser.parse_args(argv)
    host, port = _split_hostport(args.listen)
    _install_fast_loop()
    asyncio.run(serve(host, port))


if __name__ == "__main__":
    main()
