"""JWT authentication and authorization per route, end to end through real sockets.

Tokens are signed with joserfc (and, for the forged ones, by hand with
``cryptography``/``hmac``), never with PyJWT, which the gateway verifies with: the two
cannot agree on a mistake.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from joserfc import jwt as jose_jwt
from joserfc.jwk import ECKey, OctKey, OKPKey, RSAKey
from yarl import URL

from lucid.config import ConfigError
from lucid.testing import wait_until

pytestmark = pytest.mark.filterwarnings("ignore:EdDSA is deprecated")

SECRET = "s" * 40
ALL_ALGS = ["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "ES256", "ES384",
            "EdDSA"]


def sign(claims: dict[str, Any], key: Any, alg: str, kid: str | None = None) -> str:
    header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    return jose_jwt.encode(header, claims, key, algorithms=[alg])


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_hs256(claims: dict[str, Any], secret: bytes, alg: str = "HS256") -> str:
    """An HMAC token made by hand (used for forgeries joserfc rightly refuses to make)."""
    head = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(mac)}"


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": "https://issuer.test", "sub": "alice", "aud": "api", "iat": now,
            "exp": now + 300, **extra}


def keys_for(alg: str) -> Any:
    if alg.startswith("HS"):
        return OctKey.import_key(SECRET)
    if alg.startswith(("RS", "PS")):
        return RSAKey.generate_key(2048)
    if alg == "ES256":
        return ECKey.generate_key("P-256")
    if alg == "ES384":
        return ECKey.generate_key("P-384")
    return OKPKey.generate_key("Ed25519")


class JwksServer:
    """A JWKS endpoint on loopback whose key set the test can rotate."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0

    def publish(self, *pairs: tuple[str, Any]) -> None:
        self.keys = [{**key.as_dict(private=False), "kid": kid, "use": "sig"}
                     for kid, key in pairs]

    async def handler(self, request: web.Request) -> web.StreamResponse:
        self.fetches += 1
        return web.json_response({"keys": self.keys})


def route_toml(upstream: str, auth: str, issuers: str, extra_route: str = "") -> str:
    return f"""
[gateway.services.svc]
instances = ["{upstream}"]

{issuers}

[[gateway.routes]]
id = "api"
prefix = "/api"
service = "svc"
auth = {auth}
{extra_route}

[[gateway.routes]]
id = "open"
prefix = "/open"
service = "svc"
"""


HS_ISSUER = f"""
[gateway.auth.issuers.main]
issuer = "https://issuer.test"
audiences = ["api"]
algorithms = ["HS256"]
secret = "{SECRET}"
"""


async def call(gw: Any, path: str = "/api/x", token: str | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    url = URL(gw.proxy_url + path, encoded=True)  # the query goes out exactly as written
    async with gw.session.get(url, headers=sent) as r:
        body = await r.json(content_type=None)
        return r.status, {k.lower(): v for k, v in r.headers.items()}, body


async def test_valid_hs256_token_passes_and_claims_reach_the_upstream(
        lucid_upstream: Any, lucid_gateway: Any) -> None:
    upstream = await lucid_upstream()
    gw = await lucid_gateway(route_toml(
        upstream.url, '{ forward_claims = { sub = "X-User" }, strip_authorization = true }',
        HS_ISSUER))
    token = sign(claims(), OctKey.import_key(SECRET), "HS256")
    status, _, body = await call(gw, token=token, headers={"X-User": "mallory"})
    assert status == 200
    assert body["headers"]["x-user"] == "alice"
    assert "authorization" not in body["headers"]
    # a route without auth is untouched, Authorization included
    status, _, body = await call(gw, "/open/x", token="anything")
    assert status == 200 and body["headers"]["authorization"] == "Bearer anything"


@pytest.mark.parametrize(("header", "why"), [
    ("Connection", "removes or sets itself"),
    ("Proxy-Authorization", "removes or sets itself"),
    ("X-Forwarded-For", "removes or sets itself"),
    ("x-request-id", "removes or sets itself"),
    ("Host", "removes or sets itself"),
    ("X-A-B-C-D-E-F-G-H-I", "at most 8 '-'"),
])
async def test_forward_claims_cannot_name_a_header_the_proxy_removes_or_sets(
        lucid_upstream: Any, lucid_gateway: Any, header: str, why: str) -> None:
    """Such a claim header would never reach the upstream: a config error, not a surprise."""
    upstream = await lucid_upstream()
    with pytest.raises(ConfigError, match=why):
        await lucid_gateway(route_toml(
            upstream.url, f'{{ forward_claims = {{ sub = "{header}" }} }}', HS_ISSUER))


async def test_identity_is_set_for_later_hooks(lucid_upstream: Any, lucid_gateway: Any) -> None:
    upstream = await lucid_upstream()
    gw = await lucid_gateway(route_toml(upstream.url, "{}", HS_ISSUER))
    seen: list[Any] = []

    from lucid.plugins import Hooks, hookimpl

    class Spy:  # a later plugin, as a rate limiter keyed by identity would be
        @hookimpl
        def lucid_observe_exchange(self, exchange: Any) -> None:
            seen.append(exchange.identity)

    gw.runtime.plugin_set.pm.register(Spy(), name="spy")
    gw.runtime.hooks = Hooks(gw.runtime.plugin_set.pm)
    token = sign(claims(roles=["x"]), OctKey.import_key(SECRET), "HS256")
    assert (await call(gw, token=token))[0] == 200
    await wait_until(lambda: bool(seen), message="the observer to run")
    assert seen[0]["sub"] == "alice" and seen[0]["roles"] == ["x"]


async def test_missing_and_invalid_tokens_get_rfc6750_401s(
        lucid_upstream: Any, lucid_gateway: Any) -> None:
    upstream = await lucid_upstream()
    gw = await lucid_gateway(route_toml(upstream.url, "{}", HS_ISSUER))
    status, headers, body = await call(gw)
    assert status == 401
    assert headers["www-authenticate"] == 'Bearer realm="lucid"'  # no error code: no token
    key = OctKey.import_key(SECRET)
    cases = {
        "token expired": sign(claims(exp=int(time.time()) - 120), key, "HS256"),
        "token not yet valid": sign(claims(nbf=int(time.time()) + 120), key, "HS256"),
        "token issued in the future": sign(claims(iat=int(time.time()) + 120), key, "HS256"),
        "token audience is not accepted": sign(claims(aud="other"), key, "HS256"),
        "token issuer is not trusted here": sign(claims(iss="https://evil.test"), key, "HS256"),
        "missing required claim 'exp'": sign(
            {k: v for k, v in claims().items() if k != "exp"}, key, "HS256"),
        "signature verification failed": sign(claims(), OctKey.import_key("x" * 40), "HS256"),
        "malformed token": "not.a-token",
    }
    for description, token in cases.items():
        status, headers, body = await call(gw, token=token)
        assert status == 401, description
        assert headers["www-authenticate"] == (
            f'Bearer realm="lucid", error="invalid_token", error_description="{description}"')
        assert body["error"] == description
        assert SECRET not in json.dumps(body) and "Traceback" not in json.dumps(body)
    status, headers, _ = await call(gw, headers={"Authorization": "Basic YTpi"})
    assert status == 401 and 'error="invalid_request"' in headers["www-authenticate"]
    assert not upstream.requests


async def test_leeway_accepts_small_clock_skew(lucid_upstream: Any, lucid_gateway: Any) -> None:
    upstream = await lucid_upstream()
    gw = await lucid_gateway(route_toml(upstream.url, "{}", HS_ISSUER + 'leeway = "60s"\n'))
    key = OctKey.import_key(SECRET)
    now = int(time.time())
    assert (await call(gw, token=sign(claims(exp=now - 20), key, "HS256")))[0] == 200
    assert (await call(gw, token=sign(claims(nbf=now + 20), key, "HS256")))[0] == 200
    assert (await call(gw, token=sign(claims(exp=now - 120), key, "HS256")))[0] == 401


async def test_none_and_algorithms_outside_the_allow_list_are_refused(
        lucid_upstream: Any, lucid_gateway: Any) -> None:
    upstream = await lucid_upstream()
    gw = await lucid_gateway(route_toml(upstream.url, "{}", HS_ISSUER))
    head = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    unsigned = f"{head}.{b64(json.dumps(claims()).encode())}."
    status, _, body = await call(gw, token=unsigned)
    assert status == 401 and body["error"] == "unsigned tokens are not accepted"
    hs512 = sign(claims(), OctKey.import_key(SECRET), "HS512")
    status, _, body = await call(gw, token=hs512)
    assert status == 401 and body["error"] == "algorithm HS512 is not allowed"
    with pytest.raises(ConfigError, match="'none' is never accepted"):
        await lucid_gateway(route_toml(upstream.url, "{}", HS_ISSUER.replace(
            '["HS256"]', '["HS256", "none"]')))


async def test_hs_rs_key_confusion_is_refused(
        lucid_upstream: Any, lucid_gateway: Any, tmp_path: Any) -> None:
    """The classic attack: an HS256 token whose HMAC key is the issuer's RSA public key."""
    upstream = await lucid_upstream()
    rsa = RSAKey.generate_key(2048)
    pem = rsa.get_op_key("verify").public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "rsa.pem").write_bytes(pem)
    issuers = f"""
[gateway.auth.issuers.main]
issuer = "https://issuer.test"
algorithms = ["RS256", "HS256"]
secret = "{SECRET}"
public_key_file = "{tmp_path / 'rsa.pem'}"
"""
    gw = await lucid_gateway(route_toml(upstream.url, "{}", issuers))
    assert (await call(gw, token=sign(claims(), rsa, "RS256")))[0] == 200
    forged = hand_hs256(claims(), pem)
    status, _, body = await call(gw, token=forged)
    assert status == 401 and body["error"] == "signature verification failed"
    # and an RS-only issuer has no HMAC key at all
    rs_only = issuers.replace('["RS256", "HS256"]', '["RS256"]').replace(
        f'secret = "{SECRET}"\n', "")
    gw2 = await lucid_gateway(route_toml(upstream.url, "{}", rs_only))
    status, _, body = await call(gw2, token=forged)
    assert status == 401 and body["error"] == "algorithm HS256 is not allowed"


@pytest.mark.parametrize("alg", ALL_ALGS)
async def test_every_supported_algorithm_via_jwks(
        alg: str, lucid_upstream: Any, lucid_gateway: Any) -> None:
    upstream = await lucid_upstream()
    jwks = JwksServer()
    key = keys_for(alg)
    if alg.startswith("HS"):
        issuers = HS_ISSUER.replace('["HS256"]', f'["{alg}"]')
    else:
        jwks.publish(("k1", key))
        server = await lucid_upstream(jwks.handler)
        issuers = f"""
[gateway.auth.issuers.main]
issuer = "https://issuer.test"
audiences = ["api"]
algorithms = ["{alg}"]
jwks_url = "{server.url}/jwks.json"
"""
    gw = await lucid_gateway(route_toml(upstream.url, "{}", issuers))
    token = sign(claims(), key, alg, kid="k1")
    status, _, body = await call(gw, token=token)
    assert status == 200, body
    # the same claims signed by another key of the same type are refused
    status, _, _ = await call(gw, token=sign(claims(), keys_for(alg) if not alg.startswith(
        "HS") else OctKey.import_key("z" * 40), alg, kid="k1"))
    assert status == 401


async def test_jwks_rotation_without_restart(lucid_upstream: Any, lucid_gateway: Any) -> None:
    upstream = await lucid_upstream()
    jwks = JwksServer()
    old, new = ECKey.generate_key("P-256"), ECKey.generate_key("P-256")
    jwks.publish(("old", old))
    server = await lucid_upstream(jwks.handler)
    issuers = f"""
[gateway.auth.issuers.main]
issuer = "https://issuer.test"
algorithms = ["ES256"]
jwks_url = "{server.url}/jwks.json"
jwks_refresh_interval = 0
"""
    gw = await lucid_gateway(route_toml(upstream.url, "{}", issuers))
    await wait_until(lambda: jwks.fetches >= 1, message="the JWKS to be prefetched")
    assert (await call(gw, token=sign(claims(), old, "ES256", "old")))[0] == 200
    assert (await call(gw, token=sign(claims(n=2), old, "ES256", "old")))[0] == 200
    assert jwks.fetches == 1  # the key stays cached
    jwks.publish(("new", new))  # rotation: the old key is withdrawn
    status, _, body = await call(gw, token=sign(claims(), new, "ES256", "new"))
    assert status == 200, body
    assert jwks.fetches == 2  # the unknown kid caused one refetch
    status, _, body = await call(gw, token=sign(claims(n=3), old, "ES256", "old"))
    assert status == 401 and body["error"] == "no key matches the token's key id and algorithm"


async def test_unknown_kid_refresh_is_rate_limited(
        lucid_upstream: Any, lucid_gateway: Any) -> None:
    upstream = await lucid_upstream()
    jwks = JwksServer()
    key = ECKey.generate_key("P-256")
    jwks.publish(("k1", key))
    server = await lucid_upstream(jwks.handler)
    issuers = f"""
[gateway.auth.issuers.main]
issuer = "https://issuer.test"
algorithms = ["ES256"]
jwks_url = "{server.url}/jwks.json"
jwks_refresh_interval = "1h"
"""
    gw = await lucid_gateway(route_toml(upstream.url, "{}", issuers))
    await wait_until(lambda: jwks.fetches >= 1, message="the JWKS to be prefetched")
    for n in range(5):  # random kids must not make the gateway hammer the JWKS server
        status, _, _ = await call(gw, token=sign(claims(n=n), key, "ES256", f"bogus{n}"))
        assert status == 401
    assert jwks.fetches == 1
    assert (await call(gw, token=sign(claims(), key, "ES256", "k1")))[0] == 200


async def test_first_request_waits_for_the_jwks_when_it_is_not_loaded(
        lucid_upstream: Any, lucid_gateway: Any) -> None:
    upstream = await lucid_upstream()
    jwks = JwksServer()
    key = RSAKey.generate_key(2048)
    server = await lucid_upstream(jwks.handler)  # serves an empty set at first
    issuers = f"""
[gateway.auth.issuers.main]
algorithms = ["RS256"]
jwks_url = "{server.url}/jwks.json"
jwks_refresh_interval = 0
"""
    gw = await lucid_gateway(route_toml(upstream.url, "{}", issuers))
    jwks.publish(("r1", key))
    status, _, body = await call(gw, token=sign(claims(), key, "RS256", "r1"))
    assert status == 200, body


async def test_several_issuers_and_per_route_issuer_lists(
        lucid_upstream: Any, lucid_gateway: Any) -> None:
    upstream = await lucid_upstream()
    jwks = JwksServer()
    partner = ECKey.generate_key("P-256")
    jwks.publish(("p1", partner))
    server = await lucid_upstream(jwks.handler)
    issuers = HS_ISSUER + f"""
[gateway.auth.issuers.partner]
issuer = "https://partner.test"
algorithms = ["ES256"]
jwks_url = "{server.url}/jwks.json"
"""
    gw = await lucid_gateway(route_toml(upstream.url, "{}", issuers) + """
[[gateway.routes]]
id = "internal"
prefix = "/internal"
service = "svc"
auth = { issuers = ["main"] }
""")
    main_token = sign(claims(), OctKey.import_key(SECRET), "HS256")
    partner_token = sign(claims(iss="https://partner.test"), partner, "ES256", "p1")
    assert (await call(gw, token=main_token))[0] == 200
    assert (await call(gw, token=partner_token))[0] == 200
    assert (await call(gw, "/internal/x", token=main_token))[0] == 200
    status, _, body = await call(gw, "/internal/x", token=partner_token)
    assert status == 401 and body["error"] == "token issuer is not trusted here"
    with pytest.raises(ConfigError, match="no such issuer"):
        await lucid_gateway(route_toml(upstream.url, '{ issuers = ["nope"] }', issuers))


async def test_token_from_cookie_or_query(lucid_upstream: Any, lucid_gateway: Any) -> None:
    upstream = await lucid_upstream()
    gw = await lucid_gateway(route_toml(
        upstream.url, '{ cookie = "session", query = "access_token" }', HS_ISSUER))
    token = sign(claims(), OctKey.import_key(SECRET), "HS256")
    assert (await call(gw, headers={"Cookie": f"theme=dark; session={token}"}))[0] == 200
    assert (await call(gw, f"/api/x?a=1&access_token={token}"))[0] == 200
    assert (await call(gw, "/api/x?access_token=nope"))[0] == 401
    assert (await call(gw, headers={"Cookie": "session="}))[0] == 401


async def test_a_token_from_a_cookie_or_query_argument_is_not_forwarded(
        lucid_upstream: Any, lucid_gateway: Any) -> None:
    """The cookie or argument that carried the token is removed before the upstream
    call; every other cookie and argument arrives as the client sent it, in order."""
    upstream = await lucid_upstream()
    gw = await lucid_gateway(route_toml(
        upstream.url, '{ cookie = "session", query = "access_token" }', HS_ISSUER))
    token = sign(claims(), OctKey.import_key(SECRET), "HS256")

    status, _, body = await call(gw, headers={"Cookie": f"theme=dark; session={token}; lang=en"})
    assert status == 200
    assert body["headers"]["cookie"] == "theme=dark; lang=en"
    assert token not in json.dumps(body)
    status, _, body = await call(gw, headers={"Cookie": f"session={token}"})
    assert status == 200 and "cookie" not in body["headers"]

    query = f"b=2&access_token={token}&a=%2F+x&access%5Ftoken=again&z"
    status, _, body = await call(gw, f"/api/x?{query}")
    assert status == 200
    assert body["query"] == "b=2&a=%2F+x&z"
    assert token not in json.dumps(body)
    status, _, body = await call(gw, f"/api/x?access_token={token}")
    assert status == 200 and body["query"] == "" and body["path"] == "/api/x"

    # From the Authorization header the token is forwarded (strip_authorization is off),
    # and a cookie or argument of the configured names that did not carry it stays.
    status, _, body = await call(gw, "/api/x?access_token=other", token=token,
                                 headers={"Cookie": "session=other"})
    assert status == 200
    assert body["headers"]["authorization"] == f"Bearer {token}"
    assert body["headers"]["cookie"] == "session=other"
    assert body["query"] == "access_token=other"


async def test_strip_authorization_also_hides_a_header_token(
        lucid_upstream: Any, lucid_gateway: Any) -> None:
    upstream = await lucid_upstream()
    gw = await lucid_gateway(route_toml(
        upstream.url, '{ cookie = "session", strip_authorization = true }', HS_ISSUER))
    token = sign(claims(), OctKey.import_key(SECRET), "HS256")
    status, _, body = await call(gw, token=token, headers={"Cookie": "theme=dark"})
    assert status == 200 and "authorization" not in body["headers"]
    assert body["headers"]["cookie"] == "theme=dark"
    # a non-Bearer Authorization next to a cookie token is the upstream's own: it is
    # still removed on this route, and the token cookie too
    status, _, body = await call(gw, headers={"Authorization": "Basic dXNlcjpwdw==",
                                              "Cookie": f"session={token}; theme=dark"})
    assert status == 200 and "authorization" not in body["headers"]
    assert body["headers"]["cookie"] == "theme=dark"


def test_credential_removal_helpers_keep_everything_else() -> None:
    from lucid_gateway.auth import without_cookie, without_query_arg

    assert without_cookie("a=1; t=x; b=2;t=y", "t") == "a=1; b=2"
    assert without_cookie("t=x", "t") == ""
    assert without_cookie("tt=1; t=", "t") == "tt=1"
    assert without_query_arg("t=1&a=%20&t=2&b", "t") == "a=%20&b"
    assert without_query_arg("x+y=1&x%20y=2&xy=3", "x y") == "xy=3"
    assert without_query_arg("a=1&&b=2", "t") == "a=1&&b=2"


async def test_roles_and_scopes_answer_403(lucid_upstream: Any, lucid_gateway: Any) -> None:
    upstream = await lucid_upstream()
    gw = await lucid_gateway(route_toml(
        upstream.url, '{ roles = ["admin", "ops"], roles_claim = "realm.roles", '
        'scopes = ["orders:read", "orders:write"] }', HS_ISSUER))
    key = OctKey.import_key(SECRET)
    good = sign(claims(realm={"roles": ["ops"]}, scope="orders:read orders:write x"), key,
                "HS256")
    assert (await call(gw, token=good))[0] == 200
    no_role = sign(claims(realm={"roles": ["user"]}, scope="orders:read orders:write"), key,
                   "HS256")
    status, headers, body = await call(gw, token=no_role)
    assert status == 403 and 'error="insufficient_scope"' in headers["www-authenticate"]
    assert body["error"] == "one of the roles admin, ops is required"
    no_scope = sign(claims(realm={"roles": ["admin"]}, scope=["orders:read"]), key, "HS256")
    status, headers, body = await call(gw, token=no_scope)
    assert status == 403 and body["error"] == "missing scope orders:write"
    assert 'scope="orders:read orders:write"' in headers["www-authenticate"]


async def test_hostile_header_values_are_not_echoed(lucid_upstream: Any, lucid_gateway: Any
                                                    ) -> None:
    upstream = await lucid_upstream()
    gw = await lucid_gateway(route_toml(upstream.url, "{}", HS_ISSUER))
    head = b64(json.dumps({"alg": 'HS256", error="x\r\nSet-Cookie: a=b', "typ": "JWT"}
                          ).encode())
    token = f"{head}.{b64(json.dumps(claims()).encode())}.{b64(b'sig')}"
    status, headers, body = await call(gw, token=token)
    assert status == 401 and body["error"] == "algorithm not allowed"
    assert "set-cookie" not in headers
