"""What the gateway checks before admitting a request on one route: header limits,
CORS, method overrides, then the JWT. Built per route and per generation; a route with
none of these has no guard and its admission costs one dict lookup."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from lucid.model import Exchange, Rejection
from lucid_gateway.auth import RouteAuthGuard
from lucid_gateway.config import HeaderLimits
from lucid_gateway.cors import CorsGuard

# Headers through which a client asks an upstream framework (Rails, Laravel, Symfony,
# Express's method-override, Spring's HiddenHttpMethodFilter...) to treat a POST as
# another method, which the route's ``methods`` would then never have seen.
METHOD_OVERRIDES = (
    ("x-http-method-override", "X-HTTP-Method-Override"),
    ("x-http-method", "X-HTTP-Method"),
    ("x-method-override", "X-Method-Override"),
)


Admit = Callable[[Exchange], "Rejection | None | Awaitable[Rejection | None]"]


@dataclass(eq=False, slots=True)
class RouteGuard:
    limits: HeaderLimits | None
    cors: CorsGuard | None
    auth: RouteAuthGuard | None
    methods: frozenset[str] | None = None  # the route's methods, when it limits them
    allow: str = ""  # the same, as an Allow header value
    # what the admission hook calls: admit, or the auth guard's own admit when the
    # route checks nothing else (a call less per request)
    check: Admit = field(init=False)

    def __post_init__(self) -> None:
        only_auth = (self.auth is not None and self.limits is None and self.cors is None
                     and self.methods is None)
        self.check = self.auth.admit if only_auth else self.admit  # type: ignore[union-attr]

    def admit(self, exchange: Exchange) -> Rejection | None | Awaitable[Rejection | None]:
        if self.limits is not None and (refused := check_limits(self.limits, exchange)):
            return refused
        if self.cors is not None and (answer := self.cors.admit(exchange)):
            return answer
        if self.methods is not None and (
                refused := check_override(self.methods, self.allow, exchange)):
            return refused
        if self.auth is not None:
            return self.auth.admit(exchange)
        return None


def check_limits(limits: HeaderLimits, exchange: Exchange) -> Rejection | None:
    headers = exchange.headers
    if limits.max_header_count is not None and len(headers) > limits.max_header_count:
        return Rejection(431, reason=f"more than {limits.max_header_count} request headers")
    if limits.max_header_size is not None:
        for name, value in headers.items():
            if len(name) + len(value) > limits.max_header_size:
                return Rejection(431, reason=f"request header {name} is too large")
    return None


def check_override(methods: frozenset[str], allow: str, exchange: Exchange
                   ) -> Rejection | None:
    """A method override is forwarded only when it names one of the route's methods.

    Checked rather than dropped: a client that sends ``POST`` with an override means
    the other method, so forwarding a bare ``POST`` would run what it did not ask for,
    while an override the route allows (``PATCH`` through a client that can only
    ``POST``) stays useful. Refused with 405 and ``Allow`` (RFC 9110 §15.5.6).
    """
    headers = exchange.headers
    for name, spelled in METHOD_OVERRIDES:
        value = headers.get(name)
        if value is not None and value.strip().upper() not in methods:
            return Rejection(405, reason=f"{spelled} asks for a method this route does not "
                             f"allow ({allow})", headers=[("allow", allow)])
    return None
