"""Verification keys: inline secrets, PEM files and JWKS documents fetched over HTTP.

A key is bound to one key type (``oct``, ``RSA``, ``EC`` with its curve, ``OKP``) when
it is loaded, and a token's ``alg`` may only use a key of the matching type: an RSA
public key can never be used as an HMAC secret (the HS/RS confusion attack), and
``none`` is never an accepted algorithm.

A :class:`JwksCache` lives as long as the gateway (it is carried across config
generations), so a reload does not refetch, and a key rotation is picked up without
a restart: an unknown ``kid`` triggers a refresh, at most once per
``refresh_interval``; an expired cache is refreshed in the background while the keys
it holds keep serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from jwt.algorithms import get_default_algorithms

log = logging.getLogger("lucid.gateway.jwks")

ALGORITHMS = get_default_algorithms()
SUPPORTED = ("HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "ES256", "ES384",
             "EdDSA")
_CURVE_OF = {"ES256": "P-256", "ES384": "P-384"}
_CRYPTO_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384"}


def key_type_of(alg: str) -> str:
    """The JWK ``kty`` an algorithm needs."""
    if alg.startswith("HS"):
        return "oct"
    if alg.startswith(("RS", "PS")):
        return "RSA"
    if alg.startswith("ES"):
        return "EC"
    return "OKP"


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """One usable key: its type, optional kid and alg, and the prepared key object."""

    kty: str
    key: Any
    kid: str | None = None
    alg: str | None = None
    crv: str | None = None

    def fits(self, alg: str) -> bool:
        if key_type_of(alg) != self.kty or (self.alg is not None and self.alg != alg):
            return False
        return self.kty != "EC" or _CURVE_OF.get(alg) == self.crv


def secret_key(secret: str) -> VerifyKey:
    return VerifyKey("oct", secret.encode())


def pem_key(data: bytes) -> VerifyKey:
    """A public key from PEM; its type comes from the key itself, never from a token."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = load_pem_public_key(data)
    if isinstance(key, rsa.RSAPublicKey):
        return VerifyKey("RSA", key)
    if isinstance(key, ec.EllipticCurvePublicKey):
        return VerifyKey("EC", key, crv=_CRYPTO_CURVES.get(key.curve.name, key.curve.name))
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return VerifyKey("OKP", key)
    raise ValueError(f"unsupported public key type {type(key).__name__}")


def jwk_key(jwk: dict[str, Any]) -> VerifyKey | None:
    """One JWK as a verification key; None for keys we cannot or must not use."""
    kty = jwk.get("kty")
    if jwk.get("use", "sig") != "sig":
        return None
    alg = jwk.get("alg")
    if alg is not None and alg not in SUPPORTED:
        return None
    text = json.dumps(jwk)
    try:
        if kty == "RSA":
            return VerifyKey("RSA", ALGORITHMS["RS256"].from_jwk(text), jwk.get("kid"), alg)
        if kty == "EC":
            return VerifyKey("EC", ALGORITHMS["ES256"].from_jwk(text), jwk.get("kid"), alg,
                             jwk.get("crv"))
        if kty == "OKP":
            return VerifyKey("OKP", ALGORITHMS["EdDSA"].from_jwk(text), jwk.get("kid"), alg)
        if kty == "oct":
            return None  # symmetric keys are configured inline, never fetched
    except Exception as exc:  # a bad key in a JWKS must not hide the good ones
        log.warning("ignoring unusable JWK kid=%r: %s", jwk.get("kid"), exc)
    return None


def parse_jwks(document: Any) -> list[VerifyKey]:
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWK set (no 'keys' list)")
    keys = [jwk_key(k) for k in document["keys"] if isinstance(k, dict)]
    return [k for k in keys if k is not None]


class JwksCache:
    """The keys of one JWKS URL, fetched on demand and refreshed without a restart."""

    def __init__(self, url: str, ttl: float, refresh_interval: float, timeout: float = 5.0):
        self.url = url
        self.ttl = ttl
        self.refresh_interval = refresh_interval
        self.timeout = timeout
        self.keys: list[VerifyKey] = []
        self.by_kid: dict[str, list[VerifyKey]] = {}
        self.version = 0  # bumped whenever the key set changes
        self.fetched_at = 0.0  # last successful fetch (monotonic)
        self.attempted_at = float("-inf")  # last attempt, successful or not
        self.fetches = 0
        self.last_error = ""
        self._inflight: asyncio.Future[None] | None = None
        self._session: Any = None

    def configure(self, ttl: float, refresh_interval: float) -> None:
        self.ttl, self.refresh_interval = ttl, refresh_interval

    @property
    def loaded(self) -> bool:
        return self.fetched_at > 0

    def stale(self, now: float) -> bool:
        return now - self.fetched_at > self.ttl

    def may_refresh(self, now: float) -> bool:
        """Rate limit for refreshes caused by tokens (unknown kid, empty cache); a fetch
        already in flight is always worth waiting for."""
        return self._inflight is not None or now - self.attempted_at >= self.refresh_interval

    def lookup(self, kid: str | None) -> list[VerifyKey]:
        if kid is None:
            return self.keys
        return self.by_kid.get(kid, [])

    async def refresh(self) -> None:
        """Fetch once; concurrent callers share one request. Failures keep the old keys."""
        if self._inflight is not None:
            return await asyncio.shield(self._inflight)
        loop = asyncio.get_running_loop()
        self._inflight = loop.create_future()
        try:
            await self._fetch()
        finally:
            self._inflight.set_result(None)
            self._inflight = None

    def refresh_in_background(self, tasks: set[asyncio.Task[Any]]) -> None:
        if self._inflight is not None:
            return
        task = asyncio.get_running_loop().create_task(self.refresh())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _fetch(self) -> None:
        import aiohttp

        self.attempted_at = time.monotonic()
        self.fetches += 1
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        try:
            async with self._session.get(self.url, allow_redirects=False) as response:
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                raw = await response.content.read(1 << 20)
            keys = parse_jwks(json.loads(raw))
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("JWKS fetch from %s failed (keeping %d cached keys): %s",
                        self.url, len(self.keys), self.last_error)
            return
        self.last_error = ""
        self.fetched_at = time.monotonic()
        if [(k.kid, k.kty, k.alg) for k in keys] != [(k.kid, k.kty, k.alg) for k in self.keys] \
                or any(_public(a) != _public(b) for a, b in zip(keys, self.keys, strict=False)):
            self.version += 1
        by_kid: dict[str, list[VerifyKey]] = {}
        for key in keys:
            if key.kid is not None:
                by_kid.setdefault(key.kid, []).append(key)
        self.keys, self.by_kid = keys, by_kid
        log.info("JWKS %s: %d keys (version %d)", self.url, len(keys), self.version)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _public(key: VerifyKey) -> Any:
    try:
        return key.key.public_numbers()
    except AttributeError:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        return key.key.public_bytes(Encoding.Raw, PublicFormat.Raw)
