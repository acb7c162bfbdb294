"""The admin app: a Quart app on its own listener, one blueprint per plugin.

Payloads are pydantic models validated through quart-schema, which also serves the
OpenAPI document at ``/openapi.json``. Every error is a JSON body: a validation
failure is 422 and names each bad field; nothing answers with a traceback.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from quart import Blueprint, Quart, Request, current_app, g, jsonify, request
from quart.asgi import ASGIHTTPConnection
from quart.utils import encode_headers
from quart.wrappers.response import DataBody
from quart_schema import Info, QuartSchema, RequestSchemaValidationError, tag
from quart_schema.validation import QUART_SCHEMA_REQUEST_ATTRIBUTE
from werkzeug.exceptions import BadRequest, HTTPException

from lucid import __version__
from lucid.audit import AuditQuery
from lucid.config import ConfigError, SecretTree, dotted, redact, secret_fields
from lucid.definitions import DefinitionError, PreconditionFailed
from lucid.http import json_body, new_request_id, refused_head
from lucid.model import Event
from lucid.untrusted import Malformed, bearer_challenge, check_numeric_dates, decode_token, loads

if TYPE_CHECKING:
    from lucid.runtime import Runtime

log = logging.getLogger("lucid.admin")


class MalformedJSON(BadRequest):
    description = "the request body is not valid JSON"


class AdminRequest(Request):
    def on_json_loading_failed(self, error: Exception) -> Any:
        raise MalformedJSON()

    async def get_json(self, force: bool = False, silent: bool = False,
                       cache: bool = True) -> Any:
        """Quart's, parsed by :func:`lucid.untrusted.loads`: a body that is not UTF-8,
        nests deeper than a payload ever does, or holds NaN is refused as malformed
        JSON (Quart's raises ``UnicodeDecodeError`` or ``RecursionError``: a 500).
        Every view's schema, and the audit, read the body through here."""
        if cache and self._cached_json[silent] is not Ellipsis:
            return self._cached_json[silent]
        if not (force or self.is_json):
            return None
        try:
            result = loads(await self.get_data(cache=cache))
        except Malformed as exc:
            if not silent:
                raise MalformedJSON(f"the request body {exc}") from None
            result = None
        if cache:
            self._cached_json[silent] = result
        return result

    async def get_data(self, cache: bool = True, as_text: bool = False,
                       parse_form_data: bool = False) -> Any:
        """The body, without Quart's timeout task when it has all arrived already
        (it has, for nearly every admin request: a small body in one read). Measured:
        the ``wait_for`` task was ~5% of a heartbeat's CPU, paid twice per write."""
        body = self.body
        if parse_form_data or not body._complete.is_set():
            return await super().get_data(cache, as_text, parse_form_data)
        raw = await body  # complete: returns without suspending
        if not cache:
            body.clear()
        return raw.decode() if as_text else raw

    def parsed_json(self) -> Any:
        """The body as a view's schema already parsed it, else None (no second parse)."""
        for silent in (False, True):
            cached = self._cached_json[silent]
            if cached is not Ellipsis:
                return cached
        return None


class AdminHTTPConnection(ASGIHTTPConnection):
    """Quart's HTTP connection with the request handled in the connection's own task.

    Quart runs each request as two new tasks (the handler and a body receiver) joined
    by ``asyncio.wait``, then cancels the loser: a few percent of a small admin
    request's CPU. Here only the receiver is a task; if it sees the client go away
    first (an SSE client closing its stream, say), it cancels the handler, as Quart
    does.
    """

    async def __call__(self, receive: Any, send: Any) -> None:
        request = self._create_request_from_scope(send)
        receiver = asyncio.ensure_future(self.handle_messages(request, receive))
        handler = asyncio.current_task()
        state = {"finished": False, "disconnected": False}

        def on_receiver_done(task: asyncio.Future[Any]) -> None:
            # Scheduled, not called at once: the handler may have finished meanwhile.
            if not state["finished"] and not task.cancelled() and handler is not None:
                state["disconnected"] = True
                handler.cancel()

        receiver.add_done_callback(on_receiver_done)
        try:
            await self.handle_request(request, send)
        except asyncio.CancelledError:
            if not state["disconnected"] or handler is None:
                raise
            handler.uncancel()
        finally:
            state["finished"] = True
            receiver.cancel()
        if receiver.done() and not receiver.cancelled() and receiver.exception() is not None:
            raise receiver.exception()  # type: ignore[misc]

    async def _send_response(self, send: Any, response: Any) -> None:
        """A body already in memory goes out with the headers' answer in one more
        message, not two (Quart sends it, then an empty last one): one write less per
        response. Streams (SSE) and HEAD answers take Quart's way."""
        body = getattr(response, "response", None)
        if type(body) is not DataBody or self.scope["method"] == "HEAD":
            await super()._send_response(send, response)
            return
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": encode_headers(response.headers)})
        await send({"type": "http.response.body", "body": body.data[body.begin:body.end],
                    "more_body": False})


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


def if_match() -> int | None:
    """The revision an ``If-Match`` header names (``"3"``, ``3`` or ``W/"3"``), else
    None. A value that names no revision can never match: 412 (RFC 9110 §13.1.1)."""
    value = _header(request.headers, "if-match").strip()
    if not value or value == "*":
        return None
    value = value.removeprefix("W/").strip('"')
    if not value.isdigit():
        raise PreconditionFailed(f"If-Match {value!r} names no revision")
    return int(value)


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
SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("Cache-Control", "no-store"),
    ("X-Frame-Options", "DENY"),
    ("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'"),
    ("Referrer-Policy", "no-referrer"),
)


def _header(headers: Any, lowered: str) -> str:
    """A header's value or "": werkzeug's ``get`` raises and catches an exception
    for every absent header."""
    for key, value in headers.items():
        if key.lower() == lowered:
            return str(value)
    return ""


def public(view: Any = None, *, when: Callable[[Runtime], bool] | None = None) -> Any:
    """Mark a plugin's admin view as readable without a token, always or ``when`` the
    running config says so: a page a browser opens (it cannot send a bearer token),
    an exporter Prometheus scrapes without credentials. Only reads; writes always
    need the admin role. Put it under the route decorator::

        @blueprint.get("/metrics")
        @public(when=lambda rt: rt.config.monitoring.metrics_public)
        async def metrics() -> Any: ...
    """
    def mark(fn: Any) -> Any:
        fn.lucid_public = when or _always
        return fn

    return mark(view) if view is not None else mark


def _always(rt: Runtime) -> bool:
    return True


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
    """The verified admin token's claims, or the 401 to answer.

    The token is parsed strictly first (:func:`lucid.untrusted.decode_token`): PyJWT
    accepts padded and standard-alphabet base64, raises ``RecursionError`` on deeply
    nested JSON and ``OverflowError`` on an infinite ``exp``; then PyJWT checks the
    signature and claims."""
    import jwt

    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        response = error_response(401, "an admin token is required (see `lucid token`)")
        response.headers["WWW-Authenticate"] = bearer_challenge("lucid-admin")
        return None, response
    token = token.strip()
    try:
        check_numeric_dates(decode_token(token)[1])
        claims = jwt.decode(token, secret, algorithms=["HS256"], issuer=ADMIN_ISSUER,
                            options={"require": ["exp", "sub", "iss"]}, leeway=5)
    except (Malformed, jwt.PyJWTError) as exc:
        if isinstance(exc, Malformed):  # one line, no traceback, never the token
            log.info("refused a malformed admin token: %s", exc.detail or exc)
        response = error_response(401, f"invalid admin token: {exc}")
        response.headers["WWW-Authenticate"] = bearer_challenge(
            "lucid-admin", error="invalid_token", error_description=str(exc))
        return None, response
    return claims, None


def _summary(payload: Any, secrets: SecretTree | None = None) -> str:
    import json

    if payload is None:
        return ""
    text = json.dumps(redact(payload, secrets), separators=(",", ":"), sort_keys=True,
                      default=str)
    return text if len(text) <= 500 else text[:497] + "..."


def _cache_quart_schema_adapters() -> None:
    """quart-schema builds a new pydantic ``TypeAdapter`` for every dict or list a view
    returns and for every payload it validates (measured: ~300 µs of a ~700 µs admin
    request). Adapters are stateless, so one per type serves every request."""
    import quart_schema.conversion as conversion
    from pydantic import TypeAdapter

    if conversion.TypeAdapter is TypeAdapter:  # type: ignore[attr-defined]  # once per process
        conversion.TypeAdapter = functools.lru_cache(maxsize=512)(TypeAdapter)  # type: ignore[attr-defined,assignment]


class HeadLimits:
    """The proxy's request-head limits (size, count, Content-Length with
    Transfer-Encoding) for the admin listener, in front of Quart: Hypercorn's parser
    bounds only a head still incomplete, so a head that came in one read was never
    measured there either."""

    def __init__(self, app: Any, rt: Runtime):
        self.app = app
        self.rt = rt

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            names = set()
            size = 0
            for name, value in scope["headers"]:
                size += len(name) + len(value)
                names.add(name.decode("latin-1").lower())
            refused = refused_head(scope, names, size, self.rt.config.server)
            if refused is not None:
                status, message = refused
                body = json_body(status, message, new_request_id())
                await send({"type": "http.response.start", "status": status, "headers": [
                    (b"content-type", b"application/json"), (b"connection", b"close"),
                    (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return
        await self.app(scope, receive, send)


def create_admin_app(rt: Runtime) -> Quart:
    _cache_quart_schema_adapters()
    server = rt.config.server
    if server.admin_secret is None and not is_loopback(server.admin):
        raise ConfigError(rt.source, [
            f"server.admin = {server.admin!r}: the admin API may listen beyond loopback "
            "only with authentication; set server.admin_secret (lucid init makes one)"])
    app = Quart("lucid.admin")
    app.request_class = AdminRequest
    app.asgi_http_class = AdminHTTPConnection
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
            {"field": "body", "message": error.description, "type": "json_invalid"}])

    @app.errorhandler(DefinitionError)
    async def _definition(error: DefinitionError) -> Any:
        return error_response(error.status, error.message, **error.extra)

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
        key = rt.config.server.admin_secret
        if key is None or request.path in OPEN_PATHS:
            return None
        if request.method in READ_METHODS and request.endpoint:
            rule = getattr(app.view_functions.get(request.endpoint), "lucid_public", None)
            if rule is not None and rule(rt):
                return None
        claims, refusal = _admin_identity(key.get_secret_value())
        if claims is None:
            return refusal
        g.admin_subject = str(claims.get("sub"))
        g.admin_role = role = str(claims.get("role", ""))
        needed = "viewer" if request.method in READ_METHODS else "admin"
        if ADMIN_ROLES.get(role, 0) < ADMIN_ROLES[needed]:
            response = error_response(403, f"this needs the {needed} role; the token has "
                                           f"{role or 'none'}")
            response.headers["WWW-Authenticate"] = bearer_challenge(
                "lucid-admin", error="insufficient_scope")
            return response
        return None

    @app.before_request
    async def _parse_write_body() -> None:
        """A write's JSON body is parsed (once: views and the audit reuse it) before any
        view runs, so a malformed one is refused on every write endpoint, also those
        that read no body, and nothing changes."""
        if (request.method not in READ_METHODS and request.is_json
                and await request.get_data()):
            await request.get_json()

    @app.after_request
    async def _security_headers(response: Any) -> Any:
        # One pass over the headers: werkzeug's setdefault raises and catches a
        # KeyError per missing header (measured: ~8% of a small request's CPU).
        headers = response.headers
        present = {key.lower() for key in headers.keys()}
        headers.extend([(k, v) for k, v in SECURITY_HEADERS if k.lower() not in present])
        if request.method not in READ_METHODS:
            await _audit(rt, response.status_code)
        return response

    app.register_blueprint(operations)  # first: the core's paths win over a plugin's
    app.register_blueprint(cluster_blueprint)
    rt.hooks.register_admin(app.register_blueprint)
    return app


def _payload_secrets(rt: Runtime) -> SecretTree | None:
    """Where the body the view validates (its quart-schema model) keeps ``SecretStr``
    fields, a route's per-plugin settings included: the audit hides them by type,
    whatever their names, in any plugin's endpoint."""
    view = current_app.view_functions.get(request.endpoint or "")
    schema = getattr(view, QUART_SCHEMA_REQUEST_ATTRIBUTE, None)
    if schema is None:
        return None
    return secret_fields(schema[0], rt.generation.route_models)


async def _audit(rt: Runtime, status: int) -> None:
    """Record a write attempt (every plugin's endpoint, refused ones too) in the core's
    audit log, then tell observers (an ``admin_write`` event). Awaited: the record is
    committed before the client has its answer."""
    payload = request.parsed_json()  # type: ignore[attr-defined]
    if payload is None:
        try:
            payload = await request.get_json(silent=True)
        except Exception:
            payload = None
    event = Event("admin_write", {
        "subject": getattr(g, "admin_subject", "anonymous"),
        "role": getattr(g, "admin_role", ""),
        "method": request.method,
        "path": request.path,
        "status": status,
        "summary": _summary(payload, _payload_secrets(rt)),
        "request_id": _header(request.headers, "x-request-id") or new_request_id(),
    })
    if rt.audit is not None:
        try:
            await rt.audit.record({**event.data, "at": event.at})
        except Exception:  # the write itself is done: answer it, and say so in the log
            log.exception("recording an admin write in the audit log failed: %s %s",
                          event.data["method"], event.data["path"])
    if rt.hooks.observes_events:
        await rt.hooks.observe_event(event)


# ---------------------------------------------------------------------------
# operations: the core's own endpoints, whichever plugins are enabled
# ---------------------------------------------------------------------------

operations = Blueprint("lucid", __name__, url_prefix="/gateway")
tag_operations = tag(["gateway"])


@operations.get("/health")
@tag_operations
async def health() -> Any:
    """Liveness and readiness: plugins started, the definitions store answers.

    Open even when admin auth is on, so load balancers and probes can call it."""
    rt = runtime()
    checks = {"plugins_started": rt.started, "store": False}
    if rt.cluster.shared:
        # Redis down is no reason to take this node out of a load balancer: it serves
        # the definitions it has (GET /cluster says backend_up false)
        checks["store"] = rt.backend is not None
    elif rt.backend is not None:
        try:
            await rt.backend.revision()
            checks["store"] = True
        except Exception:
            pass
    ready = all(checks.values())
    body = {"status": "ok" if ready else "unavailable", "generation": rt.generation.number,
            "checks": checks}
    return body, 200 if ready else 503


@operations.get("/status")
@tag_operations
async def status() -> Any:
    """Uptime, version, config generation, plugins, listeners and request counters."""
    rt = runtime()
    return {
        "version": rt.version,
        "uptime_seconds": round(time.time() - rt.started_at, 3),
        "generation": rt.generation.number,
        "config_source": rt.source,
        "config_loaded_at": rt.generation.loaded_at,
        "plugins": [
            {"name": p.name, "capability": p.capability} for p in rt.plugin_set.plugins
        ],
        "listeners": rt.listeners,
        "workers": rt.config.server.workers,
        "requests": dict(rt.counters),
    }


@operations.post("/config/reload")
@tag_operations
async def reload() -> Any:
    """Validate the config file again and swap it in; on error the running one stays."""
    rt = runtime()
    try:
        generation = await rt.reload()
    except ConfigError as exc:
        return error_response(422, "config rejected; the running config is unchanged",
                              problems=exc.problems, generation=rt.generation.number)
    return {"status": "reloaded", "generation": generation.number}


@operations.get("/config")
@tag_operations
async def config() -> Any:
    """The effective config (file, environment overrides and the definitions added
    through the API that their plugin places in the file), secrets redacted."""
    from lucid.export import config_secrets, effective_config

    rt = runtime()
    generation = rt.generation
    data = effective_config(generation.config, rt.kinds, generation.definitions, full=True)
    secrets = config_secrets(type(generation.config), rt.kinds, generation.route_models)
    return {"generation": generation.number, "source": rt.source,
            "config": redact(data, secrets)}


@operations.get("/metrics")
@tag_operations
async def metrics() -> Any:
    """Gateway-level figures over the last minute (and the last 10,000 requests at
    most): req/s, error rate, latency percentiles."""
    rt = runtime()
    now = time.perf_counter()  # the clock the proxy stamps ``rt.recent`` with
    window = [r for r in rt.recent if now - r[0] <= 60.0]
    durations = sorted(r[1] for r in window)
    errors = sum(1 for r in window if r[2] >= 500 or r[2] == 0)
    span = min(60.0, now - window[0][0]) if window else 0.0

    def pct(p: float) -> float | None:
        if not durations:
            return None
        return round(durations[min(len(durations) - 1, int(p / 100 * len(durations)))]
                     * 1000, 3)

    return {
        "window_seconds": round(span, 3),
        "requests": len(window),
        "requests_per_second": round(len(window) / span, 3) if span > 0 else 0.0,
        "error_rate": round(errors / len(window), 4) if window else 0.0,
        "latency_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99)},
        "totals": dict(rt.counters),
    }


cluster_blueprint = Blueprint("lucid_cluster", __name__)


@cluster_blueprint.get("/cluster")
@tag(["cluster"])
async def cluster() -> Any:
    """The cluster as this node sees it: backend, whether it answers, the revision of
    the definitions served here, and every node (``alive`` while it renews)."""
    from lucid.cluster import status as cluster_status

    return await cluster_status(runtime())


AUDIT_FILTERS = {"since": float, "until": float, "status": int, "limit": int}


@operations.get("/audit")
@tag_operations
async def audit() -> Any:
    """Admin writes, newest first. Filters: ``subject``, ``path`` (prefix), ``since``
    and ``until`` (Unix seconds), ``status``, ``limit`` (1-1000, default 100)."""
    args = request.args
    problems = []
    parsed: dict[str, Any] = {}
    for name, kind in AUDIT_FILTERS.items():
        if name in args:
            try:
                parsed[name] = kind(args[name])
            except ValueError:
                problems.append({"field": name, "message": f"expected a {kind.__name__}",
                                 "type": "value_error"})
    if not 1 <= parsed.get("limit", 100) <= 1000:
        problems.append({"field": "limit", "message": "between 1 and 1000",
                         "type": "value_error"})
    unknown = set(args) - {"subject", "path", *AUDIT_FILTERS}
    problems += [{"field": n, "message": "unknown filter", "type": "extra_forbidden"}
                 for n in sorted(unknown)]
    if problems:
        return error_response(422, "validation failed", fields=problems)
    log_ = runtime().audit
    if log_ is None:
        return error_response(503, "the audit log is not open")
    query = AuditQuery(subject=args.get("subject"), path_prefix=args.get("path"), **parsed)
    return {"entries": await log_.entries(query)}
