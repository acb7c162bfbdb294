"""Identity headers: what an upstream is told about the client, and what a client can
make it believe. Checked on the exact bytes the upstream received.

A client that is not a trusted proxy cannot name an address, scheme, port, prefix or
URL for the upstream to believe; a trusted proxy's own versions pass on. A client's
``Connection`` header cannot remove a header Lucid sets, and no underscore twin of one
(``X_User_Id`` for ``X-User-Id``: CGI and WSGI map both to ``HTTP_X_USER_ID``) gets
through. A method override is only forwarded for a method the route allows.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import pytest

from lucid.testing_internal import route

# Every header an upstream framework may read the client's address, scheme, port,
# prefix or URL from, other than X-Forwarded-For/-Proto/-Host (which Lucid sets).
SPOOFED = {
    "X-Real-IP": "6.6.6.6",
    "Forwarded": "for=6.6.6.6;proto=https;host=evil.example",
    "True-Client-IP": "6.6.6.6",
    "X-Client-IP": "6.6.6.6",
    "Client-IP": "6.6.6.6",
    "CF-Connecting-IP": "6.6.6.6",
    "X-Cluster-Client-IP": "6.6.6.6",
    "Fastly-Client-IP": "6.6.6.6",
    "X-Original-Forwarded-For": "6.6.6.6",
    "X-Forwarded": "for=6.6.6.6",
    "Forwarded-For": "6.6.6.6",
    "X-Forwarded-Port": "443",
    "X-Forwarded-Prefix": "/admin",
    "X-Forwarded-Server": "evil.example",
    "X-Forwarded-Scheme": "https",
    "X-Forwarded-Protocol": "https",
    "X-Forwarded-Ssl": "on",
    "Front-End-Https": "on",
    "X-Url-Scheme": "https",
    "X-Original-URL": "/admin",
    "X-Rewrite-URL": "/admin",
    "X-Original-URI": "/admin",
    "X-Forwarded-Uri": "/admin",
    "X-Original-Host": "evil.example",
    "X-Envoy-External-Address": "6.6.6.6",
}
TRUSTED = ["127.0.0.0/8", "::1/128"]
SECRET = "s" * 40


def request(path: str = "/", headers: dict[str, str] | list[tuple[str, str]] | None = None,
            method: str = "GET", host: str = "shop.example") -> bytes:
    items = headers.items() if isinstance(headers, dict) else headers or []
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in items]
    if method in ("POST", "PUT", "PATCH"):
        lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def forwarded_once(served, upstream, data: bytes):
    """Send one request; assert it was proxied and return what the upstream received."""
    response = await served.client.send(data)
    assert response.status == 200, response.raw
    assert len(upstream.requests) == 1
    return upstream.requests[0]


async def test_identity_headers_from_an_untrusted_client_are_removed(serve, raw_upstream):
    upstream = await raw_upstream()
    served = serve(route(upstream.url))
    seen = await forwarded_once(served, upstream, request(headers={
        **SPOOFED, "X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "evil.example"}))
    leaked = [name for name in SPOOFED if seen.has(name)]
    assert leaked == []
    assert seen.values("x-forwarded-for") == ["127.0.0.1"]
    assert seen.values("x-forwarded-proto") == ["http"]
    assert seen.values("x-forwarded-host") == ["shop.example"]
    assert "6.6.6.6" not in seen.head.decode("latin-1")


async def test_underscore_twins_of_identity_headers_are_removed(serve, raw_upstream):
    """Whatever the peer: CGI/WSGI read X_Real_IP as HTTP_X_REAL_IP, so a twin would
    stand in for a header Lucid removed or set."""
    upstream = await raw_upstream()
    served = serve(route(upstream.url), trusted_proxies=TRUSTED)
    twins = [("X_Real_IP", "6.6.6.6"), ("X_Forwarded_For", "6.6.6.6"),
             ("X-Forwarded_Proto", "https"), ("x_forwarded-host", "evil.example"),
             ("X_Request_ID", "forged"), ("CF_Connecting_IP", "6.6.6.6"),
             ("X_Original_URL", "/admin"), ("X-Keep_Me", "yes")]
    seen = await forwarded_once(served, upstream, request(headers=twins))
    assert [name for name, _ in seen.headers if "_" in name] == ["x-keep_me"]
    assert "6.6.6.6" not in seen.head.decode("latin-1")


async def test_a_trusted_proxy_identity_headers_are_passed_on(serve, raw_upstream):
    upstream = await raw_upstream()
    served = serve(route(upstream.url), trusted_proxies=TRUSTED)
    seen = await forwarded_once(served, upstream, request(headers=SPOOFED))
    for name, value in SPOOFED.items():
        assert seen.values(name) == [value], name


@pytest.mark.parametrize(("host", "element"), [
    ("shop.example", "host=shop.example"),
    # RFC 7239 §4: a value that is not a token is a quoted-string (RFC 9110 §5.6.4)
    ("shop.example:8080", 'host="shop.example:8080"'),
    ('odd"host\\x', 'host="odd\\"host\\\\x"'),
])
async def test_forwarded_is_replaced_for_an_untrusted_client(serve, raw_upstream, host,
                                                             element):
    upstream = await raw_upstream()
    served = serve(route(upstream.url), forwarded=True)
    seen = await forwarded_once(served, upstream, request(
        headers={"Forwarded": "for=6.6.6.6;proto=https"}, host=host))
    assert seen.values("forwarded") == [f"for=127.0.0.1;proto=http;{element}"]


async def test_forwarded_is_appended_behind_a_trusted_proxy(serve, raw_upstream):
    upstream = await raw_upstream()
    served = serve(route(upstream.url), forwarded=True, trusted_proxies=TRUSTED)
    seen = await forwarded_once(served, upstream, request(
        headers={"Forwarded": 'for=203.0.113.9;proto=https, for="[2001:db8::7]"'}))
    assert seen.values("forwarded") == [
        'for=203.0.113.9;proto=https, for="[2001:db8::7]", '
        "for=127.0.0.1;proto=http;host=shop.example"]


async def test_forwarded_quotes_and_brackets_an_ipv6_client(serve, raw_upstream):
    """RFC 7239 §6: an IPv6 node is bracketed, and ':' makes the value a quoted-string."""
    upstream = await raw_upstream()
    served = serve(route(upstream.url), forwarded=True, proxy="[::1]:0")
    seen = await forwarded_once(served, upstream, request())
    assert seen.values("forwarded") == ['for="[::1]";proto=http;host=shop.example']
    assert seen.values("x-forwarded-for") == ["::1"]


async def test_forwarded_is_not_sent_unless_configured(serve, raw_upstream):
    upstream = await raw_upstream()
    served = serve(route(upstream.url))
    seen = await forwarded_once(served, upstream, request())
    assert not seen.has("forwarded") and not seen.has("x-real-ip")


@pytest.mark.parametrize(("trusted", "sent", "expected"), [
    (False, {"X-Real-IP": "6.6.6.6", "X-Forwarded-For": "6.6.6.6"}, "127.0.0.1"),
    (True, {"X-Real-IP": "6.6.6.6", "X-Forwarded-For": "203.0.113.9"}, "203.0.113.9"),
])
async def test_x_real_ip_is_the_client_address_when_configured(serve, raw_upstream, trusted,
                                                                sent, expected):
    upstream = await raw_upstream()
    served = serve(route(upstream.url), x_real_ip=True,
                   trusted_proxies=TRUSTED if trusted else [])
    seen = await forwarded_once(served, upstream, request(headers=sent))
    assert seen.values("x-real-ip") == [expected]


async def test_connection_cannot_remove_a_header_lucid_sets(serve, raw_upstream):
    upstream = await raw_upstream()
    served = serve(route(upstream.url, "preserve_host = true"), forwarded=True, x_real_ip=True)
    listed = ("X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host, X-Request-ID, "
              "traceparent, Via, Host, Forwarded, X-Real-IP")
    seen = await forwarded_once(served, upstream, request(headers={
        "Connection": listed, "X-Request-ID": "req-1"}))
    for name in ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "via",
                 "traceparent", "forwarded", "x-real-ip"):
        assert len(seen.values(name)) == 1, name
    assert seen.values("host") == ["shop.example"]
    assert seen.values("x-request-id") == ["req-1"]


# --- identity from a verified JWT ---------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(**claims: object) -> str:
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"exp": int(time.time()) + 300, **claims}).encode())
    mac = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(mac)}"


def auth_route(upstream_url: str) -> str:
    return route(upstream_url, 'auth = { forward_claims = { sub = "X-User-Id", '
                 'tenant = "X-Tenant" } }') + f"""
[gateway.auth.issuers.main]
algorithms = ["HS256"]
secret = "{SECRET}"
"""


async def test_connection_cannot_remove_a_claim_header(serve, raw_upstream):
    upstream = await raw_upstream()
    served = serve(auth_route(upstream.url))
    seen = await forwarded_once(served, upstream, request(headers={
        "Authorization": f"Bearer {token(sub='alice', tenant='t1')}",
        "Connection": "X-User-Id, X-Tenant", "X-User-Id": "admin"}))
    assert seen.values("x-user-id") == ["alice"]
    assert seen.values("x-tenant") == ["t1"]


async def test_a_client_cannot_supply_a_claim_header_or_its_twin(serve, raw_upstream):
    upstream = await raw_upstream()
    served = serve(auth_route(upstream.url))
    forged = [("X-User-Id", "admin"), ("X_User_Id", "admin"), ("x-user_id", "admin"),
              ("X_Tenant", "t0"), ("X-Tenant", "t0")]
    seen = await forwarded_once(served, upstream, request(headers=[
        ("Authorization", f"Bearer {token(sub='alice')}"), *forged]))
    assert seen.values("x-user-id") == ["alice"]
    assert not seen.has("x-tenant")  # the token has no tenant claim: the client's is removed
    assert [name for name, _ in seen.headers if "_" in name] == []
    assert "admin" not in seen.head.decode("latin-1")
    assert "t0" not in seen.head.decode("latin-1")


# --- method overrides -----------------------------------------------------------------

OVERRIDES = ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"]


@pytest.mark.parametrize("header", OVERRIDES)
async def test_a_method_override_the_route_does_not_allow_is_refused(serve, raw_upstream,
                                                                     header):
    upstream = await raw_upstream()
    served = serve(route(upstream.url, 'methods = ["GET", "POST"]'))
    response = await served.client.send(request(method="POST", headers={header: "DELETE"}))
    assert response.status == 405
    assert response.header("allow") == "GET, POST"
    assert response.header("content-type") == "application/json"
    assert header.lower() in json.loads(response.body)["error"].lower()
    assert upstream.requests == []


async def test_a_method_override_the_route_allows_is_forwarded(serve, raw_upstream):
    upstream = await raw_upstream()
    served = serve(route(upstream.url, 'methods = ["POST", "PATCH"]'))
    seen = await forwarded_once(served, upstream, request(
        method="POST", headers={"X-HTTP-Method-Override": "patch"}))
    assert seen.values("x-http-method-override") == ["patch"]


async def test_a_method_override_on_a_route_for_every_method_is_forwarded(serve,
                                                                         raw_upstream):
    upstream = await raw_upstream()
    served = serve(route(upstream.url))
    seen = await forwarded_once(served, upstream, request(
        method="POST", headers={"X-HTTP-Method-Override": "DELETE"}))
    assert seen.values("x-http-method-override") == ["DELETE"]
