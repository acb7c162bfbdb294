"""The monitoring admin API (``/monitoring``) and ``GET /metrics`` (Prometheus text)."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from operator import itemgetter
from typing import Any, Literal

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator
from quart import Blueprint, Response
from quart_schema import tag, validate_querystring, validate_request

from lucid.admin import error_response, if_match, public, runtime
from lucid_monitoring.accesslog import query
from lucid_monitoring.config import ALERT_RULE as KIND
from lucid_monitoring.config import AlertRule
from lucid_monitoring.dashboard import PAGE
from lucid_monitoring.metrics import (
    CLASSES,
    COUNT,
    WINDOWS,
    figures,
    instance_health,
    summarise,
)
from lucid_monitoring.reports import PERIODS, build_report, to_csv

blueprint = Blueprint("monitoring", __name__, url_prefix="/monitoring")
metrics_blueprint = Blueprint("monitoring_metrics", __name__, url_prefix="")
tag_monitoring = tag(["monitoring"])


def plugin() -> Any:
    return runtime().plugin_set.pm.get_plugin("monitoring")


def _time(value: str | None) -> float | None:
    """Unix seconds or ISO 8601."""
    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise ValueError("give unix seconds or an ISO 8601 time") from None


class Window(BaseModel):
    model_config = ConfigDict(extra="forbid")
    window: Literal["1m", "5m", "1h"] | None = None


class LogQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: str | None = Field(None, description="a status (404) or a class (5xx)")
    route: str | None = None
    request_id: str | None = None
    since: str | None = None
    until: str | None = None
    limit: int = Field(100, ge=1, le=10000)

    @field_validator("status")
    @classmethod
    def _status(cls, value: str | None) -> str | None:
        if value is not None and not (value.isdigit() and len(value) == 3) and not (
                len(value) == 3 and value[0] in "12345" and value[1:].lower() == "xx"):
            raise ValueError("give a status such as 404 or a class such as 5xx")
        return value

    @field_validator("since", "until")
    @classmethod
    def _times(cls, value: str | None) -> str | None:
        _time(value)
        return value


class ReportQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    period: Literal["hour", "day"] = "hour"
    from_: str | None = Field(None, alias="from")
    to: str | None = None
    format: Literal["json", "csv"] = "json"

    @field_validator("from_", "to")
    @classmethod
    def _times(cls, value: str | None) -> str | None:
        _time(value)
        return value


# --------------------------------------------------------------------------- health
@blueprint.get("/health")
@tag_monitoring
async def health() -> Any:
    """Is monitoring recording, and how many alerts fire."""
    p = plugin()
    firing = [a.rule.name for a in p.engine.alerts.values() if a.state == "firing"]
    return {"status": "ok", "metrics": p.recorder is not None, "alerts_firing": firing}


@blueprint.get("/status")
@tag_monitoring
async def status() -> Any:
    """What monitoring does in this process: config, background jobs, notifiers."""
    p = plugin()
    rt = runtime()
    cfg = p.config
    return {
        "uptime_seconds": round(time.time() - rt.started_at, 3),
        "generation": rt.generation.number,
        "requests": dict(rt.counters),
        "metrics": p.recorder is not None,
        "series": len(p.recorder.routes) if p.recorder else 0,
        "log_buffer": {"size": cfg.log_buffer, "used": len(p.ring) if p.ring else 0},
        "access_log": {"enabled": cfg.access_log.enabled, "target": cfg.access_log.target,
                       "path": str(p.writer.path) if p.writer and p.writer.path else None,
                       "writer_pid": p.writer.pid if p.writer else None,
                       "writer_restarts": p.writer.restarts if p.writer else 0,
                       "dropped_lines": p.writer.dropped if p.writer else 0},
        "alert_rules": len(p.engine.alerts),
        "evaluation_interval": cfg.evaluation_interval,
        "rollup_interval": cfg.rollup_interval,
        "retention": cfg.retention,
        "notifiers": [n.describe() for n in p.notifiers],
        # server.workers > 1: what each worker counted, as summed on /metrics
        "workers": (p.workers.describe(p.recorder, rt.counters.get("in_flight", 0))
                    if p.workers is not None and p.recorder is not None else None),
    }


# --------------------------------------------------------------------------- metrics
def window_figures(p: Any, name: str) -> dict[str, Any]:
    rec = p.recorder
    covered, routes, instances, rejections = rec.window(WINDOWS[name])
    nb = rec.nb
    by_route: dict[tuple[str, str], list[list[float]]] = {}
    by_service: dict[str, list[list[float]]] = {}
    statuses: dict[str, int] = {}
    for (route, service, _, klass), e in routes.items():
        by_route.setdefault((route, service), []).append(e)
        by_service.setdefault(service, []).append(e)
        statuses[CLASSES[klass]] = statuses.get(CLASSES[klass], 0) + int(e[COUNT])
    out_instances = []
    for (service, instance), e in sorted(instances.items()):
        fig = figures(rec.bounds, e[0], e[1], e[3:3 + nb], covered)
        out_instances.append({"service": service, "instance": instance, **fig})
    return {
        "seconds": covered,
        "total": {**summarise(rec.bounds, routes.values(), covered, nb), "status": statuses},
        "routes": [{"route": r, "service": s, **summarise(rec.bounds, es, covered, nb)}
                   for (r, s), es in sorted(by_route.items())],
        "services": [{"service": s, **summarise(rec.bounds, es, covered, nb)}
                     for s, es in sorted(by_service.items())],
        "instances": out_instances,  # per upstream attempt, time to response headers
        "rejections": {k: v for k, v in rejections.items() if v},
    }


@blueprint.get("/metrics")
@validate_querystring(Window)
@tag_monitoring
async def metrics(query_args: Window) -> Any:
    """Per route/service/instance req/s, error rate, p50/p95/p99 over 1m, 5m and 1h."""
    p = plugin()
    if p.recorder is None:
        return error_response(409, "metrics are off ([monitoring] metrics = false)")
    names = [query_args.window] if query_args.window else list(WINDOWS)
    return {"windows": {name: window_figures(p, name) for name in names}}


def prometheus_response() -> Response:
    body = generate_latest(plugin().registry)
    return Response(body, status=200, content_type=CONTENT_TYPE_LATEST)


@metrics_blueprint.get("/metrics")
@public(when=lambda rt: rt.config.monitoring.metrics_public)
async def prometheus() -> Any:
    """Prometheus text exposition format. With ``server.admin_secret`` set it needs a
    viewer token (Prometheus: ``authorization: {credentials_file: ...}``) unless
    ``[monitoring] metrics_public = true``."""
    return prometheus_response()


# --------------------------------------------------------------------------- services
def services_view(p: Any) -> list[dict[str, Any]]:
    rt = runtime()
    rec = p.recorder.view() if p.recorder is not None else None
    health_map = instance_health(rt, rec)
    breakers = rec.breakers if rec else {}
    window = window_figures(p, "1m") if rec else {"instances": []}
    figures_by = {(i["service"], i["instance"]): i for i in window["instances"]}
    services: dict[str, dict[str, Any]] = {}
    for (service, instance), state in sorted(health_map.items()):
        s = services.setdefault(service, {"service": service, "instances": []})
        fig = figures_by.get((service, instance), {})
        s["instances"].append({
            "instance": instance, "health": state,
            "breaker": breakers.get((service, instance), "closed"),
            "rps": fig.get("rps", 0.0), "error_rate": fig.get("error_rate", 0.0),
            "p99_ms": fig.get("p99_ms"),
        })
    for (service, instance), state in breakers.items():
        if (service, instance) not in health_map:
            s = services.setdefault(service, {"service": service, "instances": []})
            s["instances"].append({"instance": instance, "health": "unknown", "breaker": state})
    for s in services.values():
        total = len(s["instances"])
        healthy = sum(1 for i in s["instances"] if i["health"] == "passing")
        s["healthy"] = healthy
        s["total"] = total
        s["healthy_share"] = round(healthy / total, 4) if total else None
        s["breakers_open"] = sum(1 for i in s["instances"] if i["breaker"] == "open")
    return list(services.values())


@blueprint.get("/services")
@tag_monitoring
async def services() -> Any:
    """Health of every service and instance, with breaker states."""
    return {"services": services_view(plugin())}


# --------------------------------------------------------------------------- alerts
@blueprint.get("/alerts")
@tag_monitoring
async def alerts() -> Any:
    """Every rule with its state (inactive, pending, firing) and the recent transitions."""
    p = plugin()
    history = await p.store.history(100) if p.store is not None else list(p.engine.recent)
    return {
        "alerts": [a.describe() for a in p.engine.alerts.values()],
        "active": [a.describe() for a in p.engine.alerts.values() if a.state != "inactive"],
        "recent": history,
    }


@blueprint.post("/alerts")
@validate_request(AlertRule)
@tag_monitoring
async def create_alert(data: AlertRule) -> Any:
    """Create an alert rule; it is persisted and survives restarts. With
    ``If-Match: <revision>`` it replaces the API rule of that name instead, if that
    rule is still at this revision (412 if not)."""
    rt = runtime()
    expected = if_match()
    existing = rt.generation.defined(KIND).get(data.name)
    if existing is not None and (expected is None or existing.origin == "static"):
        why = "declared in the config" if existing.origin == "static" else \
            "created through the API"
        return error_response(409, f"alert rule {data.name!r} exists ({why})")
    body = data.model_dump(by_alias=True, mode="json")
    definition = await rt.write(KIND, data.name, body, exists=False if expected is None
                                else None, if_match=expected)
    assert definition is not None
    return plugin().engine.alerts[data.name].describe(), 201 if existing is None else 200


@blueprint.delete("/alerts/<name>")
@tag_monitoring
async def delete_alert(name: str) -> Any:
    """Delete a rule created through the API (config rules are static);
    ``If-Match: <revision>`` makes it conditional (412)."""
    rt = runtime()
    existing = rt.generation.defined(KIND).get(name)
    if existing is None:
        return error_response(404, f"no alert rule named {name!r}")
    if existing.origin == "static":
        return error_response(409, f"alert rule {name!r} is declared in the config "
                                   "([[monitoring.alerts]]); remove it there and reload")
    await rt.write(KIND, name, None, exists=True, if_match=if_match())
    return "", 204


# --------------------------------------------------------------------------- logs
@blueprint.get("/logs")
@validate_querystring(LogQuery)
@tag_monitoring
async def logs(query_args: LogQuery) -> Any:
    """Recent requests from the ring buffer, newest first (every worker's, with
    ``server.workers > 1``: the others' at most a second late)."""
    p = plugin()
    q = query_args
    status = status_class = None
    if q.status is not None:
        if q.status.isdigit():
            status = int(q.status)
        else:
            status_class = int(q.status[0])
    buffer: Any = p.ring or ()
    if p.workers is not None and p.ring is not None:
        others = await asyncio.to_thread(p.workers.logs, p.config.log_buffer)
        if others:
            buffer = sorted([*buffer, *others], key=itemgetter(0))
    lines = query(buffer, status=status, status_class=status_class, route=q.route,
                  request_id=q.request_id, since=_time(q.since), until=_time(q.until),
                  limit=q.limit)
    return {"logs": lines, "buffer": p.config.log_buffer}


# --------------------------------------------------------------------------- reports
@blueprint.get("/reports")
@validate_querystring(ReportQuery)
@tag_monitoring
async def reports(query_args: ReportQuery) -> Any:
    """Per service and route, by hour or day, from the persisted per-minute rollups."""
    p = plugin()
    if p.store is None or p.recorder is None:
        return error_response(409, "reports need metrics on and worker 0's admin listener")
    q = query_args
    now = time.time()
    end = _time(q.to) or now + 1
    start = _time(q.from_)
    if start is None:
        start = end - (86400 if q.period == "hour" else 7 * 86400)
    if start >= end:
        return error_response(422, "validation failed", fields=[
            {"field": "from", "message": "must be before 'to'", "type": "value_error"}])
    await p.rollup()  # include the minute in progress
    rows = await p.store.rollups(start - start % PERIODS[q.period], end)
    report = build_report(rows, p.recorder.bounds, q.period)
    if q.format == "csv":
        return Response(to_csv(report), status=200, content_type="text/csv; charset=utf-8")
    return {"period": q.period, "from": start, "to": end, "report": report}


# --------------------------------------------------------------------------- dashboard
@blueprint.get("/dashboard")
@tag_monitoring
async def dashboard() -> Any:
    """Everything the dashboard draws, in one document."""
    p = plugin()
    rt = runtime()
    out: dict[str, Any] = {"time": time.time(), "generation": rt.generation.number,
                           "in_flight": rt.counters.get("in_flight", 0)}
    rec = p.recorder
    if rec is not None:
        nb = rec.nb
        series = []
        for at, routes, _, _ in rec.slots:
            series.append({"t": at, **summarise(rec.bounds, routes.values(), 10.0, nb)})
        current = window_figures(p, "1m")
        out["now"] = current["total"]
        out["series"] = series[-90:]
        out["routes"] = current["routes"]
        every = rec.view()
        top = sorted(every.rejected_keys.items(), key=lambda kv: -kv[1])[:10]
        out["rate_limited"] = [{"key": k, "rejections": n} for k, n in top]
        out["rejections"] = dict(every.rejections)
    out["services"] = services_view(p)
    out["alerts"] = [a.describe() for a in p.engine.alerts.values() if a.state != "inactive"]
    return out


def ui_response() -> Response:
    response = Response(PAGE, status=200, content_type="text/html; charset=utf-8")
    # The admin app's default CSP forbids everything; this page needs its own inline
    # script and style and to fetch from its origin, nothing else.
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'")
    return response


@blueprint.get("/ui")
@tag_monitoring
@public
async def ui() -> Any:
    """The live dashboard: one self-contained HTML page (no CDN). It carries no data,
    so it is served without a token; the data it polls needs one (the page asks)."""
    return ui_response()
