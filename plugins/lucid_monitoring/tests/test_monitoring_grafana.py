"""The Grafana dashboard shipped in ``docs/grafana/lucid.json``: a Grafana dashboard
whose every query names only metrics a real gateway exports (scraped after traffic
through the router, the registry, the circuit breaker and the rate limiter), and
whose every expression Prometheus' own parser (``promtool``) accepts."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from lucid.testing import wait_until
from lucid.testing_internal import debian_tool

DASHBOARD = Path(__file__).parents[3] / "docs" / "grafana" / "lucid.json"
# Grafana's variables, as Grafana would expand them for Prometheus
VARIABLES = {"$__rate_interval": "1m", "$node": ".*", "${datasource}": "prometheus"}
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def dashboard() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return board


def queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expression) of every query panel's targets."""
    out = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        out += [(panel["title"], target["expr"]) for target in panel["targets"]]
    return out


def expanded(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, expr
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (Lucid's all start with ``lucid_``;
    a label value never does in this dashboard)."""
    return set(re.findall(r"\blucid_[a-zA-Z0-9_]*", re.sub(r'"[^"]*"', '""', expr)))


def test_the_dashboard_has_grafanas_shape_and_a_node_variable() -> None:
    board = dashboard()
    assert board["title"] and board["uid"] and isinstance(board["schemaVersion"], int)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    node = variables["node"]
    assert node["type"] == "query" and node["includeAll"] and node["multi"]
    assert "instance" in node["definition"]
    titles = set()
    for panel in board["panels"]:
        assert set(panel) >= {"type", "title", "gridPos", "id"}, panel
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        assert 0 <= panel["gridPos"]["x"] and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        titles.add(panel["title"])
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
            for target in panel["targets"]:
                assert target["refId"] and target["expr"]
                assert '$node' in target["expr"], (panel["title"], "not filtered by node")
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    everything = " ".join(expr for _, expr in queries(board))
    # what the issue asks of it: requests, errors, latency per route and service,
    # breaker states, limiter rejections, per node
    for needed in ("lucid_requests_total", 'code="5xx"', "histogram_quantile(0.99",
                   "lucid_breaker_state", "lucid_ratelimit_rejections_total",
                   "by (instance)", "by (le, route, service)", "by (le, service)"):
        assert needed in everything, needed


async def test_every_query_names_metrics_a_real_gateway_exports(
        lucid_upstream: Any, lucid_gateway: Any, tmp_path: Path) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=500 if request.path.startswith("/fail") else 200)

    upstream = await lucid_upstream(handler)
    gw = await lucid_gateway(f"""
[[gateway.routes]]
id = "api"
prefix = "/"
service = "users"

[registry.services.users]
instances = [{{ id = "u1", url = "{upstream.url}" }}]

[circuitbreaker.circuits.cb]
service = "users"
consecutive_failures = 2

[[ratelimiter.limits]]
id = "per-ip"
rate = "4/m"
key = "ip"
""")
    statuses = []
    for path in ("/ok", "/fail", "/fail", "/x", "/y", "/z"):
        async with gw.session.get(gw.proxy_url + path) as r:
            await r.read()
            statuses.append(r.status)
    assert statuses[:3] == [200, 500, 500]
    assert 503 in statuses and 429 in statuses  # the breaker open, then the limit

    async def scraped() -> dict[str, set[str]] | None:
        async with gw.session.get(gw.admin_url + "/metrics") as r:
            assert r.status == 200
            text = await r.text()
        exported, sampled = set(), set()
        for family in text_string_to_metric_families(text):
            exported |= {family.name + s for s in SUFFIXES.get(family.type, ("",))}
            sampled |= {s.name for s in family.samples}
        needed = {"lucid_requests_total", "lucid_request_duration_seconds_bucket",
                  "lucid_breaker_state", "lucid_breaker_transitions_total",
                  "lucid_ratelimit_rejections_total", "lucid_instances"}
        return {"exported": exported, "sampled": sampled} if needed <= sampled else None

    names = await wait_until(scraped, message="every plugin's metrics on /metrics")
    used = set()
    for title, expr in queries(dashboard()):
        found = metric_names(expr)
        assert found, (title, expr)
        unknown = found - names["exported"]
        assert not unknown, f"panel {title!r} queries {sorted(unknown)}, not exported"
        used |= found
        if "histogram_quantile" in expr:
            assert "_bucket" in expr, (title, expr)
    # most of what Lucid exports is on the dashboard, and what it draws had samples
    assert len(used & names["sampled"]) >= 10, sorted(used & names["sampled"])

    # Prometheus' parser accepts every expression (as recording rules; YAML takes JSON)
    promtool = await asyncio.to_thread(debian_tool, "promtool", "prometheus")
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text(json.dumps({"groups": [{"name": "grafana", "rules": [
        {"record": f"lucid_dashboard:query{i}", "expr": expanded(expr)}
        for i, (_, expr) in enumerate(queries(dashboard()))]}]}))
    checked = await asyncio.to_thread(subprocess.run, [promtool, "check", "rules", str(rules)],
                                      capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
