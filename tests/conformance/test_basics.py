"""Plain HTTP/1.1 through the proxy: the kit's own check, and keep-alive behaviour."""

from __future__ import annotations

from lucid.testing_http import read_response
from lucid.testing_internal import route


async def test_a_plain_request_is_proxied_and_the_connection_kept(serve, raw_upstream):
    upstream = await raw_upstream()
    served = serve(route(upstream.url))
    reader, writer = await served.client.connect()
    try:
        for _ in range(2):
            writer.write(b"GET /hello?x=1 HTTP/1.1\r\nHost: example\r\n\r\n")
            await writer.drain()
            response = await read_response(reader)
            assert response.status == 200
            assert response.body == b"ok"
            assert not response.closed
    finally:
        writer.close()
    assert [r.request_line for r in upstream.requests] == [b"GET /hello?x=1 HTTP/1.1"] * 2
