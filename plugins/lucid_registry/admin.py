"""The registry's admin blueprint, mounted at ``/registry``.

Bodies are validated by quart-schema (422 naming each field); query strings by hand,
with the same error shape. Writes answer only once committed to the store.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from quart import Blueprint, Response, make_response, request
from quart_schema import tag, validate_request

from lucid.admin import error_response, runtime
from lucid.units import parse_duration
from lucid_registry.config import (
    STATUSES,
    HealthBatch,
    HealthReport,
    InstanceSpec,
    InstanceUpdate,
    Maintenance,
    ServiceRegistration,
    ServiceUpdate,
)
from lucid_registry.registry import Record, Registry, RegistryError

blueprint = Blueprint("registry", __name__, url_prefix="/registry")
tag_registry = tag(["registry"])
INDEX_HEADER = "X-Lucid-Index"
KEEPALIVE = 15.0


class BadQuery(Exception):
    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message


def reply(data: dict[str, Any], status: int = 200, index: int | None = None) -> Response:
    """A JSON response built here: handing quart-schema a dict costs a pydantic
    TypeAdapter per response, a third of a heartbeat's time in the admin app."""
    headers = {INDEX_HEADER: str(index)} if index is not None else None
    return Response(json.dumps(data), status, headers=headers, mimetype="application/json")


def registry() -> Registry:
    plugin: Any = runtime().plugin_set.pm.get_plugin("registry")
    return plugin.registry  # type: ignore[no-any-return]


@blueprint.errorhandler(RegistryError)
async def _registry_error(error: RegistryError) -> Any:
    return error_response(error.status, error.message, **error.extra)


@blueprint.errorhandler(BadQuery)
async def _bad_query(error: BadQuery) -> Any:
    return error_response(422, "validation failed", fields=[
        {"field": f"query.{error.field}", "message": error.message, "type": "value_error"}])


# filters -----------------------------------------------------------------------
def _metadata_filters() -> list[tuple[str, str]]:
    pairs = []
    for item in request.args.getlist("meta"):
        key, sep, value = item.partition(":")
        if not sep or not key:
            raise BadQuery("meta", f"{item!r}: expected key:value")
        pairs.append((key, value))
    return pairs


def _matches(metadata: dict[str, str], tags: Any, wanted_tags: list[str],
             wanted_meta: list[tuple[str, str]]) -> bool:
    return all(t in tags for t in wanted_tags) and all(
        metadata.get(k) == v for k, v in wanted_meta)


# services ------------------------------------------------------------------------
@blueprint.post("/services")
@tag_registry
@validate_request(ServiceRegistration)
async def register_service(data: ServiceRegistration) -> Any:
    """Register a service with zero or more instances (409 if the id is taken)."""
    service = await registry().register_service(data)
    return reply(service.describe(), 201, service.idx)


def _service_filter() -> Any:
    tags = request.args.getlist("tag")
    meta = _metadata_filters()
    health = request.args.get("health")
    if health is not None and health not in STATUSES:
        raise BadQuery("health", f"{health!r}: expected one of {', '.join(STATUSES)}")

    def keep(service: Any) -> bool:
        if not _matches(service.metadata, service.tags, tags, meta):
            return False
        return health is None or any(r.status == health for r in service.records.values())

    return keep


def _catalog(reg: Registry, keep: Any) -> dict[str, Any]:
    return {"services": [s.describe(instances=False) for s in reg.services.values()
                         if keep(s)], "index": reg.index}


async def _wait_for(reg: Registry, changed: asyncio.Event, seconds: float, owner: Any) -> None:
    """Wait for ``changed`` (or the gateway stopping) for at most ``seconds``."""
    if reg.closed:
        return
    owner.watchers += 1
    try:
        await asyncio.wait_for(changed.wait(), seconds)
    except TimeoutError:
        pass
    finally:
        owner.watchers -= 1


@blueprint.get("/services")
@tag_registry
async def list_services() -> Any:
    """Services, filtered by ``tag`` and ``meta=key:value`` (repeatable) and by
    ``health`` (services with at least one instance in that status). With
    ``index=N`` it blocks until the registry's index passes N -- any service added,
    changed or removed, any instance registered, deregistered or changing status --
    or ``wait`` elapses (Consul's blocking query on its catalog); the index is in
    ``X-Lucid-Index``."""
    reg = registry()
    keep = _service_filter()
    index, wait = _blocking_args(reg)
    if index is not None and reg.index <= index:
        await _wait_for(reg, reg.catalog_changed, wait, reg)
    return reply(_catalog(reg, keep), 200, reg.index)


@blueprint.get("/services/<service_id>")
@tag_registry
async def get_service(service_id: str) -> Any:
    """One service with its instances."""
    service = registry().service(service_id)
    return reply(service.describe(), 200, service.idx)


@blueprint.put("/services/<service_id>")
@tag_registry
@validate_request(ServiceUpdate)
async def update_service(service_id: str, data: ServiceUpdate) -> Any:
    """Replace a service's metadata, tags and check (instances are kept)."""
    service = await registry().update_service(service_id, data)
    return reply(service.describe(), 200, service.idx)


@blueprint.delete("/services/<service_id>")
@tag_registry
async def delete_service(service_id: str) -> Any:
    """Unregister a service and all its instances (static ones: 409)."""
    reg = registry()
    await reg.delete_service(service_id)
    return reply({"deleted": service_id}, 200, reg.index)


# instances -------------------------------------------------------------------------
def _instance_filter() -> Any:
    healthy = request.args.get("healthy")
    if healthy not in (None, "true", "false"):
        raise BadQuery("healthy", f"{healthy!r}: expected true or false")
    status = request.args.get("status")
    if status is not None and status not in STATUSES:
        raise BadQuery("status", f"{status!r}: expected one of {', '.join(STATUSES)}")
    tags = request.args.getlist("tag")
    zone = request.args.get("zone")
    meta = _metadata_filters()

    def keep(record: Record) -> bool:
        if healthy is not None and (record.status in ("passing", "warning")) != (
                healthy == "true"):
            return False
        if status is not None and record.status != status:
            return False
        if zone is not None and record.spec.zone != zone:
            return False
        return _matches(record.spec.metadata, record.spec.tags, tags, meta)

    return keep


def _blocking_args(reg: Registry) -> tuple[int | None, float]:
    index = request.args.get("index")
    if index is not None:
        if not index.isdigit():
            raise BadQuery("index", f"{index!r}: expected a non-negative integer")
    wait = request.args.get("wait")
    seconds = reg.config.max_wait
    if wait is not None:
        try:
            seconds = min(parse_duration(wait), reg.config.max_wait)
        except ValueError as exc:
            raise BadQuery("wait", f"{wait!r}: {exc}") from None
    return (int(index) if index is not None else None), seconds


@blueprint.get("/services/<service_id>/instances")
@tag_registry
async def list_instances(service_id: str) -> Any:
    """A service's instances (filters: ``healthy``, ``status``, ``tag``, ``zone``,
    ``meta=key:value``). With ``index=N`` it blocks until the service's index passes
    N or ``wait`` (default and cap: ``max_wait``) elapses; the index is in
    ``X-Lucid-Index``."""
    reg = registry()
    keep = _instance_filter()
    index, wait = _blocking_args(reg)
    service = reg.service(service_id)
    if index is not None and service.idx <= index:
        await _wait_for(reg, service.changed, wait, service)
        service = reg.service(service_id)  # 404 if it was deleted meanwhile
    return reply({
        "service": service.name, "index": service.idx,
        "instances": [r.describe() for r in service.records.values() if keep(r)],
    }, 200, service.idx)


@blueprint.post("/services/<service_id>/instances")
@tag_registry
@validate_request(InstanceSpec)
async def register_instance(service_id: str, data: InstanceSpec) -> Any:
    """Register one instance into an existing service (409 if its id is taken)."""
    record = await registry().register_instance(service_id, data)
    return reply(record.describe(), 201, record.service.idx)


@blueprint.get("/services/<service_id>/instances/<instance_id>")
@tag_registry
async def get_instance(service_id: str, instance_id: str) -> Any:
    record = registry().record(service_id, instance_id)
    return reply(record.describe(), 200, record.service.idx)


@blueprint.put("/services/<service_id>/instances/<instance_id>")
@tag_registry
@validate_request(InstanceUpdate)
async def update_instance(service_id: str, instance_id: str, data: InstanceUpdate) -> Any:
    """Replace an instance's URL, weight, zone, metadata and tags (static ones: 409)."""
    record = await registry().update_instance(service_id, instance_id, data)
    return reply(record.describe(), 200, record.service.idx)


@blueprint.delete("/services/<service_id>/instances/<instance_id>")
@tag_registry
async def deregister_instance(service_id: str, instance_id: str) -> Any:
    """Deregister one instance (static ones: 409)."""
    reg = registry()
    await reg.deregister_instance(service_id, instance_id)
    return reply({"deleted": instance_id}, 200, reg.index)


@blueprint.put("/services/<service_id>/instances/<instance_id>/maintenance")
@tag_registry
@validate_request(Maintenance)
async def maintenance(service_id: str, instance_id: str, data: Maintenance) -> Any:
    """Drain an instance (no new requests; in-flight ones finish) or bring it back."""
    record = await registry().maintenance(service_id, instance_id, data.enabled, data.reason)
    return reply(record.describe(), 200, record.service.idx)


@blueprint.post("/services/<service_id>/health")
@tag_registry
@validate_request(HealthReport)
async def report_health(service_id: str, data: HealthReport) -> Any:
    """Heartbeat: renew an instance's TTL and report its status (default passing)."""
    record = await registry().heartbeat(service_id, data.instance, data.status, data.note)
    return reply({"instance": record.spec.id, "status": record.status})


@blueprint.post("/health")
@tag_registry
@validate_request(HealthBatch)
async def report_health_batch(data: HealthBatch) -> Any:
    """Heartbeats for up to 1,000 instances of any services (an agent renewing all
    the instances on its host); all refused if one is unknown (404 listing them)."""
    records = await registry().heartbeats(
        [(h.service, h.instance, h.status, h.note) for h in data.heartbeats])
    return reply({"renewed": len(records),
                  "statuses": [[r.service.name, r.spec.id, r.status] for r in records]})


# watching --------------------------------------------------------------------------
@blueprint.get("/services/<service_id>/events")
@tag_registry
async def watch(service_id: str) -> Any:
    """Server-Sent Events: an ``instances`` event with the full list now and after
    each change (``id`` is the index), ``deleted`` if the service goes away."""
    reg = registry()
    keep = _instance_filter()
    reg.service(service_id)

    async def stream() -> AsyncIterator[bytes]:
        last = -1
        while not reg.closed:
            service = reg.services.get(service_id)
            if service is None:
                yield _sse("deleted", {"service": service_id}, reg.index)
                return
            if service.idx != last:
                last = service.idx
                yield _sse("instances", {
                    "service": service_id, "index": last,
                    "instances": [r.describe() for r in service.records.values() if keep(r)],
                }, last)
                continue
            if not await _changed_within(reg, service.changed, service):
                yield b": keepalive\n\n"

    return await _event_stream(stream())


@blueprint.get("/events")
@tag_registry
async def watch_catalog() -> Any:
    """Server-Sent Events for the whole registry: a ``services`` event with the
    (filtered, as ``GET /registry/services``) list now and after each change; ``id``
    is the index. Changes that come in a burst are sent as one event."""
    reg = registry()
    keep = _service_filter()

    async def stream() -> AsyncIterator[bytes]:
        last = -1
        while not reg.closed:
            if reg.index != last:
                last = reg.index
                yield _sse("services", _catalog(reg, keep), last)
                continue
            if not await _changed_within(reg, reg.catalog_changed, reg):
                yield b": keepalive\n\n"

    return await _event_stream(stream())


async def _changed_within(reg: Registry, changed: asyncio.Event, owner: Any) -> bool:
    """For a stream: wait for ``changed`` up to the keepalive interval."""
    owner.watchers += 1
    try:
        await asyncio.wait_for(changed.wait(), KEEPALIVE)
        return True
    except TimeoutError:
        return False
    finally:
        owner.watchers -= 1


async def _event_stream(body: AsyncIterator[bytes]) -> Any:
    response: Any = await make_response(body, 200, {
        "Content-Type": "text/event-stream", "X-Accel-Buffering": "no"})
    response.timeout = None
    return response


def _sse(event: str, data: dict[str, Any], index: int) -> bytes:
    return f"id: {index}\nevent: {event}\ndata: {json.dumps(data)}\n\n".encode()

