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

from ._guard import internal_error
from ._server import InboundTracer, ServerRequest
from .config import (
    ExcludedPaths,
    ExcludedPathsOption,
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

_MAX_MOUNT_DEPTH: Final = 8
_MAX_CHAIN: Final = 32  # wrappers followed to find an app's routes


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
    `LAMINAR_TRUST`, else `"continue"`) and `header_names`.
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
        )
        self._header_names: frozenset[bytes] = frozenset(
            n.encode("latin-1") for n in self._server.header_names
        )
        self._routes: list[Any] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            request = self._start(scope)
        except Exception:
            internal_error("LaminarASGIMiddleware")
            request = None
        if request is None:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "http":
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
        client = scope.get("client")
        server_address = scope.get("server")
        return server.start(
            method=method,
            path=path,
            scheme=scope.get("scheme") or ("http" if method is not None else "ws"),
            laminar_values=values,
            carrier=headers,
            getter=_GETTER,
            subject=scope,
            host=None if host is None else host.decode("latin-1"),
            server=(str(server_address[0]), server_address[1]) if server_address else None,
            client=str(client[0]) if client else None,
            user_agent=None if user_agent is None else user_agent.decode("latin-1"),
        )

    async def _http(
        self, request: ServerRequest, scope: Scope, receive: Receive, send: Send
    ) -> None:
        root_path = scope.get("root_path", "")
        trailers = False
        request.find_route_with(lambda: self._route_of(scope, root_path))

        async def send_wrapper(message: Message) -> None:
            nonlocal trailers
            last = False
            try:
                kind = message["type"]
                if kind == "http.response.start":
                    request.response_started(message["status"], self._route_of(scope, root_path))
                    trailers = bool(message.get("trailers", False))
                elif kind == "http.response.body":
                    last = not message.get("more_body", False) and not trailers
                elif kind == "http.response.trailers":
                    last = not message.get("more_trailers", False)
                elif kind == "http.response.pathsend":
                    last = True
            except Exception:
                internal_error("LaminarASGIMiddleware send")
            await send(message)
            if last:
                request.end()

        token = request.attach()
        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException as exc:
            self._name(request, scope, root_path)
            request.fail(exc)
            raise
        else:
            request.incomplete()
        finally:
            request.detach(token)
            if not request.ended:
                self._name(request, scope, root_path)
                request.end()

    async def _websocket(
        self, request: ServerRequest, scope: Scope, receive: Receive, send: Send
    ) -> None:
        root_path = scope.get("root_path", "")

        async def send_wrapper(message: Message) -> None:
            try:
                kind = message["type"]
                if kind == "websocket.accept":
                    request.set_route(self._route_of(scope, root_path))
                elif kind == "websocket.http.response.start":
                    request.response_started(message["status"], self._route_of(scope, root_path))
            except Exception:
                internal_error("LaminarASGIMiddleware send")
            await send(message)

        token = request.attach()
        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException as exc:
            self._name(request, scope, root_path)
            request.fail(exc)
            raise
        finally:
            request.detach(token)
            self._name(request, scope, root_path)
            request.end()

    def _name(self, request: ServerRequest, scope: Scope, root_path: str) -> None:
        request.set_route(self._route_of(scope, root_path))

    # -- the route template -------------------------------------------------------------

    def _route_of(self, scope: Scope, root_path: str) -> str | None:
        """The matched route's template, as the framework left it in the scope; never raises."""
        try:
            return self._route_template(scope, root_path)
        except Exception:
            internal_error("LaminarASGIMiddleware route")
            return None

    def _route_template(self, scope: Scope, root_path: str) -> str | None:
        # FastAPI's request telemetry has the full template (router prefixes and mounts).
        telemetry = scope.get("fastapi.telemetry")
        if telemetry is not None:
            route_name = getattr(telemetry, "route", None)
            if isinstance(route_name, str) and route_name:
                return route_name
        route = scope.get("route")
        if route is None:
            return None
        template: Any = None
        fastapi_scope = scope.get("fastapi")
        if isinstance(fastapi_scope, dict):
            # FastAPI's included routers: the route's own path lacks the routers' prefixes.
            effective = fastapi_scope.get("effective_route_context")
            if effective is not None and getattr(effective, "original_route", None) is route:
                template = getattr(effective, "path_format", None)
        if not template:
            template = getattr(route, "path_format", None) or getattr(route, "path", None)
        if not isinstance(template, str) or not template:
            return None
        if scope.get("root_path", "") != root_path:
            # Inside a Mount: the route's template is relative to it.
            prefix = self._mount_prefix(scope, root_path)
            if prefix is not None:
                if _is_mount(route):
                    return prefix + "/{path}"
                return prefix + template
        return template

    def _mount_prefix(self, scope: Scope, root_path: str) -> str | None:
        """The templates of the Mounts the request went through, found by matching again."""
        routes = self._routes
        if routes is None:
            routes = self._routes = _find_routes(self.app)
        if not routes:
            return None
        probe: dict[str, Any] = {
            "type": scope["type"],
            "path": scope["path"],
            "root_path": root_path,
            "path_params": {},
            "method": scope.get("method", "GET"),
            "headers": scope.get("headers") or [],
        }
        prefix = ""
        current: Any = routes
        for _ in range(_MAX_MOUNT_DEPTH):
            if not current:
                break
            for candidate in current:
                match, child = candidate.matches(probe)
                if getattr(match, "name", None) == "FULL":
                    break
            else:
                break
            if not _is_mount(candidate):
                break
            prefix += candidate.path
            probe.update(child)
            current = candidate.routes
        return prefix or None


def _is_mount(route: object) -> bool:
    return any(cls.__name__ == "Mount" for cls in type(route).__mro__)


def _find_routes(app: object) -> list[Any] | None:
    """The route list of the first router inside this middleware."""
    for _ in range(_MAX_CHAIN):
        routes = getattr(app, "routes", None)
        if isinstance(routes, list):
            return routes
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None
