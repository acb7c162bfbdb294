"""The request hooks record exactly what Recorder.observe / Recorder.outcome and
accesslog.entry do: the hooks run that code inline, so the two must not drift apart."""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace

from lucid_monitoring import MonitoringPlugin
from lucid_monitoring.accesslog import entry
from lucid_monitoring.metrics import Recorder

from lucid.model import Exchange, Instance, Outcome

TABLES = ("routes", "instances", "retries", "clients", "upstream_errors")


def exchanges() -> list[tuple[Exchange, list[tuple[Instance, Outcome]]]]:
    a = Instance(id="a", url="http://127.0.0.1:1", service="svc")
    b = Instance(id="b", url="http://127.0.0.1:2", service="svc")
    out = []
    cases = [
        # method, status, route, instance, attempts, duration, upstream, identity, ip
        ("GET", 200, "r1", a, 1, 0.003, 0.002, {"sub": "alice"}, "10.0.0.1"),
        ("POST", 201, "r1", a, 1, 0.3, 0.29, {"subject": "bob"}, "10.0.0.2"),
        ("GET", 503, "r1", b, 2, 1.7, 1.2, None, "10.0.0.1"),
        ("BREW", 200, "r2", a, 1, 20.0, 19.0, {}, "10.0.0.3"),
        ("GET", 404, "", None, 0, 0.0001, 0.0, None, "10.0.0.4"),
        ("GET", 700, "r2", b, 3, 0.05, 0.04, {"sub": "carol"}, "10.0.0.5"),
        ("DELETE", 500, "r1", a, 1, 0.01, 0.01, None, "10.0.0.1"),
        ("GET", 200, "r1", a, 1, 0.003, 0.002, {"sub": "alice"}, "10.0.0.1"),
    ]
    for n, (method, status, route, instance, attempts, duration, upstream, identity,
            ip) in enumerate(cases):
        ex = Exchange(request_id=f"req-{n}", method=method, path=f"/p/{n}", query="",
                      host="h", scheme="http", client_ip=ip, headers={}, started=0.0)
        ex.route_id, ex.service, ex.status = route, "svc" if route else "", status
        ex.instance, ex.attempts, ex.identity = instance, attempts, identity
        ex.duration, ex.upstream_duration = duration, upstream
        ex.bytes_in, ex.bytes_out = 10 * n, 100 * n
        ex.error = "upstream timeout" if status >= 500 else ""
        attempts_made = []
        if instance is not None:
            for k in range(attempts):
                kind = "success" if k == attempts - 1 and status < 500 else "timeout"
                attempts_made.append((instance, Outcome(kind, None, upstream / (k + 1))))
        out.append((ex, attempts_made))
    return out


def test_hooks_record_what_the_recorder_and_the_entry_say():
    plugin = MonitoringPlugin()
    plugin.recorder = Recorder((0.005, 0.01, 0.1, 1.0, 10.0), max_clients=4)
    plugin.ring = deque(maxlen=100)
    logged: list[tuple] = []
    plugin._put = logged.append
    reference = Recorder((0.005, 0.01, 0.1, 1.0, 10.0), max_clients=4)
    for _ in range(3):
        for ex, attempts in exchanges():
            for instance, outcome in attempts:
                plugin.lucid_record_outcome(ex, instance, outcome)
                reference.outcome(ex.service, instance.id, outcome)
            plugin.lucid_observe_exchange(ex)
            reference.observe(ex)
            fields = plugin.ring[-1]
            assert logged[-1] is fields
            assert fields[1:] == entry(ex, 0.0)[1:]
    for name in TABLES:
        mine, theirs = getattr(plugin.recorder, name), getattr(reference, name)
        assert list(mine.items()) == list(theirs.items()), name


def test_a_route_without_access_log_is_still_counted():
    plugin = MonitoringPlugin()
    plugin.recorder = Recorder((0.1,))
    plugin.ring = deque(maxlen=10)
    ex, _ = exchanges()[0]
    ex.overrides = {"monitoring": SimpleNamespace(access_log=False)}
    plugin.lucid_observe_exchange(ex)
    assert not plugin.ring
    assert [e[0] for e in plugin.recorder.routes.values()] == [1]
