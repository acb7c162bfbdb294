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
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field
from quart import Blueprint
from quart_schema import tag, validate_querystring, validate_request

from lucid.admin import error_response, if_match, runtime
from lucid_ratelimiter.config import Limit

if TYPE_CHECKING:
    from lucid_ratelimiter import CompiledLimit, RateLimiterPlugin

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
    return {"status": "ok" if p.store is not None else "starting", "store": "memory",
            "persistence": "sqlite", "limits": len(p.table.limits) if p.table else 0}


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
    if workers > 1:
        return error_response(409, f"this gateway runs {workers} workers and the limiter's "
                                   "store is in memory: each worker would count on its own, "
                                   "multiplying the limit; run with server.workers = 1")
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
    # the top N without sorting (or describing) every key of a million-key limit
    top = heapq.nsmallest(query_args.top, candidates,
                          key=lambda c: (-c[0], -c[1], c[2], c[3]))
    rows = [{
        "limit": limit_id, "key": key, "used": used,
        "remaining": max(0, compiled.limit - used), "limit_value": compiled.limit,
        "reset": round(reset, 3), "rejections": rejected,
    } for rejected, used, limit_id, key, compiled, reset in top]
    return {"usage": rows, "total": len(candidates)}


@blueprint.post("/usage/reset")
@tag_ratelimiter
@validate_request(ResetRequest)
async def reset(data: ResetRequest) -> Any:
    """Forget a key's counters (quota counters included, on disk at the next flush)."""
    p = plugin()
    if data.limit is not None and data.limit not in p.current().limits:
        return error_response(404, f"no limit {data.limit!r}")
    limits = p.reset_key(data.key, data.limit)
    await p.flush()
    return {"key": data.key, "limits": limits}
