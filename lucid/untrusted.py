"""Parsing what a client sent, where the client may be hostile.

Shared by the route auth (``lucid_gateway.auth``) and the admin API (tokens and
request bodies), so both refuse the same things the same way:

- JSON nested deeper than :data:`MAX_DEPTH`: the stdlib parser raises
  ``RecursionError`` near 1,000 levels, and code that walks a parsed value (redaction,
  ``json.dumps`` of a claim) would fail sooner; no real claim set or admin payload
  nests more than a handful of levels;
- strings with an unpaired UTF-16 surrogate escape (``"\\ud800"``): they cannot be
  encoded as UTF-8, so storing or echoing them would fail later (RFC 8259 §8.2);
- ``NaN``, ``Infinity`` and numbers that overflow to them: not JSON (RFC 8259 §6),
  and every comparison with NaN is false, so a NaN ``exp`` never expires;
- a JWS compact token in any spelling but the canonical base64url one (RFC 7515 §2:
  no padding, ``-``/``_`` not ``+``/``/``, unused trailing bits zero): one token has
  one spelling, so a cache or deny list keyed by the token string cannot be dodged
  by re-spelling the same signature.
"""

from __future__ import annotations

import base64
import json
import math
import re
from typing import Any

MAX_DEPTH = 32

# RFC 7519 §2 NumericDate, bounded to what every datetime library can represent
# (year 9999): anything later, negative or non-finite is not a date.
MAX_NUMERIC_DATE = 253402300799

# An empty signature parses, so an ``alg: none`` token is refused by name, not as
# malformed; no key verifies it.
_TOKEN = re.compile(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]*)")
# RFC 4648 §3.5: the last character of a segment whose length is 2 (resp. 3) mod 4
# carries 4 (resp. 2) bits that are not data; canonical encoders write them as zero.
_LAST_OF_2 = frozenset("AQgw")
_LAST_OF_3 = frozenset("AEIMQUYcgkosw048")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class Malformed(ValueError):
    """Input refused. The message echoes nothing the client sent, so it is safe to
    answer with; for JSON it is a predicate ("is not UTF-8 …") that follows a subject
    such as "the request body". ``detail`` says more, for the log (never the input)."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail


def _not_json(constant: str) -> Any:
    raise Malformed(f"has {constant}, which is not a JSON number (RFC 8259 §6)")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise Malformed("has a number too large for a double (RFC 8259 §6)")
    return value


# One decoder: ``json.loads`` with any option builds a new one per call (~1 µs).
_DECODER = json.JSONDecoder(parse_constant=_not_json, parse_float=_finite)


def loads(data: bytes | str, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` for untrusted input: UTF-8 only, finite numbers only, nesting at
    most ``max_depth``; raises :class:`Malformed` (a ``ValueError``) otherwise.

    The depth is checked only when the text has more brackets than ``max_depth``
    (two ``count`` calls), so a small document pays nothing for it."""
    if isinstance(data, bytes | bytearray):
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise Malformed("is not UTF-8 (RFC 8259 §8.1)") from None
    else:
        text = data
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        raise Malformed(f"nests deeper than {max_depth} levels") from None
    except Malformed:
        raise
    except ValueError:
        raise Malformed("is not valid JSON") from None
    if text.count("[") + text.count("{") > max_depth and _depth(value) > max_depth:
        raise Malformed(f"nests deeper than {max_depth} levels")
    if _SURROGATE_ESCAPE.search(text) is not None:
        try:  # a pair escaped as two \u escapes is one character; a lone half is not
            json.dumps(value, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise Malformed("has a string with an unpaired surrogate (RFC 8259 §8.2)") from None
    return value


def _depth(value: Any) -> int:
    """How deep containers nest in a parsed JSON value; iterative, so any depth."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _canonical(segment: str) -> bool:
    rest = len(segment) & 3
    return (rest == 0 or (rest == 2 and segment[-1] in _LAST_OF_2)
            or (rest == 3 and segment[-1] in _LAST_OF_3))


def b64url(segment: str) -> bytes:
    """A segment already checked by :func:`split_token`: decoding cannot fail."""
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) & 3))


def split_token(token: str) -> tuple[str, str, str]:
    """A JWS compact token's three segments, each canonical base64url (RFC 7515 §2,
    §7.1); raises :class:`Malformed`. A regex and three character tests: ~1.3 µs."""
    match = _TOKEN.fullmatch(token)
    if match is None:
        raise Malformed("malformed token", "not three base64url segments")
    head, body, sig = match.groups()
    if not (_canonical(head) and _canonical(body) and _canonical(sig)):
        raise Malformed("malformed token", "a segment is not canonical base64url")
    return head, body, sig


def decode_token(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """``(header, payload, signature, signing input)`` of a JWS compact token, strictly
    parsed (canonical base64url, bounded JSON objects); raises :class:`Malformed`. The
    signature is not checked here."""
    head, body, sig = split_token(token)
    try:
        header = loads(b64url(head))
        payload = loads(b64url(body))
    except Malformed as exc:
        raise Malformed("malformed token", f"its header or payload {exc}") from None
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise Malformed("malformed token", "its header or payload is not a JSON object")
    return header, payload, b64url(sig), f"{head}.{body}".encode()


def check_numeric_dates(claims: dict[str, Any]) -> None:
    """``exp``, ``nbf`` and ``iat``, where present, are NumericDates (RFC 7519 §2):
    numbers (not booleans, not null) in ``[0, year 9999]``. One chained comparison refuses NaN,
    infinities and integers too large for a float alike."""
    for name in ("exp", "nbf", "iat"):
        if name not in claims:
            continue
        value = claims[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise Malformed(f"claim '{name}' must be a number")
        if not 0 <= value <= MAX_NUMERIC_DATE:
            raise Malformed(f"claim '{name}' is not a date")


def quoted_string(text: str) -> str:
    """``text`` as an RFC 9110 §5.6.4 quoted-string: ``"`` and ``\\`` backslash-escaped;
    control characters, which no quoted-pair may carry, dropped."""
    text = _CONTROLS.sub("", text).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def bearer_challenge(realm: str, **params: str) -> str:
    """A ``WWW-Authenticate: Bearer`` value (RFC 6750 §3) with every parameter quoted."""
    parts = [f"realm={quoted_string(realm)}"]
    parts.extend(f"{name}={quoted_string(value)}" for name, value in params.items() if value)
    return "Bearer " + ", ".join(parts)
