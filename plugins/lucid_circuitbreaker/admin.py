"""The circuit breaker's admin blueprint, mounted at ``/circuitbreaker``.

Writes are validated completely (payload, then the settings merged with the
defaults, then conflicts) before anything is stored. A definition is written through
the core (``runtime.write``): committed to the definitions store, prepared by every
plugin and live before the answer; ``If-Match: <revision>`` makes a replace or a
delete conditional (412). Circuits declared in TOML are static: the API can reset,
force open or disable them, but not change or delete them.
"""

from __future__ import annotations

import time
from typing import Any

from quart import Blueprint
from quart_schema import tag, validate_request

from lucid.admin import error_response, if_match, runtime
from lucid.definitions import Definition
from lucid_circuitbreaker import KIND, CircuitBreakerPlugin, route_circuits
from lucid_circuitbreaker.circuits import NORMAL, Circuit
from lucid_circuitbreaker.config import CircuitCreate, CircuitSpec, resolve
from lucid_circuitbreaker.machine import FORCED_OPEN, METRICS_ONLY

blueprint = Blueprint("circuitbreaker", __name__, url_prefix="/circuitbreaker")
tag_cb = tag(["circuitbreaker"])


def _plugin() -> CircuitBreakerPlugin:
    """This plugin's instance: its circuits are the live generation's (``lucid_activate``
    made them so), nothing to catch up on here."""
    plugin: CircuitBreakerPlugin = runtime().plugin_set.pm.get_plugin("circuitbreaker")
    return plugin


def _defined(circuit_id: str) -> Definition | None:
    return runtime().generation.defined(KIND).get(circuit_id)


def _wall_offset(plugin: CircuitBreakerPlugin) -> float:
    return time.time() - plugin.clock()


def _unknown(circuit_id: str) -> Any:
    return error_response(404, f"no circuit {circuit_id!r}", field="circuit_id")


def _static(circuit_id: str, verb: str) -> Any:
    return error_response(
        409, f"circuit {circuit_id!r} is declared in the config file; {verb} it there and "
        "reload", field="circuit_id")


def _check(plugin: CircuitBreakerPlugin, circuit_id: str, spec: CircuitSpec) -> Any | None:
    """422 for settings that are wrong once merged with the defaults; 409 for a service
    another circuit guards. None when the definition can be stored."""
    _, problems = resolve(spec, plugin.defaults)
    if problems:
        return error_response(422, "validation failed", fields=[
            {"field": f, "message": m, "type": "value_error"} for f, m in problems])
    for other in plugin.circuits.values():
        if other.id != circuit_id and other.service == spec.service:
            return error_response(409, f"service {spec.service!r} is already guarded by "
                                  f"circuit {other.id!r}", field="service")
    return None


def _body(spec: CircuitSpec) -> dict[str, Any]:
    """A definition's body as stored: the fields given, as JSON."""
    return spec.model_dump(mode="json", exclude_unset=True)


@blueprint.get("/health")
@tag_cb
async def health() -> Any:
    """Liveness of the breaker plugin, and which circuits are not closed."""
    plugin = _plugin()
    statuses = [c.status(_wall_offset(plugin)) for c in plugin.circuits.values()]
    return {
        "status": "ok",
        "circuits": len(statuses),
        "store": str(plugin.store_path),
        "not_closed": sorted(s["id"] for s in statuses if s["state"] != "closed"),
    }


@blueprint.get("/status")
@tag_cb
async def status() -> Any:
    """Every circuit: state, since when, failure and slow-call rates, calls in the
    window, next probe time; per instance in instance scope."""
    plugin = _plugin()
    offset = _wall_offset(plugin)
    return {
        "scope": "cluster" if plugin.shared is not None else "node",
        "shared_state_reachable": plugin.shared.live if plugin.shared is not None else None,
        "circuits": [c.status(offset) for c in plugin.circuits.values()],
        "transitions": dict(plugin.transition_counts),
        "recent_transitions": list(plugin.recent),
    }


@blueprint.get("/circuits")
@tag_cb
async def list_circuits() -> Any:
    """Definitions: as written, and effective (defaults applied)."""
    plugin = _plugin()
    return {
        "defaults": plugin.defaults.model_dump(exclude_none=True),
        "circuits": [c.describe() for c in plugin.circuits.values()],
    }


@blueprint.get("/circuits/<circuit_id>")
@tag_cb
async def get_circuit(circuit_id: str) -> Any:
    """One definition and its live status."""
    plugin = _plugin()
    circuit: Circuit | None = plugin.circuits.get(circuit_id)
    if circuit is None:
        return _unknown(circuit_id)
    return {**circuit.describe(), "status": circuit.status(_wall_offset(plugin))}


@blueprint.post("/circuits")
@tag_cb
@validate_request(CircuitCreate)
async def create_circuit(data: CircuitCreate) -> Any:
    """Create a circuit (persisted; survives restarts)."""
    plugin = _plugin()
    rt = runtime()
    workers = rt.config.server.workers
    if workers > 1 and plugin.shared is None:
        return error_response(
            409, f"this gateway runs {workers} workers: each would keep its own state of "
            "this circuit, and reset or force-open would reach one of them only; use a "
            "Redis backend (circuit state shared by every worker) or run one worker",
            field="id")
    spec = CircuitSpec.model_validate(data.model_dump(exclude={"id"}, exclude_unset=True))
    assert plugin.lock is not None
    async with plugin.lock:
        found = _defined(data.id)
        if found is not None and found.origin == "static":
            return error_response(409, f"circuit {data.id!r} is declared in the config file",
                                  field="id")
        if found is not None:
            return error_response(409, f"circuit {data.id!r} already exists", field="id")
        problem = _check(plugin, data.id, spec)
        if problem is not None:
            return problem
        await rt.write(KIND, data.id, _body(spec), exists=False, if_match=if_match())
    return plugin.circuits[data.id].describe(), 201


@blueprint.put("/circuits/<circuit_id>")
@tag_cb
@validate_request(CircuitSpec)
async def replace_circuit(circuit_id: str, data: CircuitSpec) -> Any:
    """Replace a circuit's definition (its state restarts closed if it changed).
    ``If-Match: <revision>`` makes it conditional (412 when the circuit moved on)."""
    plugin = _plugin()
    assert plugin.lock is not None
    async with plugin.lock:
        found = _defined(circuit_id)
        if found is not None and found.origin == "static":
            return _static(circuit_id, "change")
        if found is None:
            return _unknown(circuit_id)
        problem = _check(plugin, circuit_id, data)
        if problem is not None:
            return problem
        await runtime().write(KIND, circuit_id, _body(data), exists=True, if_match=if_match())
    return plugin.circuits[circuit_id].describe()


@blueprint.delete("/circuits/<circuit_id>")
@tag_cb
async def delete_circuit(circuit_id: str) -> Any:
    """Delete a circuit made through the API (and its operator mode). ``If-Match:
    <revision>`` makes it conditional (412 when the circuit moved on)."""
    plugin = _plugin()
    rt = runtime()
    assert plugin.lock is not None
    async with plugin.lock:
        found = _defined(circuit_id)
        if found is not None and found.origin == "static":
            return _static(circuit_id, "remove")
        if found is None:
            return _unknown(circuit_id)
        users = [route for _, route, cid in route_circuits(rt.generation)
                 if cid == circuit_id]
        if users:
            return error_response(
                409, f"circuit {circuit_id!r} guards route(s) {', '.join(map(repr, users))}; "
                "change those routes first", field="circuit_id", routes=users)
        await rt.write(KIND, circuit_id, None, exists=True, if_match=if_match())
        if plugin.modes.pop(circuit_id, None) is not None:
            if plugin.shared is not None:
                await plugin.shared.set_mode(circuit_id, NORMAL)
            else:
                await (await plugin.open_store()).set_mode(circuit_id, None)
    return {"deleted": circuit_id}


async def _set_mode(circuit_id: str, mode: str) -> Any:
    """Set an operator mode; in cluster scope stored in Redis and published, so every
    node and worker applies it (503 naming the backend while Redis is unreachable)."""
    plugin = _plugin()
    assert plugin.lock is not None
    async with plugin.lock:
        circuit: Circuit | None = plugin.circuits.get(circuit_id)
        if circuit is None:
            return _unknown(circuit_id)
        if plugin.shared is not None:
            await plugin.shared.set_mode(circuit_id, mode)
        else:
            await (await plugin.open_store()).set_mode(circuit_id,
                                                       None if mode == NORMAL else mode)
        if mode == NORMAL:
            plugin.modes.pop(circuit_id, None)
            circuit.reset()
        else:
            plugin.modes[circuit_id] = mode
            circuit.set_mode(mode, "")
    return circuit.status(_wall_offset(plugin))


@blueprint.post("/circuits/<circuit_id>/reset")
@tag_cb
async def reset_circuit(circuit_id: str) -> Any:
    """Back to closed with an empty window; ends force-open and disable."""
    return await _set_mode(circuit_id, NORMAL)


@blueprint.post("/circuits/<circuit_id>/force-open")
@tag_cb
async def force_open(circuit_id: str) -> Any:
    """Refuse every call until reset (Resilience4j FORCED_OPEN); persisted."""
    return await _set_mode(circuit_id, FORCED_OPEN)


@blueprint.post("/circuits/<circuit_id>/disable")
@tag_cb
async def disable(circuit_id: str) -> Any:
    """Permit every call but keep counting (Resilience4j METRICS_ONLY); persisted."""
    return await _set_mode(circuit_id, METRICS_ONLY)
