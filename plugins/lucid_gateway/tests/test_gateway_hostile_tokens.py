"""Hostile tokens on a route with ``auth``, end to end through real sockets: nesting
deep enough to crash a recursive parser, dates that are not dates, re-spelt base64,
and challenge parameters that must stay quoted-strings.

Every token here is signed by hand (HMAC over the exact segments sent), so a refusal
can only come from the parsing under test, never from a bad signature.
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

from lucid.testing_internal import challenge_params

SECRET = "s" * 40
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
ISSUER = f"""
[gateway.auth.issuers.main]
issuer = "https://issuer.test"
audiences = ["api"]
algorithms = ["HS256"]
secret = "{SECRET}"
"""


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mac(signing_input: str) -> str:
    return b64(hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest())


def signed(head: str, body: str) -> str:
    """A token over exactly these segments, however they are spelt."""
    return f"{head}.{body}.{mac(f'{head}.{body}')}"


def raw_token(payload: str, header: str = '{"alg":"HS256","typ":"JWT"}') -> str:
    return signed(b64(header.encode()), b64(payload.encode()))


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": "https://issuer.test", "sub": "alice", "aud": "api", "iat": now,
            "exp": now + 300, **extra}


def payload_with(name: str, literal: str) -> str:
    """The claims as JSON text with ``name`` set to a literal json.dumps cannot write
    (``1e400``, a 400-digit integer)."""
    body = {k: v for k, v in claims().items() if k != name}
    return json.dumps(body)[:-1] + f', "{name}": {literal}}}'


def config(upstream: str, auth: str = "{}") -> str:
    return f"""
[gateway.services.svc]
instances = ["{upstream}"]
{ISSUER}
[[gateway.routes]]
id = "api"
prefix = "/api"
service = "svc"
auth = {auth}
"""


async def call(gw: Any, token: str) -> tuple[int, dict[str, str], Any]:
    async with gw.session.get(gw.proxy_url + "/api/x",
                              headers={"Authorization": f"Bearer {token}"}) as r:
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.json(
            content_type=None)


async def test_deeply_nested_header_or_payload_is_a_401_without_a_traceback(
        lucid_upstream: Any, lucid_gateway: Any, caplog: pytest.LogCaptureFixture) -> None:
    """1,000 levels made the stdlib parser raise RecursionError: a 500 and a logged
    traceback. 40 levels parse, but nest deeper than any claim set does (32)."""
    upstream = await lucid_upstream()
    gw = await lucid_gateway(config(upstream.url))
    fine = json.dumps(claims(deep=json.loads("[" * 20 + "]" * 20)))
    assert (await call(gw, raw_token(fine)))[0] == 200
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    for depth in (40, 1_000):
        nested = "[" * depth + "]" * depth
        for token in (raw_token(json.dumps(claims())[:-1] + f', "x": {nested}}}'),
                      raw_token(json.dumps(claims()),
                                header=f'{{"alg":"HS256","typ":"JWT","x":{nested}}}')):
            status, _, body = await call(gw, token)
            assert (status, body["error"]) == (401, "malformed token"), depth
    assert len(upstream.requests) == 1
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert "RecursionError" not in caplog.text
    refused = [r.getMessage() for r in caplog.records if "malformed bearer token" in
               r.getMessage()]
    assert len(refused) == 4 and all("nests deeper than 32 levels" in m for m in refused)


NOT_JSON = "malformed token"  # NaN, Infinity and 1e400 are no JSON numbers (RFC 8259 §6)


@pytest.mark.parametrize("name, literal, error", [
    ("exp", "NaN", NOT_JSON),
    ("exp", "Infinity", NOT_JSON),
    ("exp", "1e400", NOT_JSON),
    ("exp", "1" + "0" * 400, "claim 'exp' is not a date"),
    ("exp", "null", "claim 'exp' must be a number"),
    ("exp", "253402300800", "claim 'exp' is not a date"),  # year 10000
    ("nbf", "NaN", NOT_JSON),
    ("nbf", "-Infinity", NOT_JSON),
    ("nbf", "-1e400", NOT_JSON),
    ("iat", "-1", "claim 'iat' is not a date"),
    ("iat", "1e300", "claim 'iat' is not a date"),
])
async def test_dates_that_are_not_finite_numbers_in_range_are_refused(
        lucid_upstream: Any, lucid_gateway: Any, name: str, literal: str, error: str) -> None:
    """NaN compares false with everything, so a NaN ``exp`` never expired; infinities
    and 1e400 (which parses as one) were accepted; a 400-digit integer or null was a
    500."""
    upstream = await lucid_upstream()
    gw = await lucid_gateway(config(upstream.url))
    status, headers, body = await call(gw, raw_token(payload_with(name, literal)))
    assert (status, body["error"]) == (401, error)
    assert 'error="invalid_token"' in headers["www-authenticate"]
    assert not upstream.requests
    # the far future is a date: a token that expires in 2100 is fine
    assert (await call(gw, raw_token(payload_with("exp", "4102444800"))))[0] == 200


def with_symbol(build: Any, segment: int) -> str:
    """A token built by ``build(n)`` whose segment number ``segment`` contains a ``-``
    or ``_`` (the characters base64url has where base64 has ``+`` and ``/``)."""
    for n in range(1000):
        token = build(n)
        if re.search("[-_]", token.split(".")[segment]):
            return str(token)
    raise AssertionError("no segment with - or _ in 1000 tries")


async def test_only_canonical_base64url_segments_are_accepted(
        lucid_upstream: Any, lucid_gateway: Any) -> None:
    """RFC 7515 §2: base64url, no padding. Python's decoder also takes padding, the
    standard alphabet, junk characters and non-zero unused bits, so one signature had
    many spellings; each spelling below is signed as sent and was accepted."""
    upstream = await lucid_upstream()
    gw = await lucid_gateway(config(upstream.url))
    good = raw_token(json.dumps(claims()))
    assert (await call(gw, good))[0] == 200
    head, body, sig = good.split(".")
    assert len(sig) % 4 == 3  # 32 bytes: 43 characters, 2 unused bits in the last one

    def respelt(segment: str) -> str:
        return segment.replace("-", "+").replace("_", "/")

    def padded_payload() -> str:
        for n in range(4):
            text = json.dumps(claims(pad="x" * n))
            if len(text) % 3:
                return signed(head, base64.urlsafe_b64encode(text.encode()).decode())
        raise AssertionError("unreachable")

    plus_sig = with_symbol(lambda n: raw_token(json.dumps(claims(n=n))), 2)
    plus_body = with_symbol(lambda n: raw_token(json.dumps(claims(sub="~?>" * (n + 1)))), 1)
    h, b, s = plus_body.split(".")
    last = ALPHABET.index(sig[-1])
    variants = {
        "padded signature": f"{head}.{body}.{sig}=",
        "padded payload": padded_payload(),
        "standard alphabet in the signature": ".".join(
            [*plus_sig.split(".")[:2], respelt(plus_sig.split(".")[2])]),
        "standard alphabet in the payload": signed(h, respelt(b)),
        "non-zero unused bits": f"{head}.{body}.{sig[:-1]}{ALPHABET[last + 1]}",
        "a character outside the alphabet": f"{head}.{body}.{sig[:10]}*{sig[10:]}",
        "a space inside the signature": f"{head}.{body}.{sig[:10]} {sig[10:]}",
    }
    assert "=" in variants["padded payload"].split(".")[1]
    for name, token in variants.items():
        status, _, answer = await call(gw, token)
        assert (status, answer["error"]) == (401, "malformed token"), name
    assert len(upstream.requests) == 1




async def test_challenge_parameters_are_quoted_strings(
        lucid_upstream: Any, lucid_gateway: Any) -> None:
    """RFC 9110 §5.6.4: inside a quoted-string ``"`` and ``\\`` are backslash-escaped. A
    role or scope from the config with a quote in it cut the challenge short."""
    upstream = await lucid_upstream()
    gw = await lucid_gateway(config(
        upstream.url, r"""{ roles = ['ops"admin', 'back\slash'], scopes = ['a"b'] }"""))
    status, headers, body = await call(gw, raw_token(json.dumps(claims(roles=["user"]))))
    assert status == 403
    assert challenge_params(headers["www-authenticate"]) == {
        "realm": "lucid", "error": "insufficient_scope",
        "error_description": body["error"]}
    assert body["error"] == 'one of the roles ops"admin, back\\slash is required'
    token = raw_token(json.dumps(claims(roles=["back\\slash"])))
    status, headers, body = await call(gw, token)
    assert status == 403
    assert challenge_params(headers["www-authenticate"]) == {
        "realm": "lucid", "error": "insufficient_scope",
        "error_description": 'missing scope a"b', "scope": 'a"b'}
    status, headers, body = await call(gw, raw_token(payload_with("exp", "-5")))
    assert challenge_params(headers["www-authenticate"])["error_description"] == (
        "claim 'exp' is not a date")
