"""lucid-apikey end to end: a real gateway on loopback (the ``lucid_gateway`` fixture),
a real upstream (``lucid_upstream``), real HTTP requests. Only Lucid's public test kit."""

from __future__ import annotations

from typing import Any

import pytest
from lucid.config import ConfigError

KEY_A = "key-of-client-a-0123456789"
KEY_B = "key-of-client-b-0123456789"


def config(upstream_url: str, apikey: str = "", extra: str = "") -> str:
    """Two routes to one upstream: ``/private`` (a key needed) and ``/open``."""
    return f"""
[apikey]
keys = {{ client-a = "{KEY_A}", client-b = "{KEY_B}" }}
{apikey}

[gateway.services.svc]
instances = ["{upstream_url}"]

[[gateway.routes]]
id = "private"
prefix = "/private"
service = "svc"

[[gateway.routes]]
id = "open"
prefix = "/open"
service = "svc"
plugins = {{ apikey = {{ required = false }} }}
{extra}
"""


async def get(gw: Any, path: str, **headers: str) -> tuple[int, Any, Any]:
    async with gw.session.get(gw.proxy_url + path, headers=headers) as r:
        return r.status, r.headers, await r.json()


async def test_a_request_without_a_key_is_refused_before_the_upstream(
    lucid_gateway: Any, lucid_upstream: Any
) -> None:
    upstream = await lucid_upstream()
    gw = await lucid_gateway(config(upstream.url))
    status, headers, body = await get(gw, "/private/x")
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Key realm="lucid"'
    assert headers["Content-Type"].startswith("application/json")
    assert body["error"] == "No API key found in request"
    assert body["status"] == 401 and body["request_id"] == headers["X-Request-ID"]
    status, _, body = await get(gw, "/private/x", **{"X-Api-Key": "not-a-key"})
    assert (status, body["error"]) == (401, "Invalid authentication credentials")
    assert upstream.requests == []


async def test_a_valid_key_reaches_the_upstream_named_as_its_client(
    lucid_gateway: Any, lucid_upstream: Any
) -> None:
    upstream = await lucid_upstream()
    gw = await lucid_gateway(config(upstream.url))
    # a client cannot pose as another by sending the consumer header itself
    status, _, echo = await get(gw, "/private/x", **{"X-Api-Key": KEY_B,
                                                     "X-Consumer-Username": "client-a"})
    assert status == 200
    assert echo["path"] == "/private/x"
    assert echo["headers"]["x-consumer-username"] == "client-b"
    assert echo["headers"]["x-api-key"] == KEY_B  # hide_credentials is off by default


async def test_hide_credentials_keeps_the_key_from_the_upstream(
    lucid_gateway: Any, lucid_upstream: Any
) -> None:
    upstream = await lucid_upstream()
    gw = await lucid_gateway(config(upstream.url, 'hide_credentials = true\n'
                                                  'header = "X-Key"'))
    status, _, echo = await get(gw, "/private/x", **{"X-Key": KEY_A})
    assert status == 200
    assert "x-key" not in echo["headers"]
    assert echo["headers"]["x-consumer-username"] == "client-a"
    status, _, _ = await get(gw, "/private/x", **{"X-Api-Key": KEY_A})  # not its header
    assert status == 401


async def test_an_open_route_admits_anyone_and_still_names_a_known_client(
    lucid_gateway: Any, lucid_upstream: Any
) -> None:
    upstream = await lucid_upstream()
    gw = await lucid_gateway(config(upstream.url))
    status, _, echo = await get(gw, "/open/x", **{"X-Consumer-Username": "client-a"})
    assert status == 200
    assert "x-consumer-username" not in echo["headers"]  # the spoofed one removed
    status, _, echo = await get(gw, "/open/x", **{"X-Api-Key": "wrong"})
    assert status == 200 and "x-consumer-username" not in echo["headers"]
    status, _, echo = await get(gw, "/open/x", **{"X-Api-Key": KEY_A})
    assert status == 200 and echo["headers"]["x-consumer-username"] == "client-a"


async def test_refused_requests_spend_no_rate_limit_allowance(
    lucid_gateway: Any, lucid_upstream: Any
) -> None:
    """Admission priority 900 runs the key check before the rate limiter (800), and the
    limiter's ``key = "user"`` counts each client on its own."""
    upstream = await lucid_upstream()
    gw = await lucid_gateway(config(upstream.url, extra="""
[[ratelimiter.limits]]
id = "per-client"
rate = "2/m"
key = "user"
"""))
    for _ in range(5):
        assert (await get(gw, "/private/x"))[0] == 401
    statuses = [(await get(gw, "/private/x", **{"X-Api-Key": KEY_A}))[0] for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert (await get(gw, "/private/x", **{"X-Api-Key": KEY_B}))[0] == 200  # its own bucket
    assert len(upstream.requests) == 3


async def test_the_admin_api_lists_clients_and_never_a_key(
    lucid_gateway: Any, lucid_upstream: Any
) -> None:
    upstream = await lucid_upstream()
    gw = await lucid_gateway(config(upstream.url))
    await get(gw, "/private/x", **{"X-Api-Key": KEY_A})
    await get(gw, "/private/x")
    async with gw.session.get(gw.admin_url + "/apikey/clients") as r:
        assert r.status == 200
        text = await r.text()
        body = await r.json()
    assert body["clients"] == [{"name": "client-a", "admitted": 1},
                               {"name": "client-b", "admitted": 0}]
    assert body["refused"] == 1 and body["header"] == "x-api-key"
    async with gw.session.get(gw.admin_url + "/gateway/config") as r:
        assert r.status == 200
        text += await r.text()
    assert KEY_A not in text and KEY_B not in text


async def test_installed_but_not_configured_it_admits_everything(
    lucid_gateway: Any, lucid_upstream: Any
) -> None:
    upstream = await lucid_upstream()
    gw = await lucid_gateway(f"""
[gateway.services.svc]
instances = ["{upstream.url}"]
[[gateway.routes]]
prefix = "/"
service = "svc"
""")
    assert (await get(gw, "/x"))[0] == 200


@pytest.mark.parametrize(("setting", "problem"), [
    ('keys = { a = "k1-secret", b = "k1-secret" }', "apikey.keys"),
    ('keys = { "no spaces" = "k" }', "apikey.keys"),
    ('header = "x api key"', "apikey.header"),
    ('unknown = 1', "apikey.unknown"),
])
async def test_bad_config_is_refused_naming_the_key(
    lucid_gateway: Any, setting: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        await lucid_gateway(f"[apikey]\n{setting}\n")
    assert problem in str(raised.value)
    assert "k1-secret" not in str(raised.value)  # keys are SecretStr: never echoed
