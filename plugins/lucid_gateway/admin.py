"""The gateway's admin blueprint, mounted at ``/gateway``: the route table and the
services it targets. The operations endpoints under ``/gateway`` (health, status,
reload, config, metrics, audit) are the core's (:mod:`lucid.admin`), so they answer
whichever plugin does routing."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from quart import Blueprint
from quart_schema import tag, validate_request

from lucid.admin import error_response, if_match, runtime
from lucid.config import redact, secret_fields
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


def _describe(index: int, route: Any) -> dict[str, Any]:
    data = _shown(route.model_dump(mode="json", exclude_defaults=True))
    data["id"] = route_id(index, route)
    data["kind"] = route.kind
    return data


def _shown(body: dict[str, Any]) -> dict[str, Any]:
    """A route as the API shows it: the secrets of its per-plugin settings (a plugin's
    ``SecretStr`` fields, secret-looking keys) hidden, as ``GET /gateway/config``
    hides them."""
    shown: dict[str, Any] = redact(body, secret_fields(Route, runtime().generation.route_models))
    return shown


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
    body = Route.model_validate(data.model_dump()).model_dump(mode="json",
                                                              exclude_defaults=True)
    definition, created = await rt.put("route", data.id, body, if_match=if_match())
    return {"route": _shown(dict(definition.body)), "created": created,
            "revision": definition.revision,
            "generation": rt.generation.number}, 201 if created else 200


@blueprint.get("/route")
@tag_gateway
async def list_runtime_routes() -> Any:
    """Routes added through the API (the config file's are in ``GET /gateway/routes``)."""
    defined = runtime().generation.defined("route")
    return {"routes": [{**_shown(dict(d.body)), "id": d.id, "revision": d.revision}
                       for d in sorted(defined.values(), key=lambda d: d.id)
                       if d.origin == "dynamic"]}


@blueprint.delete("/route/<route_id>")
@tag_gateway
async def delete_route(route_id: str) -> Any:
    rt = runtime()
    await rt.write("route", route_id, None, exists=True, if_match=if_match())
    return {"deleted": route_id, "generation": rt.generation.number}


# ---------------------------------------------------------------------------
# services (health, status, reload, config, metrics and the audit log are the
# core's: lucid.admin)
# ---------------------------------------------------------------------------


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
