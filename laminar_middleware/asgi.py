"""`LaminarASGIMiddleware`: the inbound middleware for Starlette, FastAPI and any ASGI app.

A pure ASGI middleware (no `BaseHTTPMiddleware`): it wraps `send` to learn the status and to
end the span after the last body chunk, and it never touches the messages themselves.
Lifespan and unknown scope types pass through untouched; a WebSocket connection gets one
span for its whole life.

FastAPI's own tracing
---------------------
FastAPI 0.14x and later open a SERVER span in `FastAPI.__call__`, outside every user
middleware, parented by whatever the global OpenTelemetry propagator extracts. Left alone,
that is a second SERVER span per request in another trace. This middleware's constructor
runs while FastAPI builds its middleware stack, before the first request's span starts; it
finds that FastAPI app (the `build_middleware_stack` frame that is constructing it, or the
app it wraps directly) and gives the app's telemetry a tracer provider that hands out a
non-recording span for SERVER spans and delegates everything else to the real provider
(FastAPI's own `tracer_provider` setting when there is one, else the global provider).

So FastAPI keeps its metrics, its logs and its operation spans (`fastapi.dependencies`,
`fastapi.endpoint`, `fastapi.serialization`), which become children of this middleware's
span, while the request's one SERVER span is this middleware's: in the caller's trace, with
the Laminar attributes and the trust policy. It was chosen over turning FastAPI's tracing
off (`telemetry["tracing"] = False`), which also silences those operation spans. FastAPI
apps with `telemetry={"tracing": False}` are left as they are. Should FastAPI still open a
recording request span (its stack built in some other way, or the global provider set after
the first request), the first such request is seen here and the app is switched over for
the requests after it.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import INVALID_SPAN, Link, Span, SpanKind, Tracer, TracerProvider
from opentelemetry.util.types import Attributes

from ._guard import internal_error
from ._server import InboundTracer, ServerRequest
from .config import (
    ExcludedPaths,
    ExcludedPathsOption,
    TrustOption,
    TrustPolicy,
    tolerant_options,
)
from .context import request_provider

__all__ = ["LaminarASGIMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = Sequence[tuple[bytes, bytes]]

_MAX_MOUNT_DEPTH: Final = 8
_MAX_CHAIN: Final = 32


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
        fastapi_app = _fastapi_app_for(app)
        if fastapi_app is not None:
            own_provider = _take_over_fastapi_tracing(fastapi_app)
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
            _fastapi_span_seen(scope, telemetry)
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


# -- FastAPI's own tracing ------------------------------------------------------------------


def _suppressed(kind: SpanKind, context: Context | None) -> bool:
    # FastAPI's request span, and FastAPI's operation spans outside of a request span of
    # ours (an excluded path): they would be roots of traces of their own.
    return (
        kind is SpanKind.SERVER or not trace.get_current_span(context).get_span_context().is_valid
    )


class _NoServerSpanTracer(Tracer):
    """Delegates to a real tracer, except that a SERVER span is a non-recording one (and so
    is any span that would otherwise have no parent).

    With `args` (FastAPI has no tracer provider of its own set), a span under one of our
    server spans goes to that server span's provider when it is not the global one
    (Laminar's SDK): otherwise `fastapi.endpoint` would be exported elsewhere than its
    parent and its children, and the trace would break in Laminar."""

    def __init__(self, tracer: Tracer, args: tuple[Any, ...] | None = None) -> None:
        self._tracer = tracer
        self._args = args
        self._by_provider: dict[int, tuple[TracerProvider, Tracer]] = {}

    def _tracer_for(self, context: Context | None) -> Tracer:
        provider = request_provider(context) if self._args is not None else None
        if provider is None:
            return self._tracer
        cached = self._by_provider.get(id(provider))
        if cached is None or cached[0] is not provider:
            cached = (provider, provider.get_tracer(*(self._args or ())))
            self._by_provider[id(provider)] = cached
        return cached[1]

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> Span:
        if _suppressed(kind, context):
            return INVALID_SPAN
        return self._tracer_for(context).start_span(
            name,
            context,
            kind,
            attributes,
            links,
            start_time,
            record_exception,
            set_status_on_exception,
        )

    @contextmanager
    def start_as_current_span(  # type: ignore[override]
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[Span]:
        if _suppressed(kind, context):
            with trace.use_span(INVALID_SPAN, end_on_exit=False) as span:
                yield span
            return
        with self._tracer_for(context).start_as_current_span(
            name,
            context,
            kind,
            attributes,
            links,
            start_time,
            record_exception,
            set_status_on_exception,
            end_on_exit,
        ) as span:
            yield span


class _NoServerSpanTracerProvider(TracerProvider):
    """FastAPI's tracer provider while this middleware owns the request's SERVER span."""

    def __init__(self, inner: TracerProvider | None) -> None:
        self.inner = inner

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Attributes = None,
    ) -> Tracer:
        args = (instrumenting_module_name, instrumenting_library_version, schema_url, attributes)
        if self.inner is not None:  # the app chose FastAPI's provider: its choice stands
            return _NoServerSpanTracer(self.inner.get_tracer(*args))
        return _NoServerSpanTracer(trace.get_tracer_provider().get_tracer(*args), args)


def _is_fastapi(app: object) -> bool:
    fastapi = sys.modules.get("fastapi")
    return (
        fastapi is not None
        and isinstance(app, getattr(fastapi, "FastAPI", ()))
        and isinstance(getattr(app, "_telemetry", None), dict)
    )


def _fastapi_app_for(app: object) -> Any | None:
    """The FastAPI app whose request span this middleware replaces, if any: the app it
    wraps, or the one whose `build_middleware_stack` is constructing it."""
    try:
        if _is_fastapi(app):
            return app
        if "fastapi" not in sys.modules:
            return None
        frame = sys._getframe(1)
        for _ in range(_MAX_CHAIN):
            if frame is None:
                break
            if frame.f_code.co_name == "build_middleware_stack":
                candidate = frame.f_locals.get("self")
                if _is_fastapi(candidate):
                    return candidate
            frame = frame.f_back  # type: ignore[assignment]
    except Exception:
        internal_error("finding the FastAPI app")
    return None


def _take_over_fastapi_tracing(fastapi_app: Any) -> TracerProvider | None:
    """Make FastAPI's request span non-recording for this app; returns FastAPI's own
    `tracer_provider` setting (None: the global one)."""
    try:
        config: dict[str, Any] = fastapi_app._telemetry
        inner = config.get("tracer_provider")
        if isinstance(inner, _NoServerSpanTracerProvider):
            return inner.inner
        # Without a provider FastAPI does not trace at all: nothing to take over (and
        # installing one would switch its telemetry on). If the global provider is set
        # later, `_fastapi_span_seen` catches up.
        if config.get("tracing", True) and (
            inner is not None or not _unconfigured(trace.get_tracer_provider())
        ):
            config["tracer_provider"] = _NoServerSpanTracerProvider(inner)
        return inner if isinstance(inner, TracerProvider) else None
    except Exception:
        internal_error("taking over FastAPI's request span")
        return None


def _unconfigured(provider: object) -> bool:
    # The API's placeholder until a real provider is set.
    return type(provider).__name__ == "ProxyTracerProvider"


def _fastapi_span_seen(scope: Scope, telemetry: object) -> None:
    """FastAPI opened a recording request span after all: switch the app over for the
    requests that follow (this one keeps both spans)."""
    span = getattr(telemetry, "span", None)
    if span is None or not span.is_recording():
        return
    app = scope.get("app")
    if _is_fastapi(app):
        _take_over_fastapi_tracing(app)
