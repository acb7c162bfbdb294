"""The gateway's admin blueprint, mounted at ``/gateway``."""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from quart import Blueprint, request
from quart_schema import tag, validate_request

from lucid.admin import error_response, if_match, runtime
from lucid.config import ConfigError, redact
from lucid.http import normalize_path
from lucid.model import Exchange
from lucid_gateway import route_id
from lucid_gateway.config import HTTP_METHODS, Route

blueprint = Blueprint("gateway", __name__, url_prefix="/gateway")
tag_gateway = tag(["gateway"])


class MatchRequest(BaseModel):
    """A request to test against the live route table."""

    model_config = ConfigDict(extra="forbid")

    method: str = "GET"
    path: str = Field(min_length=1)
    host: str = ""
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        if value.upper() not in HTTP_METHODS:
            raise ValueError(f"{value!r} is not an HTTP method")
        return value.upper()

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        return value


@blueprint.get("/health")
@tag_gateway
async def health() -> Any:
    """Liveness and readiness: plugins started, the gateway's store answers.

    Open even when admin auth is on, so load balancers and probes can call it."""
    rt = runtime()
    shared = rt.generation.state["gateway"].shared
    checks = {"plugins_started": shared.started, "store": False}
    if shared.store is not None:
        try:
            await (await shared.store.db.execute("SELECT 1")).close()
            checks["store"] = True
        except Exception:
            pass
    ready = all(checks.values())
    body = {"status": "ok" if ready else "unavailable", "generation": rt.generation.number,
            "checks": checks}
    return body, 200 if ready else 503


@blueprint.get("/status")
@tag_gateway
async def status() -> Any:
    """Uptime, version, config generation, plugins, listeners and request counters."""
    rt = runtime()
    return {
        "version": rt.version,
        "uptime_seconds": round(time.time() - rt.started_at, 3),
        "generation": rt.generation.number,
        "config_source": rt.source,
        "config_loaded_at": rt.generation.loaded_at,
        "plugins": [
            {"name": p.name, "capability": p.capability} for p in rt.plugin_set.plugins
        ],
        "listeners": rt.listeners,
        "workers": rt.config.server.workers,
        "requests": dict(rt.counters),
    }


@blueprint.get("/routes")
@tag_gateway
async def routes() -> Any:
    """The live route table, in declaration order."""
    rt = runtime()
    table = rt.generation.state["gateway"].router
    return {"routes": [_describe(i, r) for i, r in enumerate(table.routes)]}


@blueprint.post("/routes/match")
@tag_gateway
@validate_request(MatchRequest)
async def match(data: MatchRequest) -> Any:
    """Which route would serve this request, and what path would go upstream."""
    rt = runtime()
    path = normalize_path(data.path)
    if path is None:
        return error_response(422, "validation failed", fields=[
            {"field": "path", "message": "not a usable path", "type": "value_error"}])
    exchange = Exchange(
        request_id="", method=data.method, path=path, query="", host=data.host,
        scheme="http", client_ip="", headers={k.lower(): v for k, v in data.headers.items()},
        started=0.0,
    )
    route = rt.hooks.match_route(exchange, rt.generation)
    if route is None:
        return error_response(404, "no route matches", normalised_path=path)
    return {
        "route_id": exchange.route_id,
        "service": exchange.service,
        "normalised_path": path,
        "upstream_path": exchange.upstream_path,
        "params": exchange.path_params,
    }


@blueprint.post("/config/reload")
@tag_gateway
async def reload() -> Any:
    """Validate the config file again and swap it in; on error the running one stays."""
    rt = runtime()
    try:
        generation = await rt.reload()
    except ConfigError as exc:
        return error_response(422, "config rejected; the running config is unchanged",
                              problems=exc.problems, generation=rt.generation.number)
    return {"status": "reloaded", "generation": generation.number}


def _describe(index: int, route: Any) -> dict[str, Any]:
    data = route.model_dump(mode="json", exclude_defaults=True)
    data["id"] = route_id(index, route)
    data["kind"] = route.kind
    return data


# ---------------------------------------------------------------------------
# runtime routes
# ---------------------------------------------------------------------------


class RouteRequest(Route):
    """A route created or replaced through the API: same fields as in TOML, ``id``
    required."""

    id: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:-]+$")


@blueprint.post("/route")
@tag_gateway
@validate_request(RouteRequest)
async def put_route(data: RouteRequest) -> Any:
    """Create or replace a runtime route: validated against the live config, stored,
    then applied with one swap (the next request sees it; a rejected one changes
    nothing). ``If-Match: <revision>`` makes a replace conditional (412)."""
    rt = runtime()
    created = rt.generation.definitions.get("route", data.id) is None
    body = Route.model_validate(data.model_dump()).model_dump(mode="json",
                                                              exclude_defaults=True)
    definition = await rt.write("route", data.id, body, exists=not created,
                                if_match=if_match())
    assert definition is not None
    return {"route": dict(definition.body), "created": created,
            "revision": definition.revision,
            "generation": rt.generation.number}, 201 if created else 200


@blueprint.get("/route")
@tag_gateway
async def list_runtime_routes() -> Any:
    """Routes added through the API (the config file's are in ``GET /gateway/routes``)."""
    defined = runtime().generation.defined("route")
    return {"routes": [{**d.body, "id": d.id, "revision": d.revision}
                       for d in sorted(defined.values(), key=lambda d: d.id)
                       if d.origin == "dynamic"]}


@blueprint.delete("/route/<route_id>")
@tag_gateway
async def delete_route(route_id: str) -> Any:
    rt = runtime()
    await rt.write("route", route_id, None, exists=True, if_match=if_match())
    return {"deleted": route_id, "generation": rt.generation.number}


# ---------------------------------------------------------------------------
# config, services, metrics, audit
# ---------------------------------------------------------------------------


def effective_config(rt: Any) -> dict[str, Any]:
    """The running config plus runtime routes, as plain data (secrets NOT redacted)."""
    data = rt.config.model_dump(mode="json", exclude_none=True)
    data.setdefault("gateway", {}).setdefault("routes", [])
    data["gateway"]["routes"] = [*data["gateway"]["routes"], *[
        {**d.parsed(Route).model_dump(mode="json", exclude_none=True), "id": d.id}
        for d in sorted(rt.generation.defined("route").values(), key=lambda d: d.id)
        if d.origin == "dynamic"]]
    return data


@blueprint.get("/config")
@tag_gateway
async def config() -> Any:
    """The effective config (file, environment overrides and runtime routes), secrets
    redacted."""
    rt = runtime()
    return {"generation": rt.generation.number, "source": rt.source,
            "config": redact(effective_config(rt))}


@blueprint.get("/services")
@tag_gateway
async def services() -> Any:
    """Services that routes target, with their instances as the resolver sees them."""
    rt = runtime()
    generation = rt.generation
    table = generation.state["gateway"].router
    names = sorted({r.service for r in table.routes}
                   | set(generation.state["gateway"].instances))
    out = []
    for name in names:
        instances = rt.instances(name)
        healthy = sum(1 for i in instances if i.status == "passing")
        out.append({
            "name": name,
            "routes": [r.id for r in generation.routes if r.service == name],
            "instances": [{"id": i.id, "url": i.url, "zone": i.zone, "weight": i.weight,
                           "status": i.status} for i in instances],
            "instance_count": len(instances),
            "healthy": healthy,
            "status": "up" if healthy else "down",
        })
    return {"services": out}


@blueprint.get("/metrics")
@tag_gateway
async def metrics() -> Any:
    """Gateway-level figures over the last minute (and the last 10,000 requests at
    most): req/s, error rate, latency percentiles."""
    rt = runtime()
    recent = rt.generation.state["gateway"].shared.recent
    now = time.monotonic()
    window = [r for r in recent if now - r[0] <= 60.0]
    durations = sorted(r[1] for r in window)
    errors = sum(1 for r in window if r[2] >= 500 or r[2] == 0)
    span = min(60.0, now - window[0][0]) if window else 0.0

    def pct(p: float) -> float | None:
        if not durations:
            return None
        return round(durations[min(len(durations) - 1, int(p / 100 * len(durations)))]
                     * 1000, 3)

    return {
        "window_seconds": round(span, 3),
        "requests": len(window),
        "requests_per_second": round(len(window) / span, 3) if span > 0 else 0.0,
        "error_rate": round(errors / len(window), 4) if window else 0.0,
        "latency_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99)},
        "totals": dict(rt.counters),
    }


@blueprint.get("/audit")
@tag_gateway
async def audit() -> Any:
    """Admin writes, newest first. Filters: ``subject``, ``path`` (prefix), ``since``
    and ``until`` (Unix seconds), ``status``, ``limit`` (1-1000, default 100)."""
    args = request.args
    problems = []
    parsed: dict[str, Any] = {}
    for name, kind in (("since", float), ("until", float), ("status", int), ("limit", int)):
        if name in args:
            try:
                parsed[name] = kind(args[name])
            except ValueError:
                problems.append({"field": name, "message": f"expected a {kind.__name__}",
                                 "type": "value_error"})
    limit = parsed.pop("limit", 100)
    if not 1 <= limit <= 1000:
        problems.append({"field": "limit", "message": "between 1 and 1000",
                         "type": "value_error"})
    unknown = set(args) - {"subject", "path", "since", "until", "status", "limit"}
    problems += [{"field": n, "message": "unknown filter", "type": "extra_forbidden"}
                 for n in sorted(unknown)]
    if problems:
        return error_response(422, "validation failed", fields=problems)
    store = runtime().generation.state["gateway"].shared.store
    if store is None:
        return error_response(503, "the gateway store is not open")
    entries = await store.audit_entries(args.get("subject"), args.get("path"), limit=limit,
                                        **parsed)
    return {"entries": entries}
