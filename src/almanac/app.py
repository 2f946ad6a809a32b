"""The Litestar application factory: routes, errors, dependencies and lifespan in one place."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import structlog
from litestar import Litestar, Request, Response, Router, get
from litestar.config.compression import CompressionConfig
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.exceptions import HTTPException, ValidationException
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin, SwaggerRenderPlugin
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from almanac import errors
from almanac.auth import PRINCIPAL, Principal, bearer_token, principal_of, raw_header
from almanac.bootstrap import bootstrap
from almanac.container import CONTAINER, ROLES, Container
from almanac.ids import new_request_id
from almanac.logs import REQUEST_ID
from almanac.settings import Settings

log = structlog.get_logger("almanac.http")

PROBLEM = "application/problem+json"
# The one table from error class to HTTP status (most specific class first).
STATUS_OF: list[tuple[type[errors.AlmanacError], int, str]] = [
    (errors.ValidationFailed, 422, "Unprocessable content"),
    (errors.NotFound, 404, "Not found"),
    (errors.Unauthorized, 401, "Unauthorized"),
    (errors.Forbidden, 403, "Forbidden"),
    (errors.NotYetVisible, 503, "Not yet visible"),
    (errors.Unavailable, 503, "Service unavailable"),
    (errors.Conflict, 409, "Conflict"),
    (errors.AlmanacError, 400, "Bad request"),
]


def problem(
    status: int, title: str, detail: str, request: Request[Any, Any, Any], **extra: Any
) -> Response[dict[str, Any]]:
    """An RFC 9457 problem response."""
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
    }
    # Also where no middleware ran (no route matched the path or the method).
    body["request_id"] = request_id_of(request.scope)
    body.update(extra)
    headers: dict[str, str] = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="almanac"'
    return Response(body, status_code=status, media_type=PROBLEM, headers=headers)


def almanac_error(request: Request[Any, Any, Any], exc: errors.AlmanacError) -> Response[Any]:
    status, title = next((s, t) for cls, s, t in STATUS_OF if isinstance(exc, cls))
    extra: dict[str, Any] = {}
    response_headers: dict[str, str] = {}
    if isinstance(exc, errors.ValidationFailed):
        extra["errors"] = [{"field": e.field, "message": e.message} for e in exc.errors]
    if isinstance(exc, errors.NotYetVisible):
        extra.update(min_position=exc.wanted, current_position=exc.current)
        response_headers["Retry-After"] = "1"
    if isinstance(exc, errors.Unavailable):
        response_headers["Retry-After"] = str(exc.retry_after)
        log.warning("http.unavailable", detail=exc.detail)
    response = problem(status, title, exc.detail, request, **extra)
    response.headers.update(response_headers)
    return response


_PATH = re.compile(r"`\$((?:\.[A-Za-z_]\w*|\[\d+\])*)`")
_NAMED = re.compile(r"(?:unknown|missing required) field `([^`]+)`")


def _field_of(message: str, key: str | None) -> tuple[str, str]:
    """Turn msgspec's ``Expected `float`, got `str` - at `$.birth.latitude``` into
    (``birth.latitude``, ``Expected `float`, got `str```)."""
    match = _PATH.search(message)
    path = match.group(1).replace("[", ".").replace("]", "").lstrip(".") if match else ""
    named = _NAMED.search(message)
    if named:
        path = f"{path}.{named.group(1)}" if path else named.group(1)
    text = message.split(" - at ", maxsplit=1)[0]
    if not path and key and key != "data":
        path = key
    return path or "body", text


def validation_error(request: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    found: list[dict[str, str]] = []
    raw = exc.extra if isinstance(exc.extra, list) else []
    for item in raw:
        if isinstance(item, dict):
            field, message = _field_of(str(item.get("message", "")), item.get("key"))
            source = item.get("source")
            if source in ("query", "header", "path", "cookie") and item.get("key"):
                field = str(item["key"])
            found.append({"field": field, "message": message})
    cause = exc.__cause__
    if isinstance(cause, msgspec.ValidationError) and any(
        e.get("source") == "body" for e in raw if isinstance(e, dict)
    ):
        # Litestar keeps only the last part of a nested path; msgspec's own message has it all
        # (``… - at `$.data.birth` ``), so body errors are named from that.
        field, message = _field_of(
            str(cause).replace("`$.data.", "`$.").replace("`$.data`", "`$`"), None
        )
        found = [e for e in found if e["field"] != field and not _same_leaf(e["field"], field)]
        found.insert(0, {"field": field, "message": message})
    if not found:
        field, message = _field_of(str(exc.detail), None)
        found.append({"field": field, "message": message})
    if any("malformed" in e["message"].lower() or "JSON is" in e["message"] for e in found):
        return problem(400, "Bad request", "The request body is not valid JSON.", request)
    if any(e["field"] == "data" for e in found):
        return problem(400, "Bad request", "A JSON request body is required.", request)
    fields = ", ".join(e["field"] for e in found)
    return problem(
        422, "Unprocessable content", f"Invalid field(s): {fields}", request, errors=found
    )


def _same_leaf(short: str, full: str) -> bool:
    return full.endswith("." + short)


def bad_encoding(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """Bodies that cannot even be read as JSON text: bad UTF-8, absurd nesting."""
    reason = "is not UTF-8" if isinstance(exc, UnicodeDecodeError) else "is nested too deeply"
    return problem(400, "Bad request", f"The request body {reason}.", request)


def http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    title = {
        400: "Bad request",
        404: "Not found",
        405: "Method not allowed",
        413: "Content too large",
        415: "Unsupported media type",
    }.get(exc.status_code, "HTTP error")
    response = problem(exc.status_code, title, str(exc.detail), request)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


def internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("http.internal_error", path=request.url.path, error=str(exc))
    return problem(500, "Internal server error", "Something went wrong on our side.", request)


def request_id_of(scope: Scope) -> str:
    """The request's id, kept in the scope's state: the client's ``X-Request-ID`` if it is
    usable (1-128 printable characters), else a new one."""
    state = scope.setdefault("state", {})
    request_id: str | None = state.get("request_id")
    if request_id is None:
        sent = (raw_header(scope["headers"], b"x-request-id") or b"").decode("latin-1")
        usable = 0 < len(sent) <= 128 and sent.isprintable()
        request_id = state["request_id"] = sent if usable else new_request_id()
    return request_id


async def echo_request_id(message: Message, scope: Scope) -> None:
    """Every HTTP answer carries its request's id. A ``before_send`` hook, so the app's
    outermost send: Litestar answers a refused key, and a path or method no route has,
    outside every middleware."""
    if message["type"] == "http.response.start":
        echoed = (b"x-request-id", request_id_of(scope).encode())
        message["headers"] = [*message.get("headers", ()), echoed]


class RequestIdMiddleware:
    """Binds the request id to every log line of the request (``echo_request_id`` sends
    it back).

    A plain ASGI middleware, as is ``AuthMiddleware``: both run on every request, and
    Litestar's ``ASGIMiddleware`` adds a closure and its exclusion checks to each call.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = REQUEST_ID.set(request_id_of(scope))
        try:
            await self.app(scope, receive, send)
        finally:
            REQUEST_ID.reset(token)


class AuthMiddleware:
    """Authenticates every API request before its handler runs or its body is read.

    No key means 401, whatever the body holds. A middleware rather than a route guard:
    Litestar copies the route handler for every guard call, which cost a cached GET more
    than its whole query.
    """

    def __init__(
        self, app: ASGIApp, authenticate: Callable[[str | None], Awaitable[Principal]]
    ) -> None:
        self.app = app
        # A plain function: Litestar deep-copies routers with their middleware, and a
        # function is copied as itself, where a key ring would be copied whole.
        self._authenticate = authenticate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal = await self._authenticate(bearer_token(scope["headers"]))
        scope.setdefault("state", {})[PRINCIPAL] = principal
        await self.app(scope, receive, send)


@get("/health/live", summary="Liveness", tags=["health"], include_in_schema=True)
async def health_live() -> dict[str, str]:
    return {"status": "ok"}


DEGRADABLE = frozenset({"redis", "nats"})


@get("/health/ready", summary="Readiness of the engines of the active profile", tags=["health"])
async def health_ready(container: NamedDependency[Container]) -> Response[dict[str, Any]]:
    checks = await container.readiness()
    # Without Redis or NATS the process still serves (degraded), so it stays in rotation.
    ready = all(v == "ok" for k, v in checks.items() if k not in DEGRADABLE)
    degraded = sorted(k for k, v in checks.items() if k in DEGRADABLE and v != "ok")
    # So does a role that runs but cannot go on (a relay at an event NATS refuses).
    troubled = container.role_problems()
    checks.update(troubled)
    degraded = sorted([*degraded, *troubled])
    body = {
        "status": ("degraded" if degraded else "ok") if ready else "unavailable",
        "degraded": degraded,
        "profile": container.settings.profile.value,
        "roles": list(container.roles),
        "checks": checks,
    }
    return Response(body, status_code=200 if ready else 503)


def create_app(
    settings: Settings,
    container: Container | None = None,
    *,
    roles: tuple[str, ...] | None = None,
    on_started: Callable[[Container], None] | None = None,
) -> Litestar:
    """The ASGI app. Every role process serves health; only ``api`` serves the API."""
    graph = container or bootstrap(settings, roles=roles or ROLES)
    from commands.http import handlers as command_handlers
    from projections.http import router as projections_router
    from queries.http import handlers as query_handlers
    from queries.monitoring import router as monitoring_router
    from streams.http import handlers as websocket_handlers

    async def provide_container() -> Container:
        return graph

    async def authenticate(secret: str | None) -> Principal:
        return await graph.keyring.authenticate(secret)

    # The principal depends on the container (whose keyring vouches for it), so Litestar
    # resolves the two in turn; two independent providers would be resolved concurrently
    # in an anyio task group per request, which cost more than the whole query handler.
    async def provide_principal(
        request: Request[Any, Any, Any], container: NamedDependency[Container]
    ) -> Principal:
        del container  # a parameter only for the order of resolution
        return principal_of(request.scope)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        await graph.start()
        if on_started is not None:
            on_started(graph)
        try:
            yield
        finally:
            await graph.stop()

    handlers: list[Any] = [health_live, health_ready]
    if "api" in graph.roles:
        # WebSockets authenticate in the session (header, ?key= or first message).
        handlers.extend(websocket_handlers)
        # One router for both sides: a path such as /readings has handlers from each.
        handlers.append(
            Router(
                path="/",
                middleware=[DefineMiddleware(AuthMiddleware, authenticate=authenticate)],
                route_handlers=[
                    Router(path="/api/v1", route_handlers=[*command_handlers, *query_handlers]),
                    monitoring_router,
                    projections_router,
                ],
            )
        )
    return Litestar(
        route_handlers=handlers,
        dependencies={
            "container": Provide(provide_container),
            "principal": Provide(provide_principal),
        },
        exception_handlers={
            errors.AlmanacError: almanac_error,
            ValidationException: validation_error,
            HTTPException: http_error,
            UnicodeDecodeError: bad_encoding,
            RecursionError: bad_encoding,
            Exception: internal_error,
        },
        middleware=[RequestIdMiddleware],
        before_send=[echo_request_id],
        # Brotli for clients that accept it, gzip otherwise, above 1 KiB.
        compression_config=CompressionConfig(
            backend="brotli", minimum_size=1024, brotli_gzip_fallback=True
        ),
        lifespan=[lifespan],
        state=State({"settings": settings, CONTAINER: graph}),
        openapi_config=OpenAPIConfig(
            title="Almanac",
            version="0.1.0",
            description="Astrology readings, event-sourced. Every command answers with the "
            "position of its events (`Almanac-Position`); queries take `min_position`.",
            path="/docs",
            render_plugins=[ScalarRenderPlugin(), SwaggerRenderPlugin(path="/swagger")],
        ),
        debug=False,
        # Logging is configured once by almanac.logs (structlog), not by the framework.
        logging_config=None,
    )
