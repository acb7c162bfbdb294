"""The registry in cluster mode: three ``lucid serve`` nodes on a private Redis, each
resolving (and watching) what was registered, renewed, drained or removed on another;
TTLs decided once by Redis; a paused Redis costs no proxied request."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from lucid_registry.testing import next_event

from lucid.testing import json_request, wait_until
from lucid.testing_internal import cluster_node_config


def node_config(backend: str) -> str:
    # timeout: the default 50 ms is for production; a test machine shared with other
    # work may not schedule a process that fast (a paused Redis still answers 503
    # within this)
    return cluster_node_config(backend, timeout="500ms", extra="""
[registry]
max_wait = "30s"

[[gateway.routes]]
id = "users"
prefix = "/users"
service = "users"
retries = { attempts = 1 }
""")


def nodes(lucid_process: Any, backend: str, *names: str, wait: bool = True,
          **options: Any) -> list[Any]:
    """``lucid serve`` nodes named ``names`` on ``backend``, started at once; ready
    (the 60 s a busy machine may need) unless ``wait`` is false."""
    started = [lucid_process(node_config(backend), env={"LUCID_CLUSTER__NODE_ID": n},
                             wait=False, **options) for n in names]
    if wait:
        for node in started:
            node.wait_ready(60)
    return started


async def proxied(node: Any, path: str = "/users/x") -> int:
    """The status of one request through ``node``, on a new connection (a node with
    several workers hands each connection to any of them)."""
    async with aiohttp.ClientSession() as fresh, fresh.get(node.proxy_url + path) as r:
        await r.read()
        return r.status


async def instance(session: aiohttp.ClientSession, node: Any, service: str,
                   iid: str) -> dict[str, Any] | None:
    status, body = await json_request(
        session, "GET", f"{node.admin_url}/registry/services/{service}/instances/{iid}")
    return body if status == 200 else None


async def test_registrations_heartbeats_and_watches_reach_every_node(
        lucid_redis, lucid_upstream, lucid_process):
    server = lucid_redis()
    upstream = await lucid_upstream()
    a, b = nodes(lucid_process, server.url, "node-a", "node-b", wait=False)
    (c,) = nodes(lucid_process, server.url, "node-c", wait=False, workers=2)
    for node in (a, b, c):
        node.wait_ready(60)
    async with aiohttp.ClientSession() as session:
        services = b.admin_url + "/registry/services"
        status, listed = await json_request(session, "GET", services)
        assert status == 200 and listed["services"] == []
        # a blocking query on B and a watch of the whole registry on C wait ...
        blocked = asyncio.create_task(json_request(
            session, "GET", f"{services}?index={listed['index']}&wait=20s"))
        stream = await session.get(c.admin_url + "/registry/events")
        first = await next_event(stream)
        assert first is not None and first["event"] == "services"

        # ... for a registration on A
        status, body = await json_request(session, "POST", a.admin_url + "/registry/services",
                                          json={"id": "users", "instances": [
                                              {"id": "u1", "url": upstream.url}]})
        assert status == 201, body
        started = time.monotonic()
        status, seen = await asyncio.wait_for(blocked, 10)
        assert status == 200 and [s["id"] for s in seen["services"]] == ["users"]
        assert seen["index"] == body["index"]  # one index, the cluster's
        event = await asyncio.wait_for(next_event(stream), 10)
        assert event is not None and '"users"' in event["data"]
        assert time.monotonic() - started < 2.0  # woken, not timed out (20 s)
        stream.close()

        async def everywhere(expected: int) -> bool:
            statuses = [await proxied(node) for node in (b, c, c, c, c)]
            return statuses == [expected] * 5

        await wait_until(lambda: everywhere(200), message="u1 proxied through B and C")

        # a second service whose instance must renew every second: renewed on B, then
        # left to lapse -- every node sees it critical, with the same note
        status, body = await json_request(session, "POST", a.admin_url + "/registry/services",
                                          json={"id": "ttl", "check": {"ttl": "1s"},
                                                "instances": [{"id": "t1",
                                                               "url": upstream.url}]})
        assert status == 201, body
        status, body = await json_request(
            session, "POST", b.admin_url + "/registry/services/ttl/health",
            json={"instance": "t1", "status": "warning", "note": "slow disk"})
        assert status == 200 and body["status"] == "warning", body

        async def status_everywhere(service: str, iid: str, wanted: str) -> bool:
            for node in (a, b, c):
                found = await instance(session, node, service, iid)
                if found is None or found["status"] != wanted:
                    return False
            return True

        await wait_until(lambda: status_everywhere("ttl", "t1", "warning"), timeout=5,
                         message="the heartbeat's status on every node")
        await wait_until(lambda: status_everywhere("ttl", "t1", "critical"), timeout=5,
                         message="the lapsed TTL on every node")
        for node in (a, b, c):
            found = await instance(session, node, "ttl", "t1")
            assert found is not None and found["note"] == "TTL of 1s expired"
            assert found["checks"]["reported"] == "critical"
        status, _ = await json_request(
            session, "POST", c.admin_url + "/registry/health",
            json={"heartbeats": [{"service": "ttl", "instance": "t1"}]})
        assert status == 200
        await wait_until(lambda: status_everywhere("ttl", "t1", "passing"), timeout=5,
                         message="renewed on C, passing everywhere")

        # maintenance set on B drains u1 everywhere; lifted on C, it is back
        maint = "/registry/services/users/instances/u1/maintenance"
        status, body = await json_request(session, "PUT", b.admin_url + maint,
                                          json={"enabled": True, "reason": "deploy"})
        assert status == 200 and body["status"] == "maintenance", body
        await wait_until(lambda: everywhere(503), message="u1 drained on every node")
        found = await instance(session, a, "users", "u1")
        assert found is not None and found["maintenance_reason"] == "deploy"
        assert found["checks"]["node"] == "node-a"  # whose active/passive view this is
        status, _ = await json_request(session, "PUT", c.admin_url + maint,
                                       json={"enabled": False})
        assert status == 200
        await wait_until(lambda: everywhere(200), message="u1 back on every node")

        # a watch of one service on B sees the deregistration made on C
        watch = await session.get(b.admin_url + "/registry/services/users/events")
        event = await next_event(watch)
        assert event is not None and '"u1"' in event["data"]
        status, _ = await json_request(
            session, "DELETE", c.admin_url + "/registry/services/users/instances/u1")
        assert status == 200
        event = await asyncio.wait_for(next_event(watch), 10)
        assert event is not None and event["event"] == "instances"
        assert '"u1"' not in event["data"]
        watch.close()
        await wait_until(lambda: everywhere(503), message="u1 gone from every node")

        # conflicts are the cluster's: a name registered on A is taken on B too
        status, body = await json_request(session, "POST", b.admin_url + "/registry/services",
                                          json={"id": "users"})
        assert status == 409, body
        status, body = await json_request(
            session, "POST", c.admin_url + "/registry/services/users/instances",
            json={"id": "bad", "url": "ftp://x:1"})
        assert status == 422 and "url" in str(body), body


async def test_a_paused_redis_keeps_resolving_refuses_writes_and_resyncs(
        lucid_redis, lucid_upstream, lucid_process):
    server = lucid_redis()
    upstream = await lucid_upstream()
    a, b = nodes(lucid_process, server.url, "node-a", "node-b")
    async with aiohttp.ClientSession() as session:
        status, _ = await json_request(session, "POST", a.admin_url + "/registry/services",
                                       json={"id": "users", "instances": [
                                           {"id": "u1", "url": upstream.url}]})
        assert status == 201
        async def through_b() -> bool:
            return await proxied(b) == 200

        await wait_until(through_b, message="u1 proxied through B")
        server.pause()
        try:
            for _ in range(20):  # resolved from memory: no request waits on Redis
                assert await proxied(b) == 200
            started = time.monotonic()
            status, refused = await json_request(
                session, "POST", a.admin_url + "/registry/services/users/instances",
                json={"id": "u2", "url": upstream.url})
            assert status == 503, refused
            assert time.monotonic() - started < 2.0  # the 50 ms timeout, not a hang
            assert refused["backend"] == server.url
            assert server.url.rsplit("/", 1)[0] in refused["error"]
            status, _ = await json_request(
                session, "POST", b.admin_url + "/registry/services/users/health",
                json={"instance": "u1", "status": "critical"})
            assert status == 503
            assert await proxied(a) == 200
        finally:
            server.resume()
        # once Redis answers again, a change made on A reaches B within a second
        status, body = await json_request(
            session, "PUT", a.admin_url + "/registry/services/users/instances/u1/maintenance",
            json={"enabled": True})
        assert status == 200, body
        started = time.monotonic()

        async def drained_on_b() -> bool:
            found = await instance(session, b, "users", "u1")
            return found is not None and found["status"] == "maintenance"

        await wait_until(drained_on_b, timeout=5, message="maintenance seen on B")
        assert time.monotonic() - started < 1.0


async def test_a_node_starting_while_redis_is_down_serves_its_snapshot_s_instances(
        lucid_redis, lucid_upstream, lucid_process):
    import tomllib
    from pathlib import Path

    from lucid.testing import GatewayProcess

    server = lucid_redis()
    upstream = await lucid_upstream()
    env = {"LUCID_CLUSTER__NODE_ID": "node-a"}
    a = lucid_process(node_config(server.url), env=env, wait=False)
    a.wait_ready(60)
    data_dir = Path(tomllib.loads(a.config_path.read_text())["server"]["data_dir"])
    async with aiohttp.ClientSession() as session:
        status, _ = await json_request(session, "POST", a.admin_url + "/registry/services",
                                       json={"id": "users", "instances": [
                                           {"id": "u1", "url": upstream.url}]})
        assert status == 201

    def saved() -> bool:  # written off the write's path, soon after it
        try:
            text = (data_dir / "cluster-snapshot.json").read_text()
        except FileNotFoundError:
            return False
        return upstream.url in text

    await wait_until(saved, timeout=10, message="the registry in the snapshot")
    a.stop()
    server.kill()
    again = GatewayProcess(a.config_path, env=env)
    try:
        again.wait_ready(60)
        again.wait_for_line("registered services of the last-known-good snapshot")
        assert await proxied(again) == 200  # u1, known from the snapshot alone
    finally:
        again.stop()


async def orphans(url: str) -> list[str]:
    """Registry keys in Redis that belong to nothing: per-service hashes of a service
    not registered, health without its instance, deadlines of a gone instance."""
    from redis.asyncio import Redis

    redis = Redis.from_url(url, decode_responses=True)
    try:
        found: list[str] = []
        services = set(await redis.hkeys("lucid:registry:services"))
        instances: dict[str, set[str]] = {}
        for key in await redis.keys("lucid:registry:instances:*"):
            service = key.removeprefix("lucid:registry:instances:")
            instances[service] = set(await redis.hkeys(key))
            if service not in services:
                found.append(key)
        for key in await redis.keys("lucid:registry:health:*"):
            service = key.removeprefix("lucid:registry:health:")
            found += [f"{key} {i}" for i in await redis.hkeys(key)
                      if i not in instances.get(service, set())]
        for key in ("lucid:registry:deadlines", "lucid:registry:deregister"):
            for member in await redis.zrange(key, 0, -1):
                service, _, iid = member.partition("\0")
                if iid not in instances.get(service, set()):
                    found.append(f"{key} {service}/{iid}")
        return found
    finally:
        await redis.aclose()


async def test_racing_registrations_and_removals_on_two_nodes_leave_no_orphan(
        lucid_redis, lucid_upstream, lucid_process):
    server = lucid_redis()
    upstream = await lucid_upstream()
    a, b = nodes(lucid_process, server.url, "node-a", "node-b")
    service = {"id": "race", "check": {"ttl": "30s", "deregister_after": "1m"}}
    async with aiohttp.ClientSession() as session:
        async def call(method: str, url: str, body: Any = None) -> int:
            status, answer = await json_request(session, method, url, json=body)
            assert status in (200, 201, 204, 404, 409), (method, url, status, answer)
            return status

        await call("POST", a.admin_url + "/registry/services", service)
        for round_ in range(8):
            iid = f"r{round_ % 3}"
            one = a if round_ % 2 else b
            other = b if one is a else a
            work = [
                call("POST", one.admin_url + "/registry/services/race/instances",
                     {"id": iid, "url": upstream.url}),
                call("DELETE", other.admin_url + f"/registry/services/race/instances/{iid}"),
                call("POST", other.admin_url + "/registry/services/race/health",
                     {"instance": iid, "status": "critical"}),
                call("PUT", one.admin_url +
                     f"/registry/services/race/instances/{iid}/maintenance",
                     {"enabled": True}),
            ]
            if round_ % 3 == 2:  # the whole service goes while instances register
                work += [call("DELETE", other.admin_url + "/registry/services/race")] + [
                    call("POST", one.admin_url + "/registry/services/race/instances",
                         {"id": f"late{n}", "url": upstream.url}) for n in range(4)]
            await asyncio.gather(*work)
            assert await orphans(server.url) == []
            if round_ % 3 == 2:
                await call("POST", one.admin_url + "/registry/services", service)
        # and both nodes end up with what Redis has
        from redis.asyncio import Redis

        redis = Redis.from_url(server.url, decode_responses=True)
        try:
            held = sorted(await redis.hkeys("lucid:registry:instances:race"))
        finally:
            await redis.aclose()

        async def agreed() -> bool:
            for node in (a, b):
                status, body = await json_request(
                    session, "GET", node.admin_url + "/registry/services/race")
                shown = sorted(i["id"] for i in body.get("instances", [])) \
                    if status == 200 else []
                if shown != held:
                    return False
            return True

        await wait_until(agreed, timeout=5, message="both nodes show Redis's instances")
