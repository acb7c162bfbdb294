"""Message framing (RFC 9112 §6): a request whose length is ambiguous is refused before
anything reaches an upstream, and responses reach the client as they arrive."""

from __future__ import annotations

import asyncio
import json

import pytest

from lucid.testing import wait_until
from lucid.testing_http import RawRequest, read_response
from lucid.testing_internal import route

CHUNKED_BODY = b"5\r\nhello\r\n0\r\n\r\n"

# Content-Length together with Transfer-Encoding, in the spellings that slipped through
# (RFC 9112 §6.3: such a message "ought to be handled as an error"; nginx and Envoy
# answer 400 and close). Each is a whole request, chunked body included.
SMUGGLING = {
    "chunked": b"POST /s HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n" + CHUNKED_BODY,
    "te-first": b"POST /s HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                b"Content-Length: 5\r\n\r\n" + CHUNKED_BODY,
    "upper-case": b"POST /s HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                  b"Transfer-Encoding: CHUNKED\r\n\r\n" + CHUNKED_BODY,
    "tab": b"POST /s HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
           b"Transfer-Encoding:\tchunked\r\n\r\n" + CHUNKED_BODY,
    "obs-fold": b"POST /s HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                b"Transfer-Encoding:\r\n chunked\r\n\r\n" + CHUNKED_BODY,
    "bare-lf": b"POST /s HTTP/1.1\nHost: a\nContent-Length: 5\nTransfer-Encoding: chunked\n\n"
               + CHUNKED_BODY,
    "gzip-chunked": b"POST /s HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                    b"Transfer-Encoding: gzip, chunked\r\n\r\n" + CHUNKED_BODY,
    "two-te": b"POST /s HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
              b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
              + CHUNKED_BODY,
    "space-before-colon": b"POST /s HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                          b"Transfer-Encoding : chunked\r\n\r\n" + CHUNKED_BODY,
    "http-1.0": b"POST /s HTTP/1.0\r\nHost: a\r\nContent-Length: 5\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n" + CHUNKED_BODY,
}


def _both_headers(request: RawRequest) -> bool:
    return request.has("content-length") and request.has("transfer-encoding")


@pytest.mark.parametrize("spelling", sorted(SMUGGLING))
async def test_content_length_with_transfer_encoding_is_refused_and_closed(
    serve, raw_upstream, spelling
):
    upstream = await raw_upstream()
    served = serve(route(upstream.url))
    response = await served.client.send(SMUGGLING[spelling])
    assert 400 <= response.status < 500 or response.status == 501, response.raw
    assert response.closed
    # A connection reused after an ambiguous message is how requests get smuggled:
    # nothing of it reaches the upstream, let alone with both headers.
    assert upstream.requests == []
    # The gateway still serves the next client.
    again = await served.client.send(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")
    assert again.status == 200


async def test_content_length_with_transfer_encoding_gets_a_json_400(serve, raw_upstream):
    """Where the parser leaves the decision to Lucid, the answer says what was wrong."""
    upstream = await raw_upstream()
    served = serve(route(upstream.url))
    response = await served.client.send(SMUGGLING["chunked"])
    assert response.status == 400
    assert response.header("connection") == "close"
    assert "Transfer-Encoding" in json.loads(response.body)["error"]
    assert not any(_both_headers(r) for r in upstream.requests)


async def test_a_chunked_request_is_forwarded_chunked_without_content_length(
    serve, raw_upstream
):
    upstream = await raw_upstream()
    served = serve(route(upstream.url))
    response = await served.client.send(
        b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_BODY)
    assert response.status == 200
    [seen] = upstream.requests
    assert seen.body == b"hello"
    assert not _both_headers(seen)


async def test_a_declared_length_response_is_streamed_as_it_arrives(serve, raw_upstream):
    """A small response with a Content-Length reaches the client piece by piece: a
    long poll or a slow API must not wait for its last byte to show its first."""
    release = asyncio.Event()

    async def drip(request, reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nfirst")
        await writer.drain()
        await release.wait()
        writer.write(b"-last")
        await writer.drain()

    upstream = await raw_upstream(drip)
    served = serve(route(upstream.url))
    reader, writer = await served.client.connect()
    try:
        writer.write(b"GET /drip HTTP/1.1\r\nHost: a\r\n\r\n")
        await writer.drain()
        seen = b""

        async def first_part_arrived() -> bool:
            nonlocal seen
            try:
                seen += await asyncio.wait_for(reader.read(4096), 0.2)
            except TimeoutError:
                pass
            return seen.endswith(b"\r\n\r\nfirst")

        await wait_until(first_part_arrived, message="the first part of the body")
        release.set()
        rest = await asyncio.wait_for(reader.readexactly(5), 10)
        assert rest == b"-last"
        assert b"content-length: 10" in seen.lower()
    finally:
        release.set()
        writer.close()


async def test_a_small_response_still_arrives_whole_and_the_connection_kept(
    serve, raw_upstream
):
    upstream = await raw_upstream()
    served = serve(route(upstream.url))
    reader, writer = await served.client.connect()
    try:
        for _ in range(3):
            writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            await writer.drain()
            response = await asyncio.wait_for(read_response(reader), 10)
            assert (response.status, response.body, response.closed) == (200, b"ok", False)
    finally:
        writer.close()
