"""Every hook Lucid calls, grouped by the stage of a request or of the process.

Results policy, stated per hook:

* **list** (the default): every implementation is called; the core combines the
  results as the hook says. Implementations may return a plain value or an
  awaitable; the core awaits only what is awaitable (see :func:`lucid.plugins.resolve`).
* **firstresult**: only on synchronous "choose one" hooks. Stops at first non-None
  result. An implementation of such a hook must not be ``async``: a coroutine is
  never None, so it would always win.

Hooks are called through :class:`lucid.plugins.Hooks`, never as ``pm.hook.x``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from quart import Blueprint

    from lucid.model import Event, Exchange, Generation, Instance, Outcome, Rejection
    from lucid.runtime import Runtime

hookspec = pluggy.HookspecMarker("lucid")

# ---------------------------------------------------------------------------
# lifecycle
# ---------------------------------------------------------------------------


@hookspec
def lucid_register_config(
    register: Callable[..., None],
) -> None:
    """Contribute this plugin's config section model.

    ``register(section, model, route_model=None)``: ``model`` validates ``[section]``
    (use ``extra="forbid"`` so a typo is an error); ``route_model``, if given,
    validates per-route overrides written as ``[gateway.routes.plugins.<section>]``.

    :param register: callback that records a section; raises if the name is taken.
    """


@hookspec
def lucid_register_definitions(register: Callable[..., None]) -> None:
    """Contribute the kinds of definition this plugin manages (routes, limits …).

    ``register(kind, model, static=None, legacy=None, section=None)``: ``model``
    validates one definition's body (the admin API's payload); ``static(config)``
    returns the definitions the config file declares, ``{id: body}`` in file order
    (read-only through the API); ``legacy(data_dir)``, if given, returns the
    definitions an older Lucid kept in this plugin's own store, imported once into the
    core's store; ``section``, the dotted config key where the file declares them (a
    list of tables with ``id``, or a table by id), places the dynamic ones there in
    the effective config (``GET /gateway/config``, ``lucid config export``).
    Read them in ``lucid_prepare`` with ``generation.defined(kind)``; write them
    through ``runtime.write(kind, id, body)``.

    :param register: callback that records a kind; raises if the name is taken.
    """


@hookspec
def lucid_register_admin(register: Callable[[Blueprint], None]) -> None:
    """Contribute this plugin's admin blueprint (with its ``url_prefix`` set).

    :param register: callback that mounts a blueprint on the admin app.
    """


@hookspec
def lucid_check_workers(config: Any, workers: int) -> str | None:
    """Say whether this plugin's state stays correct across ``workers`` processes.

    Results: list; any string refuses startup with that reason, so state such as
    rate-limit counters is never silently multiplied by the worker count.

    :param config: the validated config (root model).
    :param workers: the configured number of worker processes.
    """


@hookspec
def lucid_prepare(generation: Generation) -> None | Awaitable[None]:
    """Build whatever this plugin derives from a config, before it goes live.

    Called at startup and on every reload, with the candidate generation, before the
    swap. Store derived state with ``generation.state[plugin_name] = ...``. Raise
    :class:`lucid.config.ConfigError` to reject the config; the running one stays.
    Results: list, awaited.

    :param generation: the candidate config generation.
    """


@hookspec
def lucid_activate(generation: Generation) -> None | Awaitable[None]:
    """The generation this plugin prepared is now live: requests arriving from now on
    run under it.

    Called once per generation, right after the swap, at startup (after
    ``lucid_startup``), on every reload and after every definition write. Start
    here what must follow the live config (move counters over, retarget background
    work); never re-sync lazily inside a data-path hook. Results: list, awaited in
    plugin order; an exception is logged, not fatal (the swap has happened).

    :param generation: the generation that just went live.
    """


@hookspec
def lucid_startup(runtime: Runtime) -> None | Awaitable[None]:
    """Start this plugin's resources (stores, background tasks) once per process.

    Results: list, awaited in plugin order.

    :param runtime: the running gateway.
    """


@hookspec
def lucid_shutdown(runtime: Runtime) -> None | Awaitable[None]:
    """Stop this plugin's resources after in-flight requests have drained.

    Results: list, awaited in reverse plugin order; an exception is logged, not fatal.

    :param runtime: the running gateway.
    """


# ---------------------------------------------------------------------------
# routing
# ---------------------------------------------------------------------------


@hookspec(firstresult=True)
def lucid_match_route(exchange: Exchange, generation: Generation) -> Any | None:
    """Match a request to a route; set ``exchange.route``, ``route_id``, ``service``,
    ``path_params`` and ``upstream_path`` and return the route.

    Synchronous. Stops at first non-None result. None everywhere answers 404.

    :param exchange: the request, its path already normalised.
    :param generation: the config generation this request runs under.
    """


@hookspec(firstresult=True)
def lucid_resolve_instances(
    exchange: Exchange, generation: Generation
) -> Sequence[Instance] | None:
    """Resolve the matched route's service to its candidate instances.

    Synchronous, from memory (never a store read per request). Answer the healthy
    instances; a :class:`lucid.model.Candidates` also carries ``everyone`` (any health)
    for selection plugins. The core keeps the answer in ``exchange.instances``, minus
    the instances its passive health has ejected (:mod:`lucid.passive`), if any.
    Stops at first non-None result. None everywhere, or an empty list, answers 503.

    :param exchange: the request, with ``service`` set.
    :param generation: the config generation this request runs under.
    """


@hookspec(firstresult=True)
def lucid_list_instances(service: str, generation: Generation) -> Sequence[Instance] | None:
    """Every instance of ``service`` that this plugin knows, of any health (each
    carries its ``status``), outside any request: what ``runtime.instances(service)``
    answers to admin endpoints, metrics and plugins.

    Synchronous, from memory. Stops at first non-None result: the plugin that
    resolves a service for requests should answer for it here too.

    :param service: the service name.
    :param generation: the generation to answer for (the running one).
    """


# ---------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------


@hookspec(firstresult=True)
def lucid_select_instance(
    exchange: Exchange, candidates: Sequence[Instance]
) -> Instance | None:
    """Choose one instance among the candidates (never one of ``exchange`` tried ones).

    Synchronous. Stops at first non-None result. None everywhere: the core rotates
    through the candidates in order.

    :param exchange: the request.
    :param candidates: instances already tried by this request are removed; empty only
        when none is healthy but ``exchange.instances.everyone`` is not (panic mode).
    """


# ---------------------------------------------------------------------------
# admission
# ---------------------------------------------------------------------------


@hookspec
def lucid_admit_request(exchange: Exchange) -> Rejection | None | Awaitable[Rejection | None]:
    """Allow (None) or reject a request before any upstream call.

    Results: list, resolved in plugin order; the first Rejection answers the client
    and the remaining implementations are not awaited. A plugin may add headers for
    admitted requests to ``exchange.response_headers``.

    :param exchange: the matched request (route, service and client IP known).
    """


# ---------------------------------------------------------------------------
# failure
# ---------------------------------------------------------------------------


@hookspec
def lucid_permit_call(
    exchange: Exchange, instance: Instance
) -> Rejection | None | Awaitable[Rejection | None]:
    """Permit (None) or refuse a call to one instance, e.g. because a breaker is open.

    Results: list; the first Rejection refuses. A refused instance is skipped like a
    failed one; when no instance is left, the fallback hook answers.

    :param exchange: the request.
    :param instance: the instance about to be called.
    """


@hookspec
def lucid_record_outcome(
    exchange: Exchange, instance: Instance, outcome: Outcome
) -> None | Awaitable[None]:
    """Record how one upstream call ended (success, error status, timeout, connect error).

    Called once per attempt, as soon as the status (or error) is known. Results: list.

    :param exchange: the request.
    :param instance: the instance that was called.
    :param outcome: kind, status, duration in seconds, error text.
    """


@hookspec
def lucid_fallback_response(
    exchange: Exchange, rejection: Rejection
) -> Rejection | None | Awaitable[Rejection | None]:
    """Supply the answer when every instance was refused or failed.

    Results: list, resolved in plugin order; the first non-None answer is sent.
    None everywhere sends ``rejection`` itself (a 502/503/504 JSON body).

    :param exchange: the request.
    :param rejection: what the core would answer without a fallback.
    """


# ---------------------------------------------------------------------------
# observation
# ---------------------------------------------------------------------------


@hookspec
def lucid_observe_exchange(exchange: Exchange) -> None | Awaitable[None]:
    """See every finished exchange: timings, sizes, status, route, instance, identity.

    Called after the response is sent, so it never delays the client; for a proxied
    WebSocket, once its session ends (status 101). Results: list; an exception is
    logged and swallowed.

    :param exchange: the finished request.
    """


@hookspec
def lucid_observe_event(event: Event) -> None | Awaitable[None]:
    """See a lifecycle event: instance registered/deregistered/health changed,
    breaker transition, limit rejection, config reloaded, stopping (the drain began).

    Results: list; an exception is logged and swallowed.

    :param event: kind and data.
    """
