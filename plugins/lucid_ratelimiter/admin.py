"""The rate limiter's admin blueprint, mounted at ``/ratelimiter``.

Limits are definitions of kind ``"limit"``: every write goes through the core
(``runtime().write``), which validates it whole (every plugin prepares the result),
commits it to the definitions store and swaps the generation in; the rate limiter's
``lucid_activate`` then moves the counters over. Limits declared in TOML are static:
the API lists them but cannot change or delete them (409). Reads show each limit's
``revision``; writes accept ``If-Match: <revision>`` (412 when it moved on).
"""

from __future__ import annotations

import heapq
import time
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field
from quart import Blueprint
from quart_schema import tag, validate_querystring, validate_request

from lucid.admin import error_response, if_match, runtime
from lucid.definitions import BackendUnavailable
from lucid_ratelimiter.config import Limit
from lucid_ratelimiter.redis_store import MICRO, label_of, state_key

if TYPE_CHECKING:
    from lucid_ratelimiter import CompiledLimit, RateLimiterPlugin
    from lucid_ratelimiter.redis_store import SharedLimits

blueprint = Blueprint("ratelimiter", __name__, url_prefix="/ratelimiter")
tag_ratelimiter = tag(["ratelimiter"])


class LimitUpdate(Limit):
    """``PUT /ratelimiter/limits/{id}``: a whole limit; ``id`` may be left out."""

    id: str | None = None  # type: ignore[assignment]


class UsageQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: str | None = None
    key: str | None = None
    top: int = Field(default=100, ge=1, le=10_000)


class ResetRequest(BaseModel):
    """Forget a key's counters: in every limit, or in ``limit`` only."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1)
    limit: str | None = None


def plugin() -> RateLimiterPlugin:
    """This plugin's instance (its live table and counters)."""
    found: RateLimiterPlugin = runtime().plugin_set.pm.get_plugin("ratelimiter")
    return found


def describe(compiled: CompiledLimit) -> dict[str, Any]:
    spec = compiled.spec
    return {
        **spec.model_dump(),
        "source": compiled.source,
        "revision": compiled.revision,
        "quota": compiled.quota,
        "period_seconds": spec.period,
        "keys": len(compiled.limiter),
    }


@blueprint.get("/health")
@tag_ratelimiter
async def health() -> Any:
    """The limiter is up; its store is reachable."""
    p = plugin()
    shared = p.shared is not None
    return {"status": "ok" if p.store is not None else "starting",
            "store": "redis" if shared else "memory",
            "persistence": "redis" if shared else "sqlite",
            "limits": len(p.table.limits) if p.table else 0}


@blueprint.get("/status")
@tag_ratelimiter
async def status() -> Any:
    """Decisions so far, keys in memory, evictions, and the quota flusher's progress."""
    p = plugin()
    table = p.current()
    return {
        "limits": len(table.limits),
        "admitted": p.admitted,
        "rejected": p.rejected,
        "keys": {i: len(c.limiter) for i, c in table.limits.items()},
        "evictions": {i: c.limiter.evictions for i, c in table.limits.items()},
        "max_keys_per_limit": table.config.max_keys,
        "swept": p.swept,
        "quota": {
            "flush_interval": table.config.flush_interval,
            "pending": p.pending,
            "flushes": p.flushes,
            "flushed_rows": p.flushed_rows,
            "last_flush_at": p.last_flush_at,
        },
        "workers": runtime().config.server.workers,
        "backend": backend_status(p, table),
    }


def backend_status(p: RateLimiterPlugin, table: Any) -> dict[str, Any]:
    """Where limits are counted and, with Redis, how that is going: the breaker,
    batching (decisions per script call) and the decisions made without Redis."""
    shared = p.shared
    if shared is None:
        return {"kind": "memory", "per_process": True}
    return {
        "kind": "redis",
        "url": shared.cluster.url,
        "up": shared.closed,
        "down_for": (round(time.monotonic() - shared.opened_at, 3)
                     if shared.opened_at is not None else None),
        "on_backend_failure": table.config.on_backend_failure,
        "degraded": dict(p.degraded),
        "script_calls": shared.calls,
        "decisions": shared.decisions,
        "breaker_openings": shared.failures,
        "processes": p.processes,
        "leases_held": len(shared.held),
        # sync = "lease": tokens this worker holds, taken from Redis, not yet spent
        "slice_tokens": sum(piece.tokens for compiled in table.limits.values()
                            for piece in list(compiled.slices.values())),
    }


@blueprint.get("/limits")
@tag_ratelimiter
async def list_limits() -> Any:
    """Every live limit, static (TOML) and dynamic (admin API)."""
    return {"limits": [describe(c) for c in plugin().current().limits.values()]}


@blueprint.get("/limits/<limit_id>")
@tag_ratelimiter
async def get_limit(limit_id: str) -> Any:
    compiled = plugin().current().limits.get(limit_id)
    if compiled is None:
        return error_response(404, f"no limit {limit_id!r}")
    return describe(compiled)


def _refuse_workers() -> Any:
    workers = runtime().config.server.workers
    if workers > 1 and not runtime().cluster.shared:
        return error_response(409, f"this gateway runs {workers} workers and the limiter's "
                                   "store is in memory: each worker would count on its own, "
                                   "multiplying the limit; run with server.workers = 1 "
                                   "or a Redis [cluster] backend")
    return None


async def _write(spec: Limit, created: bool) -> Any:
    """Write through the core; answer with the limit as it is now live."""
    body = spec.model_dump(mode="json", exclude_defaults=True)
    await runtime().write("limit", spec.id, body, exists=not created, if_match=if_match())
    return describe(plugin().current().limits[spec.id])


@blueprint.post("/limits")
@tag_ratelimiter
@validate_request(Limit)
async def create_limit(data: Limit) -> Any:
    """Add a limit; it applies to the next request and survives restarts."""
    if (refusal := _refuse_workers()) is not None:
        return refusal
    if data.id in runtime().generation.defined("limit"):
        return error_response(409, f"limit {data.id!r} exists; PUT /ratelimiter/limits/"
                                   f"{data.id} replaces it")
    return await _write(data, created=True), 201


@blueprint.put("/limits/<limit_id>")
@tag_ratelimiter
@validate_request(LimitUpdate)
async def replace_limit(limit_id: str, data: LimitUpdate) -> Any:
    """Replace a dynamic limit. Its counters carry over unless what they count changed.
    ``If-Match: <revision>`` makes it conditional (412)."""
    if data.id is not None and data.id != limit_id:
        return error_response(422, "validation failed", fields=[{
            "field": "id", "message": f"must be {limit_id!r} (the id in the path)",
            "type": "value_error"}])
    if limit_id not in runtime().generation.defined("limit"):
        return error_response(404, f"no limit {limit_id!r}; POST /ratelimiter/limits creates one")
    spec = Limit.model_validate({**data.model_dump(), "id": limit_id})
    return await _write(spec, created=False)


@blueprint.delete("/limits/<limit_id>")
@tag_ratelimiter
async def delete_limit(limit_id: str) -> Any:
    """Remove a dynamic limit and its counters. ``If-Match: <revision>`` makes it
    conditional (412)."""
    if limit_id not in runtime().generation.defined("limit"):
        return error_response(404, f"no limit {limit_id!r}")
    await runtime().write("limit", limit_id, None, exists=True, if_match=if_match())
    return {"deleted": limit_id}


@blueprint.get("/usage")
@tag_ratelimiter
@validate_querystring(UsageQuery)
async def usage(query_args: UsageQuery) -> Any:
    """Per limit and key: used, remaining, seconds to reset, rejections; the most
    limited keys first (by rejections, then use), at most ``top`` rows."""
    p = plugin()
    table = p.current()
    if query_args.limit is not None and query_args.limit not in table.limits:
        return error_response(404, f"no limit {query_args.limit!r}")
    if p.shared is not None:
        try:
            candidates = await shared_usage(p.shared, table, query_args.limit,
                                            query_args.key)
        except BackendUnavailable as exc:
            return error_response(503, f"the rate limit backend is unavailable: {exc}")
        return usage_rows(candidates, query_args.top)
    now = p.clock()
    candidates = []  # (rejections, used, limit id, key, compiled, reset)
    for compiled in table.limits.values():
        if query_args.limit is not None and compiled.id != query_args.limit:
            continue
        limiter = compiled.limiter
        if query_args.key is not None:
            keys: Any = [query_args.key]
        else:
            keys = dict.fromkeys([*limiter.keys(now), *compiled.rejections])
        rejections = compiled.rejections
        for key in keys:
            used, reset = limiter.usage(key, now)
            candidates.append((rejections.get(key, 0), used, compiled.id, key, compiled, reset))
    return usage_rows(candidates, query_args.top)


def usage_rows(candidates: list[Any], top_n: int) -> dict[str, Any]:
    """The most limited ``top_n`` of (rejections, used, limit id, key, compiled, reset)."""
    # the top N without sorting (or describing) every key of a million-key limit
    top = heapq.nsmallest(top_n, candidates, key=lambda c: (-c[0], -c[1], c[2], c[3]))
    rows = [{
        "limit": limit_id, "key": key, "used": used,
        "remaining": max(0, compiled.limit - used), "limit_value": compiled.limit,
        "reset": round(reset, 3), "rejections": rejected,
    } for rejected, used, limit_id, key, compiled, reset in top]
    return {"usage": rows, "total": len(candidates)}


MAX_SCANNED = 100_000  # keys per limit the cluster-wide usage report reads at most


async def shared_usage(shared: SharedLimits, table: Any, limit_id: str | None,
                       key: str | None) -> list[Any]:
    """Usage rows from Redis: every node's and worker's counts and rejections."""
    from lucid_ratelimiter.redis_store import KEY_TYPES

    candidates = []
    for compiled in table.limits.values():
        if limit_id is not None and compiled.id != limit_id:
            continue
        prefix = compiled.shared_prefix

        async def read(redis: Any, compiled: Any = compiled, prefix: str = prefix) -> Any:
            rejections = await redis.hgetall(compiled.shared_rejections)
            if key is not None:
                return [key], rejections
            labels = []
            async for name in redis.scan_iter(match=glob_escape(prefix) + "*", count=1000,
                                              _type=KEY_TYPES[compiled.spec.algorithm]):
                labels.append(label_of(name, prefix))
                if len(labels) >= MAX_SCANNED:
                    break
            return labels, rejections

        labels, rejections = await shared.cluster.call(read)
        if key is None:  # else the one key asked for, not every key refused
            labels = list(dict.fromkeys([*labels, *rejections]))
        code, count, period, capacity = compiled.shared_args
        args = shared.params(compiled.spec.algorithm, 0, count, compiled.spec.period,
                             capacity, "", "", "")
        for start in range(0, len(labels), 1000):
            chunk = labels[start:start + 1000]
            reply = await shared.run([("u", args * len(chunk),
                                       [state_key(prefix, label) for label in chunk])])
            values = reply[1]
            for i, label in enumerate(chunk):
                used, reset = int(values[2 * i]), values[2 * i + 1] / MICRO
                candidates.append((int(rejections.get(label, 0)), used, compiled.id, label,
                                   compiled, reset))
    return candidates


def glob_escape(text: str) -> str:
    """``text`` matched literally by a Redis ``SCAN MATCH`` pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


@blueprint.post("/usage/reset")
@tag_ratelimiter
@validate_request(ResetRequest)
async def reset(data: ResetRequest) -> Any:
    """Forget a key's counters (quota counters included, on disk at the next flush)."""
    p = plugin()
    if data.limit is not None and data.limit not in p.current().limits:
        return error_response(404, f"no limit {data.limit!r}")
    limits = p.reset_key(data.key, data.limit)
    if p.shared is not None:
        table = p.current()
        names = []
        for limit_id in limits:
            compiled = table.limits[limit_id]
            state = state_key(compiled.shared_prefix, data.key)
            names.append((state, compiled.shared_rejections))

        async def forget(redis: Any) -> None:
            async with redis.pipeline(transaction=True) as pipe:
                for state, rejections in names:
                    pipe.delete(state, state + ":n")
                    pipe.hdel(rejections, data.key)
                await pipe.execute()

        try:
            await p.shared.cluster.call(forget)
        except BackendUnavailable as exc:
            return error_response(503, f"the rate limit backend is unavailable: {exc}")
    await p.flush()
    return {"key": data.key, "limits": limits}
