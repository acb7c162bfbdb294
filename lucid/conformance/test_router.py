"""Router contract (``lucid_match_route``): a matched request carries its route, route
id, service, policy and per-route overrides, as the route table
(``generation.routes``) describes them; nothing matching is the core's 404."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from lucid.conformance.support import SERVICE, UNMATCHED, Harness
from lucid.model import RoutePolicy

CAPABILITY = "router"
pytestmark = pytest.mark.asyncio


async def test_a_matched_request_carries_route_service_policy_and_overrides(
    harness: Harness,
) -> None:
    answer = await harness.get("/conformance/router")
    assert answer.status == 200, f"GET /conformance/router: {answer}"
    exchange = await harness.exchange_of(answer)
    assert exchange.route is not None, "exchange.route not set"
    assert isinstance(exchange.route_id, str) and exchange.route_id, "exchange.route_id not set"
    assert exchange.service == SERVICE, f"exchange.service is {exchange.service!r}"
    assert isinstance(exchange.policy, RoutePolicy), "exchange.policy is not a RoutePolicy"
    assert isinstance(exchange.overrides, Mapping), "exchange.overrides is not a mapping"
    assert harness.hits(answer.request_id) == 1


async def test_the_route_table_describes_the_matched_route(harness: Harness) -> None:
    answer = await harness.get("/conformance/table")
    exchange = await harness.exchange_of(answer)
    assert exchange.generation is not None
    routes = {route.id: route for route in exchange.generation.routes}
    assert exchange.route_id in routes, (
        f"generation.routes (set in lucid_prepare) lists {sorted(routes)}, not the matched "
        f"route {exchange.route_id!r}")
    info = routes[exchange.route_id]
    assert info.service == exchange.service
    assert info.policy is exchange.policy, "the request does not run under its route's policy"
    assert dict(info.overrides) == dict(exchange.overrides)


async def test_nothing_matching_is_a_404_json_answer(harness: Harness) -> None:
    answer = await harness.get(UNMATCHED)
    assert answer.status == 404, f"GET {UNMATCHED}: {answer}"
    body = answer.json()
    assert (body["status"], body["request_id"]) == (404, answer.request_id)
    exchange = await harness.exchange_of(answer)
    assert exchange.route is None and not exchange.service
    assert harness.hits(answer.request_id) == 0
