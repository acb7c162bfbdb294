"""Circuit breakers in cluster scope: three ``lucid serve`` nodes on a private Redis.
A circuit opened by one node's traffic is open on every node (no upstream call from
the others), operator actions on any node reach every node, half-open probes are
counted for the whole cluster, and with Redis paused each node goes on alone."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from lucid_circuitbreaker.testing import Switch, guarded, plugin_of

from lucid.config import ConfigError
from lucid.testing import GatewayProcess, json_request, wait_until
from lucid.testing_internal import cluster_node_config

# The promise: a trip, a reset or any operator action through one node is taken by
# every node within 100 ms of the answer to the request that caused it (the tripping
# call's 500, the admin write's 200). Measured with each node's own record of when its
# breaker moved ("since", wall clock, one host), so a busy shared machine (two cores,
# several test suites) that is slow to answer the admin polls does not fail the suite;
# the revision check runs every 10 s, so a move within 100 ms can only have come by
# pub/sub. The figures are printed (pytest -s); p50/p99 come from bench/bench_cluster.py.
PROPAGATION = 0.1
# How long polling the admin APIs may take to see it (a busy machine is slow to answer)
VISIBLE = 5.0


def node_config(backend: str, upstream: str, wait: str = "1s", check: str = "10s") -> str:
    return guarded([upstream], f"""consecutive_failures = 3
wait_duration_in_open_state = "{wait}"
permitted_number_of_calls_in_half_open_state = 2""",
                   # 500 ms: a busy test machine may be slow to answer; no request waits on it
                   head=cluster_node_config(backend, check_interval=check, timeout="500ms"))


async def three_nodes(lucid_redis: Any, lucid_upstream: Any, lucid_process: Any,
                      wait: str = "1s", check: str = "10s"
                      ) -> tuple[Any, Switch, list[GatewayProcess]]:
    """A private Redis, an upstream answering 500 (``Switch``) and three nodes on them,
    each subscribed to the shared state (reachable) before the test starts."""
    server = lucid_redis()
    switch = Switch(500)
    upstream = await lucid_upstream(switch)
    nodes = [lucid_process(node_config(server.url, upstream.url, wait, check),
                           env={"LUCID_CLUSTER__NODE_ID": name}, wait=False)
             for name in ("node-a", "node-b", "node-c")]
    # generous: three nodes starting at once on a busy two-core machine
    ready = [node.wait_ready(timeout=60) for node in nodes]
    async with aiohttp.ClientSession() as session:
        for node in ready:
            async def reachable(node: GatewayProcess = node) -> bool:
                _, listed = await json_request(session, "GET",
                                               node.admin_url + "/circuitbreaker/status")
                assert listed["scope"] == "cluster"
                return listed["shared_state_reachable"] is True

            await wait_until(reachable, timeout=VISIBLE,
                             message=f"{node.admin_url} reaching the shared state")
    return server, switch, ready


async def state(session: aiohttp.ClientSession, node: GatewayProcess) -> dict[str, Any]:
    status, body = await json_request(session, "GET",
                                      node.admin_url + "/circuitbreaker/circuits/cb")
    assert status == 200, body
    result: dict[str, Any] = body["status"]
    return result


async def everywhere(session: aiohttp.ClientSession, nodes: list[GatewayProcess],
                     wanted: str, what: str, answered: float) -> float:
    """Wait until every node's admin API shows ``wanted``; then assert that each node
    moved within ``PROPAGATION`` of ``answered`` (the wall-clock time the causing
    request was answered), and return the latest node's lag (seconds)."""
    async def shown() -> list[dict[str, Any]] | None:
        states = await asyncio.gather(*(state(session, n) for n in nodes))
        return states if all(s["state"] == wanted for s in states) else None

    states = await wait_until(shown, timeout=VISIBLE, interval=0.005, message=what)
    polled = time.time() - answered
    lags = [s["since"] - answered for s in states]
    lag = max(lags)
    print(f"{what}: every node moved within {lag * 1000:.0f} ms of the answer "
          f"(shown to the polls after {polled * 1000:.0f} ms)")
    assert lag <= PROPAGATION, (what, [round(x * 1000) for x in lags])
    return lag


async def state_is(session: aiohttp.ClientSession, node: GatewayProcess, wanted: str) -> bool:
    return (await state(session, node))["state"] == wanted


async def call(session: aiohttp.ClientSession, node: GatewayProcess) -> int:
    async with session.get(node.proxy_url + "/x") as response:
        await response.read()
        return response.status


async def admin(session: aiohttp.ClientSession, node: GatewayProcess,
                action: str) -> tuple[int, Any]:
    return await json_request(session, "POST",
                              node.admin_url + f"/circuitbreaker/circuits/cb/{action}")


async def acted(session: aiohttp.ClientSession, node: GatewayProcess, action: str) -> float:
    """An operator action through ``node``: the wall-clock time of its 200."""
    status, body = await admin(session, node, action)
    assert status == 200, body
    return time.time()


async def tripped(session: aiohttp.ClientSession, node: GatewayProcess) -> float:
    """Three failed calls through ``node`` trip the circuit: the time of the third 500."""
    assert [await call(session, node) for _ in range(3)] == [500] * 3
    return time.time()


async def test_a_trip_and_operator_actions_on_one_node_reach_every_node(
        lucid_redis: Any, lucid_upstream: Any, lucid_process: Any) -> None:
    server, switch, nodes = await three_nodes(lucid_redis, lucid_upstream, lucid_process)
    a, b, c = nodes
    async with aiohttp.ClientSession() as session:
        # three failures through A trip the circuit; B and C take it within 100 ms
        await everywhere(session, nodes, "open", "open on every node",
                         await tripped(session, a))
        calls = switch.calls
        # no upstream call from any node while it is open
        answers = [await call(session, node) for node in (b, c, a) for _ in range(5)]
        assert answers == [503] * 15 and switch.calls == calls
        # reset on C closes it on A and B; traffic flows again through every node
        switch.status = 200
        await everywhere(session, nodes, "closed", "reset on every node",
                         await acted(session, c, "reset"))
        assert [await call(session, node) for node in nodes] == [200] * 3
        # force-open on B, disable on A, reset on C: each reaches every node
        await everywhere(session, nodes, "forced_open", "force-open on every node",
                         await acted(session, b, "force-open"))
        calls = switch.calls
        assert [await call(session, node) for node in nodes] == [503] * 3
        assert switch.calls == calls
        await everywhere(session, nodes, "metrics_only", "disable on every node",
                         await acted(session, a, "disable"))
        await everywhere(session, nodes, "closed", "reset again",
                         await acted(session, c, "reset"))
        # tripped again, through B this time: open on every node within 100 ms
        switch.status = 500
        await everywhere(session, nodes, "open", "open again on every node",
                         await tripped(session, b))
        calls = switch.calls
        assert [await call(session, node) for node in (a, c)] == [503] * 2
        assert switch.calls == calls
        assert (await admin(session, a, "reset"))[0] == 200
        # a node started now takes the shared state (modes too) from Redis
        assert (await admin(session, a, "force-open"))[0] == 200
        late = lucid_process(a.config_path.read_text(), env={"LUCID_CLUSTER__NODE_ID": "node-d"},
                             wait=False, data_dir=str(a.config_path.parent / "late"))
        late.wait_ready(timeout=60)
        await wait_until(lambda: state_is(session, late, "forced_open"), timeout=VISIBLE,
                         message="a new node forced open")
        assert await call(session, late) == 503


async def test_half_open_probes_are_counted_for_the_whole_cluster(
        lucid_redis: Any, lucid_upstream: Any, lucid_process: Any) -> None:
    server, switch, nodes = await three_nodes(lucid_redis, lucid_upstream, lucid_process)
    a, b, c = nodes
    async with aiohttp.ClientSession() as session:
        await everywhere(session, nodes, "open", "open on every node",
                         await tripped(session, b))
        await asyncio.sleep(1.0)  # wait_duration_in_open_state: probes may start
        calls = switch.calls

        async def reopened() -> bool:
            # every node asks in turn; 2 probe slots for the whole cluster, not 2 each
            for node in nodes:
                await call(session, node)
            states = await asyncio.gather(*(state(session, n) for n in nodes))
            return all(s["state"] == "open" and s["trips"] == 2 for s in states)

        await wait_until(reopened, timeout=5, interval=0.005,
                         message="two failed probes reopen it on every node")
        assert switch.calls - calls == 2
        # the cluster judged the two probes together, whichever nodes made them
        states = await asyncio.gather(*(state(session, n) for n in nodes))
        assert {s["reason"] for s in states} == {"2 of 2 probe calls failed"}, states
        # the upstream recovers: two probes close it on every node
        switch.status = 200
        await asyncio.sleep(1.0)
        calls = switch.calls

        async def closed() -> bool:
            for node in nodes:
                await call(session, node)
            states = await asyncio.gather(*(state(session, n) for n in nodes))
            return all(s["state"] == "closed" for s in states)

        await wait_until(closed, timeout=5, interval=0.005,
                         message="two good probes close it on every node")
        states = await asyncio.gather(*(state(session, n) for n in nodes))
        assert {s["reason"] for s in states} == {"2 probe calls succeeded"}, states
        assert [await call(session, node) for node in nodes] == [200] * 3


async def test_with_redis_paused_each_node_decides_alone_and_rejoins(
        lucid_redis: Any, lucid_upstream: Any, lucid_process: Any) -> None:
    server, switch, (a, b, c) = await three_nodes(lucid_redis, lucid_upstream, lucid_process,
                                                  wait="30s", check="200ms")
    async with aiohttp.ClientSession() as session:
        assert [await call(session, node) for node in (a, b, c)] == [500] * 3
        server.pause()
        try:
            # A trips alone: every answer comes without waiting on the paused Redis
            started = time.monotonic()
            assert [await call(session, a) for _ in range(5)] == [500] * 2 + [503] * 3
            assert time.monotonic() - started < 2.0  # no Redis timeout per request
            assert (await state(session, a))["state"] == "open"

            async def alone() -> bool:
                _, body = await json_request(session, "GET",
                                             a.admin_url + "/circuitbreaker/status")
                return body["shared_state_reachable"] is False

            await wait_until(alone, timeout=5, message="A sees Redis unreachable")
            # B did not hear of it: it goes on deciding alone, and calls the upstream
            calls = switch.calls
            assert await call(session, b) == 500 and switch.calls == calls + 1
            assert (await state(session, b))["state"] == "closed"
        finally:
            server.resume()
        # Redis back: A's trip, made alone, is published and B and C take it
        for node in (a, b, c):
            await wait_until(lambda node=node: state_is(session, node, "open"), timeout=VISIBLE,
                             message="A's trip shared after Redis resumed")
        calls = switch.calls
        assert [await call(session, node) for node in (b, c)] == [503] * 2
        assert switch.calls == calls


# ---------------------------------------------------------------------------
# in this process: two gateways on one Redis
# ---------------------------------------------------------------------------

def readme_cluster_block() -> str:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Cluster scope", 1)[1]
    return section.split("```toml\n", 1)[1].split("```", 1)[0]


async def test_cluster_scope_needs_a_redis_backend(lucid_gateway: Any) -> None:
    with pytest.raises(ConfigError) as refused:
        await lucid_gateway('[circuitbreaker]\nscope = "cluster"\n')
    assert "circuitbreaker.scope = 'cluster' needs a Redis backend" in str(refused.value.render())


async def test_ejection_is_capped_for_the_whole_cluster(
        lucid_redis: Any, lucid_upstream: Any, lucid_gateway: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", "lucid.circuitbreaker")
    server = lucid_redis()
    first, second = Switch(500), Switch(500)
    ups = [await lucid_upstream(first), await lucid_upstream(second)]
    text = guarded([up.url for up in ups], "\n".join([
        'scope = "instance"', "consecutive_failures = 2", "max_ejection_percent = 50",
        'wait_duration_in_open_state = "60s"']),
                   head=readme_cluster_block().replace("redis://127.0.0.1:6379/0", server.url))
    one, two = await lucid_gateway(text), await lucid_gateway(text)
    assert plugin_of(one).shared is not None  # the README's block: cluster scope

    async def status(gw: Any) -> dict[str, Any]:
        async with gw.session.get(gw.admin_url + "/circuitbreaker/circuits/cb") as r:
            body: dict[str, Any] = (await r.json())["status"]
            return body

    # two failures on each instance through the first gateway: the first to trip is
    # ejected for the cluster; the second trips, but the cap (1 of 2) keeps it in
    for _ in range(4):
        async with one.session.get(one.proxy_url + "/") as r:
            assert r.status == 500
    ejected = (await status(one))["ejected"]
    assert len(ejected) == 1
    # the second trip reached Redis, which refused to eject it (the cap, cluster-wide)
    await wait_until(lambda: "max_ejection_percent reached" in caplog.text, timeout=15,
                     message="the cluster refusing the second ejection")

    async def ejected_on_two() -> bool:
        async with two.session.get(two.proxy_url + "/") as r:  # learns the instances
            await r.read()
        return bool((await status(two))["ejected"] == ejected)

    await wait_until(ejected_on_two, timeout=15, message="the ejection on the second gateway")
    # the second gateway trips the other instance too: still one ejected for the cluster
    for _ in range(3):
        async with two.session.get(two.proxy_url + "/") as r:
            assert r.status == 500
    assert (await status(two))["ejected"] == ejected
    assert (await status(one))["ejected"] == ejected
    # an operator mode set through one gateway is the other's too (kept for a redefinition)
    async with one.session.post(one.admin_url + "/circuitbreaker/circuits/cb/force-open") as r:
        assert r.status == 200
    await wait_until(lambda: plugin_of(two).modes == {"cb": "forced_open"}, timeout=15,
                     message="the mode on the second gateway")
    assert (await status(two))["state"] == "forced_open"


async def test_a_redis_restarted_empty_leaves_no_circuit_stuck_open(
        lucid_redis: Any, lucid_upstream: Any, lucid_gateway: Any) -> None:
    server = lucid_redis()
    switch = Switch(500)
    upstream = await lucid_upstream(switch)
    gw = await lucid_gateway(node_config(server.url, upstream.url, check="200ms"))
    plugin = plugin_of(gw)
    await wait_until(lambda: plugin.shared.live, message="the shared state reachable")

    async def get() -> int:
        async with gw.session.get(gw.proxy_url + "/x") as r:
            return r.status

    assert [await get() for _ in range(3)] == [500] * 3
    await wait_until(lambda: plugin.shared.links[("cb", "")].rev > 0,
                     message="the trip in Redis")
    server.restart()  # no persistence: every breaker entry and revision is gone
    switch.status = 200
    # after the open wait (1 s) this gateway asks Redis for a probe, finds nothing, and
    # closes the circuit rather than waiting for a half-open Redis will never start
    await wait_until(lambda: get_ok(get), timeout=10, interval=0.05,
                     message="the circuit closed again")
    assert plugin.circuits["cb"].breaker.state == "closed"


async def get_ok(get: Any) -> bool:
    return bool(await get() == 200)
