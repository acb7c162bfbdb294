"""Selector contract (``lucid_select_instance``): the choice is always one of the
candidates (an instance the request tried is never chosen again), and choices spread
over the instances."""

from __future__ import annotations

import pytest

from lucid.conformance.support import Harness

CAPABILITY = "selector"
pytestmark = pytest.mark.asyncio


async def test_choices_spread_over_the_instances(harness: Harness) -> None:
    for n in range(12):
        answer = await harness.get(f"/conformance/spread/{n}")
        assert answer.status == 200, answer
    assert all(b.requests > 0 for b in harness.backends), (
        f"requests per instance: {[b.requests for b in harness.backends]}")


async def test_a_tried_instance_is_never_chosen_again(harness: Harness) -> None:
    failing, working = harness.backends
    failing.status = 503
    retried = 0
    for n in range(10):
        answer = await harness.get(f"/conformance/retry/{n}")
        exchange = await harness.exchange_of(answer)
        policy = exchange.policy
        assert policy.attempts >= 2 and 503 in policy.retry_on_status, (
            "the route under /conformance/ must retry a 503 on another instance "
            "(retries.attempts >= 2)")
        for backend in harness.backends:
            assert backend.hits(answer.request_id) <= 1, (
                f"request {n} called {backend.url} twice")
        assert answer.status == 200, f"request {n} did not reach the working instance: {answer}"
        retried += failing.hits(answer.request_id)
    assert retried, "the failing instance was never chosen first: no retry was tested"
