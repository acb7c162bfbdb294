"""Raw HTTP/1.1 on loopback, part of the public test kit: an upstream that records
the exact bytes it receives (:class:`RawUpstream`), and a client that sends exactly
the bytes it is given (:class:`Client`, :func:`read_response`).

A plugin that touches framing or headers (a header transform, a body limit) can test
what really crossed the wire with these, where an HTTP client library would
normalise it. Lucid's HTTP/1.1 conformance module (``tests/conformance/``) is written
with them against a running ``lucid serve``, so that every proxy engine passes the
same tests. ``docs/testing.md`` describes the kit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from lucid.deprecation import moved

__all__ = [
    "Client",
    "RawRequest",
    "RawResponse",
    "RawUpstream",
    "Responder",
    "answer_ok",
    "closed_within",
    "read_response",
]

# Lucid's own test helpers, moved to lucid.testing_internal (one release of aliases)
__getattr__ = moved(__name__, {"route": "lucid.testing_internal",
                               "challenge_params": "lucid.testing_internal",
                               "AUTH_PARAM": "lucid.testing_internal"})


@dataclass
class RawRequest:
    """One request exactly as the upstream received it."""

    head: bytes
    body: bytes

    @property
    def request_line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]

    @property
    def headers(self) -> list[tuple[str, str]]:
        """Header fields in arrival order, names lower-cased, values as sent."""
        out = []
        for line in self.head.split(b"\r\n")[1:]:
            if line:
                name, _, value = line.partition(b":")
                out.append((name.decode("latin-1").lower(), value.strip().decode("latin-1")))
        return out

    def values(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name.lower()]

    def has(self, name: str) -> bool:
        return bool(self.values(name))


Responder = Callable[[RawRequest, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def answer_ok(request: RawRequest, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok")
    await writer.drain()


@dataclass
class RawUpstream:
    """An HTTP/1.1 upstream on loopback that keeps the raw bytes of every request.

    It frames request bodies itself (Content-Length, or chunked when
    Transfer-Encoding says so), so a test sees what a real origin would have read.
    ``respond`` writes the answer; by default ``200 ok``.
    """

    respond: Responder = answer_ok
    requests: list[RawRequest] = field(default_factory=list)
    server: asyncio.AbstractServer | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> RawUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                request = RawRequest(head, b"")
                request.body = await _read_body(reader, request)
                self.requests.append(request)
                await self.respond(request, reader, writer)
                if any(v.lower() == "close" for v in request.values("connection")):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            # The test's loop is closing with this connection open (a gateway keeps its
            # upstream connections alive); asyncio would log the cancelled handler as
            # an error.
            return
        finally:
            writer.close()


async def _read_body(reader: asyncio.StreamReader, request: RawRequest) -> bytes:
    if any("chunked" in v.lower() for v in request.values("transfer-encoding")):
        parts: list[bytes] = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers expected
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
    lengths = request.values("content-length")
    if lengths:
        return await reader.readexactly(int(lengths[0]))
    return b""


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    closed: bool  # the connection was closed after this response
    raw: bytes

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n == name.lower():
                return v
        return None


@dataclass
class Client:
    """A raw-socket client of the proxy listener: it sends exactly the bytes given."""

    host: str
    port: int

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self.host, self.port)

    async def send(self, data: bytes, timeout: float = 10.0) -> RawResponse:
        """Send ``data`` on a new connection and read one response (or the close)."""
        reader, writer = await self.connect()
        try:
            writer.write(data)
            await writer.drain()
            return await asyncio.wait_for(read_response(reader), timeout)
        finally:
            writer.close()


async def read_response(reader: asyncio.StreamReader, closed_wait: float | None = 0.5
                        ) -> RawResponse:
    """One response from ``reader``: status 0 if the connection closed before a head.

    Then ``closed_wait`` seconds to see whether the connection closes; ``None`` skips
    that (and reads nothing more), for a client that expects another response.
    """
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        return RawResponse(0, [], b"", True, exc.partial)
    except ConnectionResetError:
        return RawResponse(0, [], b"", True, b"")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(b":")
            headers.append((name.decode("latin-1").lower(), value.strip().decode("latin-1")))
    response = RawResponse(status, headers, b"", False, head)
    if (length := response.header("content-length")) is not None:
        response.body = await reader.readexactly(int(length))
    elif "chunked" in (response.header("transfer-encoding") or ""):
        response.body = await _read_body(reader, RawRequest(head, b""))
    else:
        response.body = await reader.read()
    if closed_wait is not None:
        response.closed = await _closed(reader, closed_wait)
    return response


async def closed_within(reader: asyncio.StreamReader, wait: float) -> bool:
    """Whether the server closes the connection within ``wait`` seconds."""
    return await _closed(reader, wait)


async def _closed(reader: asyncio.StreamReader, wait: float = 0.5) -> bool:
    """Whether the server closes the connection right after its response."""
    try:
        return await asyncio.wait_for(reader.read(1), wait) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True
