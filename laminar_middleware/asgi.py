"""`LaminarASGIMiddleware`: the inbound middleware for Starlette, FastAPI and any ASGI app.

A pure ASGI middleware (no `BaseHTTPMiddleware`): it wraps `send` to learn the status and to
end the span after the last body chunk, and it never touches the messages themselves.
Lifespan and unknown scope types pass through untouched; a WebSocket connection gets one
span for its whole life.

FastAPI's own request span is switched off for the FastAPI apps this middleware wraps, so
there is one SERVER span per request: see `laminar_middleware.fastapi`, which also explains
how the middleware finds the app when it is added with `app.add_middleware`.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from typing import Any, Final

from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import TracerProvider

from ._asgi_routes import RouteTemplates
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

__all__ = ["LaminarASGIMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = Sequence[tuple[bytes, bytes]]

# The entry points where the server or the app calls into this middleware's work.
_STARTING: Final = contained("LaminarASGIMiddleware: starting the server span")
_SENDING: Final = contained("LaminarASGIMiddleware: reading a response message")
_FAILING: Final = contained("LaminarASGIMiddleware: recording the app's exception")
_ENDING: Final = contained("LaminarASGIMiddleware: ending the server span")


class _HeadersGetter(Getter[Headers]):
    """Reads raw ASGI headers for the global OpenTelemetry propagator."""

    def get(self, carrier: Headers, key: str) -> list[str] | None:
        wanted = key.lower().encode("latin-1")
        values = [v.decode("latin-1") for k, v in carrier if k.lower() == wanted]
        return values or None

    def keys(self, carrier: Headers) -> list[str]:
        return [k.decode("latin-1") for k, _ in carrier]


_GETTER: Final = _HeadersGetter()


class LaminarASGIMiddleware:
    """Opens a SERVER span per HTTP request or WebSocket connection, continuing the caller's
    Laminar context (`X-Laminar-Span-Context`), else the W3C one.

    `app.add_middleware(LaminarASGIMiddleware, **options)` for Starlette and FastAPI, or
    `LaminarASGIMiddleware(app, **options)` for any ASGI app. Options: `tracer_provider`,
    `excluded_paths` (exact paths and compiled patterns matched in full: no span, no context
    read; default `LAMINAR_EXCLUDED_PATHS`, comma-separated exact paths), `trust`
    (`"continue"`, `"restart"`, `"ignore"` or a callable on the ASGI scope; default
    `LAMINAR_TRUST`, else `"continue"`), `header_names`, and the hooks
    `server_request_hook(span, scope)` and `server_response_hook(span, status,
    headers)` (the status an int, the headers as ASGI gives them: byte pairs).
    """

    @tolerant_options
    def __init__(
        self,
        app: ASGIApp,
        *,
        tracer_provider: TracerProvider | None = None,
        excluded_paths: ExcludedPathsOption | ExcludedPaths = None,
        trust: TrustOption | TrustPolicy | None = None,
        header_names: Iterable[str] | None = None,
        server_request_hook: ServerRequestHook | None = None,
        server_response_hook: ServerResponseHook | None = None,
    ) -> None:
        self.app = app
        if "fastapi" in sys.modules:  # FastAPI's own request span: see laminar_middleware.fastapi
            from .fastapi import take_over_the_app_being_built

            own_provider = take_over_the_app_being_built(app)
            if tracer_provider is None:
                tracer_provider = own_provider
        self._server = InboundTracer(
            tracer_provider=tracer_provider,
            excluded_paths=excluded_paths,
            trust=trust,
            header_names=header_names,
            server_request_hook=server_request_hook,
            server_response_hook=server_response_hook,
        )
        self._header_names: frozenset[bytes] = frozenset(
            n.encode("latin-1") for n in self._server.header_names
        )
        self._routes = RouteTemplates(app)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request: ServerRequest | None = None
        with _STARTING:
            request = self._start(scope)
        if request is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await self._http(request, scope, receive, send)
        else:
            await self._websocket(request, scope, receive, send)

    def _start(self, scope: Scope) -> ServerRequest | None:
        kind = scope["type"]
        if kind == "http":
            method: str | None = scope["method"]
        elif kind == "websocket":
            method = None
        else:
            return None  # lifespan and anything unknown: untouched
        telemetry = scope.get("fastapi.telemetry")
        if telemetry is not None:
            from .fastapi import request_span_seen

            request_span_seen(scope, telemetry)
        server = self._server
        path: str = scope["path"]
        if server.excluded(path):
            return None
        names = self._header_names
        values: list[bytes] = []
        traceparents: list[bytes] = []
        tracestates: list[bytes] = []
        host = user_agent = None
        headers: Headers = scope.get("headers") or ()
        for name, value in headers:
            name = name.lower()
            if name in names:
                values.append(value)
            elif name == b"host":
                host = value
            elif name == b"user-agent":
                user_agent = value
            elif name == b"traceparent":
                traceparents.append(value)
            elif name == b"tracestate":
                tracestates.append(value)
        client = scope.get("client")
        server_address = scope.get("server")
        root_path = scope.get("root_path", "")
        request = InboundRequest(
            method,
            path,
            scope.get("scheme") or ("http" if method is not None else "ws"),
            values,
            traceparents,
            tracestates,
            headers,
            _GETTER,
            scope,
            None if host is None else host.decode("latin-1"),
            (str(server_address[0]), server_address[1]) if server_address else None,
            str(client[0]) if client else None,
            None if user_agent is None else user_agent.decode("latin-1"),
            lambda: self._routes.of(scope, root_path),
        )
        server_request = server.start(request)
        return server_request

    async def _http(
        self, request: ServerRequest, scope: Scope, receive: Receive, send: Send
    ) -> None:
        trailers = False

        async def send_wrapper(message: Message) -> None:
            nonlocal trailers
            last = False
            with _SENDING:
                kind = message["type"]
                if kind == "http.response.start":
                    trailers = bool(message.get("trailers", False))
                    request.response_started(message["status"], message.get("headers", ()))
                elif kind == "http.response.body":
                    last = not message.get("more_body", False) and not trailers
                elif kind == "http.response.trailers":
                    last = not message.get("more_trailers", False)
                elif kind == "http.response.pathsend":
                    last = True
            await send(message)
            if last:
                with _ENDING:
                    request.end()

        tokens = request.attach()  # cannot fail (see ServerRequest)
        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException as exc:
            with _FAILING:
                request.fail(exc)
            raise
        else:
            if request.status_code is None:
                with _FAILING:
                    request.incomplete()
        finally:
            request.detach(tokens)
            if not request.ended:  # a response that never sent its last chunk
                with _ENDING:
                    request.end()

    async def _websocket(
        self, request: ServerRequest, scope: Scope, receive: Receive, send: Send
    ) -> None:
        async def send_wrapper(message: Message) -> None:
            with _SENDING:
                if message["type"] == "websocket.http.response.start":
                    request.response_started(message["status"], message.get("headers", ()))
            await send(message)

        tokens = request.attach()  # cannot fail (see ServerRequest)
        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException as exc:
            with _FAILING:
                request.fail(exc)
            raise
        finally:
            request.detach(tokens)
            with _ENDING:
                request.end()
