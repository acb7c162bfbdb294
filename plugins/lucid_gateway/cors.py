"""CORS per route, answered by the gateway, following the Fetch standard's CORS protocol.

* Preflights (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) are
  answered here and never reach the upstream (nor need a token: browsers send none).
* Allowed origins: exact (``https://app.example.com``), ``*``, or one wildcard label
  (``https://*.example.com``, which matches ``https://a.example.com`` and
  ``https://a.b.example.com`` but not ``https://example.com``).
* Fetch forbids ``*`` together with credentials (``Access-Control-Allow-Origin: *`` is
  never honoured for credentialed requests), so that combination is a config error;
  with credentials the exact origin is echoed.
* ``Vary: Origin`` is sent whenever the answer depends on the origin.
* The gateway's policy wins: on a route with ``cors``, the upstream's own
  ``Access-Control-*`` response headers are dropped, so a browser never sees two.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lucid.model import Exchange, Rejection
from lucid.units import Duration

CORS_RESPONSE_HEADERS = frozenset({
    "access-control-allow-origin", "access-control-allow-credentials",
    "access-control-allow-methods", "access-control-allow-headers",
    "access-control-expose-headers", "access-control-max-age",
})


class CorsPolicy(BaseModel):
    """``cors = { ... }`` on a route."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allow_origins: list[str] = Field(min_length=1)
    allow_methods: list[str] = Field(default_factory=lambda: ["GET", "HEAD", "POST"])
    allow_headers: list[str] = Field(default_factory=list)
    expose_headers: list[str] = Field(default_factory=list)
    allow_credentials: bool = False
    max_age: Duration | None = Field(None, ge=0, le=86400)

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        out = []
        for origin in value:
            if origin == "*":
                out.append(origin)
                continue
            scheme, sep, rest = origin.partition("://")
            if scheme not in ("http", "https") or not sep or not rest or "/" in rest:
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port]) or '*'")
            if "*" in rest and not (rest.startswith("*.") and "*" not in rest[2:]):
                raise ValueError(f"{origin!r}: a wildcard must be the first label, as "
                                 "'https://*.example.com'")
            out.append(origin.lower())
        return out

    @field_validator("allow_methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        return [m if m == "*" else m.upper() for m in value]

    @field_validator("allow_headers", "expose_headers")
    @classmethod
    def _lower(cls, value: list[str]) -> list[str]:
        return [h.lower() for h in value]

    @model_validator(mode="after")
    def _fetch_rules(self) -> CorsPolicy:
        if self.allow_credentials:
            for name in ("allow_origins", "allow_methods", "allow_headers", "expose_headers"):
                if "*" in getattr(self, name):
                    raise ValueError(f"'*' in {name} cannot be used with allow_credentials "
                                     "(the Fetch standard treats it as a literal name or "
                                     "refuses it for credentialed requests)")
        return self


@dataclass(eq=False)
class CorsGuard:
    policy: CorsPolicy

    def __post_init__(self) -> None:
        p = self.policy
        self.any_origin = "*" in p.allow_origins
        self.exact = frozenset(o for o in p.allow_origins if "*" not in o)
        self.suffixes = tuple(
            (o.partition("://")[0], o.partition("://")[2][1:]) for o in p.allow_origins
            if o != "*" and "*" in o
        )
        self.methods = frozenset(p.allow_methods)
        self.any_method = "*" in self.methods
        self.headers = frozenset(h for h in p.allow_headers if h != "*")
        self.any_header = "*" in p.allow_headers
        self.vary = not (self.any_origin and not p.allow_credentials)
        self.expose = ", ".join(p.expose_headers)
        self.allow_methods = ", ".join(p.allow_methods)
        self.max_age = str(int(p.max_age)) if p.max_age is not None else None

    def allows(self, origin: str) -> bool:
        if self.any_origin:
            return True
        lowered = origin.lower()
        if lowered in self.exact:
            return True
        scheme, _, host = lowered.partition("://")
        return any(scheme == s and host.endswith(suffix) and len(host) > len(suffix)
                   for s, suffix in self.suffixes)

    def _origin_headers(self, origin: str) -> list[tuple[str, str]]:
        p = self.policy
        out = [("access-control-allow-origin",
                "*" if self.any_origin and not p.allow_credentials else origin)]
        if p.allow_credentials:
            out.append(("access-control-allow-credentials", "true"))
        return out

    def admit(self, exchange: Exchange) -> Rejection | None:
        """Answer a preflight, or decorate the actual response; None lets it through.

        The upstream's CORS headers are dropped whether or not the request has an
        Origin, and ``Vary: Origin`` is sent either way, so a cache never serves one
        origin's answer to another."""
        exchange.drop_response_headers = CORS_RESPONSE_HEADERS
        headers = exchange.headers
        origin = headers.get("origin")
        requested = headers.get("access-control-request-method")
        if origin is not None and exchange.method == "OPTIONS" and requested is not None:
            return self.preflight(origin, requested, headers.get(
                "access-control-request-headers", ""))
        response = exchange.response_headers
        if self.vary:
            response.append(("vary", "Origin"))
        if origin is not None and self.allows(origin):
            response += self._origin_headers(origin)
            if self.expose:
                response.append(("access-control-expose-headers", self.expose))
        return None

    def preflight(self, origin: str, method: str, requested: str) -> Rejection:
        vary = [("vary", "Origin, Access-Control-Request-Method, Access-Control-Request-Headers")]
        if not self.allows(origin):
            return Rejection(403, reason="CORS: origin not allowed", headers=vary)
        if not self.any_method and method not in self.methods and method not in (
                "GET", "HEAD", "POST"):
            return Rejection(403, reason=f"CORS: method {method} not allowed", headers=vary)
        names = [n.strip().lower() for n in requested.split(",") if n.strip()]
        for name in names:
            if name in self.headers:
                continue
            if self.any_header and name != "authorization":
                continue
            return Rejection(403, reason=f"CORS: request header {name} not allowed",
                             headers=vary)
        out = vary + self._origin_headers(origin)
        out.append(("access-control-allow-methods", self.allow_methods))
        if self.any_header:
            allowed = ", ".join(["*", *sorted(self.headers)])
        else:
            allowed = ", ".join(names)
        if allowed:
            out.append(("access-control-allow-headers", allowed))
        if self.max_age is not None:
            out.append(("access-control-max-age", self.max_age))
        return Rejection(204, body=b"", headers=out, reason="CORS preflight")
