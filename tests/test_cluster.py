"""Cluster mode on a private Redis: definitions shared by every node through the
Redis backend, membership, and what a node does while Redis is paused, killed or
not there at all. Real ``redis-server`` and ``lucid serve`` processes on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import aiohttp
import pytest

from lucid.cluster import Cluster, RedisBackend, published_change, redact_url
from lucid.config import ClusterConfig
from lucid.definitions import BackendUnavailable, Conflict, PreconditionFailed, Snapshot, Write
from lucid.testing import json_request, wait_until, write_config
from lucid.testing_internal import cluster_node_config, run_lucid

# Three nodes starting at once on a machine shared with other test runs can take
# longer than the kit's 20 s to import and listen.
STARTUP = 60.0


def node_config(backend: str, upstream: str, extra: str = "", timeout: str = "50ms") -> str:
    return cluster_node_config(backend, upstreams=[upstream], timeout=timeout, extra=f"""
[[gateway.routes]]
id = "static"
prefix = "/static"
service = "svc"
retries = {{ attempts = 1 }}

[monitoring]
{extra}
""")


async def get(session: aiohttp.ClientSession, url: str, **kw: object) -> tuple[int, object]:
    return await json_request(session, "GET", url, **kw)


async def add_route(session: aiohttp.ClientSession, node: object, id: str) -> int:
    """POST /gateway/route on ``node``: ``/<id>`` to ``svc``; the status."""
    status, _ = await json_request(session, "POST",
                                   node.admin_url + "/gateway/route",  # type: ignore[attr-defined]
                                   json={"id": id, "prefix": f"/{id}", "service": "svc"})
    return status


# ---------------------------------------------------------------------------
# the Redis backend itself, in this process
# ---------------------------------------------------------------------------

async def backend_on(url: str, prefix: str = "lucid:") -> tuple[Cluster, RedisBackend]:
    cluster = Cluster(ClusterConfig(backend=url, key_prefix=prefix), "test")
    await cluster.start()
    return cluster, RedisBackend(cluster)


async def test_commits_bump_one_revision_and_refuse_what_moved_on(lucid_redis):
    server = lucid_redis()
    (c1, one), (c2, two) = await backend_on(server.url), await backend_on(server.url)
    try:
        assert (await one.load()).revision == 0
        first = await one.commit([Write("limit", "a", {"rate": "1/s"})], 0,
                                 {("limit", "a"): None})
        assert first.revision == 1 and first.get("limit", "a").revision == 1
        # the other node validated against revision 0: refused, it must look again
        with pytest.raises(PreconditionFailed):
            await two.commit([Write("limit", "b", {"rate": "2/s"})], 0, {})
        seen = await two.load()
        assert seen.revision == 1 and seen.get("limit", "a").body == {"rate": "1/s"}
        second = await two.commit([Write("limit", "a", {"rate": "3/s"})], 1,
                                  {("limit", "a"): 1})
        assert second.revision == 2 and second.get("limit", "a").revision == 2
        with pytest.raises(PreconditionFailed):  # If-Match on the old revision
            await one.commit([Write("limit", "a", {"rate": "4/s"})], 2, {("limit", "a"): 1})
        with pytest.raises(Conflict):
            await one.commit([Write("limit", "a", {"rate": "4/s"})], 2, {("limit", "a"): None})
        gone = await one.commit([Write("limit", "a", None)], 2, {("limit", "a"): 2})
        assert gone.revision == 3 and gone.get("limit", "a") is None
        assert await two.revision() == 3 and not (await two.load()).items
    finally:
        await c1.close()
        await c2.close()


async def test_a_commit_publishes_its_changes_for_receivers_to_apply_without_a_read(
        lucid_redis):
    server = lucid_redis()
    (c1, one), (c2, two) = await backend_on(server.url), await backend_on(server.url)
    messages: list[str] = []
    c2.subscribe(two.channel, messages.append)
    try:
        assert c1.redis is not None

        async def subscribed() -> bool:
            return (await c1.redis.pubsub_numsub(two.channel))[0][1] == 1  # type: ignore[union-attr]

        await wait_until(subscribed, 10)
        await one.commit([Write("route", "a", {"prefix": "/a"}),
                          Write("route", "b", {"prefix": "/b"})], 0, {})
        await one.commit([Write("route", "a", None)], 1, {})
        await wait_until(lambda: len(messages) == 2, 10)
        first, second = (published_change(m) for m in messages)
        assert first == (1, [Write("route", "a", {"prefix": "/a"}),
                             Write("route", "b", {"prefix": "/b"})])
        assert second == (2, [Write("route", "a", None)])
        # what a receiver makes of them is what it would have read
        made = Snapshot().applied(first[1], 1).applied(second[1], 2)
        read = await two.load()
        assert made.revision == read.revision == 2
        assert [(d.kind, d.id, d.body, d.revision) for d in made.items.values()] == \
            [(d.kind, d.id, d.body, d.revision) for d in read.items.values()]
        assert published_change("3") is None  # not a change: the receiver reads Redis
    finally:
        await c1.close()
        await c2.close()


async def test_key_prefixes_keep_clusters_apart_and_a_dead_redis_is_a_503(lucid_redis):
    server = lucid_redis()
    (ca, a), (cb, b) = (await backend_on(server.url, "one:"),
                        await backend_on(server.url, "two:"))
    try:
        await a.commit([Write("route", "r", {"prefix": "/"})], 0, {})
        assert (await b.load()).revision == 0
        assert ca.key("nodes") == "one:nodes"
        server.kill()
        with pytest.raises(BackendUnavailable) as refused:
            await a.commit([Write("route", "s", {"prefix": "/s"})], 1, {})
        assert refused.value.status == 503 and server.url.rsplit("/", 1)[0] in \
            refused.value.message
        assert not ca.up
    finally:
        await ca.close()
        await cb.close()


def test_the_backend_url_is_checked_and_its_password_never_shown(tmp_path):
    with pytest.raises(ValueError):
        ClusterConfig(backend="http://127.0.0.1:6379")
    assert redact_url("rediss://lucid:s3cret-pw@redis.example:6380/0") == \
        "rediss://lucid:***@redis.example:6380/0"
    assert redact_url(":s3cret-pw@x") == ":s3cret-pw@x"  # not a URL: as it is
    path = write_config("", tmp_path)
    secret_url = "redis://lucid:s3cret-pw@127.0.0.1:1/0"
    exported = run_lucid("config", "export", "--config", str(path),
                         LUCID_CLUSTER__BACKEND=secret_url)
    assert exported.returncode == 0, exported.stderr
    assert "s3cret-pw" not in exported.stdout
    assert 'backend = "redis://lucid:***@127.0.0.1:1/0"' in exported.stdout
    bad = run_lucid("check", "--config", str(path),
                    LUCID_CLUSTER__BACKEND="redis://lucid:s3cret-pw@127.0.0.1:99999/0")
    assert bad.returncode == 2 and "cluster.backend" in bad.stderr
    assert "s3cret-pw" not in bad.stderr and "LUCID_CLUSTER__BACKEND" in bad.stderr


# ---------------------------------------------------------------------------
# three nodes
# ---------------------------------------------------------------------------

# (create path, body, read path) on the admin API: one definition of each kind
KINDS = [
    ("/gateway/route", {"id": "rt", "prefix": "/rt", "service": "svc",
                        "retries": {"attempts": 1}}, "/gateway/route"),
    ("/loadbalancer/pools", {"id": "lb", "service": "svc"}, "/loadbalancer/pools"),
    ("/circuitbreaker/circuits", {"id": "cb", "service": "svc"},
     "/circuitbreaker/circuits/cb"),
    ("/ratelimiter/limits", {"id": "rl", "rate": "1000/s"}, "/ratelimiter/limits/rl"),
    ("/monitoring/alerts", {"name": "al", "metric": "error_rate", "threshold": 0.5},
     "/monitoring/alerts"),
]


async def test_three_nodes_share_definitions_membership_and_no_update_is_lost(
        lucid_redis, lucid_upstream, lucid_process):
    server = lucid_redis()
    upstream = await lucid_upstream()
    a, b, c = (lucid_process(node_config(server.url, upstream.url),
                             env={"LUCID_CLUSTER__NODE_ID": name}, wait=False)
               for name in ("node-a", "node-b", "node-c"))
    for node in (a, b, c):
        node.wait_ready(STARTUP)
    async with aiohttp.ClientSession() as session:
        # every definition written on A is served / shown by B and C
        for path, body, _ in KINDS:
            status, answer = await json_request(session, "POST", a.admin_url + path,
                                                json=body)
            assert status in (200, 201), (path, answer)

        async def everywhere() -> bool:
            for node in (b, c):
                for _, body, read in KINDS:
                    status, answer = await get(session, node.admin_url + read)
                    name = body.get("id", body.get("name"))
                    if status != 200 or f'"{name}"' not in json.dumps(answer):
                        return False
                async with session.get(node.proxy_url + "/rt/x") as r:
                    if r.status != 200:
                        return False
            return True

        await wait_until(everywhere, timeout=10, message="definitions on B and C")

        # two nodes replace one route with the same If-Match at once: one wins, the
        # other is told (412) and nothing is silently overwritten
        status, listed = await get(session, a.admin_url + "/gateway/route")
        revision = next(r["revision"] for r in listed["routes"] if r["id"] == "rt")
        results = await asyncio.gather(*(
            json_request(session, "POST", node.admin_url + "/gateway/route",
                         json={"id": "rt", "prefix": f"/rt-{n}", "service": "svc"},
                         headers={"If-Match": str(revision)})
            for n, node in enumerate((a, b, c))))
        statuses = sorted(s for s, _ in results)
        assert statuses == [200, 412, 412], results
        winner = next(body["route"]["prefix"] for s, body in results if s == 200)

        async def agreed() -> bool:
            for node in (a, b, c):
                _, now = await get(session, node.admin_url + "/gateway/route")
                if [r["prefix"] for r in now["routes"] if r["id"] == "rt"] != [winner]:
                    return False
            return True

        await wait_until(agreed, timeout=10, message="every node on the winning write")

        # writes to different definitions from every node at once all land
        results = await asyncio.gather(*(
            json_request(session, "POST", node.admin_url + "/ratelimiter/limits",
                         json={"id": f"per-node-{n}", "rate": "10/s"})
            for n, node in enumerate((a, b, c))))
        assert [s for s, _ in results] == [201, 201, 201], results

        # membership: all three alive; C killed with -9 is shown dead, A and B not
        async def members(alive: dict[str, bool]) -> bool:
            status, view = await get(session, b.admin_url + "/cluster")
            assert status == 200 and view["backend"] == "redis" and view["backend_up"]
            return {n["node_id"]: n["alive"] for n in view["nodes"]} == alive

        await wait_until(lambda: members({"node-a": True, "node-b": True, "node-c": True}),
                         timeout=10, message="three nodes alive")
        status, view = await get(session, a.admin_url + "/cluster")
        entry = next(n for n in view["nodes"] if n["node_id"] == "node-a")
        assert entry["admin"] == a.admin_url.removeprefix("http://")
        assert entry["proxy"] == a.proxy_url.removeprefix("http://")
        assert entry["workers"] == 1 and view["node_id"] == "node-a"
        c.proc.kill()
        started = time.monotonic()
        await wait_until(lambda: members({"node-a": True, "node-b": True, "node-c": False}),
                         timeout=10, message="node-c shown dead")
        assert time.monotonic() - started <= 5.0  # 3 renewals of 1 s, and a margin
        status_output = run_lucid("cluster", "status", "--config", str(a.config_path),
                                  "--admin", a.admin_url)
        assert status_output.returncode == 0, status_output.stderr
        lines = status_output.stdout.splitlines()
        assert any("node-c" in line and "no" in line.split() for line in lines), lines
        assert any("node-a" in line and "yes" in line.split() for line in lines), lines


# ---------------------------------------------------------------------------
# when Redis fails
# ---------------------------------------------------------------------------

class Traffic:
    """Requests through a proxy, one after another, until stopped: how many failed."""

    def __init__(self, session: aiohttp.ClientSession, url: str):
        self.session, self.url = session, url
        self.ok = 0
        self.failed: list[object] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                async with self.session.get(self.url) as r:
                    await r.read()
                    if r.status == 200:
                        self.ok += 1
                    else:
                        self.failed.append(r.status)
            except aiohttp.ClientError as exc:
                self.failed.append(exc)
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def route_served(session: aiohttp.ClientSession, node: object, path: str) -> bool:
    """Whether ``node``'s proxy answers 200 under ``path``."""
    async with session.get(node.proxy_url + path + "/x") as r:  # type: ignore[attr-defined]
        return r.status == 200


async def cluster_view(session: aiohttp.ClientSession, node: object) -> dict:
    status, view = await get(session, node.admin_url + "/cluster")  # type: ignore[attr-defined]
    assert status == 200
    return view


async def wait_backend_up(session: aiohttp.ClientSession, node: object) -> None:
    """Until ``node``'s /cluster says Redis answers again (within 5 s: the revision
    check every 500 ms finds it)."""
    async def up() -> bool:
        return bool((await cluster_view(session, node))["backend_up"])

    await wait_until(up, timeout=5, message="backend_up again")


async def test_a_node_ready_is_subscribed_so_the_first_change_needs_no_periodic_check(
        lucid_redis, lucid_upstream, lucid_process):
    """A node says it is listening only once its pub/sub subscription is in place (and
    it has read what was committed meanwhile): a route written on A right after B
    said so is served by B long before B's periodic revision check, 60 s here."""
    server = lucid_redis()
    upstream = await lucid_upstream()
    slow_check = cluster_node_config(server.url, upstreams=[upstream.url],
                                     check_interval="60s")
    a = lucid_process(slow_check, env={"LUCID_CLUSTER__NODE_ID": "node-a"})
    b = lucid_process(slow_check, env={"LUCID_CLUSTER__NODE_ID": "node-b"})
    async with aiohttp.ClientSession() as session:
        assert await add_route(session, a, "first") == 201

        async def served() -> bool:
            async with session.get(b.proxy_url + "/first/x") as r:
                return r.status == 200

        await wait_until(served, timeout=5, message="the first route served by B")


async def one_node(lucid_redis, lucid_upstream, lucid_process, appendonly: bool = False):
    """A private Redis and one ``lucid serve`` node on it, in front of an upstream."""
    server = lucid_redis(appendonly=appendonly)
    upstream = await lucid_upstream()
    # appendfsync always: each write waits for an fsync, which on a busy shared disk
    # can take longer than the default 50 ms timeout
    timeout = "1s" if appendonly else "50ms"
    node = lucid_process(node_config(server.url, upstream.url, timeout=timeout), wait=False)
    return server, node.wait_ready(STARTUP)


async def test_a_paused_redis_fails_no_request_and_writes_answer_503(
        lucid_redis, lucid_upstream, lucid_process):
    server, node = await one_node(lucid_redis, lucid_upstream, lucid_process)
    async with aiohttp.ClientSession() as session:
        status = await add_route(session, node, "rt")
        assert status == 201
        traffic = Traffic(session, node.proxy_url + "/rt/x")
        await wait_until(lambda: traffic.ok >= 20, message="traffic flowing")
        server.pause()
        try:
            started = time.monotonic()
            status, refused = await json_request(
                session, "POST", node.admin_url + "/gateway/route",
                json={"id": "rt2", "prefix": "/rt2", "service": "svc"})
            took = time.monotonic() - started
            assert status == 503, refused
            assert server.url.rsplit("/", 1)[0] in refused["error"]
            assert "may still be applied" in refused["error"]
            assert refused["backend"] == server.url
            assert took < 2.0  # a 50 ms timeout, not a hang (generous for a busy machine)
            view = await cluster_view(session, node)
            assert view["backend_up"] is False and view["nodes"][0]["alive"]
            status, health = await get(session, node.admin_url + "/gateway/health")
            assert status == 200, health  # still serving: no reason to leave a balancer
            before = traffic.ok
            await wait_until(lambda: traffic.ok >= before + 50, message="traffic while paused")
        finally:
            server.resume()

        await wait_backend_up(session, node)
        # the refused write may still have run when Redis resumed (it was sent, not
        # answered): the 503 said so. Writing it again replaces it (200) or creates it
        # (201), whether or not this node has yet applied the late write.
        status = await add_route(session, node, "rt2")
        assert status in (200, 201)
        await wait_until(lambda: route_served(session, node, "/rt2"),
                         message="rt2 served after Redis resumed")
        await traffic.stop()
        assert traffic.failed == [] and traffic.ok > 70


async def test_acknowledged_writes_survive_redis_kill_9_with_appendonly(
        lucid_redis, lucid_upstream, lucid_process):
    server, node = await one_node(lucid_redis, lucid_upstream, lucid_process, appendonly=True)
    async with aiohttp.ClientSession() as session:
        traffic = Traffic(session, node.proxy_url + "/static/x")
        for n in range(20):
            assert await add_route(session, node, f"r{n}") == 201
        server.kill()
        status = await add_route(session, node, "lost")
        assert status == 503  # refused, not written locally
        async with session.get(node.proxy_url + "/r19/x") as r:
            assert r.status == 200  # still served from memory
        server.start()

        await wait_backend_up(session, node)
        await traffic.stop()
        assert traffic.failed == [] and traffic.ok > 0
    cluster, backend = await backend_on(server.url)
    try:
        snapshot = await backend.load()
    finally:
        await cluster.close()
    assert sorted(snapshot.of("route")) == sorted(f"r{n}" for n in range(20))
    assert snapshot.revision == 20


async def test_a_node_starts_from_its_snapshot_while_redis_is_down(
        lucid_redis, lucid_upstream, lucid_process):
    from lucid.testing import GatewayProcess

    server, first = await one_node(lucid_redis, lucid_upstream, lucid_process, appendonly=True)
    async with aiohttp.ClientSession() as session:
        status = await add_route(session, first, "rt")
        assert status == 201
        checked = await asyncio.to_thread(run_lucid, "check", "--config",
                                          str(first.config_path))
        assert checked.returncode == 0, checked.stderr
        assert f"checked against the live cluster at {server.url} (revision 1, 1 dynamic " \
            "definitions, 1 node alive)" in checked.stdout
        first.stop()
        server.kill()
        checked = await asyncio.to_thread(run_lucid, "check", "--config",
                                          str(first.config_path))
        assert checked.returncode == 0, checked.stderr
        assert "unreachable" in checked.stdout and \
            "checked against the last-known-good snapshot only (revision 1" in checked.stdout
        again = GatewayProcess(first.config_path)
        try:
            again.wait_ready(STARTUP)
            again.wait_for_line("serving the last-known-good snapshot at revision 1")
            async with session.get(again.proxy_url + "/rt/x") as r:
                assert r.status == 200
            view = await cluster_view(session, again)
            assert view["backend_up"] is False and view["revision"] == 1
            server.start()

            await wait_backend_up(session, again)
            status = await add_route(session, again, "rt2")
            assert status == 201
        finally:
            again.stop()


def test_without_redis_or_a_snapshot_a_node_does_not_start(tmp_path):
    from lucid.testing_redis import free_port

    url = f"redis://lucid:s3cret-pw@127.0.0.1:{free_port()}/0"
    path = write_config("", tmp_path)
    started = run_lucid("serve", "--config", str(path), LUCID_CLUSTER__BACKEND=url)
    assert started.returncode == 2, started.stderr
    assert "no last-known-good snapshot" in started.stderr
    assert "cluster.backend" in started.stderr and "s3cret-pw" not in started.stderr


async def test_with_the_local_backend_cluster_shows_this_node(lucid_gateway):
    gw = await lucid_gateway("")
    status, view = await get(gw.session, gw.admin_url + "/cluster")
    assert status == 200
    assert view["backend"] == "local" and view["backend_up"] is True
    assert [n["node_id"] for n in view["nodes"]] == [view["node_id"]]
    assert view["nodes"][0]["admin"] == gw.admin_url.removeprefix("http://")
    assert gw.runtime.cluster.redis is None and not gw.runtime.cluster.shared


# ---------------------------------------------------------------------------
# workers
# ---------------------------------------------------------------------------

def test_check_says_what_a_redis_backend_shares_and_what_not_yet(tmp_path):
    limits = '[[ratelimiter.limits]]\nid = "per-ip"\nrate = "10/s"\n'
    local = write_config(limits, tmp_path / "local", workers=2)
    refused = run_lucid("check", "--config", str(local))
    assert refused.returncode == 2
    assert "a Redis [cluster] backend" in refused.stderr and \
        "counts every limit once for all workers and nodes" in refused.stderr
    shared = write_config('[cluster]\nbackend = "redis://127.0.0.1:1/0"\n'
                          '[gateway.services.svc]\ninstances = ["http://127.0.0.1:9"]\n'
                          '[loadbalancer.pools.p]\nservice = "svc"\n' + limits,
                          tmp_path / "shared", workers=3)
    accepted = run_lucid("check", "--config", str(shared))
    assert accepted.returncode == 0, accepted.stderr
    assert "no last-known-good snapshot" in accepted.stdout and \
        "only the config file was checked" in accepted.stdout


async def test_a_write_reaches_every_worker_of_a_node(lucid_redis, lucid_upstream,
                                                     lucid_process):
    server = lucid_redis()
    upstream = await lucid_upstream()
    node = lucid_process(node_config(server.url, upstream.url), workers=2, wait=False)
    node.wait_ready(STARTUP)
    async with aiohttp.ClientSession() as session:
        status = await add_route(session, node, "rt")
        assert status == 201

        async def every_worker() -> bool:
            # a new connection each time: the kernel hands them to either worker
            answers = []
            for _ in range(20):
                async with aiohttp.ClientSession() as fresh, \
                        fresh.get(node.proxy_url + "/rt/x") as r:
                    answers.append(r.status)
            return answers == [200] * 20

        await wait_until(every_worker, timeout=10, message="the route on both workers")
        view = await cluster_view(session, node)
        assert view["nodes"][0]["workers"] == 2


async def test_a_node_switched_from_local_to_redis_imports_into_an_empty_cluster_only(
        lucid_redis, lucid_upstream, tmp_path):
    """What a node kept with the local backend (definitions.db, registry.db) goes into
    a cluster never written to; a cluster that has state keeps it, untouched."""
    from lucid_registry.cluster import RedisStore
    from lucid_registry.store import SQLiteStore

    from lucid.definitions import SqliteBackend
    from lucid.testing import GatewayProcess
    from lucid.testing_internal import write_cluster_config

    server = lucid_redis()
    upstream = await lucid_upstream()
    data = tmp_path / "node" / "data"  # where write_config puts the node's data_dir
    data.mkdir(parents=True)
    local = await SqliteBackend.open(data / "definitions.db")  # as a local node left it
    await local.commit([Write("route", "kept", {"id": "kept", "prefix": "/kept",
                                                "service": "svc"})], 0, {})
    await local.close()
    registry = SQLiteStore(data / "registry.db")
    await registry.write(
        services=[{"name": "users", "idx": 1,
                   "body": {"metadata": {}, "tags": [], "check": {}}}],
        instances=[{"service": "users", "id": "u1", "idx": 1, "health": "passing",
                    "maintenance": None, "note": "", "changed_at": 0.0,
                    "body": {"url": upstream.url, "weight": 1, "zone": "",
                             "metadata": {}, "tags": []}}])
    await registry.close()
    # a cluster that has state: nothing imported into it
    seeded, backend = await backend_on(server.url, "seeded:")
    await backend.commit([Write("route", "theirs", {"id": "theirs", "prefix": "/theirs",
                                                    "service": "svc"})], 0, {})
    await RedisStore(seeded).commit([["service", "others", json.dumps(
        {"metadata": {}, "tags": [], "check": {}})]])
    routes = '[[gateway.routes]]\nid = "users"\nprefix = "/users"\nservice = "users"\n'
    try:
        for prefix in ("seeded:", "empty:"):
            path = write_cluster_config(tmp_path / "node", server.url, key_prefix=prefix,
                                        upstreams=[upstream.url], timeout="1s",
                                        extra=routes)
            if prefix == "empty:":  # lucid check prepares what serve will import
                checked = await asyncio.to_thread(run_lucid, "check", "--config", str(path))
                assert checked.returncode == 0, checked.stderr
                assert "it is empty, so the 1 definitions" in checked.stdout, checked.stdout
            node = GatewayProcess(path)
            try:
                node.wait_ready(STARTUP)
                async with aiohttp.ClientSession() as session:
                    status, listed = await get(session, node.admin_url + "/gateway/route")
                    assert status == 200
                    assert [r["id"] for r in listed["routes"]] == (  # type: ignore[index]
                        ["theirs"] if prefix == "seeded:" else ["kept"])
                    async with session.get(node.proxy_url + "/users/x") as r:
                        # the registered instance: only where it was imported
                        assert r.status == (503 if prefix == "seeded:" else 200)
            finally:
                node.stop()
        # imported into Redis, not only served by the node that had them
        cluster, imported = await backend_on(server.url, "empty:")
        try:
            snapshot = await imported.load()
            assert list(snapshot.of("route")) == ["kept"] and snapshot.revision == 1
            assert await cluster.redis.hkeys("empty:registry:services") == ["users"]  # type: ignore[union-attr]
            assert await cluster.redis.hkeys("seeded:registry:services") == ["others"]  # type: ignore[union-attr]
        finally:
            await cluster.close()
        assert "imported 1 definitions" in node.output
        assert "imported 1 services" in node.output
        assert (data / "definitions-imported-to-cluster.json").exists()
    finally:
        await seeded.close()
