"""What the gateway checks before admitting a request on one route: header limits,
CORS, then the JWT. Built per route and per generation; a route with none of these
has no guard and its admission costs one dict lookup."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass

from lucid.model import Exchange, Rejection
from lucid_gateway.auth import RouteAuthGuard
from lucid_gateway.config import HeaderLimits
from lucid_gateway.cors import CorsGuard


@dataclass(eq=False, slots=True)
class RouteGuard:
    limits: HeaderLimits | None
    cors: CorsGuard | None
    auth: RouteAuthGuard | None

    def admit(self, exchange: Exchange) -> Rejection | None | Awaitable[Rejection | None]:
        if self.limits is not None and (refused := check_limits(self.limits, exchange)):
            return refused
        if self.cors is not None and (answer := self.cors.admit(exchange)):
            return answer
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
