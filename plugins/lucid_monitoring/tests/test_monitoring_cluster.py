"""Monitoring across a cluster: ``GET /monitoring/cluster``, the cluster view of the
dashboard, alert rules evaluated once per cluster by a leader elected through Redis,
and the ``node`` label on ``/metrics``.

The cluster tests run three real ``lucid serve`` nodes on a private ``redis-server``, a
real upstream and a loopback webhook receiver that counts the notifications."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import aiohttp
from aiohttp import web
from lucid_monitoring.testing import Receiver, chromium
from prometheus_client.parser import text_string_to_metric_families

from lucid.testing import GatewayProcess, json_request, wait_until

# Three nodes starting at once on a busy two-core machine: generous
STARTUP = 60.0
# How long the admin APIs may take to show what Redis carries (figures are published
# every 200 ms here, rules evaluated every 200 ms)
VISIBLE = 10.0
# The promise: another node leads within 5 s of the leader's kill -9 (lease 3 s)
TAKEOVER = 5.0


async def failing_upstream(request: web.Request) -> web.Response:
    return web.Response(status=500 if request.path.startswith("/fail") else 200, text="ok")


def gateway_config(upstream: str, extra: str = "") -> str:
    return f"""
[[gateway.routes]]
id = "api"
prefix = "/"
service = "svc"
retries = {{ attempts = 1 }}

[gateway.services.svc]
instances = ["{upstream}"]

[monitoring]
{extra}
"""


def series(text: str) -> list[Any]:
    return [sample for family in text_string_to_metric_families(text)
            for sample in family.samples]


async def test_with_the_local_backend_the_cluster_is_this_node(lucid_upstream, lucid_gateway):
    upstream = await lucid_upstream(failing_upstream)
    gw = await lucid_gateway(gateway_config(upstream.url))
    for path in ("/a", "/b", "/fail"):
        async with gw.session.get(gw.proxy_url + path) as r:
            await r.read()
    status, body = await json_request(gw.session, "GET", gw.admin_url + "/monitoring/cluster")
    assert status == 200, body
    me = gw.runtime.cluster.node_id
    assert body["backend"] == "local" and body["node_id"] == me
    assert body["leader"] == me  # it evaluates its own rules, as without a cluster
    (node,) = body["nodes"]
    assert node["node_id"] == me and node["alive"] is True and node["workers"] == 1
    assert node["minute"]["requests"] == 3
    assert node["minute"]["error_rate"] == round(1 / 3, 4)
    assert node["minute"]["p50_ms"] is not None and node["minute"]["p99_ms"] is not None
    assert body["totals"]["nodes"] == 1 and body["totals"]["alive"] == 1
    assert body["totals"]["minute"]["requests"] == 3
    status, body = await json_request(gw.session, "GET", gw.admin_url + "/monitoring/status")
    assert status == 200 and body["cluster"] is None


async def test_node_label_on_every_series_or_on_none(lucid_upstream, lucid_gateway):
    upstream = await lucid_upstream(failing_upstream)
    labelled = await lucid_gateway(gateway_config(upstream.url, "node_label = true"))
    plain = await lucid_gateway(gateway_config(upstream.url))
    for gw in (labelled, plain):
        for path in ("/a", "/fail"):
            async with gw.session.get(gw.proxy_url + path) as r:
                await r.read()
    async with labelled.session.get(labelled.admin_url + "/metrics") as r:
        on = series(await r.text())
    async with plain.session.get(plain.admin_url + "/metrics") as r:
        off = series(await r.text())
    me = labelled.runtime.cluster.node_id
    assert len(on) > 20 and len(off) > 20
    assert {s.labels.get("node") for s in on} == {me}
    assert not [s for s in off if "node" in s.labels]
    requests = [s for s in on if s.name == "lucid_requests_total"]
    assert {(s.labels["code"], s.value) for s in requests} == {("2xx", 1.0), ("5xx", 1.0)}


class Finished:
    """A finished exchange, as the recorder reads it."""

    bytes_in = bytes_out = 10
    attempts = 1
    instance = "i"
    upstream_duration = 0.002
    client_ip = "10.0.0.1"
    service = "svc"

    def __init__(self, route: str, status: int, duration: float):
        self.route_id, self.method, self.status, self.duration = route, "GET", status, duration


class Attempt:
    def __init__(self, kind: str):
        self.kind, self.duration = kind, 0.002


def test_published_windows_kept_as_running_sums_equal_sums_made_afresh():
    from lucid_monitoring.clustered import ClusterFigures, WindowSums, node_figures
    from lucid_monitoring.metrics import COUNT, ERRORS, WINDOWS, Recorder

    rec = Recorder([0.01, 0.1, 1.0])
    start = 1_000_000.0
    rec.started = start
    sums = WindowSums()
    for tick in range(1, 520):  # past 360 slots: the 1 h window drops its oldest
        now = start + 10.0 * tick
        for n in range(tick % 5):
            rec.observe(Finished(f"r{n}", 500 if (tick + n) % 3 == 0 else 200,
                                 0.005 * (1 + (tick + n) % 50)))
            rec.outcome("svc", "i", Attempt("success" if n % 2 else "timeout"))
        rec.observe_event("limit_rejected", {"limit": f"l{tick % 2}"})
        if tick % 4:
            rec.tick(now)
        if tick % 7 == 0:  # between ticks too: the open slot has traffic
            kept = node_figures(rec, "n", list(WINDOWS), now + 3.0, sums)
            assert kept == node_figures(rec, "n", list(WINDOWS), now + 3.0)
            merged = ClusterFigures(rec.bounds, [kept])
            for seconds in WINDOWS.values():
                covered, routes, instances, rejections = rec.window(seconds, now + 3.0)
                mine = merged.window(seconds)
                assert mine[0] == covered
                assert sum(e[COUNT] for e in mine[1].values()) == sum(
                    e[COUNT] for e in routes.values())
                assert sum(e[ERRORS] for e in mine[1].values()) == sum(
                    e[ERRORS] for e in routes.values())
                assert {k: v[:2] for k, v in mine[2].items()} == {
                    k: v[:2] for k, v in instances.items() if v[0]}
                assert mine[3] == {k: v for k, v in rejections.items() if v}


# ---------------------------------------------------------------------------
# three `lucid serve` nodes on a private Redis
# ---------------------------------------------------------------------------

def node_config(backend: str, upstream: str, hook: str) -> str:
    return f"""
[cluster]
backend = "{backend}"
timeout = "500ms"
""" + gateway_config(upstream, f"""evaluation_interval = "200ms"
cluster_interval = "200ms"
leader_lease = "3s"

[[monitoring.notifiers]]
type = "webhook"
url = "{hook}"
backoff_initial = "100ms"
""")


async def get(session: aiohttp.ClientSession, node: GatewayProcess, path: str) -> Any:
    status, body = await json_request(session, "GET", node.admin_url + path)
    assert status == 200, (path, body)
    return body


async def send(session: aiohttp.ClientSession, node: GatewayProcess, path: str,
               times: int) -> None:
    for _ in range(times):
        async with session.get(node.proxy_url + path) as r:
            await r.read()


async def alert(session: aiohttp.ClientSession, node: GatewayProcess) -> dict[str, Any] | None:
    body = await get(session, node, "/monitoring/alerts")
    found = [a for a in body["alerts"] if a["name"] == "ClusterErrors"]
    return found[0] if found else None


async def quiet_after(session: aiohttp.ClientSession, nodes: list[GatewayProcess],
                      since: float) -> None:
    """Wait until every node shows the rule evaluated well after ``since`` (five
    evaluations): a second notification would have been sent by then."""
    async def evaluated() -> bool:
        shown = await asyncio.gather(*(get(session, n, "/monitoring/status") for n in nodes))
        return all((s["alerts_evaluated_at"] or 0) > since + 1.0 for s in shown)

    await wait_until(evaluated, timeout=VISIBLE, message="five more evaluations")


async def test_three_nodes_one_view_one_leader_one_webhook_per_change(
        lucid_redis, lucid_upstream, lucid_process, tmp_path):
    server = lucid_redis()
    upstream = await lucid_upstream(failing_upstream)
    receiver = Receiver()
    hook = await lucid_upstream(receiver)
    text = node_config(server.url, upstream.url, hook.url + "/hook")
    started = [lucid_process(text, env={"LUCID_CLUSTER__NODE_ID": name, **extra}, wait=False)
               for name, extra in (("node-a", {"LUCID_MONITORING__NODE_LABEL": "true"}),
                                   ("node-b", {}), ("node-c", {}))]
    nodes = [node.wait_ready(timeout=STARTUP) for node in started]
    a, b, c = nodes
    names = {"node-a": a, "node-b": b, "node-c": c}
    async with aiohttp.ClientSession() as session:
        # every node lists all three, alive, and names one and the same leader
        async def one_view() -> list[dict[str, Any]] | None:
            views = await asyncio.gather(*(get(session, n, "/monitoring/cluster")
                                           for n in nodes))
            ok = all([x["node_id"] for x in v["nodes"]] == ["node-a", "node-b", "node-c"]
                     and all(x["alive"] for x in v["nodes"]) for v in views)
            leaders = {v["leader"] for v in views}
            return views if ok and len(leaders) == 1 and None not in leaders else None

        views = await wait_until(one_view, timeout=STARTUP, message="one view, one leader")
        assert all(v["backend"] == "redis" for v in views)
        # a rule written through node B reaches every node (the definitions layer)
        status, created = await json_request(session, "POST",
                                             b.admin_url + "/monitoring/alerts", json={
            "name": "ClusterErrors", "metric": "error_rate", "op": ">",
            "threshold": 0.4, "window": "1m", "severity": "critical"})
        assert status == 201, created
        for node in nodes:
            await wait_until(lambda node=node: alert(session, node), timeout=VISIBLE,
                             message="the rule on every node")

        # 10 good requests through C, then 4 errors through A and 4 through B: each
        # node alone is at 100 % or 0 %; the cluster is at 4/14 (< 0.4), then 8/18
        await send(session, c, "/ok", 10)

        async def totals(requests: int) -> bool:
            views = await asyncio.gather(*(get(session, n, "/monitoring/cluster")
                                           for n in nodes))
            return all(v["totals"]["minute"]["requests"] == requests for v in views)

        await wait_until(lambda: totals(10), timeout=VISIBLE, message="C's figures everywhere")
        await send(session, a, "/fail", 4)
        await send(session, b, "/fail", 4)
        fired = await wait_until(lambda: receiver.payloads, timeout=VISIBLE,
                                 message="the firing webhook")
        assert fired[0]["status"] == "firing"
        assert fired[0]["commonLabels"]["alertname"] == "ClusterErrors"
        assert float(fired[0]["commonAnnotations"]["value"]) == round(8 / 18, 6)

        # /monitoring/cluster on every node: all three with their own figures
        await wait_until(lambda: totals(18), timeout=VISIBLE, message="every figure")
        view = await get(session, c, "/monitoring/cluster")
        minute = {n["node_id"]: n["minute"] for n in view["nodes"]}
        assert {k: (m["requests"], m["error_rate"]) for k, m in minute.items()} == {
            "node-a": (4, 1.0), "node-b": (4, 1.0), "node-c": (10, 0.0)}
        assert all(m["rps"] > 0 and m["p50_ms"] is not None and m["p99_ms"] is not None
                   for m in minute.values())
        assert view["totals"]["minute"]["error_rate"] == round(8 / 18, 4)
        assert (view["totals"]["nodes"], view["totals"]["alive"]) == (3, 3)
        assert all(n["workers"] == 1 for n in view["nodes"])

        async def same_revision() -> bool:  # membership is renewed every second
            nodes = (await get(session, c, "/monitoring/cluster"))["nodes"]
            return {n["revision"] for n in nodes} == {view["revision"]} != {0}

        await wait_until(same_revision, timeout=VISIBLE, message="the rule's revision")

        # every node shows it firing (the followers copy the leader's states) and
        # nothing more is sent however many evaluations follow
        async def firing_everywhere() -> bool:
            shown = await asyncio.gather(*(alert(session, n) for n in nodes))
            return all(x is not None and x["state"] == "firing" for x in shown)

        await wait_until(firing_everywhere, timeout=VISIBLE, message="firing on every node")
        await quiet_after(session, nodes, time.time())
        assert receiver.states() == ["firing"]

        # the dashboard's cluster view, in a real browser, on node C
        dom = await chromium(tmp_path, "--virtual-time-budget=3000", "--dump-dom",
                             c.admin_url + "/monitoring/ui?interval=300")
        cluster_view = dom.split('id="cluster"', 1)[1].split("</section>", 1)[0]
        rows = re.findall(r"<tr[^>]*>(.*?)</tr>", cluster_view)
        # the text of each cell (long names carry <wbr> break points)
        cells = [[re.sub(r"<[^>]+>", "", cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row)]
                 for row in rows[1:]]
        assert [r[0] for r in cells] == ["node-a", "node-b", "node-c (this node)", "cluster"]
        assert [r[1] for r in cells[:3]] == ["alive"] * 3 and cells[3][1] == "3/3 alive"
        assert [r[6] for r in cells] == ["100%", "100%", "0%", "44.4%"]
        assert sum(1 for r in cells if r[2] == "leader") == 1
        assert '<tr class="cluster-total">' in cluster_view
        assert "alerts evaluated by node-" in dom

        # node_label: node A (true) labels every series, node B (default) none
        async with session.get(a.admin_url + "/metrics") as r:
            labelled = series(await r.text())
        async with session.get(b.admin_url + "/metrics") as r:
            plain = series(await r.text())
        assert {s.labels.get("node") for s in labelled} == {"node-a"}
        assert not [s for s in plain if "node" in s.labels]

        # 20 good requests through A and 20 through B: 8/58, resolved, once. Then the
        # cluster stays under 0.4 whichever node is killed below (its figures leave)
        await send(session, a, "/ok", 20)
        await send(session, b, "/ok", 20)
        await wait_until(lambda: len(receiver.payloads) >= 2, timeout=VISIBLE,
                         message="the resolved webhook")
        await quiet_after(session, nodes, time.time())
        assert receiver.states() == ["firing", "resolved"], receiver.payloads

        # kill -9 the leader: another node takes over within 5 s
        leader = (await get(session, a, "/monitoring/cluster"))["leader"]
        dead = names[leader]
        dead.proc.kill()
        killed = time.monotonic()
        alive = [n for n in nodes if n is not dead]

        async def new_leader() -> str | None:
            views = await asyncio.gather(*(get(session, n, "/monitoring/cluster")
                                           for n in alive))
            leaders = {v["leader"] for v in views}
            return leaders.pop() if len(leaders) == 1 and None not in leaders \
                and leader not in leaders else None

        successor = await wait_until(new_leader, timeout=TAKEOVER, interval=0.05,
                                     message="a new leader within 5 s")
        took = time.monotonic() - killed
        print(f"leader {leader} killed; {successor} took over in {took:.2f} s")
        assert took < TAKEOVER and successor in names
        # still one webhook per state change: nothing re-sent by the takeover ...
        await quiet_after(session, alive, time.time())
        assert receiver.states() == ["firing", "resolved"], receiver.payloads
        # ... and the next change is sent once, by the new leader
        await send(session, alive[0], "/fail", 40)
        await wait_until(lambda: len(receiver.payloads) >= 3, timeout=VISIBLE,
                         message="the second firing webhook")
        await quiet_after(session, alive, time.time())
        assert receiver.states() == ["firing", "resolved", "firing"]
        # a rule deleted through one node leaves every node
        async with session.delete(alive[1].admin_url + "/monitoring/alerts/ClusterErrors") as r:
            assert r.status == 204
        for node in alive:
            await wait_until(lambda node=node: _gone(session, node), timeout=VISIBLE,
                             message="the rule deleted on every node")


async def _gone(session: aiohttp.ClientSession, node: GatewayProcess) -> bool:
    return await alert(session, node) is None


# ---------------------------------------------------------------------------
# in this process: two gateways on one Redis
# ---------------------------------------------------------------------------

async def test_a_stopped_leader_frees_the_lock_and_without_redis_nobody_leads(
        lucid_redis, lucid_upstream, tmp_path):
    from contextlib import AsyncExitStack

    from redis.asyncio import Redis

    from lucid.testing import run_gateway

    server = lucid_redis()
    upstream = await lucid_upstream(failing_upstream)

    def text(node: str) -> str:
        return f'[cluster]\nbackend = "{server.url}"\nnode_id = "{node}"\n' + gateway_config(
            upstream.url, 'cluster_interval = "100ms"\nleader_lease = "1s"\n'
                          'evaluation_interval = "100ms"\n[[monitoring.alerts]]\n'
                          'name = "Busy"\nmetric = "request_rate"\nthreshold = 1000')

    async with AsyncExitStack() as stack:
        redis = Redis.from_url(server.url, decode_responses=True)
        stack.push_async_callback(redis.aclose)
        gateways: dict[str, Any] = {}
        stacks: dict[str, AsyncExitStack] = {}
        for name in ("one", "two"):
            stacks[name] = AsyncExitStack()
            stack.push_async_callback(stacks[name].aclose)  # whatever happens below
            gateways[name] = await stacks[name].enter_async_context(
                run_gateway(text(name), tmp_path / name))

        async def leader(gw: Any) -> str | None:
            status, body = await json_request(gw.session, "GET",
                                              gw.admin_url + "/monitoring/cluster")
            assert status == 200, body
            return body["leader"]  # type: ignore[no-any-return]

        async def agreed() -> str | None:
            seen = {await leader(gw) for gw in gateways.values()}
            return seen.pop() if len(seen) == 1 and None not in seen else None

        first = await wait_until(agreed, timeout=VISIBLE, message="one leader")
        other = "two" if first == "one" else "one"
        one = gateways[other]  # the one left
        # the leader stopped (SIGTERM's path) frees the lock at once
        await stacks[first].aclose()
        held = await redis.get("lucid:monitoring:leader")
        assert held is None or not held.startswith(first + "/"), held
        await wait_until(lambda: leader(one), timeout=VISIBLE, message="the other leads")
        assert await leader(one) == other
        plugin = one.runtime.plugin_set.pm.get_plugin("monitoring")
        # the lock taken from under it (as when this node was paused past its lease and
        # another took over): its state write is refused, it sends nothing, steps down
        async def written() -> bool:  # the leader writes its rule's state
            return "Busy" in await redis.hgetall("lucid:monitoring:alerts")

        await wait_until(written, timeout=VISIBLE, message="the leader's first evaluation")
        await redis.set("lucid:monitoring:leader", "intruder/run", px=60_000)
        since = await redis.hgetall("lucid:monitoring:alerts")
        assert await plugin.evaluate() == []
        assert plugin.monitor.leading is False
        assert await leader(one) == "intruder"
        assert await redis.hgetall("lucid:monitoring:alerts") == since  # nothing written
        await redis.delete("lucid:monitoring:leader")
        await wait_until(lambda: plugin.monitor.leading, timeout=VISIBLE,
                         message="leading again once the lock is free")
        # Redis hung: nobody can hold the lock, so nobody evaluates
        server.pause()
        try:
            await wait_until(lambda: _no_leader(leader, one), timeout=VISIBLE,
                             message="no leader while Redis is paused")
            assert plugin.monitor.leading is False
            assert await plugin.evaluate() == []
            status, body = await json_request(one.session, "GET",
                                              one.admin_url + "/monitoring/status")
            assert status == 200 and body["cluster"]["leading"] is False
        finally:
            server.resume()
        await wait_until(lambda: leader(one), timeout=VISIBLE, message="leading again")


async def _no_leader(leader: Any, gw: Any) -> bool:
    return await leader(gw) is None
