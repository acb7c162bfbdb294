"""The load balancer's admin blueprint, mounted at ``/loadbalancer``.

Pools are definitions of kind ``"pool"`` in the core's store: a write is validated
completely (payload, then the service and conflicts, then every plugin's
``lucid_prepare``) before it is committed, and applies to the next request. Pools
declared in TOML are static: the API shows them but does not change them (409). Reads
show each pool's ``revision``; ``If-Match: <revision>`` makes a replace or a delete
conditional (412). With ``server.workers > 1`` every worker follows the store within a
second; reads show the counters of the worker that answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from quart import Blueprint
from quart_schema import tag, validate_request

from lucid.admin import error_response, if_match, runtime
from lucid.model import Candidates, Instance
from lucid_loadbalancer import KIND, LUCID_CAPABILITY
from lucid_loadbalancer.config import PoolCreate, PoolSpec
from lucid_loadbalancer.pool import Pool

if TYPE_CHECKING:
    from lucid_loadbalancer import LoadBalancerPlugin

blueprint = Blueprint("loadbalancer", __name__, url_prefix="/loadbalancer")
tag_lb = tag(["loadbalancer"])


def _plugin() -> LoadBalancerPlugin:
    """This plugin (its live pools and counters): what ``lucid_activate`` made live."""
    plugin: LoadBalancerPlugin | None = runtime().plugin_set.pm.get_plugin(LUCID_CAPABILITY)
    assert plugin is not None  # this blueprint is mounted by it
    return plugin


def _unknown(pool_id: str) -> Any:
    return error_response(404, f"no pool {pool_id!r}", field="pool_id")


def _static(pool_id: str, verb: str) -> Any:
    return error_response(409, f"pool {pool_id!r} is declared in the config file; {verb} it "
                          "there and reload", field="pool_id")


def candidates_now(pool: Pool) -> Sequence[Instance] | None:
    """The pool's candidates as a request arriving now would get them, without making
    one: its own instances, or the service's (``runtime.instances``) -- passing ones
    healthy (warning ones when none passes), those in maintenance out, as the registry
    publishes them -- minus what the core's passive health ejected."""
    rt = runtime()
    found: Sequence[Instance] | None = pool.inline
    if found is None:
        every = rt.instances(pool.service)
        if not every:
            return None
        found = every
        if any(i.status != "passing" for i in every):
            passing = [i for i in every if i.status == "passing"]
            found = Candidates(passing or [i for i in every if i.status == "warning"],
                               [i for i in every if i.status != "maintenance"])
    if rt.passive.ejected:
        return rt.passive.view(found)
    return found


def _known_service(service: str) -> bool:
    """A service with instances now (the registry's, or the config file's): a pool
    without its own instances over any other would answer nothing but 503."""
    return bool(runtime().instances(service))


def _check(plugin: LoadBalancerPlugin, pool_id: str, spec: PoolSpec) -> Any | None:
    """409 for a service another pool balances; 422 for a service nobody knows."""
    for other in plugin.pools.values():
        if other.id != pool_id and other.service == spec.service:
            return error_response(409, f"service {spec.service!r} is already balanced by "
                                  f"pool {other.id!r}", field="service")
    if spec.instances is None and not _known_service(spec.service):
        return error_response(422, "validation failed", fields=[{
            "field": "service", "type": "value_error",
            "message": f"unknown service {spec.service!r}: register it (registry), declare "
                       "it in [gateway.services], or list the pool's instances"}])
    return None


def _describe(plugin: LoadBalancerPlugin, pool_id: str) -> dict[str, Any]:
    pool = plugin.pools[pool_id]
    definition = runtime().generation.defined(KIND).get(pool_id)
    return {"id": pool_id, "source": "static" if pool.static else "api",
            "definition": pool.spec.model_dump(exclude_unset=True),
            "effective": pool.spec.model_dump(),
            "panic_threshold": pool.threshold * 100,
            "revision": definition.revision if definition is not None else 0}


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
    return {"pools": [p.status(candidates_now(p)) for p in plugin.pools.values()],
            "worker": runtime().worker_index}


@blueprint.get("/pools")
@tag_lb
async def list_pools() -> Any:
    """Every pool's definition (as written, and with defaults) and its revision."""
    plugin = _plugin()
    return {"pools": [_describe(plugin, pid) for pid in plugin.pools]}


def _not_api_pool(pool_id: str, verb: str) -> Any | None:
    """409 for a pool declared in TOML, 404 for no such pool; None for an API pool."""
    found = runtime().generation.defined(KIND).get(pool_id)
    if found is None:
        return _unknown(pool_id)
    if found.origin == "static":
        return _static(pool_id, verb)
    return None


async def _write(plugin: LoadBalancerPlugin, pool_id: str, spec: PoolSpec,
                 exists: bool) -> Any | None:
    """Check one API pool, then write it through the core (committed, then live);
    the refusal when it cannot be written, else None. Under the plugin's lock, so two
    writes cannot both pass the service checks."""
    problem = _check(plugin, pool_id, spec)
    if problem is not None:
        return problem
    body = spec.model_dump(mode="json", exclude_unset=True)
    await runtime().write(KIND, pool_id, body, exists=exists, if_match=if_match())
    return None


@blueprint.post("/pools")
@tag_lb
@validate_request(PoolCreate)
async def create_pool(data: PoolCreate) -> Any:
    """Create a pool (persisted; applies to the next request)."""
    plugin = _plugin()
    spec = PoolSpec.model_validate(data.model_dump(exclude={"id"}, exclude_unset=True))
    async with plugin.lock:
        found = runtime().generation.defined(KIND).get(data.id)
        if found is not None and found.origin == "static":
            return error_response(409, f"pool {data.id!r} is declared in the config file",
                                  field="id")
        if found is not None:
            return error_response(409, f"pool {data.id!r} already exists", field="id")
        problem = await _write(plugin, data.id, spec, exists=False)
        if problem is not None:
            return problem
    return _describe(plugin, data.id), 201


@blueprint.put("/pools/<pool_id>")
@tag_lb
@validate_request(PoolSpec)
async def replace_pool(pool_id: str, data: PoolSpec) -> Any:
    """Replace a pool's definition (counters carry over for the same service);
    ``If-Match: <revision>`` makes it conditional."""
    plugin = _plugin()
    async with plugin.lock:
        refused = _not_api_pool(pool_id, "change")
        if refused is not None:
            return refused
        problem = await _write(plugin, pool_id, data, exists=True)
        if problem is not None:
            return problem
    return _describe(plugin, pool_id)


@blueprint.delete("/pools/<pool_id>")
@tag_lb
async def delete_pool(pool_id: str) -> Any:
    """Delete a pool made through the API; its service goes back to the core's rotation.
    ``If-Match: <revision>`` makes it conditional."""
    plugin = _plugin()
    async with plugin.lock:
        refused = _not_api_pool(pool_id, "remove")
        if refused is not None:
            return refused
        await runtime().write(KIND, pool_id, None, exists=True, if_match=if_match())
    return {"deleted": pool_id}


@blueprint.get("/pools/<pool_id>/instances")
@tag_lb
async def pool_instances(pool_id: str) -> Any:
    """The pool's instances now: health, weight, in-flight, picks, slow-start factor."""
    plugin = _plugin()
    pool = plugin.pools.get(pool_id)
    if pool is None:
        return _unknown(pool_id)
    state = pool.status(candidates_now(pool))
    return {"pool": pool_id, "service": pool.service, "algorithm": pool.algorithm,
            "panic": state["panic"], "instances": state["instances"],
            "ejected": state["ejected"]}
