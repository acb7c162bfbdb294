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
from quart import Quart, Request, current_app, jsonify
from quart_schema import Info, QuartSchema, RequestSchemaValidationError
from werkzeug.exceptions import BadRequest, HTTPException

from lucid import __version__
from lucid.config import dotted
from lucid.http import new_request_id

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

    @app.after_request
    async def _security_headers(response: Any) -> Any:
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    rt.hooks.register_admin(app.register_blueprint)
    return app
