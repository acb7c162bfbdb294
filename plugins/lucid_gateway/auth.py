"""JWT authentication and authorization on the data path, per route.

Issuers are declared once in ``[gateway.auth.issuers.<name>]``; a route opts in with
``auth = { ... }``. The signature is checked with PyJWT's algorithm implementations
against keys whose type was fixed when they were loaded; the claims are checked
here (exp/nbf/iat with leeway, iss, aud, required claims).

Cost: a route without ``auth`` pays nothing. With a cached key the check is
synchronous; only a token whose key must first be fetched (unknown ``kid``, JWKS
not loaded yet) makes the admission hook return an awaitable. Verified tokens are
kept in a bounded cache (as Envoy's ``jwt_cache_config``), re-checked for
expiry on every hit and dropped when the issuer's key set changes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lucid.config import SecretText32
from lucid.http import FORWARDING, HOP_BY_HOP
from lucid.model import Exchange, Rejection
from lucid.units import Duration
from lucid.untrusted import Malformed, bearer_challenge, check_numeric_dates, decode_token
from lucid_gateway.jwks import (
    ALGORITHMS,
    SUPPORTED,
    JwksCache,
    VerifyKey,
    key_type_of,
    pem_key,
    secret_key,
)

log = logging.getLogger("lucid.gateway.auth")
_now = time.time

_HEADER_NAME = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"
_MAX_HYPHENS = 8  # lucid.http.underscore_twins lists every spelling up to this
_NO_CONTROLS = {c: None for c in (*range(0, 9), *range(10, 32), 127)}  # signed, still unsafe


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IssuerConfig(Strict):
    """One trusted token issuer and its keys."""

    issuer: str = Field("", description="the exact 'iss' claim required; empty: not checked")
    audiences: list[str] = Field(default_factory=list,
                                 description="'aud' must contain one of these; empty: unchecked")
    algorithms: list[str] = Field(default_factory=lambda: ["RS256"],
                                  description="allow-list of 'alg' values")
    secret: SecretText32 | None = Field(None, description="HMAC key for HS* tokens")
    public_key_file: str | None = Field(None, description="PEM public key (RSA, EC, Ed25519)")
    jwks_url: str | None = Field(None, pattern=r"^https?://",
                                 description="JWK set fetched over HTTP, cached")
    jwks_cache_ttl: Duration = Field(300.0, gt=0, description="refetch the JWKS after this")
    jwks_refresh_interval: Duration = Field(
        30.0, ge=0, description="least time between refetches caused by an unknown kid")
    leeway: Duration = Field(30.0, ge=0, le=600, description="clock skew allowed on exp/nbf/iat")
    required_claims: list[str] = Field(default_factory=lambda: ["exp"])

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("list at least one algorithm")
        for alg in value:
            if alg.lower() == "none":
                raise ValueError("'none' is never accepted: unsigned tokens prove nothing")
            if alg not in SUPPORTED:
                raise ValueError(f"{alg!r} is not supported (one of {', '.join(SUPPORTED)})")
        return value

    @model_validator(mode="after")
    def _keys(self) -> IssuerConfig:
        symmetric = [a for a in self.algorithms if a.startswith("HS")]
        asymmetric = [a for a in self.algorithms if not a.startswith("HS")]
        if symmetric and self.secret is None:
            raise ValueError(f"algorithms {symmetric} need 'secret'")
        if self.secret is not None and not symmetric:
            raise ValueError("'secret' is given but no HS* algorithm is allowed")
        if asymmetric and self.public_key_file is None and self.jwks_url is None:
            raise ValueError(f"algorithms {asymmetric} need 'public_key_file' or 'jwks_url'")
        return self


class AuthConfig(Strict):
    """``[gateway.auth]``: the issuers routes may trust."""

    issuers: dict[str, IssuerConfig] = Field(default_factory=dict)
    token_cache_size: int = Field(10_000, ge=0,
                                  description="verified tokens remembered; 0 disables")


class RouteAuth(Strict):
    """``auth = { ... }`` on a route: who may call it."""

    issuers: list[str] = Field(default_factory=list, description="names; empty: every issuer")
    cookie: str | None = Field(None, description="also read the token from this cookie")
    query: str | None = Field(None, description="also read the token from this query parameter")
    roles: list[str] = Field(default_factory=list, description="any one of these is enough")
    roles_claim: str = Field("roles", description="dotted path to a list (or string) of roles")
    scopes: list[str] = Field(default_factory=list, description="all of these are needed")
    scopes_claim: str = Field("scope", description="space-separated string or list")
    forward_claims: dict[str, str] = Field(
        default_factory=dict, description="claim -> request header sent upstream")
    strip_authorization: bool = Field(False, description="do not forward Authorization upstream")

    @field_validator("forward_claims")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        import re

        for header in value.values():
            if not re.match(_HEADER_NAME, header):
                raise ValueError(f"{header!r} is not a header name")
            if header.lower() in HOP_BY_HOP or header.lower() in FORWARDING:
                # it would never reach the upstream as the claim: say so, not fail silently
                raise ValueError(f"{header!r} is a header the proxy removes or sets itself")
            if header.count("-") > _MAX_HYPHENS:
                raise ValueError(f"{header!r}: at most {_MAX_HYPHENS} '-' (every underscore "
                                 "spelling of the name is dropped from requests)")
        return {k: v.lower() for k, v in value.items()}


# ---------------------------------------------------------------------------
# compiled, per generation
# ---------------------------------------------------------------------------


class AuthFailure(Exception):
    def __init__(self, description: str, code: str = "invalid_token"):
        self.description = description
        self.code = code


def unauthorized(description: str, code: str | None = "invalid_token") -> Rejection:
    """RFC 6750 §3: no error code when the request carried no token at all."""
    challenge = (bearer_challenge("lucid", error=code, error_description=description) if code
                 else bearer_challenge("lucid"))
    return Rejection(401, body={"auth_error": code or "missing_token"}, reason=description,
                     headers=[("www-authenticate", challenge)])


def forbidden(description: str, scope: str = "") -> Rejection:
    challenge = bearer_challenge("lucid", error="insufficient_scope",
                                 error_description=description, scope=scope)
    return Rejection(403, body={"auth_error": "insufficient_scope"}, reason=description,
                     headers=[("www-authenticate", challenge)])


@dataclass(eq=False)
class Issuer:
    name: str
    config: IssuerConfig
    static_keys: list[VerifyKey]
    jwks: JwksCache | None
    algorithms: frozenset[str]
    audiences: frozenset[str]

    @property
    def key_version(self) -> int:
        return self.jwks.version if self.jwks is not None else 0


# A verified token as the cache keeps it: its claims, the issuer that signed it, that
# issuer's JWKS (None: static keys only) and the key-set version it was checked
# against, when it expires (``exp`` plus the issuer's leeway), ``nbf``, the leeway.
Verified = tuple[dict[str, Any], Issuer, JwksCache | None, int, float, float, float]


@dataclass(eq=False)
class Verifier:
    """Every issuer of one generation, and the verified-token cache."""

    issuers: dict[str, Issuer]
    by_iss: dict[str, list[Issuer]]
    cache_size: int
    tasks: set[Any]
    cache: dict[str, Verified] = field(default_factory=dict)

    def verify(self, token: str, allowed: tuple[Issuer, ...]) -> dict[str, Any] | Awaitable[Any]:
        """Claims, or an awaitable of them when a key must be fetched first; raises
        AuthFailure."""
        hit = self.cache.get(token)
        if hit is not None:
            claims, issuer, jwks, version, expires, nbf, leeway = hit
            if issuer in allowed and (jwks is None or jwks.version == version):
                now = time.time()
                if now > expires:
                    raise AuthFailure("token expired")
                if now + leeway < nbf:
                    raise AuthFailure("token not yet valid")
                return claims
        try:  # canonical base64url, bounded JSON: parsed before the signature is checked
            header, payload, signature, signing_input = decode_token(token)
        except Malformed as exc:
            # One line, no traceback: what was wrong, never the token itself.
            log.info("refused a malformed bearer token: %s", exc.detail or exc)
            raise AuthFailure(str(exc)) from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise AuthFailure("unsigned tokens are not accepted")
        if "crit" in header:
            raise AuthFailure("critical header extensions are not supported")
        issuer = self._issuer_for(payload.get("iss"), allowed)
        if alg not in issuer.algorithms:  # never echo an unknown value into a header
            raise AuthFailure(f"algorithm {alg} is not allowed" if alg in ALGORITHMS
                              else "algorithm not allowed")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthFailure("malformed token")
        keys = self._keys(issuer, alg, kid)
        if keys is None:  # the key must be fetched first
            return self._verify_after_fetch(token, issuer, alg, kid, signing_input, signature,
                                            payload)
        return self._finish(token, issuer, alg, keys, signing_input, signature, payload)

    def _issuer_for(self, iss: Any, allowed: tuple[Issuer, ...]) -> Issuer:
        candidates = self.by_iss.get(iss, []) if isinstance(iss, str) else []
        for issuer in candidates:
            if issuer in allowed:
                return issuer
        unchecked = [i for i in allowed if not i.config.issuer]
        if len(unchecked) == 1:
            return unchecked[0]
        raise AuthFailure("token issuer is not trusted here")

    def _keys(self, issuer: Issuer, alg: str, kid: str | None) -> list[VerifyKey] | None:
        kty = key_type_of(alg)
        keys = [k for k in issuer.static_keys if k.fits(alg)]
        jwks = issuer.jwks
        if jwks is None or kty == "oct":
            return keys
        now = time.monotonic()
        found = [k for k in jwks.lookup(kid) if k.fits(alg)]
        if jwks.loaded and jwks.stale(now):
            jwks.refresh_in_background(self.tasks)
        if found or keys:
            return found + keys
        if (not jwks.loaded or kid is not None) and jwks.may_refresh(now):
            return None
        return []

    async def _verify_after_fetch(self, token: str, issuer: Issuer, alg: str, kid: str | None,
                                  signing_input: bytes, signature: bytes,
                                  payload: dict[str, Any]) -> dict[str, Any]:
        assert issuer.jwks is not None
        await issuer.jwks.refresh()
        keys = [k for k in issuer.jwks.lookup(kid) if k.fits(alg)]
        return self._finish(token, issuer, alg, keys, signing_input, signature, payload)

    def _finish(self, token: str, issuer: Issuer, alg: str, keys: list[VerifyKey],
                signing_input: bytes, signature: bytes, payload: dict[str, Any]
                ) -> dict[str, Any]:
        if not keys:
            raise AuthFailure("no key matches the token's key id and algorithm")
        algorithm = ALGORITHMS[alg]
        if not any(algorithm.verify(signing_input, k.key, signature) for k in keys):
            raise AuthFailure("signature verification failed")
        exp, nbf = self._check_claims(issuer, payload)
        if self.cache_size:
            if len(self.cache) >= self.cache_size:
                self.cache.pop(next(iter(self.cache)))
            leeway = issuer.config.leeway
            self.cache[token] = (payload, issuer, issuer.jwks, issuer.key_version,
                                 exp + leeway, nbf, leeway)
        return payload

    @staticmethod
    def _check_claims(issuer: Issuer, claims: dict[str, Any]) -> tuple[float, float]:
        config = issuer.config
        for name in config.required_claims:
            if name not in claims:
                raise AuthFailure(f"missing required claim '{name}'")
        try:
            check_numeric_dates(claims)  # NaN compares false: it would never expire
        except Malformed as exc:
            raise AuthFailure(str(exc)) from None
        now = time.time()
        leeway = config.leeway
        exp = claims.get("exp", float("inf"))
        nbf = claims.get("nbf", float("-inf"))
        iat = claims.get("iat")
        if now > exp + leeway:
            raise AuthFailure("token expired")
        if now + leeway < nbf:
            raise AuthFailure("token not yet valid")
        if iat is not None and iat > now + leeway:
            raise AuthFailure("token issued in the future")
        if config.issuer and claims.get("iss") != config.issuer:
            raise AuthFailure("token issuer is not trusted here")
        if issuer.audiences:
            aud = claims.get("aud")
            auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
            if not issuer.audiences.intersection(a for a in auds if isinstance(a, str)):
                raise AuthFailure("token audience is not accepted")
        return float(exp), float(nbf)


def build_verifier(config: AuthConfig, base: Path | None, jwks_caches: dict[tuple[str, str],
                   JwksCache], tasks: set[Any], problems: list[str]) -> Verifier:
    """Load every issuer's keys; JWKS caches are reused across generations by (name, url)."""
    issuers: dict[str, Issuer] = {}
    by_iss: dict[str, list[Issuer]] = {}
    for name, ic in config.issuers.items():
        keys: list[VerifyKey] = []
        if ic.secret is not None:
            keys.append(secret_key(ic.secret.get_secret_value()))
        if ic.public_key_file is not None:
            path = Path(ic.public_key_file)
            if not path.is_absolute() and base is not None:
                path = base / path
            try:
                keys.append(pem_key(path.read_bytes()))
            except (OSError, ValueError) as exc:
                problems.append(f"gateway.auth.issuers.{name}.public_key_file = "
                                f"{ic.public_key_file!r}: cannot load a PEM public key ({exc})")
                continue
        jwks = None
        if ic.jwks_url is not None:
            jwks = jwks_caches.get((name, ic.jwks_url))
            if jwks is None:
                jwks = jwks_caches[(name, ic.jwks_url)] = JwksCache(
                    ic.jwks_url, ic.jwks_cache_ttl, ic.jwks_refresh_interval)
            jwks.configure(ic.jwks_cache_ttl, ic.jwks_refresh_interval)
        issuer = Issuer(name, ic, keys, jwks, frozenset(ic.algorithms), frozenset(ic.audiences))
        issuers[name] = issuer
        if ic.issuer:
            by_iss.setdefault(ic.issuer, []).append(issuer)
    return Verifier(issuers, by_iss, config.token_cache_size, tasks)


@dataclass(eq=False)
class RouteAuthGuard:
    """One route's auth settings, compiled."""

    verifier: Verifier
    settings: RouteAuth
    allowed: tuple[Issuer, ...]
    roles_path: tuple[str, ...]
    scopes_path: tuple[str, ...]
    claim_headers: frozenset[str] = frozenset()  # forward_claims' header names
    # the verifier's token cache (the same dict, never replaced)
    cache: dict[str, Verified] = field(init=False)
    # nothing to check or change past the identity (no roles, scopes, claim headers,
    # nor credential to strip): the route's admission is settled by a valid token
    plain: bool = field(init=False)

    def __post_init__(self) -> None:
        s = self.settings
        self.cache = self.verifier.cache
        self.plain = not (s.roles or s.scopes or s.forward_claims or s.strip_authorization)

    def token_of(self, exchange: Exchange) -> tuple[str, str] | None:
        """The token and where it was found: ``"header"``, ``"cookie"`` or ``"query"``."""
        header = exchange.headers.get("authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip(), "header"
        s = self.settings
        if s.cookie is not None and "cookie" in exchange.headers:
            for part in exchange.headers["cookie"].split(";"):
                name, _, value = part.strip().partition("=")
                if name == s.cookie and value:
                    return value, "cookie"
        if s.query is not None and exchange.query:
            for name, value in parse_qsl(exchange.query):
                if name == s.query and value:
                    return value, "query"
        return None

    def admit(self, exchange: Exchange) -> Rejection | None | Awaitable[Rejection | None]:
        """Nothing, a rejection, or an awaitable of either when a key must be fetched.

        A bearer token the cache holds (the usual request) is settled here: the same
        checks as :meth:`Verifier.verify` makes on a hit, then :meth:`authorize`, which
        a plain route needs only for the identity. A cached token is canonical base64url
        (nothing else verifies), so the text after ``Bearer `` is found in the cache
        only when it is exactly the token :meth:`token_of` would take. Anything else
        takes the general path."""
        header = exchange.headers.get("authorization")
        if header is not None and header[:7] == "Bearer ":
            hit = self.cache.get(header[7:])
            if hit is not None:
                claims, issuer, jwks, version, expires, nbf, leeway = hit
                if issuer in self.allowed and (jwks is None or jwks.version == version):
                    now = _now()
                    if now > expires:
                        return unauthorized("token expired")
                    if now + leeway < nbf:
                        return unauthorized("token not yet valid")
                    if self.plain:
                        exchange.identity = dict(claims)  # a copy, as authorize makes
                        return None
                    return self.authorize(exchange, claims, "header")
        return self.admit_any(exchange)

    def admit_any(self, exchange: Exchange
                  ) -> Rejection | None | Awaitable[Rejection | None]:
        """:meth:`admit` for any request: the token wherever it is, verified or cached."""
        found = self.token_of(exchange)
        if found is None:
            if "authorization" in exchange.headers:
                return unauthorized("the Authorization header is not a Bearer token",
                                    "invalid_request")
            return unauthorized("a bearer token is required", None)
        token, source = found
        try:
            claims = self.verifier.verify(token, self.allowed)
        except AuthFailure as exc:
            return unauthorized(exc.description, exc.code)
        if isinstance(claims, dict):
            return self.authorize(exchange, claims, source)
        return self._admit_later(exchange, claims, source)

    async def _admit_later(self, exchange: Exchange, pending: Awaitable[Any], source: str
                           ) -> Rejection | None:
        try:
            claims = await pending
        except AuthFailure as exc:
            return unauthorized(exc.description, exc.code)
        return self.authorize(exchange, claims, source)

    def authorize(self, exchange: Exchange, claims: dict[str, Any], source: str = "header"
                  ) -> Rejection | None:
        """Roles and scopes, then what goes upstream: claim headers, and the credential
        removed where it must not travel (``source`` is where the token was found)."""
        s = self.settings
        if s.roles:
            held = _as_list(_dig(claims, self.roles_path))
            if not any(r in held for r in s.roles):
                return forbidden(f"one of the roles {', '.join(s.roles)} is required")
        if s.scopes:
            held = _as_list(_dig(claims, self.scopes_path), split=True)
            missing = [x for x in s.scopes if x not in held]
            if missing:
                return forbidden(f"missing scope {' '.join(missing)}", " ".join(s.scopes))
        exchange.identity = dict(claims)  # a copy: cached claims serve many requests
        headers = exchange.headers
        if self.claim_headers:  # kept from a client's Connection; underscore twins dropped
            own = exchange.set_request_headers
            exchange.set_request_headers = own | self.claim_headers if own else self.claim_headers
        for claim, header in s.forward_claims.items():
            value = claims.get(claim)
            if value is None:
                headers.pop(header, None)  # never let a client supply it
                continue
            if isinstance(value, list):
                text = ",".join(str(v) for v in value)
            else:
                text = value if isinstance(value, str) else json.dumps(value)
            headers[header] = text.translate(_NO_CONTROLS)
        if s.strip_authorization:
            headers.pop("authorization", None)
        if source == "cookie":
            assert s.cookie is not None
            rest = without_cookie(headers["cookie"], s.cookie)
            if rest:
                headers["cookie"] = rest
            else:
                del headers["cookie"]
        elif source == "query":
            assert s.query is not None
            exchange.query = without_query_arg(exchange.query, s.query)
        return None


def without_cookie(header: str, name: str) -> str:
    """A Cookie header without every pair called ``name``; the others keep their order."""
    kept = [p for p in (part.strip() for part in header.split(";"))
            if p and p.partition("=")[0].strip() != name]
    return "; ".join(kept)


def without_query_arg(query: str, name: str) -> str:
    """A raw query string without every argument called ``name`` (compared decoded, as
    ``parse_qsl`` reads them); the other arguments keep their order and exact encoding."""
    return "&".join(part for part in query.split("&")
                    if unquote_plus(part.partition("=")[0]) != name)


def _dig(claims: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = claims
    for part in path:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _as_list(value: Any, split: bool = False) -> list[str]:
    if isinstance(value, str):
        return value.split() if split else [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def route_guard(verifier: Verifier, settings: RouteAuth, key: str, problems: list[str]
                ) -> RouteAuthGuard | None:
    names = settings.issuers or list(verifier.issuers)
    unknown = [n for n in names if n not in verifier.issuers]
    if unknown or not names:
        known = ", ".join(sorted(verifier.issuers)) or "none"
        problems.append(f"{key}.issuers = {settings.issuers!r}: no such issuer in "
                        f"[gateway.auth.issuers] (declared: {known})")
        return None
    return RouteAuthGuard(verifier, settings, tuple(verifier.issuers[n] for n in names),
                          tuple(settings.roles_claim.split(".")),
                          tuple(settings.scopes_claim.split(".")),
                          frozenset(settings.forward_claims.values()))
