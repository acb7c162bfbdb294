"""Observer contract (``lucid_observe_exchange`` / ``lucid_observe_event``): called
once per exchange, after its answer; whatever the observer does, requests keep being
answered, and nothing it raises reaches the log as an observer failure."""

from __future__ import annotations

import logging

import pytest

from lucid.conformance.support import UNMATCHED, Harness
from lucid.testing import json_request

CAPABILITY = "observer"
pytestmark = pytest.mark.asyncio


def observer_failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.ERROR and "observer raised" in r.getMessage()]


async def test_every_exchange_is_observed_once_and_answered(
    harness: Harness, caplog: pytest.LogCaptureFixture,
) -> None:
    expected = {f"/conformance/observed/{n}": 200 for n in range(6)}
    expected[UNMATCHED] = 404
    for path, status in expected.items():
        answer = await harness.get(path)
        assert answer.status == status, f"GET {path}: {answer}"
        exchange = await harness.exchange_of(answer)
        assert exchange.status == status
    assert len(harness.spy.exchanges) == len(expected)
    assert observer_failures(caplog) == []


async def test_events_are_observed_and_requests_keep_being_answered(
    harness: Harness, caplog: pytest.LogCaptureFixture,
) -> None:
    gw = harness.gw
    status, body = await json_request(gw.session, "POST",
                                      gw.admin_url + "/gateway/config/reload")
    assert status == 200, body  # a config_reloaded event for every observer
    for n in range(3):
        answer = await harness.get(f"/conformance/after-reload/{n}")
        assert answer.status == 200, answer
    assert observer_failures(caplog) == []
