"""aiohttp's server side: `middleware(**options)` for `web.Application(middlewares=[...])`.

aiohttp has matched the route before any middleware runs, so the span's name,
`METHOD canonical-route` (`GET /items/{item_id}`, sub-application prefixes included), is
known to the handler's first child span and first outgoing call. The span is current while
the handler runs, so a streaming handler's writes are inside it, and it ends when the
handler returns. A raised `web.HTTPException` is a response (its status is recorded), not a
failure.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from multidict import CIMultiDictProxy
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import TracerProvider

from ._guard import contained
from ._server import InboundRequest, InboundTracer
from ._server_request import ServerRequest
from .config import (
    ExcludedPaths,
    ExcludedPathsOption,
    ServerRequestHook,
    ServerResponseHook,
    TrustOption,
    TrustPolicy,
    tolerant_options,
)

__all__ = ["MIDDLEWARE_MARK", "add_to_app", "middleware"]


# Where the request object waits, on aiohttp's request mapping: a second copy of the
# middleware (a sub-application's, or one `instrument()` added) passes the request through.
# (A typed key where aiohttp has them: it warns about plain strings.)
_REQUEST_KEY: Final[Any] = (
    web.RequestKey("laminar_middleware.request", ServerRequest)
    if hasattr(web, "RequestKey")
    else "laminar_middleware.request"
)
# Marks the middlewares made here, so `instrument()` does not add a second one.
MIDDLEWARE_MARK: Final = "_laminar_middleware"


class _HeadersGetter(Getter[CIMultiDictProxy[str]]):
    """Every line of a header, for the global OpenTelemetry propagator (the default getter
    would see the first line only, and miss a duplicated `traceparent`)."""

    def get(self, carrier: CIMultiDictProxy[str], key: str) -> list[str] | None:
        values = carrier.getall(key, None)
        return None if values is None else list(values)

    def keys(self, carrier: CIMultiDictProxy[str]) -> list[str]:
        return list(carrier.keys())


_GETTER: Final = _HeadersGetter()


def _route_of(request: web.Request) -> str | None:
    resource = getattr(getattr(request.match_info, "route", None), "resource", None)
    canonical = getattr(resource, "canonical", None)
    return canonical if isinstance(canonical, str) and canonical else None


@tolerant_options
def middleware(
    *,
    tracer_provider: TracerProvider | None = None,
    excluded_paths: ExcludedPathsOption | ExcludedPaths = None,
    trust: TrustOption | TrustPolicy | None = None,
    header_names: Iterable[str] | None = None,
    server_request_hook: ServerRequestHook | None = None,
    server_response_hook: ServerResponseHook | None = None,
) -> Middleware:
    """The server middleware: a SERVER span per request, continuing the caller's Laminar
    context (`X-Laminar-Span-Context`), else the W3C one.

    Options as for the other middlewares; `excluded_paths` match `request.path`, a trust
    callable and `server_request_hook(span, request)` get the `web.Request`, and
    `server_response_hook(span, status, headers)` the response's headers.
    """
    server = InboundTracer(
        tracer_provider=tracer_provider,
        excluded_paths=excluded_paths,
        trust=trust,
        header_names=header_names,
        server_request_hook=server_request_hook,
        server_response_hook=server_response_hook,
    )
    names = server.header_names

    @web.middleware
    async def laminar_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        server_request = None
        if _REQUEST_KEY not in request:
            with _STARTING:
                server_request = _start(server, names, request)
        if server_request is None:
            return await handler(request)
        tokens = server_request.attach()
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # aiohttp's way to answer 404, 302, ...
            server_request.detach(tokens)
            _respond(server_request, exc)
            raise
        except BaseException as exc:
            server_request.detach(tokens)
            _fail(server_request, exc)
            raise
        server_request.detach(tokens)
        _respond(server_request, response)
        return response

    setattr(laminar_middleware, MIDDLEWARE_MARK, True)
    return laminar_middleware


def _start(
    server: InboundTracer, names: tuple[str, ...], request: web.Request
) -> ServerRequest | None:
    path = request.path
    if server.excluded(path):
        return None
    headers = request.headers
    # aiohttp decodes header bytes as UTF-8 with surrogateescape: undo it, so the codec sees
    # the bytes as sent (and refuses invalid UTF-8, as it does behind every other server).
    values = [
        value.encode("utf-8", "surrogateescape")
        for name in names
        for value in headers.getall(name, ())
    ]
    server_request = server.start(
        InboundRequest(
            request.method,
            path,
            request.scheme,
            values,
            headers.getall("traceparent", ()),
            headers.getall("tracestate", ()),
            headers,
            _GETTER,
            request,
            headers.get("Host"),
            None,
            request.remote,
            headers.get("User-Agent"),
            lambda: _route_of(request),  # matched already: asked once, when first needed
        )
    )
    request[_REQUEST_KEY] = server_request
    return server_request


def _respond(server_request: ServerRequest, response: web.StreamResponse) -> None:
    with _RESPONDING:
        server_request.response_started(response.status, response.headers)
    with _ENDING:
        server_request.end()


def _fail(server_request: ServerRequest, exc: BaseException) -> None:
    with _FAILING:
        server_request.fail(exc)
    with _ENDING:
        server_request.end()


# Each step contained on its own, so a failure in one (recording) does not skip another
# (ending the span).
_STARTING: Final = contained("aiohttp middleware: starting the server span")
_RESPONDING: Final = contained("aiohttp middleware: the response")
_FAILING: Final = contained("aiohttp middleware: recording the handler's exception")
_ENDING: Final = contained("aiohttp middleware: ending the server span")


def add_to_app(app: web.Application, options: dict[str, Any]) -> None:
    """Put the middleware first in an app that is about to freeze (`instrument()`), after
    any OpenTelemetry instrumentation's middleware: that one reads the headers itself and
    opens the SERVER span, which ours then gives Laminar's attributes."""
    middlewares = app.middlewares
    if any(getattr(m, MIDDLEWARE_MARK, False) for m in middlewares):
        return
    index = 0
    while index < len(middlewares) and str(
        getattr(middlewares[index], "__module__", "")
    ).startswith("opentelemetry.instrumentation"):
        index += 1
    middlewares.insert(index, middleware(**options))
