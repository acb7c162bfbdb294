"""Admission contract (``lucid_admit_request``): the admitted request reaches the
upstream; the refused one (sent after an admitted one, so a limiter has spent its
allowance) gets the plugin's ``Rejection``: its status, its headers, and a JSON body
carrying ``error`` and the core's ``status`` and ``request_id``; no upstream sees it."""

from __future__ import annotations

import pytest

from lucid.conformance.support import Harness

CAPABILITY = "admission"
pytestmark = pytest.mark.asyncio


async def test_the_admitted_request_reaches_the_upstream(harness: Harness) -> None:
    answer = await harness.get("/conformance/admitted", harness.target.admitted.headers)
    assert answer.status == 200, f"the admitted request: {answer}"
    assert answer.json()["path"].endswith("/admitted")  # the upstream's echo
    assert harness.hits(answer.request_id) == 1
    exchange = await harness.exchange_of(answer)
    assert exchange.rejection is None


async def test_the_refused_request_gets_the_plugins_rejection(harness: Harness) -> None:
    first = await harness.get("/conformance/admitted", harness.target.admitted.headers)
    assert first.status == 200, f"the admitted request: {first}"
    answer = await harness.get("/conformance/refused", harness.target.refused.headers)
    exchange = await harness.exchange_of(answer)
    rejection = exchange.rejection
    assert rejection is not None, f"the refused request was not refused: {answer}"
    assert answer.status == rejection.status
    for name, value in rejection.headers:
        assert value in answer.headers.getall(name, []), f"header {name}: {value} not sent"
    body = answer.json()
    assert body["status"] == rejection.status
    assert body["request_id"] == exchange.request_id == answer.request_id
    assert isinstance(body.get("error"), str) and body["error"]
    assert harness.hits(answer.request_id) == 0, "the refused request reached an upstream"
