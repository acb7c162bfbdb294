"""The admin app: a Quart app on its own listener, one blueprint per plugin.

Payloads are pydantic models validated through quart-schema, which also serves the
OpenAPI document at ``/openapi.json``. Every error is a JSON body: a validation
failure is 422 and names each bad field; nothing answers with a traceback.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from quart import Quart, Request, current_app, g, jsonify, request
from quart_schema import Info, QuartSchema, RequestSchemaValidationError
from werkzeug.exceptions import BadRequest, HTTPException

from lucid import __version__
from lucid.config import ConfigError, dotted
from lucid.http import new_request_id
from lucid.model import Event

if TYPE_CHECKING:
    from lucid.gateway import Runtime

log = logging.getLogger("lucid.admin")


class MalformedJSON(BadRequest):
    description = "the request body is not valid JSON"


class AdminRequest(Request):
    def on_json_loading_failed(self, error: Exception) -> Any:
        raise MalformedJSON()


def runtime() -> Runtime:
    """The running gateway, from inside an admin view."""
    return current_app.extensions["lucid"]  # type: ignore[no-any-return]


def field_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """Each bad field as ``{"field", "message", "type"}``; the input is not echoed back."""
    return [
        {
            "field": dotted(list(e["loc"])) or "body",
            "message": e["msg"].removeprefix("Value error, "),
            "type": e["type"],
        }
        for e in exc.errors(include_url=False)
    ]


def error_response(status: int, message: str, **extra: Any) -> Any:
    response = jsonify({"error": message, "status": status, **extra})
    response.status_code = status
    return response


# Admin API access. Without ``server.admin_secret`` the API is open, which is only
# allowed on a loopback listener. With it, every endpoint but these needs a bearer
# token signed with that secret (``lucid token``): reads a ``viewer`` or ``admin``
# role, writes ``admin``.
ADMIN_ISSUER = "lucid-admin"
ADMIN_ROLES = {"viewer": 1, "admin": 2}
OPEN_PATHS = frozenset({"/openapi.json", "/gateway/health"})
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_SECRET_WORDS = ("secret", "password", "token", "private")


def is_loopback(listen: str) -> bool:
    import ipaddress

    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def mint_admin_token(secret: str, role: str, ttl: float, subject: str) -> str:
    import time

    import jwt

    now = int(time.time())
    claims = {"iss": ADMIN_ISSUER, "sub": subject, "role": role, "iat": now,
              "exp": now + int(ttl)}
    return jwt.encode(claims, secret, algorithm="HS256")


def _admin_identity(secret: str) -> tuple[dict[str, Any] | None, Any]:
    """The verified admin token's claims, or the 401 to answer."""
    import jwt

    challenge = 'Bearer realm="lucid-admin"'
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        response = error_response(401, "an admin token is required (see `lucid token`)")
        response.headers["WWW-Authenticate"] = challenge
        return None, response
    try:
        claims = jwt.decode(token.strip(), secret, algorithms=["HS256"], issuer=ADMIN_ISSUER,
                            options={"require": ["exp", "sub", "iss"]}, leeway=5)
    except jwt.PyJWTError as exc:
        response = error_response(401, f"invalid admin token: {exc}")
        response.headers["WWW-Authenticate"] = (
            f'{challenge}, error="invalid_token", error_description="{exc}"')
        return None, response
    return claims, None


def redact(value: Any) -> Any:
    """A JSON-like value with anything that looks like a secret replaced."""
    if isinstance(value, dict):
        return {k: "***" if any(w in k.lower() for w in _SECRET_WORDS) and v is not None
                else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def _summary(payload: Any) -> str:
    import json

    if payload is None:
        return ""
    text = json.dumps(redact(payload), separators=(",", ":"), sort_keys=True, default=str)
    return text if len(text) <= 500 else text[:497] + "..."


def _cache_quart_schema_adapters() -> None:
    """quart-schema builds a new pydantic ``TypeAdapter`` for every dict or list a view
    returns and for every payload it validates (measured: ~300 µs of a ~700 µs admin
    request). Adapters are stateless, so one per type serves every request."""
    import quart_schema.conversion as conversion
    from pydantic import TypeAdapter

    if conversion.TypeAdapter is TypeAdapter:  # once per process
        conversion.TypeAdapter = functools.lru_cache(maxsize=512)(TypeAdapter)  # type: ignore[misc,assignment]


def create_admin_app(rt: Runtime) -> Quart:
    _cache_quart_schema_adapters()
    server = rt.config.server
    if server.admin_secret is None and not is_loopback(server.admin):
        raise ConfigError(rt.source, [
            f"server.admin = {server.admin!r}: the admin API may listen beyond loopback "
            "only with authentication; set server.admin_secret (lucid init makes one)"])
    app = Quart("lucid.admin")
    app.request_class = AdminRequest
    app.config["PROPAGATE_EXCEPTIONS"] = False
    app.config["MAX_CONTENT_LENGTH"] = 1 << 20
    QuartSchema(
        app,
        info=Info(title="Lucid admin API", version=__version__),
        openapi_path="/openapi.json",
        redoc_ui_path=None,
        scalar_ui_path=None,
        swagger_ui_path=None,
    )
    app.extensions["lucid"] = rt

    @app.errorhandler(RequestSchemaValidationError)
    async def _invalid(error: RequestSchemaValidationError) -> Any:
        cause = error.validation_error
        if isinstance(cause, ValidationError):
            return error_response(422, "validation failed", fields=field_errors(cause))
        return error_response(422, "validation failed",
                              fields=[{"field": "body", "message": str(cause), "type": "invalid"}])

    @app.errorhandler(MalformedJSON)
    async def _malformed(error: MalformedJSON) -> Any:
        return error_response(422, "validation failed", fields=[
            {"field": "body", "message": "the request body is not valid JSON",
             "type": "json_invalid"}])

    @app.errorhandler(HTTPException)
    async def _http(error: HTTPException) -> Any:
        return error_response(error.code or 500, error.description or error.name)

    @app.errorhandler(Exception)
    async def _crash(error: Exception) -> Any:
        request_id = new_request_id()
        log.exception("admin request %s failed", request_id)
        return error_response(500, "internal error", request_id=request_id)

    @app.before_request
    async def _authenticate() -> Any:
        g.admin_subject, g.admin_role = "anonymous", ""
        secret = rt.config.server.admin_secret
        if secret is None or request.path in OPEN_PATHS:
            return None
        claims, refusal = _admin_identity(secret)
        if claims is None:
            return refusal
        g.admin_subject = str(claims.get("sub"))
        g.admin_role = role = str(claims.get("role", ""))
        needed = "viewer" if request.method in READ_METHODS else "admin"
        if ADMIN_ROLES.get(role, 0) < ADMIN_ROLES[needed]:
            response = error_response(403, f"this needs the {needed} role; the token has "
                                           f"{role or 'none'}")
            response.headers["WWW-Authenticate"] = (
                'Bearer realm="lucid-admin", error="insufficient_scope"')
            return response
        return None

    @app.after_request
    async def _security_headers(response: Any) -> Any:
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Content-Security-Policy",
                                    "default-src 'none'; frame-ancestors 'none'")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        if request.method not in READ_METHODS:
            # Every write attempt, every plugin's endpoint: awaited, so the audit
            # record is stored before the client has its answer.
            try:
                payload = await request.get_json(silent=True)
            except Exception:
                payload = None
            await rt.hooks.observe_event(Event("admin_write", {
                "subject": getattr(g, "admin_subject", "anonymous"),
                "role": getattr(g, "admin_role", ""),
                "method": request.method,
                "path": request.path,
                "status": response.status_code,
                "summary": _summary(payload),
                "request_id": request.headers.get("X-Request-Id", "") or new_request_id(),
            }))
        return response

    rt.hooks.register_admin(app.register_blueprint)
    return app
