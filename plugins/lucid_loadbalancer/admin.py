"""The load balancer's admin blueprint, mounted at ``/loadbalancer``.

Writes are validated completely (payload, then the service and conflicts) before
anything is stored; each is committed before the answer and applies to the next
request. Pools declared in TOML are static: the API shows them but does not change
them. With ``server.workers > 1`` the admin API reaches one worker only, so writes are
refused (declare pools in the config file); reads show that worker's counters.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint
from quart_schema import tag, validate_request

from lucid.admin import error_response, runtime
from lucid_loadbalancer.config import PoolCreate, PoolSpec

blueprint = Blueprint("loadbalancer", __name__, url_prefix="/loadbalancer")
tag_lb = tag(["loadbalancer"])


def _plugin() -> Any:
    plugin: Any = runtime().plugin_set.pm.get_plugin("loadbalancer")
    plugin.sync(runtime().generation)
    return plugin


def _unknown(pool_id: str) -> Any:
    return error_response(404, f"no pool {pool_id!r}", field="pool_id")


def _static(pool_id: str, verb: str) -> Any:
    return error_response(409, f"pool {pool_id!r} is declared in the config file; {verb} it "
                          "there and reload", field="pool_id")


def _read_only() -> Any | None:
    workers = runtime().config.server.workers
    if workers > 1:
        return error_response(409, f"server.workers = {workers}: the admin API reaches one "
                              "worker only; declare pools in [loadbalancer.pools] and reload",
                              field="pool_id")
    return None


def _known_service(plugin: Any, service: str) -> bool:
    """A service the registry knows, or one that resolves to instances now."""
    registry = runtime().plugin_set.pm.get_plugin("registry")
    if registry is not None and getattr(registry, "registry", None) is not None and (
            service in registry.registry.services):
        return True
    rt = runtime()
    from lucid.model import Exchange

    exchange = Exchange(request_id="", method="GET", path="/", query="", host="",
                        scheme="http", client_ip="", headers={}, started=0.0,
                        generation=rt.generation, service=service)
    found = rt.hooks.resolve_instances(exchange, rt.generation)
    # a pool's own inline instances do not make its service known elsewhere
    return found is not None and not any(found is p.inline for p in plugin.pools.values())


def _check(plugin: Any, pool_id: str, spec: PoolSpec) -> Any | None:
    """422 for a service nobody knows; 409 for a service another pool balances."""
    for other in plugin.pools.values():
        if other.id != pool_id and other.service == spec.service:
            return error_response(409, f"service {spec.service!r} is already balanced by "
                                  f"pool {other.id!r}", field="service")
    if spec.instances is None and not _known_service(plugin, spec.service):
        return error_response(422, "validation failed", fields=[{
            "field": "service", "type": "value_error",
            "message": f"unknown service {spec.service!r}: register it (registry), declare "
                       "it in [gateway.services], or list the pool's instances"}])
    return None


def _describe(plugin: Any, pool_id: str) -> dict[str, Any]:
    pool = plugin.pools[pool_id]
    return {"id": pool_id, "source": "static" if pool.static else "api",
            "definition": pool.spec.model_dump(exclude_unset=True),
            "effective": pool.spec.model_dump(),
            "panic_threshold": pool.threshold * 100}


@blueprint.get("/health")
@tag_lb
async def health() -> Any:
    """Liveness of the load balancer, and which pools are in panic mode."""
    plugin = _plugin()
    return {
        "status": "ok",
        "pools": len(plugin.pools),
        "store": str(plugin.store_path),
        "panic": sorted(p.id for p in plugin.pools.values()
                        if p.state is not None and p.state.panic),
        "worker": runtime().worker_index,
    }


@blueprint.get("/status")
@tag_lb
async def status() -> Any:
    """Per pool: algorithm, instances, in-flight and picks per instance, ejected
    (unhealthy) instances, panic mode."""
    plugin = _plugin()
    return {"pools": [p.status(plugin.instances_of(p)) for p in plugin.pools.values()],
            "worker": runtime().worker_index}


@blueprint.get("/pools")
@tag_lb
async def list_pools() -> Any:
    """Every pool's definition (as written, and with defaults)."""
    plugin = _plugin()
    return {"pools": [_describe(plugin, pid) for pid in plugin.pools]}


def _not_api_pool(plugin: Any, pool_id: str, verb: str) -> Any | None:
    """409 for a pool declared in TOML, 404 for no such pool; None for an API pool."""
    if pool_id in plugin.static:
        return _static(pool_id, verb)
    if pool_id not in plugin.dynamic:
        return _unknown(pool_id)
    return None


async def _store(plugin: Any, pool_id: str, spec: PoolSpec) -> Any | None:
    """Check, persist and apply one API pool (under the plugin's lock); the refusal
    when it cannot be stored, else None."""
    problem = _check(plugin, pool_id, spec)
    if problem is not None:
        return problem
    if spec.affinity is not None:
        await plugin.ensure_key()
    await (await plugin.open_store()).put_pool(pool_id, spec.model_dump(exclude_unset=True))
    plugin.dynamic[pool_id] = spec
    plugin.rebuild()
    return None


@blueprint.post("/pools")
@tag_lb
@validate_request(PoolCreate)
async def create_pool(data: PoolCreate) -> Any:
    """Create a pool (persisted; applies to the next request)."""
    plugin = _plugin()
    refused = _read_only()
    if refused is not None:
        return refused
    spec = PoolSpec.model_validate(data.model_dump(exclude={"id"}, exclude_unset=True))
    async with plugin.lock:
        if data.id in plugin.static:
            return error_response(409, f"pool {data.id!r} is declared in the config file",
                                  field="id")
        if data.id in plugin.dynamic:
            return error_response(409, f"pool {data.id!r} already exists", field="id")
        problem = await _store(plugin, data.id, spec)
        if problem is not None:
            return problem
    return _describe(plugin, data.id), 201


@blueprint.put("/pools/<pool_id>")
@tag_lb
@validate_request(PoolSpec)
async def replace_pool(pool_id: str, data: PoolSpec) -> Any:
    """Replace a pool's definition (counters carry over for the same service)."""
    plugin = _plugin()
    refused = _read_only()
    if refused is not None:
        return refused
    async with plugin.lock:
        refused = _not_api_pool(plugin, pool_id, "change")
        if refused is not None:
            return refused
        problem = await _store(plugin, pool_id, data)
        if problem is not None:
            return problem
    return _describe(plugin, pool_id)


@blueprint.delete("/pools/<pool_id>")
@tag_lb
async def delete_pool(pool_id: str) -> Any:
    """Delete a pool made through the API; its service goes back to the core's rotation."""
    plugin = _plugin()
    refused = _read_only()
    if refused is not None:
        return refused
    async with plugin.lock:
        refused = _not_api_pool(plugin, pool_id, "remove")
        if refused is not None:
            return refused
        await (await plugin.open_store()).delete_pool(pool_id)
        del plugin.dynamic[pool_id]
        plugin.rebuild()
    return {"deleted": pool_id}


@blueprint.get("/pools/<pool_id>/instances")
@tag_lb
async def pool_instances(pool_id: str) -> Any:
    """The pool's instances now: health, weight, in-flight, picks, slow-start factor."""
    plugin = _plugin()
    pool = plugin.pools.get(pool_id)
    if pool is None:
        return _unknown(pool_id)
    state = pool.status(plugin.instances_of(pool))
    return {"pool": pool_id, "service": pool.service, "algorithm": pool.algorithm,
            "panic": state["panic"], "instances": state["instances"],
            "ejected": state["ejected"]}
