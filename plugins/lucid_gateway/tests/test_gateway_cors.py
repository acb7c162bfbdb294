"""CORS per route: preflights answered by the gateway, Fetch-standard rules, no duplicates."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web

from lucid.config import ConfigError


def config(upstream: str, cors: str, extra: str = "") -> str:
    cors = " ".join(cors.split())  # TOML inline tables are one line
    return f"""
[gateway.services.svc]
instances = ["{upstream}"]

[[gateway.routes]]
id = "api"
prefix = "/api"
service = "svc"
methods = ["GET", "PUT", "DELETE"]
cors = {cors}
{extra}
"""


async def upstream_with_its_own_cors(request: web.Request) -> web.StreamResponse:
    return web.json_response({"ok": True}, headers={
        "Access-Control-Allow-Origin": "*", "Access-Control-Allow-Credentials": "false",
        "Vary": "Accept-Encoding"})


async def preflight(gw: Any, origin: str, method: str = "PUT", headers: str = "") -> Any:
    sent = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers:
        sent["Access-Control-Request-Headers"] = headers
    async with gw.session.options(gw.proxy_url + "/api/x", headers=sent) as r:
        return r.status, r.headers, await r.read()


async def test_preflight_is_answered_by_the_gateway(lucid_upstream: Any, lucid_gateway: Any
                                                    ) -> None:
    upstream = await lucid_upstream()
    gw = await lucid_gateway(config(upstream.url, """{ allow_origins = ["https://app.test",
        "https://*.example.com"], allow_methods = ["GET", "PUT"],
        allow_headers = ["Content-Type", "X-Trace"], allow_credentials = true,
        max_age = "10m" }"""))
    status, headers, body = await preflight(gw, "https://app.test", "PUT", "x-trace, content-type")
    assert status == 204 and body == b""
    assert headers.getall("Access-Control-Allow-Origin") == ["https://app.test"]
    assert headers["Access-Control-Allow-Credentials"] == "true"
    assert headers["Access-Control-Allow-Methods"] == "GET, PUT"
    assert headers["Access-Control-Allow-Headers"] == "x-trace, content-type"
    assert headers["Access-Control-Max-Age"] == "600"
    assert "Origin" in headers["Vary"]
    status, headers, _ = await preflight(gw, "https://a.b.example.com")
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "https://a.b.example.com"
    for origin, method, asked in (("https://example.com", "PUT", ""),  # wildcard needs a label
                                  ("http://a.example.com", "PUT", ""),  # scheme matters
                                  ("https://evil.test", "PUT", ""),
                                  ("https://app.test", "DELETE", ""),
                                  ("https://app.test", "PUT", "x-secret")):
        status, headers, _ = await preflight(gw, origin, method, asked)
        assert status == 403, (origin, method, asked)
        assert "Access-Control-Allow-Origin" not in headers
    assert not upstream.requests  # no preflight ever reached the upstream


async def test_actual_requests_carry_the_gateways_headers_only(lucid_upstream: Any,
                                                               lucid_gateway: Any) -> None:
    upstream = await lucid_upstream(upstream_with_its_own_cors)
    gw = await lucid_gateway(config(upstream.url, """{ allow_origins = ["https://app.test"],
        allow_credentials = true, expose_headers = ["X-Request-Id"] }"""))
    async with gw.session.get(gw.proxy_url + "/api/x",
                              headers={"Origin": "https://app.test"}) as r:
        assert r.status == 200
        assert r.headers.getall("Access-Control-Allow-Origin") == ["https://app.test"]
        assert r.headers.getall("Access-Control-Allow-Credentials") == ["true"]
        assert r.headers["Access-Control-Expose-Headers"] == "x-request-id"
        assert sorted(r.headers.getall("Vary")) == ["Accept-Encoding", "Origin"]
    async with gw.session.get(gw.proxy_url + "/api/x",
                              headers={"Origin": "https://evil.test"}) as r:
        assert r.status == 200  # CORS is enforced by the browser; it gets no grant
        assert "Access-Control-Allow-Origin" not in r.headers
        assert r.headers.getall("Vary") == ["Accept-Encoding", "Origin"]
    async with gw.session.get(gw.proxy_url + "/api/x") as r:  # no Origin: still no
        assert "Access-Control-Allow-Origin" not in r.headers  # upstream CORS headers
        assert r.headers.getall("Vary") == ["Accept-Encoding", "Origin"]


async def test_star_origin_without_credentials(lucid_upstream: Any, lucid_gateway: Any) -> None:
    upstream = await lucid_upstream()
    gw = await lucid_gateway(config(upstream.url, """{ allow_origins = ["*"],
        allow_headers = ["*"] }"""))
    status, headers, _ = await preflight(gw, "https://any.test", "GET", "x-custom")
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in headers
    # Fetch: the '*' wildcard never covers Authorization; it must be listed by name
    status, _, _ = await preflight(gw, "https://any.test", "GET", "authorization")
    assert status == 403


async def test_preflight_skips_auth_but_actual_requests_do_not(lucid_upstream: Any,
                                                               lucid_gateway: Any) -> None:
    upstream = await lucid_upstream()
    gw = await lucid_gateway(config(upstream.url, '{ allow_origins = ["https://app.test"], '
                                    'allow_headers = ["authorization"] }',
                                    'auth = {}\n\n[gateway.auth.issuers.main]\n'
                                    'algorithms = ["HS256"]\nsecret = "' + "k" * 40 + '"'))
    status, headers, _ = await preflight(gw, "https://app.test", "GET", "authorization")
    assert status == 204
    async with gw.session.get(gw.proxy_url + "/api/x",
                              headers={"Origin": "https://app.test"}) as r:
        assert r.status == 401  # and the browser may read it:
        assert r.headers["Access-Control-Allow-Origin"] == "https://app.test"


@pytest.mark.parametrize("cors", [
    '{ allow_origins = ["*"], allow_credentials = true }',
    '{ allow_origins = ["https://a.test"], allow_headers = ["*"], allow_credentials = true }',
    '{ allow_origins = ["https://a.test/path"] }',
    '{ allow_origins = ["https://a.*.test"] }',
])
async def test_fetch_rule_violations_are_config_errors(cors: str, lucid_gateway: Any) -> None:
    with pytest.raises(ConfigError, match=r"gateway\.routes\[0\]\.cors"):
        await lucid_gateway(config("http://127.0.0.1:9", cors))
