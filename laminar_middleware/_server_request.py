"""The SERVER span of one request, from its start to its single end, in two kinds.

`OwnedRequest`: this package opened the span, and owns its name, attributes, status and end.
`EnrichedRequest`: another layer (a contrib instrumentation, an outer copy of a middleware)
opened the request's SERVER span; this package only gives it Laminar's attributes, and
leaves its name, status and end to that layer.

While the request runs, the context holds its request object (`context.SERVER_REQUEST`), and
the object is the one owner of the span's Laminar paths (`context.PathOwner`): whoever needs
them (a child span, a client hook, the propagator, `serialize_span_context`) asks
`laminar_paths()`. The span's own attributes are written in one place, `_pending`, with the
response or at the end, by the request's own thread; a reader in another thread only reads.

Nothing here contains its own failures: the adapter's entry point that called in does (see
`_guard`). The exceptions are other people's code that the request calls: the framework's
route lookup, whose failure must not cost the span its status or its end, and Laminar's
SDK in `attach` / `detach`, which the adapters call around every step of the app without a
guard of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.http_attributes import (
    HTTP_RESPONSE_STATUS_CODE,
    HTTP_ROUTE,
)
from opentelemetry.trace import Span, Status, StatusCode, TracerProvider
from opentelemetry.util.types import AttributeValue

from ._guard import contained
from ._http import exception_type
from ._lmnr import LaminarBridge
from .codec import LaminarSpanContext, format_uuid
from .config import ServerResponseHook
from .context import SERVER_REQUEST, SPAN_IDS_PATH, SPAN_PATH, forget_owner, register_owner

__all__ = ["EnrichedRequest", "OwnedRequest", "RouteFinder", "ServerRequest", "Tokens"]

Tokens = tuple[object | None, object | None]
# How an adapter reads the matched route's template from its framework, once it has matched.
RouteFinder = Callable[[], str | None]

_ERROR_STATUS: Final = Status(StatusCode.ERROR)
# WebSocket close codes of a normal end: not an error.
_NORMAL_CLOSE_CODES: Final = frozenset({1000, 1001})
_FINDING_ROUTE: Final = contained("finding the route")
_BRIDGE_ATTACH: Final = contained("attaching the server span to Laminar's context")
_BRIDGE_DETACH: Final = contained("detaching the server span from Laminar's context")
_RESPONSE_HOOK: Final = contained("server_response_hook", theirs=True)


def _is_normal_disconnect(exc: BaseException) -> bool:
    # Starlette's WebSocketDisconnect (and look-alikes) with a normal close code.
    return type(exc).__name__ == "WebSocketDisconnect" and (
        getattr(exc, "code", None) in _NORMAL_CLOSE_CODES
    )


class ServerRequest:
    """What both kinds share: the span, the caller's paths, the span's place in the context."""

    __slots__ = (
        "_base",
        "_bridge",
        "_context",
        "_owner",
        "_parent_ids_path",
        "_parent_path",
        "_remote",
        "_response_hook",
        "_span_id",
        "ended",
        "provider",
        "span",
        "status_code",
    )

    def __init__(
        self,
        span: Span,
        remote: LaminarSpanContext | None,
        bridge: LaminarBridge | None,
        provider: TracerProvider | None = None,
        base: Context | None = None,
        response_hook: ServerResponseHook | None = None,
    ) -> None:
        self.span = span
        # The caller's Laminar context, when the trust policy continued it.
        self._remote = remote
        self._parent_path = () if remote is None else remote.span_path
        self._parent_ids_path = () if remote is None else remote.span_ids_path
        self._bridge = bridge
        # The tracer provider of this request's spans, when it is not the global one.
        self.provider = provider
        # What the span goes on top of when attached; None: whatever is current then (the
        # adapters attach right away, in the request's own context).
        self._base = base
        # Called once, at the first response start.
        self._response_hook = response_hook
        self._context: Context | None = None
        self.status_code: int | None = None
        self.ended = False
        self._span_id = span.get_span_context().span_id
        # False: not recording, or an outer copy of the middleware owns the span already.
        self._owner = span.is_recording() and register_owner(self._span_id, self)

    @property
    def route(self) -> str | None:
        """The route template once known."""
        return None

    @property
    def wants_response_headers(self) -> bool:
        """True while a response hook is still to be called: the adapters whose frameworks
        keep headers in their own shape copy them only then."""
        return self._response_hook is not None

    def laminar_paths(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The span's Laminar path and ids path now: the caller's plus its own."""
        return (
            (*self._parent_path, self._name_now()),
            (*self._parent_ids_path, format_uuid(self._span_id)),
        )

    def _name_now(self) -> str:
        raise NotImplementedError

    def attach(self) -> Tokens:
        """Make the span current (in Laminar's SDK context too, when it is initialized);
        returns what `detach` needs. Call `detach` in the same thread or task.

        Called around every step of the app (each chunk of a streamed body), so it cannot
        fail: OpenTelemetry's attach sets a context variable, and Laminar's SDK, someone
        else's code, is contained here."""
        context = self._context
        if context is None:
            context = trace.set_span_in_context(self.span, self._base)
            if self._owner:
                context = otel_context.set_value(SERVER_REQUEST, self, context)
            self._context = context
        token = otel_context.attach(context)
        bridge = self._bridge
        if bridge is not None:
            with _BRIDGE_ATTACH:
                return token, bridge.attach(self.span, self._remote)
        return token, None

    def detach(self, tokens: Tokens) -> None:
        """Undo `attach`; cannot fail (OpenTelemetry's detach contains its own failures)."""
        token, bridge_token = tokens
        if bridge_token is not None and self._bridge is not None:
            with _BRIDGE_DETACH:
                self._bridge.detach(bridge_token)  # type: ignore[arg-type]
        if token is not None:
            otel_context.detach(token)  # type: ignore[arg-type]

    def set_route(self, route: str | None) -> None:
        """The framework has matched the request's route (a template)."""

    def response_started(self, status: object, headers: object = None) -> None:
        """The response starts with this status code (an int, or its digits) and headers."""

    def _hook_response(self, code: int, headers: object) -> None:
        hook, self._response_hook = self._response_hook, None
        if hook is not None and self.span.is_recording():
            with _RESPONSE_HOOK:
                hook(self.span, code, headers)

    def fail(self, exc: BaseException) -> None:
        """An exception left the app (the adapter re-raises it)."""

    def incomplete(self) -> None:
        """The app returned without starting a response (the server answers 500)."""

    def end(self) -> None:
        """The request is over; only the first call does anything."""


class OwnedRequest(ServerRequest):
    """A SERVER span this package opened: named `PREFIX route` once the route is known."""

    __slots__ = ("_failed", "_find_route", "_name", "_prefix", "_route", "_written")

    def __init__(
        self,
        span: Span,
        prefix: str,
        find_route: RouteFinder | None,
        remote: LaminarSpanContext | None,
        bridge: LaminarBridge | None,
        provider: TracerProvider | None = None,
        base: Context | None = None,
        response_hook: ServerResponseHook | None = None,
    ) -> None:
        super().__init__(span, remote, bridge, provider, base, response_hook)
        self._prefix = self._name = prefix
        self._find_route = find_route
        self._route: str | None = None
        # The name the span's Laminar path attributes were last written with.
        self._written: str | None = None
        self._failed = False

    @property
    def route(self) -> str | None:
        return self._route

    def _name_now(self) -> str:
        if self._route is None:
            self._resolve_route()
        return self._name

    def _resolve_route(self) -> None:
        find_route = self._find_route
        if find_route is not None and not self.ended:
            with _FINDING_ROUTE:
                self.set_route(find_route())

    def set_route(self, route: str | None) -> None:
        if not route or route == self._route or self.ended:
            return
        self._route = route
        self._name = name = f"{self._prefix} {route}"
        self.span.update_name(name)

    def _pending(self) -> dict[str, AttributeValue]:
        """The attributes that lag the span's name: its paths and route, or nothing."""
        name = self._name
        if name == self._written:
            return {}
        self._written = name
        attributes: dict[str, AttributeValue] = {
            SPAN_PATH: (*self._parent_path, name),
            SPAN_IDS_PATH: (*self._parent_ids_path, format_uuid(self._span_id)),
        }
        if self._route is not None:
            attributes[HTTP_ROUTE] = self._route
        return attributes

    def response_started(self, status: object, headers: object = None) -> None:
        if self.ended:
            return
        code = int(status)  # type: ignore[call-overload]
        self.status_code = code
        # Asked again even when known: Starlette names a Mount first, its inner route later.
        self._resolve_route()
        attributes = self._pending()
        attributes[HTTP_RESPONSE_STATUS_CODE] = code
        if code >= 500 and not self._failed:
            attributes[ERROR_TYPE] = str(code)
            self.span.set_status(_ERROR_STATUS)
        self.span.set_attributes(attributes)
        if self._response_hook is not None:
            self._hook_response(code, headers)

    def fail(self, exc: BaseException) -> None:
        if self.ended or self._failed:
            return
        if not isinstance(exc, Exception) or _is_normal_disconnect(exc):
            return  # cancellation, exit, a normal WebSocket close: not a server error
        self._failed = True
        span = self.span
        span.record_exception(exc, escaped=True)
        span.set_attribute(ERROR_TYPE, exception_type(exc))
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))

    def incomplete(self) -> None:
        if self.ended or self._failed or self.status_code is not None:
            return
        self.span.set_attribute(ERROR_TYPE, "incomplete_response")
        self.span.set_status(_ERROR_STATUS)

    def end(self) -> None:
        if self.ended:
            return
        if self._route is None:
            self._resolve_route()
        self.ended = True
        forget_owner(self._span_id, self)
        try:
            if self._name != self._written:
                self.span.set_attributes(self._pending())
        finally:
            self.span.end()


class EnrichedRequest(ServerRequest):
    """Another layer's SERVER span: its Laminar path follows the name that layer gives it."""

    __slots__ = ()

    def _name_now(self) -> str:
        name: Any = getattr(self.span, "name", None)
        return name if isinstance(name, str) and name else "HTTP"

    def _follow_name(self) -> None:
        # The other layer names its span when it matches the route: follow that name.
        if self.span.is_recording():
            self.span.set_attribute(SPAN_PATH, (*self._parent_path, self._name_now()))

    def set_route(self, route: str | None) -> None:
        self._follow_name()

    def response_started(self, status: object, headers: object = None) -> None:
        if not self.ended:
            code = int(status)  # type: ignore[call-overload]
            self.status_code = code
            self._follow_name()
            if self._response_hook is not None:
                self._hook_response(code, headers)

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            forget_owner(self._span_id, self)
            self._follow_name()
