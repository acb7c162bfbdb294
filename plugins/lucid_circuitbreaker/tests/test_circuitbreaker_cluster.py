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
from lucid_circuitbreaker.testing import Switch, plugin_of

from lucid.config import ConfigError
from lucid.testing import GatewayProcess, json_request, wait_until

# How long a change made through one node may take to show on every node (the
# promise: 100 ms). The measured figure is printed (pytest -s) for the record.
PROPAGATION = 0.1


def node_config(backend: str, upstream: str, wait: str = "1s") -> str:
    return f"""
[cluster]
backend = "{backend}"
check_interval = "200ms"

[gateway.services.svc]
instances = ["{upstream}"]

[[gateway.routes]]
prefix = "/"
service = "svc"
retries = {{ attempts = 1 }}

[circuitbreaker.circuits.cb]
service = "svc"
consecutive_failures = 3
wait_duration_in_open_state = "{wait}"
permitted_number_of_calls_in_half_open_state = 2
"""


def three_nodes(lucid_process: Any, backend: str, upstream: str,
                wait: str = "1s") -> list[GatewayProcess]:
    nodes = [lucid_process(node_config(backend, upstream, wait),
                           env={"LUCID_CLUSTER__NODE_ID": name}, wait=False)
             for name in ("node-a", "node-b", "node-c")]
    return [node.wait_ready(timeout=60) for node in nodes]


async def state(session: aiohttp.ClientSession, node: GatewayProcess) -> dict[str, Any]:
    status, body = await json_request(session, "GET",
                                      node.admin_url + "/circuitbreaker/circuits/cb")
    assert status == 200, body
    result: dict[str, Any] = body["status"]
    return result


async def everywhere(session: aiohttp.ClientSession, nodes: list[GatewayProcess],
                     wanted: str, timeout: float, what: str) -> float:
    """Wait until every node's admin API shows ``wanted``; the seconds it took."""
    started = time.monotonic()

    async def shown() -> bool:
        states = await asyncio.gather(*(state(session, n) for n in nodes))
        return all(s["state"] == wanted for s in states)

    await wait_until(shown, timeout=timeout, interval=0.002, message=what)
    took = time.monotonic() - started
    print(f"{what}: {took * 1000:.1f} ms")
    return took


async def call(session: aiohttp.ClientSession, node: GatewayProcess) -> int:
    async with session.get(node.proxy_url + "/x") as response:
        await response.read()
        return response.status


async def admin(session: aiohttp.ClientSession, node: GatewayProcess,
                action: str) -> tuple[int, Any]:
    return await json_request(session, "POST",
                              node.admin_url + f"/circuitbreaker/circuits/cb/{action}")


async def test_a_trip_and_operator_actions_on_one_node_reach_every_node(
        lucid_redis: Any, lucid_upstream: Any, lucid_process: Any) -> None:
    server = lucid_redis()
    switch = Switch(500)
    upstream = await lucid_upstream(switch)
    a, b, c = nodes = three_nodes(lucid_process, server.url, upstream.url)
    async with aiohttp.ClientSession() as session:
        status, listed = await json_request(session, "GET", b.admin_url + "/circuitbreaker/status")
        assert listed["scope"] == "cluster" and listed["shared_state_reachable"] is True
        # three failures through A trip the circuit; B and C show it open at once
        assert [await call(session, a) for _ in range(3)] == [500] * 3
        await everywhere(session, nodes, "open", PROPAGATION, "open on every node")
        calls = switch.calls
        # no upstream call from any node while it is open
        answers = [await call(session, node) for node in (b, c, a) for _ in range(5)]
        assert answers == [503] * 15 and switch.calls == calls
        # reset on C closes it on A and B; traffic flows again through every node
        switch.status = 200
        assert (await admin(session, c, "reset"))[0] == 200
        await everywhere(session, nodes, "closed", PROPAGATION, "reset on every node")
        assert [await call(session, node) for node in nodes] == [200] * 3
        # force-open on B, disable on A, reset on C: each reaches every node
        assert (await admin(session, b, "force-open"))[0] == 200
        await everywhere(session, nodes, "forced_open", PROPAGATION,
                         "force-open on every node")
        assert [await call(session, node) for node in nodes] == [503] * 3
        assert (await admin(session, a, "disable"))[0] == 200
        await everywhere(session, nodes, "metrics_only", PROPAGATION,
                         "disable on every node")
        assert (await admin(session, c, "reset"))[0] == 200
        await everywhere(session, nodes, "closed", PROPAGATION, "reset again")
        # a node started now takes the shared state (modes too) from Redis
        assert (await admin(session, a, "force-open"))[0] == 200
        late = lucid_process(node_config(server.url, upstream.url),
                             env={"LUCID_CLUSTER__NODE_ID": "node-d"})
        await everywhere(session, [late], "forced_open", 5, "a new node forced open")
        assert await call(session, late) == 503


async def test_half_open_probes_are_counted_for_the_whole_cluster(
        lucid_redis: Any, lucid_upstream: Any, lucid_process: Any) -> None:
    server = lucid_redis()
    switch = Switch(500)
    upstream = await lucid_upstream(switch)
    a, b, c = nodes = three_nodes(lucid_process, server.url, upstream.url)
    async with aiohttp.ClientSession() as session:
        assert [await call(session, b) for _ in range(3)] == [500] * 3
        await everywhere(session, nodes, "open", PROPAGATION, "open on every node")
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
        assert [await call(session, node) for node in nodes] == [200] * 3


async def test_with_redis_paused_each_node_decides_alone_and_rejoins(
        lucid_redis: Any, lucid_upstream: Any, lucid_process: Any) -> None:
    server = lucid_redis()
    switch = Switch(500)
    upstream = await lucid_upstream(switch)
    a, b, c = three_nodes(lucid_process, server.url, upstream.url, wait="30s")
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
        await everywhere(session, [a, b, c], "open", 5, "A's trip shared after Redis resumed")
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
    text = readme_cluster_block().replace("redis://127.0.0.1:6379/0", server.url) + f"""
[gateway.services.svc]
instances = ["{ups[0].url}", "{ups[1].url}"]

[[gateway.routes]]
prefix = "/"
service = "svc"
retries = {{ attempts = 1 }}

[circuitbreaker.circuits.cb]
service = "svc"
scope = "instance"
consecutive_failures = 2
max_ejection_percent = 50
wait_duration_in_open_state = "60s"
"""
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
    await wait_until(lambda: "max_ejection_percent reached" in caplog.text, timeout=5,
                     message="the cluster refusing the second ejection")

    async def ejected_on_two() -> bool:
        async with two.session.get(two.proxy_url + "/") as r:  # learns the instances
            await r.read()
        return bool((await status(two))["ejected"] == ejected)

    await wait_until(ejected_on_two, timeout=5, message="the ejection on the second gateway")
    # the second gateway trips the other instance too: still one ejected for the cluster
    for _ in range(3):
        async with two.session.get(two.proxy_url + "/") as r:
            assert r.status == 500
    assert (await status(two))["ejected"] == ejected
    assert (await status(one))["ejected"] == ejected
    # an operator mode set through one gateway is the other's too (kept for a redefinition)
    async with one.session.post(one.admin_url + "/circuitbreaker/circuits/cb/force-open") as r:
        assert r.status == 200
    await wait_until(lambda: plugin_of(two).modes == {"cb": "forced_open"}, timeout=5,
                     message="the mode on the second gateway")
    assert (await status(two))["state"] == "forced_open"
