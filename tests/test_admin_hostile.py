"""Hostile input to the admin API, through real sockets: admin tokens nested deep
enough to crash a recursive parser, dates that are not dates, re-spelt base64, a
challenge whose description has quotes, and write bodies that are not UTF-8, nest
100,000 deep or hold what JSON does not have. Each is a 4xx, never a 500, and a
refused write changes nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import time
from typing import Any

import pytest

from lucid.testing import RunningGateway
from lucid.testing_internal import challenge_params

SECRET = "a" * 48  # tests/conftest.py: ADMIN_SECRET
CONFIG = f"""
[server]
admin_secret = "{SECRET}"

[gateway.services.svc]
instances = ["http://127.0.0.1:9"]

[[gateway.routes]]
prefix = "/static"
service = "svc"
"""


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(head: str, body: str) -> str:
    mac = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(mac)}"


def admin_claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": "lucid-admin", "sub": "ops", "role": "admin", "iat": now,
            "exp": now + 600, **extra}


def token_of(payload: str, header: str = '{"alg":"HS256","typ":"JWT"}') -> str:
    return signed(b64(header.encode()), b64(payload.encode()))


def payload_with(name: str, literal: str) -> str:
    body = {k: v for k, v in admin_claims().items() if k != name}
    return json.dumps(body)[:-1] + f', "{name}": {literal}}}'


async def status_of(gw: RunningGateway, token: str, path: str = "/gateway/status"
                    ) -> tuple[int, dict[str, str], Any]:
    async with gw.session.get(gw.admin_url + path,
                              headers={"Authorization": f"Bearer {token}"}) as r:
        return r.status, dict(r.headers), await r.json()


async def test_a_deeply_nested_admin_token_is_a_401_without_a_traceback(
        lucid_gateway: Any, caplog: pytest.LogCaptureFixture) -> None:
    gw = await lucid_gateway(CONFIG)
    assert (await status_of(gw, token_of(json.dumps(admin_claims()))))[0] == 200
    caplog.set_level(logging.DEBUG)
    nested = "[" * 1000 + "]" * 1000
    for token in (token_of(json.dumps(admin_claims())[:-1] + f', "x": {nested}}}'),
                  token_of(json.dumps(admin_claims()),
                           header=f'{{"alg":"HS256","typ":"JWT","x":{nested}}}')):
        status, headers, body = await status_of(gw, token)
        assert status == 401 and body["error"] == "invalid admin token: malformed token"
        assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert "RecursionError" not in caplog.text
    refused = [r.getMessage() for r in caplog.records if "malformed admin token" in
               r.getMessage()]
    assert len(refused) == 2 and all("nests deeper than" in m for m in refused)


@pytest.mark.parametrize("name, literal", [
    ("exp", "Infinity"), ("exp", "1e400"), ("exp", "NaN"), ("exp", "1" + "0" * 400),
    ("exp", "253402300800"), ("iat", "-Infinity"), ("nbf", "NaN"), ("nbf", "-1"),
])
async def test_admin_token_dates_must_be_finite_and_in_range(
        lucid_gateway: Any, name: str, literal: str) -> None:
    """PyJWT turns ``exp`` into an int: an infinity raised OverflowError (a 500), and a
    400-digit integer or year 10000 was a token that never expires."""
    gw = await lucid_gateway(CONFIG)
    status, headers, body = await status_of(gw, token_of(payload_with(name, literal)))
    assert status == 401, body
    assert body["error"] in ("invalid admin token: malformed token",
                             f"invalid admin token: claim '{name}' is not a date")


async def test_admin_tokens_are_canonical_base64url(lucid_gateway: Any) -> None:
    """PyJWT decodes padding, the standard alphabet and junk characters alike."""
    gw = await lucid_gateway(CONFIG)
    for n in range(1000):
        good = token_of(json.dumps(admin_claims(n=n)))
        if re.search("[-_]", good.rsplit(".", 1)[1]):
            break
    assert (await status_of(gw, good))[0] == 200
    head, body, sig = good.split(".")
    for token in (f"{good}=", f"{head}.{body}.{sig.replace('-', '+').replace('_', '/')}",
                  f"{head}.{body}.{sig[:5]}*{sig[5:]}"):
        status, _, answer = await status_of(gw, token)
        assert (status, answer["error"]) == (401, "invalid admin token: malformed token")




async def test_the_admin_challenge_quotes_its_description(lucid_gateway: Any) -> None:
    """RFC 9110 §5.6.4: PyJWT's message has quotes in it, which ended the
    quoted-string early."""
    gw = await lucid_gateway(CONFIG)
    no_exp = token_of(json.dumps({k: v for k, v in admin_claims().items() if k != "exp"}))
    status, headers, body = await status_of(gw, no_exp)
    assert status == 401
    assert headers["WWW-Authenticate"] == (
        'Bearer realm="lucid-admin", error="invalid_token", '
        'error_description="Token is missing the \\"exp\\" claim"')
    assert challenge_params(headers["WWW-Authenticate"]) == {
        "realm": "lucid-admin", "error": "invalid_token",
        "error_description": 'Token is missing the "exp" claim'}
    assert body["error"] == 'invalid admin token: Token is missing the "exp" claim'


HOSTILE_BODIES = {
    "not UTF-8": (b'{"id": "\xff\xfe"}', "is not UTF-8"),
    "100,000 deep": (b"[" * 100_000 + b"]" * 100_000, "nests deeper than 32 levels"),
    "40 deep": (b'{"id": "x", "metadata": ' + b"[" * 40 + b"]" * 40 + b"}",
                "nests deeper than 32 levels"),
    "NaN": (b'{"id": "x", "weight": NaN}', "NaN, which is not a JSON number"),
    "1e400": (b'{"id": "x", "threshold": 1e400}', "a number too large for a double"),
    "lone surrogate": (b'{"id": "\\ud800"}', "unpaired surrogate"),
}
# What the admin API holds: none of it may change when a write is refused.
STATE = ("/gateway/route", "/gateway/routes", "/circuitbreaker/circuits",
         "/loadbalancer/pools", "/ratelimiter/limits", "/monitoring/alerts",
         "/registry/services")


async def snapshot(gw: RunningGateway, headers: dict[str, str]) -> dict[str, Any]:
    state = {}
    for path in STATE:
        async with gw.session.get(gw.admin_url + path, headers=headers) as r:
            assert r.status == 200, path
            state[path] = await r.json()
    async with gw.session.get(gw.admin_url + "/gateway/status", headers=headers) as r:
        state["generation"] = (await r.json())["generation"]
    return state


async def test_every_write_endpoint_refuses_a_malformed_body_and_changes_nothing(
        lucid_gateway: Any, every_plugin: Any) -> None:
    """A body that is not UTF-8 raised UnicodeDecodeError and one nested 100,000 deep
    RecursionError in 17 endpoints' schema validation (500s); endpoints that read no
    body carried out the write. Every write endpoint the OpenAPI document lists, with
    every path parameter naming an object that exists, so a write that got through
    would show."""
    text, token, created, parameters = every_plugin
    gw = await lucid_gateway(text)
    headers = {"Authorization": f"Bearer {token}"}
    for path, body in created:
        async with gw.session.post(gw.admin_url + path, json=body, headers=headers) as r:
            assert r.status == 201, (path, await r.text())
    async with gw.session.get(gw.admin_url + "/openapi.json") as r:
        document = await r.json()
    writes = [(method.upper(), path) for path, operations in document["paths"].items()
              for method in operations if method.upper() in ("POST", "PUT", "PATCH", "DELETE")]
    assert len(writes) >= 27, writes
    before = await snapshot(gw, headers)
    for method, path in writes:
        url = gw.admin_url + re.sub(r"\{(\w+)\}", lambda m: parameters[m.group(1)], path)
        for name, (body, message) in HOSTILE_BODIES.items():
            async with gw.session.request(method, url, data=body, headers={
                    **headers, "Content-Type": "application/json"}) as r:
                answer = await r.json()
                assert r.status == 422, (method, path, name, answer)
            field = answer["fields"][0]
            assert field["field"] == "body" and message in field["message"], (path, name)
            assert field["message"].startswith("the request body ")
    assert await snapshot(gw, headers) == before
