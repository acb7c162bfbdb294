"""Finding, choosing and calling plugins.

Built-in and third-party plugins alike are entry points in the ``lucid`` group. Each
provides one capability (its module's ``LUCID_CAPABILITY``, else the entry-point
name); ``[plugins]`` in the config picks which installed plugin provides each
capability, or disables it. The core calls hooks only through :class:`Hooks`.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pluggy

from lucid import hookspecs
from lucid.config import ConfigError
from lucid.definitions import Kind
from lucid.model import Rejection

if TYPE_CHECKING:
    from pydantic import BaseModel
    from quart import Blueprint

    from lucid.model import Event, Exchange, Generation, Instance, Outcome
    from lucid.runtime import Runtime

hookimpl = pluggy.HookimplMarker("lucid")
log = logging.getLogger("lucid.plugins")

ENTRY_POINT_GROUP = "lucid"
# Call order on the data path: authentication before rate limits keyed by identity,
# breakers before balancing, monitoring last so it sees what the others decided.
CAPABILITY_ORDER = (
    "gateway", "registry", "circuitbreaker", "ratelimiter", "loadbalancer", "monitoring",
)
# Admission runs by priority, highest first (Kong's and APISIX's plugin priorities): a
# plugin sets ``LUCID_ADMISSION_PRIORITY`` on its module or class, else its capability
# gives it one. Authentication (CORS, header limits, JWT) comes before limiting, so a
# refused request spends no allowance; a third-party auth plugin takes a value between
# (900, say). ``[server] admission_order`` names plugins to run first, in that order.
ADMISSION_PRIORITY = {"gateway": 1000, "ratelimiter": 800}
DEFAULT_ADMISSION_PRIORITY = 500

T = TypeVar("T")


async def resolve(value: T | Awaitable[T]) -> T:
    """Await ``value`` if it is awaitable; plain values cost no await."""
    if inspect.isawaitable(value):
        return await value
    return value


@dataclass(frozen=True)
class InstalledPlugin:
    """An entry point in the ``lucid`` group, imported on first use."""

    name: str
    target: str
    distribution: str

    @property
    def module(self) -> Any:
        """What the entry point names: a module, an object, or a class."""
        return _import(self.target)

    def instantiate(self) -> Any:
        """The object to register: a class is instantiated, so each gateway (and each
        test) gets a plugin with its own state; a module is registered as it is."""
        target = self.module
        return target() if isinstance(target, type) else target

    @property
    def capability(self) -> str:
        return str(getattr(self.module, "LUCID_CAPABILITY", self.name))


@cache
def _import(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr) if attr else module


def installed_plugins() -> list[InstalledPlugin]:
    found = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "?"
        found.append(InstalledPlugin(ep.name, ep.value, dist))
    return sorted(found, key=lambda p: p.name)


def choose_plugins(
    choices: Mapping[str, str | bool],
    source: str,
    installed: Sequence[InstalledPlugin] | None = None,
) -> tuple[list[InstalledPlugin], frozenset[str]]:
    """The enabled plugins in call order, and the capabilities switched off.

    A capability left out of ``[plugins]`` gets the plugin named after it, or its only
    provider. Naming a plugin that is not installed is an error listing those that are.

    A plugin whose import fails is an error only when ``[plugins]`` names it; otherwise
    it is left out with a warning, so one broken package beside the gateway cannot stop
    a gateway that does not use it (Kong likewise loads only the plugins it is told to).
    """
    installed = list(installed_plugins() if installed is None else installed)
    by_name = {p.name: p for p in installed}
    problems: list[str] = []
    providers: dict[str, list[InstalledPlugin]] = {}
    capability_of: dict[str, str] = {}  # plugins that imported
    chosen = {choice for choice in choices.values() if isinstance(choice, str)}
    for plugin in installed:
        try:
            capability_of[plugin.name] = plugin.capability
        except Exception as exc:  # a broken third-party package must not hide the others
            failure = f"plugin {plugin.name!r} ({plugin.target}) failed to import: {exc}"
            if plugin.name in chosen or choices.get(plugin.name) is True:
                problems.append(failure)
            else:
                log.warning("%s; it is not used (name it in [plugins] to need it)", failure)
        else:
            providers.setdefault(capability_of[plugin.name], []).append(plugin)
    names = ", ".join(sorted(by_name)) or "none"
    enabled: list[InstalledPlugin] = []
    disabled: set[str] = set()
    for capability, choice in choices.items():
        if isinstance(choice, str) and choice not in by_name:
            problems.append(
                f"plugins.{capability} = {choice!r}: no such plugin is installed "
                f"(installed: {names})"
            )
        elif isinstance(choice, str) and choice not in capability_of:
            continue  # it failed to import, reported above
        elif isinstance(choice, str) and capability_of[choice] != capability:
            problems.append(
                f"plugins.{capability} = {choice!r}: that plugin provides "
                f"{capability_of[choice]!r}, not {capability!r}"
            )
        elif choice is True and capability not in providers:
            problems.append(
                f"plugins.{capability} = true: no installed plugin provides it "
                f"(installed: {names})"
            )
    for capability, candidates in providers.items():
        choice = choices.get(capability, True)
        if choice is False:
            disabled.add(capability)
        elif isinstance(choice, str):
            if capability_of.get(choice) == capability:
                enabled.append(by_name[choice])
        elif (named := by_name.get(capability)) is not None and named in candidates:
            enabled.append(named)  # the plugin named after the capability, if it provides it
        elif len(candidates) == 1:
            enabled.append(candidates[0])
        else:
            options = ", ".join(p.name for p in candidates)
            problems.append(
                f"plugins.{capability}: several installed plugins provide it ({options}); "
                "name one"
            )
    if problems:
        raise ConfigError(source, problems)
    rank = {c: i for i, c in enumerate(CAPABILITY_ORDER)}
    enabled.sort(key=lambda p: (rank.get(p.capability, len(rank)), p.capability))
    return enabled, frozenset(disabled)


@dataclass
class PluginSet:
    """The enabled plugins, registered with one pluggy manager, and what they contributed."""

    plugins: list[InstalledPlugin]
    disabled: frozenset[str] = frozenset()
    #: ``(name, object)`` plugins registered in-process besides the installed ones (a
    #: test's observer, see ``lucid.testing.run_gateway``); called after them
    extra: Sequence[tuple[str, object]] = ()
    pm: pluggy.PluginManager = field(init=False)
    sections: dict[str, type[BaseModel]] = field(init=False, default_factory=dict)
    route_models: dict[str, type[BaseModel]] = field(init=False, default_factory=dict)
    kinds: dict[str, Kind] = field(init=False, default_factory=dict)
    admission_priority: dict[str, int] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.pm = pluggy.PluginManager("lucid")
        self.pm.add_hookspecs(hookspecs)
        # pluggy calls the last registered first; register in reverse for call order.
        # A plugin that does not fit the hookspecs (unknown hook, wrong argument names)
        # is a config problem naming that plugin, not a traceback.
        registrations: list[tuple[str, str, Callable[[], Any]]] = [
            *((name, "in-process", lambda obj=obj: obj) for name, obj in reversed(self.extra)),
            *((p.name, p.target, p.instantiate) for p in reversed(self.plugins)),
        ]
        capability = {p.name: p.capability for p in self.plugins}
        for name, target, make in registrations:
            if self.pm.has_plugin(name):
                raise ValueError(f"plugin {name!r} ({target}): the name is taken")
            try:
                instance = make()
                self.pm.register(instance, name=name)
                module = _import(target) if target != "in-process" else instance
                self.admission_priority[name] = int(getattr(
                    instance, "LUCID_ADMISSION_PRIORITY", getattr(
                        module, "LUCID_ADMISSION_PRIORITY",
                        ADMISSION_PRIORITY.get(capability.get(name, name),
                                               DEFAULT_ADMISSION_PRIORITY))))
            except pluggy.PluginValidationError as exc:
                raise ValueError(f"plugin {name!r} ({target}): {exc}") from None
            except Exception as exc:  # a third-party constructor that raises
                raise ValueError(f"plugin {name!r} ({target}) failed to start: "
                                 f"{type(exc).__name__}: {exc}") from None
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise ValueError(f"plugin {self.pm.get_name(exc.plugin)!r}: {exc}") from None
        for hook, register in (("lucid_register_config", self._register_section),
                               ("lucid_register_definitions", self._register_kind)):
            for impl in reversed(getattr(self.pm.hook, hook).get_hookimpls()):
                try:
                    impl.function(register=register)
                except ValueError:
                    raise
                except Exception as exc:
                    raise ValueError(f"plugin {impl.plugin_name!r} failed in {hook}: "
                                     f"{type(exc).__name__}: {exc}") from None

    def _register_section(
        self, section: str, model: type[BaseModel], route_model: type[BaseModel] | None = None
    ) -> None:
        if section in ("server", "plugins", "cluster", "services") or section in self.sections:
            raise ValueError(f"config section [{section}] is already taken")
        self.sections[section] = model
        if route_model is not None:
            self.route_models[section] = route_model


    def _register_kind(
        self, kind: str, model: type[BaseModel],
        static: Callable[[Any], Mapping[str, Any]] | None = None,
        legacy: Callable[[Path], Mapping[str, Mapping[str, Any]]] | None = None,
        section: str | None = None,
    ) -> None:
        if kind in self.kinds:
            raise ValueError(f"definition kind {kind!r} is already taken")
        self.kinds[kind] = Kind(kind, model, static, legacy, section)


def hook_names_of(module: object) -> list[str]:
    """Hooks a plugin object implements, without registering it anywhere."""
    return sorted(n for n in dir(module) if n.startswith("lucid_") and callable(getattr(module, n)))


class Hooks:
    """The only way the core calls hooks: one typed method per hook.

    Data-path hooks are resolved once into plain lists of functions in pluggy's call
    order and called directly: a hook nobody implements costs nothing, and a
    "first answer wins" hook stops calling plugins once one has answered (an auth
    rejection must not spend a rate-limit token). Hook wrappers are therefore not
    supported on data-path hooks; the manager refuses them at startup.
    """

    def __init__(self, pm: pluggy.PluginManager, priorities: Mapping[str, int] | None = None,
                 admission_order: Sequence[str] = ()):
        self._pm = pm
        h = pm.hook
        #: plugin names in the order their lucid_admit_request runs
        self.admission = _admission_plan(h.lucid_admit_request, priorities or {},
                                         admission_order)
        self._match_route = _direct(h.lucid_match_route, ("exchange", "generation"))
        self._resolve_instances = _direct(h.lucid_resolve_instances, ("exchange", "generation"))
        self._list_instances = _direct(h.lucid_list_instances, ("service", "generation"))
        self._select_instance = _direct(h.lucid_select_instance, ("exchange", "candidates"))
        self._admit_request = _direct(h.lucid_admit_request, ("exchange",), self.admission)
        self._permit_call = _direct(h.lucid_permit_call, ("exchange", "instance"))
        self._record_outcome = _direct(
            h.lucid_record_outcome, ("exchange", "instance", "outcome")
        )
        self._fallback_response = _direct(h.lucid_fallback_response, ("exchange", "rejection"))
        self._observe_exchange = _direct(h.lucid_observe_exchange, ("exchange",))
        self._observe_event = _direct(h.lucid_observe_event, ("event",))
        self.observes_exchanges = bool(self._observe_exchange)
        # whether anyone implements these: the proxy skips the call when nobody does
        self.admits = bool(self._admit_request)
        self.selects = bool(self._select_instance)
        self.permits = bool(self._permit_call)
        self.records = bool(self._record_outcome)
        self.observes_events = bool(self._observe_event)
        # A hook below with one implementation is that function: the method's loop
        # around it answers exactly what the function does, one call later. (Each
        # call a request saves is about a thousand instructions.)
        for method, functions in (("match_route", self._match_route),
                                  ("resolve_instances", self._resolve_instances),
                                  ("select_instance", self._select_instance),
                                  ("permit_call", self._permit_call)):
            if len(functions) == 1:
                setattr(self, method, functions[0])

    # lifecycle -------------------------------------------------------------
    def register_admin(self, register: Callable[[Blueprint], None]) -> None:
        self._pm.hook.lucid_register_admin(register=register)

    def check_workers(self, config: Any, workers: int) -> list[str]:
        return [r for r in self._pm.hook.lucid_check_workers(config=config, workers=workers) if r]

    async def prepare(self, generation: Generation) -> None:
        """Every plugin derives its state; any failure rejects the generation."""
        for impl in reversed(self._pm.hook.lucid_prepare.get_hookimpls()):
            try:
                await resolve(impl.function(generation=generation))
            except ConfigError:
                raise
            except Exception as exc:
                log.exception("plugin %s failed in lucid_prepare", impl.plugin_name)
                raise ConfigError(generation.source, [
                    f"plugin {impl.plugin_name!r} could not use this config: "
                    f"{type(exc).__name__}: {exc}"]) from None

    async def activate(self, generation: Generation) -> None:
        for fn in _direct(self._pm.hook.lucid_activate, ("generation",)):
            try:
                await resolve(fn(generation))
            except Exception:
                log.exception("a plugin failed in lucid_activate (generation %d)",
                              generation.number)

    async def startup(self, runtime: Runtime) -> None:
        for fn in _direct(self._pm.hook.lucid_startup, ("runtime",)):
            await resolve(fn(runtime))

    async def shutdown(self, runtime: Runtime) -> None:
        for fn in reversed(_direct(self._pm.hook.lucid_shutdown, ("runtime",))):
            try:
                await resolve(fn(runtime))
            except Exception:
                log.exception("a plugin failed to shut down cleanly")

    # routing ---------------------------------------------------------------
    def match_route(self, exchange: Exchange, generation: Generation) -> Any | None:
        """Stops at first non-None result."""
        for fn in self._match_route:
            result = fn(exchange, generation)
            if result is not None:
                return result
        return None

    def resolve_instances(
        self, exchange: Exchange, generation: Generation
    ) -> Sequence[Instance] | None:
        """Stops at first non-None result."""
        for fn in self._resolve_instances:
            result = fn(exchange, generation)
            if result is not None:
                return result  # type: ignore[no-any-return]
        return None

    def list_instances(self, service: str, generation: Generation) -> Sequence[Instance]:
        """Stops at first non-None result; none answers an empty list."""
        for fn in self._list_instances:
            result = fn(service, generation)
            if result is not None:
                return result  # type: ignore[no-any-return]
        return []

    # selection -------------------------------------------------------------
    def select_instance(
        self, exchange: Exchange, candidates: Sequence[Instance]
    ) -> Instance | None:
        """Stops at first non-None result."""
        for fn in self._select_instance:
            result = fn(exchange, candidates)
            if result is not None:
                return result  # type: ignore[no-any-return]
        return None

    # admission -------------------------------------------------------------
    # The data-path hooks below answer at once when every plugin did (the usual case,
    # and one coroutine fewer per hook and request), and only otherwise an awaitable
    # of the rest: the caller awaits a result that is not None nor a Rejection.
    def admit_request(self, exchange: Exchange) -> Rejection | None | Awaitable[Rejection | None]:
        """Stops at the first rejection."""
        functions = self._admit_request
        for i, fn in enumerate(functions):
            result = fn(exchange)
            if result is not None:
                if _answered(result):
                    return result  # type: ignore[no-any-return]
                return _first_rejection(result, functions[i + 1:], (exchange,))
        return None

    # failure ---------------------------------------------------------------
    def permit_call(self, exchange: Exchange, instance: Instance
                    ) -> Rejection | None | Awaitable[Rejection | None]:
        """Stops at the first refusal."""
        functions = self._permit_call
        for i, fn in enumerate(functions):
            result = fn(exchange, instance)
            if result is not None:
                if _answered(result):
                    return result  # type: ignore[no-any-return]
                return _first_rejection(result, functions[i + 1:], (exchange, instance))
        return None

    def record_outcome(
        self, exchange: Exchange, instance: Instance, outcome: Outcome
    ) -> Awaitable[None] | None:
        functions = self._record_outcome
        for i, fn in enumerate(functions):
            result = fn(exchange, instance, outcome)
            if result is not None:
                return _all_of(result, functions[i + 1:], (exchange, instance, outcome))
        return None

    async def fallback_response(self, exchange: Exchange, rejection: Rejection) -> Rejection:
        for fn in self._fallback_response:
            result = fn(exchange, rejection)
            if result is not None and (result := await resolve(result)) is not None:
                return result  # type: ignore[no-any-return]
        return rejection

    # observation -----------------------------------------------------------
    def observe_exchange(self, exchange: Exchange) -> Awaitable[None] | None:
        """Observers must never break a request: each failure is logged and swallowed."""
        functions = self._observe_exchange
        for i, fn in enumerate(functions):
            try:
                result = fn(exchange)
            except Exception:
                log.exception("an observer raised in lucid_observe_exchange")
                continue
            if result is not None:
                return _observe_rest(result, functions[i + 1:], exchange)
        return None

    async def observe_event(self, event: Event) -> None:
        for fn in self._observe_event:
            try:
                result = fn(event)
                if result is not None:
                    await resolve(result)
            except Exception:
                log.exception("an observer raised in lucid_observe_event (%s)", event.kind)


def _answered(result: Any) -> bool:
    """Whether a hook's result is its answer rather than an awaitable of it."""
    return isinstance(result, Rejection) or not inspect.isawaitable(result)


async def _first_rejection(pending: Awaitable[Any], rest: Sequence[Callable[..., Any]],
                           args: tuple[Any, ...]) -> Any:
    """A "first answer wins" hook from a plugin that answered with an awaitable on."""
    result = await pending
    if result is not None:
        return result
    for fn in rest:
        result = fn(*args)
        if result is not None and (result := await resolve(result)) is not None:
            return result
    return None


async def _all_of(pending: Any, rest: Sequence[Callable[..., Any]],
                  args: tuple[Any, ...]) -> None:
    """Every implementation, from the one whose result was not None on."""
    await resolve(pending)
    for fn in rest:
        result = fn(*args)
        if result is not None:
            await resolve(result)


async def _observe_rest(pending: Any, rest: Sequence[Callable[..., Any]],
                        exchange: Exchange) -> None:
    try:
        await resolve(pending)
    except Exception:
        log.exception("an observer raised in lucid_observe_exchange")
    for fn in rest:
        try:
            result = fn(exchange)
            if result is not None:
                await resolve(result)
        except Exception:
            log.exception("an observer raised in lucid_observe_exchange")


def _admission_plan(caller: Any, priorities: Mapping[str, int],
                    order: Sequence[str]) -> list[str]:
    """Plugins implementing admission, in the order they run: those ``order`` names
    first, in its order, then the others by priority, highest first (ties keep the
    plugin order)."""
    names = [impl.plugin_name for impl in reversed(caller.get_hookimpls())]
    unknown = [n for n in order if n not in names]
    if unknown:
        raise ConfigError("plugins", [
            f"server.admission_order: {', '.join(map(repr, unknown))} is not an enabled "
            f"plugin that admits requests (those that do: {', '.join(names) or 'none'})"])
    rest = sorted((n for n in names if n not in order),
                  key=lambda n: -priorities.get(n, DEFAULT_ADMISSION_PRIORITY))
    return [*order, *rest]


def _direct(caller: Any, spec_args: tuple[str, ...],
            order: Sequence[str] | None = None) -> list[Callable[..., Any]]:
    """A hook's implementations as plain functions taking the spec's arguments in order
    (pluggy's call order, or ``order``: plugin names).

    pluggy passes only the arguments an implementation names; so does this, once,
    at build time instead of on every call.
    """
    functions: list[Callable[..., Any]] = []
    impls = list(reversed(caller.get_hookimpls()))
    if order is not None:
        impls.sort(key=lambda impl: order.index(impl.plugin_name))
    for impl in impls:
        if impl.hookwrapper or impl.wrapper:
            raise ConfigError(
                "plugins",
                [f"plugin {impl.plugin_name!r}: hook wrappers are not supported on {caller.name}"],
            )
        if caller.spec and caller.spec.opts.get("firstresult") and (
            inspect.iscoroutinefunction(impl.function)
        ):
            raise ConfigError(
                "plugins",
                [f"plugin {impl.plugin_name!r}: {caller.name} must be synchronous "
                 "(it stops at the first non-None result, and a coroutine is never None)"],
            )
        names = tuple(impl.argnames)
        if names == spec_args:
            functions.append(impl.function)
        else:
            positions = tuple(spec_args.index(n) for n in names)
            functions.append(_reorder(impl.function, positions))
    return functions


def _reorder(function: Callable[..., Any], positions: tuple[int, ...]) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        return function(*(args[i] for i in positions))

    return call
