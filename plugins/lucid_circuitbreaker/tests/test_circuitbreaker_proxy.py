"""End to end: a real gateway, real failing upstreams, breakers tripping, probing,
ejecting instances and answering with fallbacks."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from lucid_circuitbreaker.testing import ManualClock, Switch, plugin_of

from lucid.config import ConfigError
from lucid.model import Event
from lucid.testing import wait_until


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def config(upstreams: list[str], circuit: str = "", extra: str = "", route: str = "") -> str:
    instances = ", ".join(f'"{u}"' for u in upstreams)
    return f"""
[gateway.services.svc]
instances = [{instances}]

[[gateway.routes]]
id = "main"
prefix = "/"
service = "svc"
retries = {{ attempts = 1 }}
{route}

[circuitbreaker.circuits.svc]
service = "svc"
{circuit}
{extra}
"""


async def get(gw: Any, path: str = "/x") -> tuple[int, dict[str, str], bytes]:
    async with gw.session.get(gw.proxy_url + path) as r:
        return r.status, dict(r.headers), await r.read()


async def admin(gw: Any, method: str, path: str, json: Any = None) -> tuple[int, Any]:
    async with gw.session.request(method, gw.admin_url + "/circuitbreaker" + path,
                                  json=json) as r:
        return r.status, await r.json()


def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return int(port)


async def test_trips_on_consecutive_failures_and_stops_calling_the_upstream(
    lucid_upstream: Any, lucid_gateway: Any, clock: ManualClock, monkeypatch: Any
) -> None:
    switch = Switch(500)
    up = await lucid_upstream(switch)
    gw = await lucid_gateway(config([up.url], "consecutive_failures = 3\n"
                                              'wait_duration_in_open_state = "30s"'))
    plugin_of(gw).set_clock(clock)
    events: list[Event] = []
    emit = gw.runtime.emit
    monkeypatch.setattr(gw.runtime, "emit", lambda e: (events.append(e), emit(e)))
    for _ in range(3):
        assert (await get(gw))[0] == 500
    clock.advance(10)
    status, headers, body = await get(gw)
    assert status == 503
    assert headers["Retry-After"] == "20"
    assert headers["Content-Type"] == "application/json"
    assert b'"circuit": "svc"' in body and b'"state": "open"' in body
    assert switch.calls == 3  # the refused request never reached the upstream
    assert [(e.kind, e.data["from"], e.data["to"]) for e in events] == [
        ("breaker_transition", "closed", "open")]
    assert events[0].data["circuit"] == "svc" and events[0].data["reason"]

    code, status_body = await admin(gw, "GET", "/status")
    assert code == 200
    [circuit] = status_body["circuits"]
    assert circuit["state"] == "open"
    assert circuit["next_probe_in"] == 20
    assert status_body["transitions"] == {"closed->open": 1}
    assert status_body["recent_transitions"][0]["to"] == "open"


async def test_half_open_probes_close_the_circuit_when_the_upstream_recovers(
    lucid_upstream: Any, lucid_gateway: Any, clock: ManualClock
) -> None:
    switch = Switch(503)
    up = await lucid_upstream(switch)
    gw = await lucid_gateway(config([up.url], "consecutive_failures = 2\n"
                                              "permitted_number_of_calls_in_half_open_state = 2\n"
                                              'wait_duration_in_open_state = "5s"'))
    plugin = plugin_of(gw)
    plugin.set_clock(clock)
    for _ in range(2):
        assert (await get(gw))[0] == 503
    assert plugin.circuits["svc"].breaker.state == "open"
    switch.status = 200
    assert (await get(gw))[0] == 503 and switch.calls == 2  # still open
    clock.advance(5)
    assert (await get(gw))[0] == 200  # first probe
    assert plugin.circuits["svc"].breaker.state == "half_open"
    assert (await get(gw))[0] == 200  # second probe closes it
    assert plugin.circuits["svc"].breaker.state == "closed"
    assert switch.calls == 4


async def test_failed_probe_reopens_with_backoff(
    lucid_upstream: Any, lucid_gateway: Any, clock: ManualClock
) -> None:
    up = await lucid_upstream(Switch(500))
    gw = await lucid_gateway(config([up.url], "consecutive_failures = 1\n"
                                              "permitted_number_of_calls_in_half_open_state = 1\n"
                                              'wait_duration_in_open_state = "10s"\n'
                                              "exponential_backoff_multiplier = 3\n"
                                              'max_wait_duration_in_open_state = "60s"'))
    plugin_of(gw).set_clock(clock)
    await get(gw)
    assert (await get(gw))[1]["Retry-After"] == "10"
    clock.advance(10)
    assert (await get(gw))[0] == 500  # the probe fails
    assert (await get(gw))[1]["Retry-After"] == "30"
    clock.advance(30)
    await get(gw)
    assert (await get(gw))[1]["Retry-After"] == "60"  # capped


async def test_failure_rate_over_a_count_window_with_4xx_ignored(
    lucid_upstream: Any, lucid_gateway: Any
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=int(request.query["s"]))

    up = await lucid_upstream(handler)
    gw = await lucid_gateway(config([up.url], "sliding_window_size = 4\n"
                                              "minimum_number_of_calls = 4\n"
                                              "failure_rate_threshold = 50"))
    for s in (404, 404, 404, 429, 200, 500, 200):
        assert (await get(gw, f"/x?s={s}"))[0] == s  # 4xx counted neither way
    status = plugin_of(gw).circuits["svc"].breaker.snapshot(0)
    assert (status["calls_in_window"], status["failed_calls"]) == (3, 1)
    assert (await get(gw, "/x?s=502"))[0] == 502  # 2 of 4 failed: 50%
    assert (await get(gw, "/x?s=200"))[0] == 503


async def test_slow_calls_trip_the_circuit(lucid_upstream: Any, lucid_gateway: Any) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.05)  # the upstream is slow; nothing waits on it to sync
        return web.Response(text="late")

    up = await lucid_upstream(slow)
    gw = await lucid_gateway(config([up.url], "sliding_window_size = 2\n"
                                              "minimum_number_of_calls = 2\n"
                                              "slow_call_rate_threshold = 100\n"
                                              'slow_call_duration_threshold = "10ms"'))
    assert (await get(gw))[0] == 200
    assert (await get(gw))[0] == 200
    status, _, body = await get(gw)
    assert status == 503 and b"open" in body
    assert "slow-call rate" in plugin_of(gw).circuits["svc"].breaker.last_reason


async def test_custom_failure_statuses(lucid_upstream: Any, lucid_gateway: Any) -> None:
    up = await lucid_upstream(Switch(429))
    gw = await lucid_gateway(config([up.url], "consecutive_failures = 2\n"
                                              "failure_statuses = [429, '5xx']\n"
                                              "ignored_statuses = []"))
    assert [(await get(gw))[0] for _ in range(3)] == [429, 429, 503]


async def test_dead_upstream_trips_on_connect_errors_and_answers_the_static_fallback(
    lucid_gateway: Any,
) -> None:
    gw = await lucid_gateway(config(
        [f"http://127.0.0.1:{closed_port()}"], "consecutive_failures = 2",
        extra='[circuitbreaker.circuits.svc.fallback]\nstatus = 200\nbody = "cached"\n'
              'headers = { "x-origin" = "fallback" }'))
    assert (await get(gw))[0] == 502
    assert (await get(gw))[0] == 502
    status, headers, body = await get(gw)
    assert (status, body) == (200, b"cached")
    assert headers["x-origin"] == "fallback" and headers["x-lucid-fallback"] == "svc"
    assert headers["Content-Type"].startswith("text/plain")


async def test_fallback_to_another_service_and_route_override_wins(
    lucid_upstream: Any, lucid_gateway: Any
) -> None:
    broken = await lucid_upstream(Switch(500))
    backup = await lucid_upstream()  # echo
    text = config(
        [broken.url], "consecutive_failures = 1",
        extra=f'[circuitbreaker.circuits.svc.fallback]\nservice = "backup"\n'
              f'[gateway.services.backup]\ninstances = ["{backup.url}"]\n'
              '[[gateway.routes]]\npath = "/special"\nservice = "svc"\n'
              "retries = { attempts = 1 }\n"
              'plugins = { circuitbreaker = { fallback = { status = 202, body = "route" } } }')
    gw = await lucid_gateway(text)
    assert (await get(gw, "/a"))[0] == 500
    status, headers, body = await get(gw, "/a/b?q=1")
    assert status == 200 and headers["x-lucid-fallback"] == "svc"
    assert b'"path": "/a/b"' in body and b'"query": "q=1"' in body
    assert len(backup.requests) == 1
    assert (await get(gw, "/special"))[:3:2] == (202, b"route")


async def test_per_instance_scope_ejects_the_bad_instance(
    lucid_upstream: Any, lucid_gateway: Any
) -> None:
    bad, good = Switch(500), Switch(200)
    up_bad, up_good = await lucid_upstream(bad), await lucid_upstream(good)
    gw = await lucid_gateway(config([up_bad.url, up_good.url],
                                    'scope = "instance"\nconsecutive_failures = 2\n'
                                    "max_ejection_percent = 50"))
    statuses = [(await get(gw))[0] for _ in range(4)]  # rotation: bad, good, bad, good
    assert statuses == [500, 200, 500, 200]
    results = [(await get(gw))[0] for _ in range(6)]
    assert results == [200] * 6 and bad.calls == 2  # ejected: only the good one serves
    code, status = await admin(gw, "GET", "/status")
    [circuit] = status["circuits"]
    assert circuit["ejected"] == [up_bad.url] and circuit["ejection_cap"] == 1
    assert circuit["instances"][up_bad.url]["state"] == "open"
    assert circuit["instances"][up_good.url]["state"] == "closed"
    assert circuit["state"] == "open"


async def test_ejection_is_bounded_by_max_ejection_percent(
    lucid_upstream: Any, lucid_gateway: Any
) -> None:
    a, b = Switch(500), Switch(500)
    up_a, up_b = await lucid_upstream(a), await lucid_upstream(b)
    gw = await lucid_gateway(config([up_a.url, up_b.url],
                                    'scope = "instance"\nconsecutive_failures = 1\n'
                                    "max_ejection_percent = 50"))
    for _ in range(6):
        assert (await get(gw))[0] in (500, 503)
    circuit = plugin_of(gw).circuits["svc"]
    assert len(circuit.ejected) == 1  # the other one keeps serving despite its open breaker
    assert circuit.suppressed > 0
    assert a.calls + b.calls > 2


async def test_no_circuit_no_effect(lucid_upstream: Any, lucid_gateway: Any) -> None:
    up = await lucid_upstream(Switch(500))
    gw = await lucid_gateway(f"""
[gateway.services.svc]
instances = ["{up.url}"]
[[gateway.routes]]
prefix = "/"
service = "svc"
retries = {{ attempts = 1 }}
""")
    assert [(await get(gw))[0] for _ in range(20)] == [500] * 20
    assert plugin_of(gw).circuits == {}
    assert (await admin(gw, "GET", "/status")) == (200, {
        "scope": "node", "shared_state_reachable": None,
        "circuits": [], "transitions": {}, "recent_transitions": []})


async def test_half_open_without_results_goes_back_to_open_on_the_ticker(
    lucid_upstream: Any, lucid_gateway: Any, clock: ManualClock
) -> None:
    up = await lucid_upstream(Switch(500))
    gw = await lucid_gateway(config([up.url], "consecutive_failures = 1\n"
                                              'wait_duration_in_open_state = "10s"\n'
                                              'max_wait_duration_in_half_open_state = "5s"',
                                    extra='[circuitbreaker]\ntick_interval = "10ms"'))
    plugin = plugin_of(gw)
    plugin.set_clock(clock)
    await get(gw)
    breaker = plugin.circuits["svc"].breaker
    clock.advance(10)
    assert breaker.permit(clock()) is None  # a probe handed out whose call never reports
    assert breaker.state == "half_open"
    clock.advance(5)
    await_state = lambda: breaker.state == "open"  # noqa: E731
    await wait_until(await_state, message="the ticker to reopen the idle half-open circuit")
    assert breaker.last_reason.startswith("no probe results")


@pytest.mark.parametrize(("circuit", "problem"), [
    ("sliding_window_size = 10\nminimum_number_of_calls = 20",
     "circuitbreaker.circuits.svc.minimum_number_of_calls"),
    ("failure_rate_threshold = 150", "circuitbreaker.circuits.svc.failure_rate_threshold"),
    ("sliding_window_size = 0", "circuitbreaker.circuits.svc.sliding_window_size"),
    ("failure_statuses = ['6xx']", "circuitbreaker.circuits.svc.failure_statuses"),
    ("failure_statuses = [500]\nignored_statuses = [500]",
     "circuitbreaker.circuits.svc.ignored_statuses"),
])
async def test_bad_toml_is_rejected_naming_the_key(
    lucid_gateway: Any, circuit: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        await lucid_gateway(config(["http://127.0.0.1:9"], circuit))
    assert problem in info.value.render()


async def test_two_circuits_cannot_guard_one_service(lucid_gateway: Any) -> None:
    with pytest.raises(ConfigError, match="already guards it"):
        await lucid_gateway(config(["http://127.0.0.1:9"], "",
                                   extra='[circuitbreaker.circuits.other]\nservice = "svc"'))


async def test_circuits_inherit_defaults(lucid_gateway: Any) -> None:
    gw = await lucid_gateway(config(["http://127.0.0.1:9"], "sliding_window_size = 7",
                                    extra="[circuitbreaker.defaults]\n"
                                          "failure_rate_threshold = 25\n"
                                          "minimum_number_of_calls = 5"))
    code, body = await admin(gw, "GET", "/circuits/svc")
    assert code == 200
    effective = body["effective"]
    assert effective["failure_rate_threshold"] == 25
    assert effective["minimum_number_of_calls"] == 5
    assert effective["sliding_window_size"] == 7
    assert effective["permitted_number_of_calls_in_half_open_state"] == 10
    assert body["source"] == "static"


async def test_the_readme_example_is_a_valid_config(lucid_gateway: Any) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    example = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    gw = await lucid_gateway(example)
    circuits = plugin_of(gw).circuits
    assert sorted(circuits) == ["payments", "search"]
    assert circuits["payments"].resolved.effective["minimum_number_of_calls"] == 20
    assert circuits["search"].spec.fallback.service == "search-cache"


async def test_reload_keeps_the_state_of_unchanged_circuits(
    lucid_upstream: Any, lucid_gateway: Any
) -> None:
    up = await lucid_upstream(Switch(500))
    gw = await lucid_gateway(config([up.url], "consecutive_failures = 1") +
                             '[gateway.services.other]\ninstances = ["http://127.0.0.1:9"]\n')
    await get(gw)
    plugin = plugin_of(gw)
    before = plugin.circuits["svc"]
    assert before.breaker.state == "open"
    text = gw.config_path.read_text()
    gw.config_path.write_text(text + '\n[circuitbreaker.circuits.second]\nservice = "other"\n')
    await gw.runtime.reload()
    assert (await get(gw))[0] == 503  # still open
    assert plugin.circuits["svc"] is before and sorted(plugin.circuits) == ["second", "svc"]
    gw.config_path.write_text(text.replace("consecutive_failures = 1",
                                           "consecutive_failures = 2"))
    await gw.runtime.reload()
    assert (await get(gw))[0] == 500  # changed definition: starts closed
    assert sorted(plugin.circuits) == ["svc"]


async def test_an_ejected_instance_returns_after_a_good_probe(
    lucid_upstream: Any, lucid_gateway: Any, clock: ManualClock
) -> None:
    bad, good = Switch(500), Switch(200)
    up_bad, up_good = await lucid_upstream(bad), await lucid_upstream(good)
    gw = await lucid_gateway(config([up_bad.url, up_good.url],
                                    'scope = "instance"\nconsecutive_failures = 1\n'
                                    "permitted_number_of_calls_in_half_open_state = 1\n"
                                    'wait_duration_in_open_state = "10s"'))
    plugin = plugin_of(gw)
    plugin.set_clock(clock)
    assert [(await get(gw))[0] for _ in range(2)] == [500, 200]
    circuit = plugin.circuits["svc"]
    assert circuit.ejected == {up_bad.url}
    assert [(await get(gw))[0] for _ in range(4)] == [200] * 4 and bad.calls == 1
    bad.status = 200
    clock.advance(10)
    for _ in range(2):  # the rotation reaches the bad one within two requests: its probe
        assert (await get(gw))[0] == 200
    assert bad.calls == 2
    assert circuit.ejected == set()
    assert circuit.instances[up_bad.url].state == "closed"


@pytest.mark.parametrize(("kinds", "tripped"), [("", True), ('failure_kinds = ["connect_error"]',
                                                             False)])
async def test_timeouts_count_as_failures_unless_left_out(
    lucid_upstream: Any, lucid_gateway: Any, kinds: str, tripped: bool
) -> None:
    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(5)  # longer than the route's read timeout
        return web.Response()

    up = await lucid_upstream(hang)
    gw = await lucid_gateway(config([up.url], f"consecutive_failures = 1\n{kinds}",
                                    route='timeouts = { read = "50ms" }'))
    assert (await get(gw))[0] == 504
    breaker = plugin_of(gw).circuits["svc"].breaker
    assert (breaker.state == "open") is tripped


def test_several_workers_are_refused_with_declared_circuits() -> None:
    from lucid_circuitbreaker import CircuitBreakerPlugin
    from lucid_circuitbreaker.config import CircuitBreakerConfig

    plugin = CircuitBreakerPlugin()
    local = SimpleNamespace(backend="local")
    redis = SimpleNamespace(backend="redis://127.0.0.1:6379/0")

    def section(**fields: Any) -> Any:
        return CircuitBreakerConfig.model_validate(
            {"circuits": {"c": {"service": "svc"}}, **fields})

    declared = SimpleNamespace(circuitbreaker=section(), cluster=local)
    none = SimpleNamespace(circuitbreaker=CircuitBreakerConfig(), cluster=local)
    refused = plugin.lucid_check_workers(declared, 2) or ""
    assert "per process" in refused and "Redis backend" in refused
    assert plugin.lucid_check_workers(declared, 1) is None
    assert plugin.lucid_check_workers(none, 4) is None
    # with a Redis backend every worker shares the breaker state (cluster scope)...
    shared = SimpleNamespace(circuitbreaker=section(), cluster=redis)
    assert plugin.lucid_check_workers(shared, 4) is None
    # ...unless node scope is asked for
    alone = SimpleNamespace(circuitbreaker=section(scope="node"), cluster=redis)
    assert "per process" in (plugin.lucid_check_workers(alone, 2) or "")


async def test_a_failing_fallback_service_leaves_the_default_503(
    lucid_upstream: Any, lucid_gateway: Any, clock: ManualClock
) -> None:
    up = await lucid_upstream(Switch(500))
    gw = await lucid_gateway(config(
        [up.url], 'consecutive_failures = 1\nwait_duration_in_open_state = "90s"',
        extra='[circuitbreaker.circuits.svc.fallback]\nservice = "gone"\n'
              f'[gateway.services.gone]\ninstances = ["http://127.0.0.1:{closed_port()}"]'))
    plugin_of(gw).set_clock(clock)
    assert (await get(gw))[0] == 500
    clock.advance(0.5)
    status, headers, body = await get(gw)
    assert status == 503 and headers["Retry-After"] == "90"  # 89.5 s, rounded up
    assert b'"circuit": "svc"' in body and "x-lucid-fallback" not in headers


async def test_the_fallback_service_gets_the_request_body(
    lucid_upstream: Any, lucid_gateway: Any
) -> None:
    broken = await lucid_upstream(Switch(500))
    backup = await lucid_upstream()  # echo: reports the body size it received
    gw = await lucid_gateway(config(
        [broken.url], "consecutive_failures = 1",
        extra=f'[circuitbreaker.circuits.svc.fallback]\nservice = "backup"\n'
              f'[gateway.services.backup]\ninstances = ["{backup.url}"]\n'))
    assert (await get(gw))[0] == 500
    payload = b"x" * 50_000  # buffered by the core (<= 64 KiB): forwarded
    async with gw.session.post(gw.proxy_url + "/orders", data=payload) as r:
        assert r.status == 200 and r.headers["x-lucid-fallback"] == "svc"
        echoed = await r.json()
    assert echoed["method"] == "POST" and echoed["body_size"] == len(payload)
    assert echoed["headers"]["content-length"] == str(len(payload))
    # a streamed body was not kept: the default answer, not a body-less copy
    async with gw.session.post(gw.proxy_url + "/orders", data=b"y" * 200_000) as r:
        assert r.status == 503 and "x-lucid-fallback" not in r.headers
        assert (await r.json())["circuit"] == "svc"
    assert len(backup.requests) == 1


async def test_a_route_naming_an_unknown_circuit_is_a_config_error(
    tmp_path: Path, lucid_upstream: Any, lucid_gateway: Any
) -> None:
    up = await lucid_upstream()
    text = config([up.url], route='plugins = { circuitbreaker = { circuit = "nope" } }')
    with pytest.raises(ConfigError) as info:
        await lucid_gateway(text)
    problem = " ".join(info.value.problems)
    assert "gateway.routes[0].plugins.circuitbreaker.circuit = 'nope'" in problem
    assert "route 'main'" in problem and "declared: svc" in problem


async def test_the_fallback_service_gets_the_request_as_the_proxy_sends_it(
    lucid_upstream: Any, lucid_gateway: Any
) -> None:
    """The fallback call is built by the core (lucid.proxy.upstream_request): same
    path quoting, same hop-by-hop rules, same forwarding headers as a proxied call."""
    broken = await lucid_upstream(Switch(500))
    backup = await lucid_upstream()  # echo
    gw = await lucid_gateway(config(
        [broken.url], "consecutive_failures = 1",
        extra=f'[circuitbreaker.circuits.svc.fallback]\nservice = "backup"\n'
              f'[gateway.services.backup]\ninstances = ["{backup.url}"]\n'))
    assert (await get(gw))[0] == 500
    proxied = broken.requests[-1]
    headers = {"x-custom": "1", "connection": "x-private", "x-private": "no",
               "x-request-id": "fallback-1", "x-real-ip": "6.6.6.6"}
    async with gw.session.get(gw.proxy_url + "/caf%C3%A9/a b?q=1", headers=headers) as r:
        assert r.status == 200 and r.headers["x-lucid-fallback"] == "svc"
        assert r.headers["x-request-id"] == "fallback-1"
        echoed = await r.json()
    assert echoed["path"] == "/caf%C3%A9/a%20b" and echoed["query"] == "q=1"
    sent = echoed["headers"]
    assert sent["x-custom"] == "1" and sent["x-request-id"] == "fallback-1"
    assert "x-private" not in sent and "x-real-ip" not in sent
    assert sent["x-forwarded-for"] == "127.0.0.1" and sent["x-forwarded-proto"] == "http"
    assert sent["via"] == proxied.headers["via"] and sent["traceparent"]
