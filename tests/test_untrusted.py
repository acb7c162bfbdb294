"""lucid.untrusted, the parsing the route auth and the admin API share, on its edges.
(End to end: plugins/lucid_gateway/tests/test_gateway_hostile_tokens.py and
tests/test_admin_hostile.py.)"""

from __future__ import annotations

import base64

import pytest

from lucid.untrusted import (
    MAX_DEPTH,
    Malformed,
    bearer_challenge,
    check_numeric_dates,
    loads,
    quoted_string,
    split_token,
)


def test_quoted_string_escapes_quote_and_backslash_and_drops_controls() -> None:
    assert quoted_string('a "b" \\c') == '"a \\"b\\" \\\\c"'
    assert quoted_string("line\r\nSet-Cookie: x\x00\x7f\tok") == '"lineSet-Cookie: x\tok"'
    assert bearer_challenge("r", error="invalid_token", error_description="", scope='s"') == (
        'Bearer realm="r", error="invalid_token", scope="s\\""')


def test_loads_bounds_depth_exactly_and_refuses_what_json_does_not_have() -> None:
    assert loads("[" * MAX_DEPTH + "]" * MAX_DEPTH) is not None
    wide = "[" + ",".join(["{}"] * 1000) + "]"  # many brackets, little depth
    assert len(loads(wide)) == 1000
    assert loads('"' + "[{" * 40 + '"') == "[{" * 40  # brackets in a string nest nothing
    assert loads('"\\ud83d\\ude00"') == "\U0001f600"  # an escaped pair is one character
    for text, reason in [
        ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), "nests deeper"),
        ("[" * 100_000 + "]" * 100_000, "nests deeper"),
        (b'"\xc3\x28"', "is not UTF-8"),
        ("[NaN]", "NaN"), ("[-Infinity]", "-Infinity"), ("[1e999]", "too large"),
        ('["\\udc00"]', "unpaired surrogate"), ("{", "is not valid JSON"),
        ("1" * 5000, "is not valid JSON"),
    ]:
        with pytest.raises(Malformed, match=reason):
            loads(text)


def test_only_the_canonical_spelling_of_a_segment_splits() -> None:
    for data in (b"", b"a", b"ab", b"abc", bytes(range(256))):
        segment = base64.urlsafe_b64encode(data).rstrip(b"=").decode() or "AA"
        assert split_token(f"{segment}.{segment}.{segment}") == (segment,) * 3
    assert split_token("e30.e30.") == ("e30", "e30", "")  # unsigned: refused by its alg
    for token in ("a.b.c", "QQ=.e30.e30", "QR.e30.e30", "QUF.e30.e30", "QUJ.e30.e30",
                  "e30.e30", "e30.e30.e30.e30", ".e30.e30", "e+0.e30.e30", "e30.e30.e3/",
                  "e30.e30.e30\n", "ｅ30.e30.e30"):
        with pytest.raises(Malformed):
            split_token(token)


def test_numeric_dates() -> None:
    check_numeric_dates({"exp": 1.5, "nbf": 0, "iat": 253402300799, "other": float("nan")})
    for bad in (True, "1", None, -1, 253402300800, float("inf"), float("nan"), 10**400):
        with pytest.raises(Malformed):
            check_numeric_dates({"exp": bad})
