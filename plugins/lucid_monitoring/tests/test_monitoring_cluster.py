"""Monitoring across a cluster: ``GET /monitoring/cluster``, the cluster view of the
dashboard, alert rules evaluated once per cluster by a leader elected through Redis,
and the ``node`` label on ``/metrics``.

The cluster tests run three real ``lucid serve`` nodes on a private ``redis-server``, a
real upstream and a loopback webhook receiver that counts the notifications."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from lucid.testing import json_request


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
