"""The gateway's admin blueprint, mounted at ``/gateway``."""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from quart import Blueprint
from quart_schema import tag, validate_request

from lucid.admin import error_response, runtime
from lucid.config import ConfigError
from lucid.http import normalize_path
from lucid.model import Exchange
from lucid_gateway.config import HTTP_METHODS

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
    """Liveness: the gateway runs and has a config generation."""
    rt = runtime()
    return {"status": "ok", "generation": rt.generation.number}


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
    data = route.model_dump(exclude_defaults=True)
    data["id"] = route.id or f"routes[{index}]"
    data["kind"] = route.kind
    return data
