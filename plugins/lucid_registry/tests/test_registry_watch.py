"""Watching the whole registry (blocking list query, SSE of every service), and
watches that end when the gateway stops instead of holding it for its grace period."""

from __future__ import annotations

import asyncio
import json
import signal

import aiohttp
from lucid_registry.testing import next_event

from lucid.model import Event
from lucid.testing import wait_until


async def post(session, url, body, status):
    async with session.post(url, json=body) as r:
        assert r.status == status, await r.text()
        return await r.json()


async def test_the_list_blocks_until_any_service_changes(lucid_gateway):
    gw = await lucid_gateway("")
    registry = gw.runtime.plugin_set.pm.get_plugin("registry").registry
    url = gw.admin_url + "/registry/services"
    await post(gw.session, url, {"id": "users", "tags": ["web"]}, 201)
    async with gw.session.get(url) as r:
        index = int(r.headers["X-Lucid-Index"])
        assert (await r.json())["index"] == index
    # An older index answers at once; bad arguments are named.
    async with gw.session.get(f"{url}?index={index - 1}&wait=60s") as r:
        assert int(r.headers["X-Lucid-Index"]) == index
    async with gw.session.get(f"{url}?index=-1") as r:
        assert r.status == 422
        assert [f["field"] for f in (await r.json())["fields"]] == ["query.index"]

    async def blocked(query):
        async with gw.session.get(f"{url}?index={index}&wait=60s{query}") as r:
            return int(r.headers["X-Lucid-Index"]), await r.json()

    waiting = asyncio.create_task(blocked("&tag=web"))
    await wait_until(lambda: registry.watchers == 1, message="the list query to block")
    # A change to another service wakes it too: the list's index is the registry's.
    await post(gw.session, url, {"id": "billing"}, 201)
    new_index, answer = await waiting
    assert new_index > index
    assert [s["id"] for s in answer["services"]] == ["users"]  # filters still apply
    # An instance changing status counts (the list carries health counts) ...
    index = new_index
    waiting = asyncio.create_task(blocked(""))
    await wait_until(lambda: registry.watchers == 1, message="the list query to block")
    await post(gw.session, url + "/users/instances",
               {"id": "a", "url": "http://127.0.0.1:9001"}, 201)
    new_index, answer = await waiting
    assert new_index > index
    assert {s["id"]: s["health"]["passing"] for s in answer["services"]} == {
        "users": 1, "billing": 0}
    # ... a renewal that changes nothing does not: the query waits out its time.
    async def short_wait():
        async with gw.session.get(f"{url}?index={new_index}&wait=300ms") as r:
            return int(r.headers["X-Lucid-Index"])

    waiting = asyncio.create_task(short_wait())
    await wait_until(lambda: registry.watchers == 1, message="the list query to block")
    await post(gw.session, url + "/users/health", {"instance": "a"}, 200)
    assert await waiting == new_index


async def test_the_catalog_stream_sends_the_list_then_every_change(lucid_gateway):
    gw = await lucid_gateway("")
    url = gw.admin_url + "/registry/services"
    await post(gw.session, url, {"id": "users"}, 201)
    async with gw.session.get(gw.admin_url + "/registry/events?health=critical") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        first = await next_event(stream)
        assert first["event"] == "services"
        assert json.loads(first["data"])["services"] == []
        await post(gw.session, url + "/users/instances",
                   {"id": "a", "url": "http://127.0.0.1:9001", "status": "critical"}, 201)
        second = await next_event(stream)
        assert int(second["id"]) > int(first["id"])
        assert [s["id"] for s in json.loads(second["data"])["services"]] == ["users"]
        async with gw.session.delete(url + "/users") as r:
            assert r.status == 200
        third = await next_event(stream)
        assert json.loads(third["data"])["services"] == []
        registry = gw.runtime.plugin_set.pm.get_plugin("registry").registry
        assert registry.watchers == 1
    # A client that goes away ends its stream on the gateway too.
    await wait_until(lambda: registry.watchers == 0, message="the stream to end")


async def test_stopping_ends_streams_and_answers_blocking_queries(lucid_gateway):
    """The registry's side of a prompt shutdown, driven by the ``stopping`` event."""
    gw = await lucid_gateway("")
    registry = gw.runtime.plugin_set.pm.get_plugin("registry").registry
    url = gw.admin_url + "/registry/services"
    await post(gw.session, url, {"id": "users"}, 201)
    service = registry.services["users"]
    catalog = await gw.session.get(gw.admin_url + "/registry/events")
    instances = await gw.session.get(url + "/users/events")
    assert (await next_event(catalog))["event"] == "services"
    assert (await next_event(instances))["event"] == "instances"

    async def blocked(path):
        async with gw.session.get(f"{path}?index={registry.index}&wait=60s") as r:
            return r.status

    queries = [asyncio.create_task(blocked(url)),
               asyncio.create_task(blocked(url + "/users/instances"))]
    await wait_until(lambda: registry.watchers == 2 and service.watchers == 2,
                     message="two streams and two queries waiting")
    await gw.runtime.hooks.observe_event(Event("stopping", {}))
    assert await asyncio.gather(*queries) == [200, 200]
    assert await next_event(catalog) is None
    assert await next_event(instances) is None
    catalog.release()
    instances.release()
    # Later blocking queries answer at once while the gateway drains.
    async with gw.session.get(f"{url}?index={registry.index}&wait=60s") as r:
        assert r.status == 200


async def test_sigterm_ends_an_open_watch_promptly(lucid_process):
    # A grace period far longer than the deadline below: if the watch held the
    # process, it would still be running when the deadline passes.
    gateway = lucid_process("", grace_period="20s")
    async with aiohttp.ClientSession() as session:
        await post(session, gateway.admin_url + "/registry/services", {"id": "users"}, 201)
        stream = await session.get(gateway.admin_url + "/registry/services/users/events",
                                   timeout=aiohttp.ClientTimeout(total=None))
        assert (await next_event(stream))["event"] == "instances"
        gateway.signal(signal.SIGTERM)
        assert await asyncio.wait_for(next_event(stream), 5) is None
        assert await asyncio.to_thread(gateway.wait, 5) == 0
        stream.release()
