"""Registry contract (``lucid_resolve_instances`` / ``lucid_list_instances``): what the
plugin resolves for a request and what it lists outside one agree, and are the
instances of the service; a service it does not know is left to other plugins."""

from __future__ import annotations

import pytest

from lucid.conformance.support import SERVICE, Harness
from lucid.model import Instance

CAPABILITY = "registry"
pytestmark = pytest.mark.asyncio


def _urls(instances: object) -> set[str]:
    assert instances is not None
    return {i.url for i in instances}  # type: ignore[attr-defined]


async def test_it_lists_the_instances_of_the_service(harness: Harness) -> None:
    generation = harness.gw.runtime.generation
    listed = harness.hook("lucid_list_instances")(service=SERVICE, generation=generation)
    assert listed is not None, f"lucid_list_instances answered None for {SERVICE!r}"
    assert all(isinstance(i, Instance) for i in listed)
    assert _urls(listed) == {b.url for b in harness.backends}
    assert {i.service for i in listed} == {SERVICE}
    assert all(isinstance(i.status, str) and i.status for i in listed)
    # and the core answers other plugins and the admin API with the same
    assert _urls(harness.gw.runtime.instances(SERVICE)) == _urls(listed)


async def test_resolved_and_listed_instances_agree(harness: Harness) -> None:
    generation = harness.gw.runtime.generation
    listed = harness.hook("lucid_list_instances")(service=SERVICE, generation=generation)
    healthy = {i.url for i in listed if i.status == "passing"}
    for n in range(4):
        answer = await harness.get(f"/conformance/registry/{n}")
        assert answer.status == 200, answer
        exchange = await harness.exchange_of(answer)
        own = harness.hook("lucid_resolve_instances")(exchange=exchange,
                                                      generation=exchange.generation)
        assert own is not None, "lucid_resolve_instances answered None for the service"
        assert _urls(own) == _urls(exchange.instances), "the request was resolved by another"
        assert _urls(own) == healthy, "resolved instances are not the listed passing ones"
        assert exchange.instance is not None and exchange.instance.url in healthy


async def test_a_service_it_does_not_know_is_left_to_others(harness: Harness) -> None:
    generation = harness.gw.runtime.generation
    assert harness.hook("lucid_list_instances")(
        service="no-such-service", generation=generation) is None
