"""Alert rules end to end: states, persistence, webhook and log notifications."""

from __future__ import annotations

import json
import logging
import signal
import socket
import sqlite3
from contextlib import closing

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from lucid.model import Event
from lucid.testing import run_gateway, wait_until


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def base(upstream_url: str) -> str:
    return f"""
[[gateway.routes]]
id = "api"
prefix = "/"
service = "svc"

[gateway.services.svc]
instances = ["{upstream_url}"]
"""


async def test_rule_goes_pending_firing_resolved_and_a_down_webhook_loses_nothing(
        lucid_upstream, lucid_gateway, caplog):
    caplog.set_level(logging.INFO, logger="lucid.monitoring.alerts")
    upstream = await lucid_upstream()
    port = free_port()  # nothing listens here yet: the receiver is down
    gw = await lucid_gateway(base(upstream.url) + f"""
[monitoring]
evaluation_interval = "20ms"
external_url = "http://lucid.example/monitoring/ui"

[[monitoring.alerts]]
name = "BreakerOpen"
metric = "breaker_open"
op = ">"
threshold = 0
for = "100ms"
service = "svc"
severity = "critical"
labels = {{ team = "payments" }}
annotations = {{ summary = "a breaker is open" }}

[[monitoring.notifiers]]
type = "webhook"
url = "http://127.0.0.1:{port}/hook"
backoff_initial = "20ms"
backoff_max = "100ms"

[[monitoring.notifiers]]
type = "log"
""")
    rt = gw.runtime
    plugin = rt.plugin_set.pm.get_plugin("monitoring")
    (webhook, _) = plugin.notifiers

    async def states() -> list[str]:
        async with gw.session.get(gw.admin_url + "/monitoring/alerts") as r:
            body = await r.json()
        return [h["state"] for h in reversed(body["recent"])]

    rt.emit(Event("breaker_transition", {"service": "svc", "instance": "i1",
                                         "from": "closed", "to": "open"}))
    await wait_until(lambda: plugin.engine.alerts["BreakerOpen"].state == "firing",
                     message="the alert to fire")
    assert await states() == ["pending", "firing"]
    await wait_until(lambda: webhook.failures >= 2, message="delivery to fail and be retried")
    rt.emit(Event("breaker_transition", {"service": "svc", "instance": "i1",
                                         "from": "open", "to": "closed"}))
    await wait_until(lambda: plugin.engine.alerts["BreakerOpen"].state == "inactive",
                     message="the alert to resolve")
    assert await states() == ["pending", "firing", "resolved"]
    assert len(webhook.queue) == 2  # firing and resolved, kept while the receiver is down

    received: list[dict] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    receiver = TestServer(app, host="127.0.0.1", port=port)
    await receiver.start_server()
    try:
        await wait_until(lambda: len(received) == 2, message="both notifications to arrive")
    finally:
        await receiver.close()
    firing, resolved = received
    assert [firing["status"], resolved["status"]] == ["firing", "resolved"]
    assert firing["version"] == "4" and firing["receiver"] == "lucid"
    assert firing["groupLabels"] == {"alertname": "BreakerOpen"}
    (alert,) = firing["alerts"]
    assert alert["labels"] == {"alertname": "BreakerOpen", "severity": "critical",
                               "service": "svc", "team": "payments"}
    assert alert["annotations"]["summary"] == "a breaker is open"
    assert alert["endsAt"] == "0001-01-01T00:00:00Z"
    assert alert["generatorURL"] == "http://lucid.example/monitoring/ui"
    assert resolved["alerts"][0]["startsAt"] == alert["startsAt"]
    assert resolved["alerts"][0]["endsAt"] != "0001-01-01T00:00:00Z"
    assert resolved["alerts"][0]["fingerprint"] == alert["fingerprint"]
    assert webhook.queue == type(webhook.queue)() and webhook.delivered == 2
    messages = [r.getMessage() for r in caplog.records if r.name == "lucid.monitoring.alerts"]
    assert any("alert BreakerOpen firing" in m for m in messages)
    assert any("alert BreakerOpen resolved" in m for m in messages)


async def test_error_rate_rule_fires_from_real_traffic(lucid_upstream, lucid_gateway):
    async def failing(request: web.Request) -> web.Response:
        return web.Response(status=503 if request.path.startswith("/bad") else 200)

    upstream = await lucid_upstream(failing)
    gw = await lucid_gateway(base(upstream.url) + """
[monitoring]
evaluation_interval = "20ms"

[[monitoring.alerts]]
name = "HighErrorRate"
metric = "error_rate"
op = ">="
threshold = 0.5
window = "1m"
service = "svc"
""")
    plugin = gw.runtime.plugin_set.pm.get_plugin("monitoring")
    async with gw.session.get(gw.proxy_url + "/ok") as r:
        assert r.status == 200
    for _ in range(3):
        async with gw.session.get(gw.proxy_url + "/bad") as r:
            assert r.status == 503
    await wait_until(lambda: plugin.engine.alerts["HighErrorRate"].state == "firing",
                     message="the error-rate alert to fire")
    await wait_until(lambda: plugin.engine.alerts["HighErrorRate"].value == 0.75,
                     message="the evaluation to see all four requests")
    async with gw.session.get(gw.admin_url + "/monitoring/health") as r:
        assert (await r.json())["alerts_firing"] == ["HighErrorRate"]
    async with gw.session.get(gw.admin_url + "/metrics") as r:
        assert 'lucid_alerts{alertname="HighErrorRate",severity="warning",state="firing"} 1.0' \
            in await r.text()


async def test_api_rules_are_validated_persisted_and_survive_kill_9(lucid_upstream, lucid_process,
                                                                    tmp_path):
    upstream = await lucid_upstream()
    text = base(upstream.url) + """
[[monitoring.alerts]]
name = "Static"
metric = "request_rate"
threshold = 1000
"""
    data_dir = tmp_path / "shared-data"
    gw = lucid_process(text, data_dir=str(data_dir))
    rule = {"name": "SlowApi", "metric": "p99_latency", "op": ">", "threshold": 0.5,
            "for": "1m", "route": "api", "severity": "critical",
            "labels": {"team": "core"}, "annotations": {"summary": "p99 above 500 ms"}}
    async with aiohttp.ClientSession() as session:
        url = gw.admin_url + "/monitoring/alerts"
        async with session.post(url, json=rule) as r:
            assert r.status == 201, await r.text()
            created = await r.json()
        assert created["state"] == "inactive" and created["rule"]["for"] == 60.0
        async with session.post(url, json=rule) as r:
            assert r.status == 409
        async with session.post(url, json={**rule, "name": "Other", "metric": "cpu"}) as r:
            assert r.status == 422
            assert (await r.json())["fields"][0]["field"] == "metric"
        async with session.post(url, json={**rule, "name": "Other", "colour": "red"}) as r:
            assert r.status == 422
        async with session.post(url, data=b"{not json", headers={
                "content-type": "application/json"}) as r:
            assert r.status == 422
        async with session.delete(url + "/Static") as r:
            assert r.status == 409
            assert "declared in the config" in (await r.json())["error"]
        async with session.get(url) as r:
            names = sorted(a["name"] for a in (await r.json())["alerts"])
        assert names == ["SlowApi", "Static"]
    gw.signal(signal.SIGKILL)
    gw.wait()
    again = lucid_process(text, data_dir=str(data_dir))
    async with aiohttp.ClientSession() as session:
        url = again.admin_url + "/monitoring/alerts"
        async with session.get(url) as r:
            alerts = {a["name"]: a for a in (await r.json())["alerts"]}
        assert sorted(alerts) == ["SlowApi", "Static"]
        assert alerts["SlowApi"]["rule"] == {**created["rule"]}
        assert alerts["SlowApi"]["static"] is False and alerts["Static"]["static"] is True
        async with session.delete(url + "/SlowApi") as r:
            assert r.status == 204
        async with session.delete(url + "/SlowApi") as r:
            assert r.status == 404
        async with session.get(url) as r:
            assert [a["name"] for a in (await r.json())["alerts"]] == ["Static"]



async def test_alert_rules_an_older_lucid_kept_are_imported_once(lucid_upstream, tmp_path):
    """Upgrading: rules an older Lucid stored in monitoring.db move to the core's
    definitions store on the first start; their history stays where it was."""
    upstream = await lucid_upstream()
    data_dir = tmp_path / "old-data"
    data_dir.mkdir()
    rule = {"name": "SlowApi", "metric": "p99_latency", "op": ">", "threshold": 0.5,
            "window": "1m", "for": 60.0, "service": "", "route": "api",
            "severity": "critical", "labels": {"team": "core"}, "annotations": {}}
    with closing(sqlite3.connect(data_dir / "monitoring.db")) as conn, conn:  # older schema
        conn.execute("CREATE TABLE alert_rules (name TEXT PRIMARY KEY, "
                     "definition TEXT NOT NULL, created_at REAL NOT NULL)")
        conn.execute("INSERT INTO alert_rules VALUES (?, ?, 1.0)",
                     ("SlowApi", json.dumps(rule)))
        conn.execute("CREATE TABLE alert_history (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                     "name TEXT NOT NULL, state TEXT NOT NULL, value REAL, "
                     "severity TEXT NOT NULL, labels TEXT NOT NULL, at REAL NOT NULL)")
        conn.execute("INSERT INTO alert_history (name, state, value, severity, labels, at) "
                     "VALUES ('SlowApi', 'firing', 0.9, 'critical', '{}', 2.0)")
    text = base(upstream.url)
    async with run_gateway(text, tmp_path / "first", data_dir=str(data_dir)) as gw:
        async with gw.session.get(gw.admin_url + "/monitoring/alerts") as r:
            body = await r.json()
        (alert,) = body["alerts"]
        assert alert["name"] == "SlowApi" and alert["static"] is False
        assert alert["revision"] == 1 and alert["rule"] == rule
        assert [(h["name"], h["state"]) for h in body["recent"]] == [("SlowApi", "firing")]
        with closing(sqlite3.connect(data_dir / "definitions.db")) as conn:
            assert conn.execute("SELECT kind, id FROM definitions").fetchall() == [
                ("alert_rule", "SlowApi")]
        async with gw.session.delete(gw.admin_url + "/monitoring/alerts/SlowApi") as r:
            assert r.status == 204
    async with run_gateway(text, tmp_path / "again", data_dir=str(data_dir)) as gw:
        async with gw.session.get(gw.admin_url + "/monitoring/alerts") as r:
            assert (await r.json())["alerts"] == []  # deleted stays deleted: imported once


async def test_alert_rule_reads_show_the_revision_and_writes_honour_if_match(
        lucid_upstream, lucid_gateway):
    upstream = await lucid_upstream()
    gw = await lucid_gateway(base(upstream.url) + """
[[monitoring.alerts]]
name = "Static"
metric = "request_rate"
threshold = 1000
""")
    url = gw.admin_url + "/monitoring/alerts"
    rule = {"name": "Api", "metric": "error_rate", "threshold": 0.5}

    async def revisions() -> dict[str, int]:
        async with gw.session.get(url) as r:
            return {a["name"]: a["revision"] for a in (await r.json())["alerts"]}

    async with gw.session.post(url, json=rule) as r:
        assert r.status == 201
        revision = (await r.json())["revision"]
    assert revision > 0
    assert await revisions() == {"Static": 0, "Api": revision}
    changed = {**rule, "threshold": 0.25}
    async with gw.session.post(url, json=changed,
                               headers={"If-Match": str(revision + 1)}) as r:
        assert r.status == 412
        assert (await r.json())["revision"] == revision
    async with gw.session.post(url, json=changed, headers={"If-Match": str(revision)}) as r:
        assert r.status == 200  # a conditional replace
        replaced = await r.json()
    assert replaced["rule"]["threshold"] == 0.25 and replaced["revision"] > revision
    async with gw.session.post(url, json={**rule, "name": "Static"},
                               headers={"If-Match": "0"}) as r:
        assert r.status == 409  # the config file's rule
    async with gw.session.post(url, json={**rule, "name": "Nope"},
                               headers={"If-Match": str(revision)}) as r:
        assert r.status == 412  # nothing to replace
    async with gw.session.delete(url + "/Api", headers={"If-Match": str(revision)}) as r:
        assert r.status == 412
    async with gw.session.delete(url + "/Api",
                                 headers={"If-Match": f'"{replaced["revision"]}"'}) as r:
        assert r.status == 204
    assert await revisions() == {"Static": 0}


async def test_alert_state_survives_other_writes_and_follows_a_reload(
        lucid_upstream, lucid_gateway):
    """Rules follow the live generation (lucid_activate): another definition's write
    keeps a pending rule's timer; a reload replaces the config's rules."""
    upstream = await lucid_upstream()
    rules = """
[monitoring]
evaluation_interval = "20ms"

[[monitoring.alerts]]
name = "BreakerOpen"
metric = "breaker_open"
threshold = 0
for = "1h"
"""
    gw = await lucid_gateway(base(upstream.url) + rules)
    rt = gw.runtime
    plugin = rt.plugin_set.pm.get_plugin("monitoring")
    rt.emit(Event("breaker_transition", {"service": "svc", "instance": "i1",
                                         "from": "closed", "to": "open"}))
    await wait_until(lambda: plugin.engine.alerts["BreakerOpen"].state == "pending",
                     message="the alert to be pending")
    since = plugin.engine.alerts["BreakerOpen"].since
    async with gw.session.post(gw.admin_url + "/monitoring/alerts", json={
            "name": "Api", "metric": "error_rate", "threshold": 0.5}) as r:
        assert r.status == 201
    async with gw.session.post(gw.admin_url + "/gateway/route", json={
            "id": "dyn", "prefix": "/dyn", "service": "svc"}) as r:
        assert r.status == 201
    pending = plugin.engine.alerts["BreakerOpen"]
    assert (pending.state, pending.since) == ("pending", since)
    gw.config_path.write_text(gw.config_path.read_text().replace('name = "BreakerOpen"',
                                                                 'name = "Renamed"'))
    await rt.reload()
    assert sorted(plugin.engine.alerts) == ["Api", "Renamed"]
    api_revision = plugin.engine.alerts["Api"].revision
    without = gw.config_path.read_text()
    gw.config_path.write_text(without.replace("alerts = [\n", 'alerts = [\n    { name = "Api", '
                                              'metric = "request_rate", threshold = 5 },\n'))
    await rt.reload()  # the file takes the API rule's name: it wins
    assert plugin.engine.alerts["Api"].static is True
    assert plugin.engine.alerts["Api"].rule.metric == "request_rate"
    gw.config_path.write_text(without)
    await rt.reload()  # and the API rule is back, as it was stored
    api = plugin.engine.alerts["Api"]
    assert (api.static, api.revision, api.rule.metric) == (False, api_revision, "error_rate")
