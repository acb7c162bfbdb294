"""Failure contract (``lucid_permit_call`` / ``lucid_record_outcome`` /
``lucid_fallback_response``): one outcome is recorded per upstream attempt, retries
included, for every permitted call; when instances fail, the client gets an upstream's
answer or a rejection (the core's or the plugin's fallback), never a 500."""

from __future__ import annotations

import pytest

from lucid.conformance.support import Harness

CAPABILITY = "failure"
pytestmark = pytest.mark.asyncio


def check_accounting(harness: Harness, request_id: str, attempts: int) -> None:
    outcomes = harness.spy.outcomes_of(request_id)
    permitted = harness.spy.permitted_for(request_id)
    hits = harness.hits(request_id)
    assert len(outcomes) == attempts == hits == len(permitted), (
        f"request {request_id}: {attempts} attempts, {hits} upstream calls, "
        f"{len(permitted)} permitted calls, {len(outcomes)} outcomes recorded")


async def test_one_outcome_per_attempt_retries_included(harness: Harness) -> None:
    harness.backends[0].status = 503
    retries = 0
    for n in range(10):
        answer = await harness.get(f"/conformance/failure/{n}")
        assert answer.status != 500, answer
        exchange = await harness.exchange_of(answer)
        check_accounting(harness, answer.request_id, exchange.attempts)
        retries += max(0, exchange.attempts - 1)
        if answer.status != 200:
            assert exchange.rejection is not None, answer
            assert answer.status == exchange.rejection.status
    assert retries, "no request was retried: the route must retry a 503 (attempts >= 2)"


async def test_when_every_instance_fails_the_client_still_gets_an_answer(
    harness: Harness,
) -> None:
    for backend in harness.backends:
        backend.status = 503
    for n in range(8):
        answer = await harness.get(f"/conformance/down/{n}")
        assert answer.status != 500, answer
        exchange = await harness.exchange_of(answer)
        check_accounting(harness, answer.request_id, exchange.attempts)
        if exchange.rejection is not None:  # the core's 502/503/504, or a fallback
            assert answer.status == exchange.rejection.status
            if answer.headers.get("content-type", "").startswith("application/json"):
                assert answer.json()["request_id"] == answer.request_id
        else:
            assert answer.status == 503 and answer.json()["error"] == "switched off by the test"
