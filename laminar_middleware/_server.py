"""What both inbound middlewares do per request, written once.

`InboundTracer` is built when a middleware is constructed: it compiles the options (trust
policy, excluded paths, header names) and picks the tracer. Per request an adapter hands it
the protocol-neutral facts (method, path, header values, a carrier for the global
OpenTelemetry propagator) and gets back a `ServerRequest`, or None when the request gets no
span. The `ServerRequest` owns the SERVER span: its parent, name, attributes, status and its
single end. Every method of it contains its own failures (see `_guard`), so the adapters can
call them without protecting each call, and a request never fails because of us.

Choosing the remote context (see docs/wire-format.md for what the header may carry):

1. The Laminar header (any of the configured names, any case). Several lines with the same
   value count as one; different values are ambiguous and count as none. An empty value is
   none, silently; an invalid one is none, with a rate-limited log line.
2. Without a usable Laminar header: whatever the globally configured OpenTelemetry
   propagator extracts (W3C `traceparent` by default).
3. The trust policy decides what the remote context is worth: `continue` (child of it, with
   the carried user id, session id, trace type and metadata as attributes), `restart` (a new
   trace with a span link to it) or `ignore` (a new trace).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.semconv.attributes.client_attributes import CLIENT_ADDRESS
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.http_attributes import (
    HTTP_REQUEST_METHOD,
    HTTP_REQUEST_METHOD_ORIGINAL,
    HTTP_RESPONSE_STATUS_CODE,
    HTTP_ROUTE,
)
from opentelemetry.semconv.attributes.network_attributes import (
    NETWORK_PROTOCOL_NAME,
)
from opentelemetry.semconv.attributes.server_attributes import SERVER_ADDRESS, SERVER_PORT
from opentelemetry.semconv.attributes.url_attributes import URL_PATH, URL_SCHEME
from opentelemetry.semconv.attributes.user_agent_attributes import USER_AGENT_ORIGINAL
from opentelemetry.trace import (
    Link,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    Tracer,
    TracerProvider,
)
from opentelemetry.util.types import AttributeValue

from ._guard import internal_error, log_bad_header
from ._http import KNOWN_METHODS, exception_type
from ._lmnr import LaminarBridge, active_bridge
from .codec import (
    HEADER_NAME,
    HEADER_NAME_ALIAS,
    LaminarSpanContext,
    format_uuid,
    parse_with_reason,
)
from .config import (
    ExcludedPaths,
    ExcludedPathsOption,
    TrustOption,
    TrustPolicy,
    checked_header_names,
    checked_provider,
)
from .context import (
    REQUEST_PROVIDER,
    SERVER_SPAN_NAMER,
    SPAN_IDS_PATH,
    SPAN_PATH,
    association_attributes,
    get_tracer,
    parent_attributes,
    remote_parent_context,
    warn_if_no_provider,
    warn_if_split_providers,
)
from .processor import ensure_path_processor
from .propagator import global_propagator_without_laminar

__all__ = [
    "DEFAULT_HEADER_NAMES",
    "InboundTracer",
    "ServerRequest",
    "split_host",
]

DEFAULT_HEADER_NAMES: Final = (HEADER_NAME, HEADER_NAME_ALIAS)

WEBSOCKET_SPAN_PREFIX: Final = "WS"
_ROOT: Final = Context()
_MAX_HOSTS: Final = 256
_ERROR_STATUS: Final = Status(StatusCode.ERROR)
# WebSocket close codes of a normal end: not an error.
_NORMAL_CLOSE_CODES: Final = frozenset({1000, 1001})


def split_host(value: str) -> tuple[str, int | None]:
    """A Host header (`name`, `name:port`, `[v6]:port`) as address and port; never raises."""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return value, None
        host, rest = value[1:end], value[end + 1 :]
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port = value.rpartition(":")
        if not sep or ":" in host:  # no port, or a bare IPv6 address
            return value, None
    if port.isdigit() and len(port) <= 5:
        return host, int(port)
    return host, None


def _span_context(remote: LaminarSpanContext) -> SpanContext:
    return SpanContext(
        trace_id=remote.trace_id,
        span_id=remote.span_id,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )


def _is_normal_disconnect(exc: BaseException) -> bool:
    # Starlette's WebSocketDisconnect (and look-alikes) with a normal close code.
    return type(exc).__name__ == "WebSocketDisconnect" and (
        getattr(exc, "code", None) in _NORMAL_CLOSE_CODES
    )


Tokens = tuple[object | None, object | None]


class ServerRequest:
    """The SERVER span of one request, from start to its single end.

    Every method contains its own failures: a raising span processor or a strange value
    becomes a log line, never an exception in the request.
    """

    __slots__ = (
        "_bridge",
        "_context",
        "_ended",
        "_failed",
        "_name",
        "_namer",
        "_owned",
        "_parent_ids_path",
        "_parent_path",
        "_paths_set",
        "_prefix",
        "_provider",
        "_remote",
        "_route",
        "span",
        "status_code",
    )

    def __init__(
        self,
        span: Span,
        prefix: str,
        parent_path: tuple[str, ...],
        parent_ids_path: tuple[str, ...] = (),
        base: Context | None = None,
        bridge: LaminarBridge | None = None,
        remote: LaminarSpanContext | None = None,
        owned: bool = True,
        provider: TracerProvider | None = None,
    ) -> None:
        self.span = span
        self._provider = provider
        # False: another layer (a contrib instrumentation) opened this SERVER span; we only
        # add Laminar's attributes to it and leave its name, status and end to that layer.
        self._owned = owned
        self.status_code: int | None = None
        self._prefix = prefix
        self._name = prefix
        self._parent_path = parent_path
        self._parent_ids_path = parent_ids_path
        # The Laminar paths are set once someone needs them (see SERVER_SPAN_NAMER) or with
        # the response: most requests then set them in the call that records the status.
        self._paths_set = not owned
        # The context to attach: the span on top of `base`, or of whatever is current when
        # first attached (the adapters attach right away, in the request's own context).
        self._context = None if base is None else trace.set_span_in_context(span, base)
        self._bridge = bridge
        self._remote = remote
        self._route: str | None = None
        self._ended = False
        self._failed = False
        self._namer: Callable[[], str | None] | None = None

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def route(self) -> str | None:
        """The route template once known."""
        return self._route

    def find_route_with(self, find_route: Callable[[], str | None]) -> None:
        """How the adapter reads the route once the framework has matched it: used when a
        child span or an outbound header needs this span's final name early."""
        self._namer = find_route

    def _name_now(self) -> None:
        """Before someone reads this span's Laminar attributes: name it by route if the
        framework knows the route by now, and set its paths."""
        if self._ended or not self._owned:
            return
        find_route = self._namer
        if find_route is not None and self._route is None:
            try:
                route = find_route()
            except Exception:
                internal_error("finding the route")
                route = None
            if route:
                self.set_route(route)
                return
        self._ensure_paths()

    def _ensure_paths(self) -> None:
        if not self._paths_set:
            try:
                # Called from another thread (a child span starting there), this write can
                # land after the request's thread renamed the span by route: write again
                # until the paths carry the name the span has.
                for _ in range(3):
                    name = self._name
                    self.span.set_attributes(self._paths(name))
                    if name == self._name:
                        break
            except Exception:
                internal_error("setting the Laminar path attributes")

    def _paths(self, name: str) -> dict[str, AttributeValue]:
        self._paths_set = True
        span_id = format_uuid(self.span.get_span_context().span_id)
        return {
            SPAN_PATH: (*self._parent_path, name),
            SPAN_IDS_PATH: (*self._parent_ids_path, span_id),
        }

    def attach(self) -> Tokens:
        """Make the span current (in Laminar's SDK context too, when it is initialized);
        returns what `detach` needs. Call `detach` in the same thread or task."""
        token: object | None = None
        bridge_token: object | None = None
        try:
            context = self._context
            if context is None or (self._owned and SERVER_SPAN_NAMER not in context):
                if context is None:
                    context = trace.set_span_in_context(self.span)
                if self._owned:
                    context = otel_context.set_value(SERVER_SPAN_NAMER, self._name_now, context)
                if self._provider is not None:
                    context = otel_context.set_value(REQUEST_PROVIDER, self._provider, context)
                self._context = context
            token = otel_context.attach(context)
            bridge = self._bridge
            if bridge is not None:
                bridge_token = bridge.attach(self.span, self._remote)
        except Exception:
            internal_error("attaching the server span")
        return token, bridge_token

    def detach(self, tokens: Tokens) -> None:
        token, bridge_token = tokens
        try:
            if bridge_token is not None and self._bridge is not None:
                self._bridge.detach(bridge_token)  # type: ignore[arg-type]
        except Exception:
            internal_error("detaching the server span from Laminar's context")
        try:
            if token is not None:
                otel_context.detach(token)  # type: ignore[arg-type]
        except Exception:
            internal_error("detaching the server span")

    def set_route(self, route: str | None) -> None:
        """Name the span `PREFIX route` once the framework has matched the route."""
        if not self._owned:
            self._refresh_borrowed_path()
            return
        if not route or route == self._route or self._ended:
            return
        try:
            self.span.set_attributes(self._named(route))
        except Exception:
            internal_error("naming the server span")

    def _named(self, route: str) -> dict[str, AttributeValue]:
        self._route = route
        self._name = name = f"{self._prefix} {route}"
        self.span.update_name(name)
        attributes = self._paths(name)
        attributes[HTTP_ROUTE] = route
        return attributes

    def _refresh_borrowed_path(self) -> None:
        # The other layer names its span when it matches the route: follow that name.
        try:
            name = getattr(self.span, "name", None)
            if name and self.span.is_recording():
                self.span.set_attribute(SPAN_PATH, (*self._parent_path, name))
        except Exception:
            internal_error("updating the Laminar path of another layer's span")

    def response_started(self, status: Any, route: str | None = None) -> None:
        """The response starts: the route when known now, the status (ERROR for 5xx)."""
        if self._ended:
            return
        if not self._owned:
            self.status_code = int(status) if isinstance(status, int) else self.status_code
            self._refresh_borrowed_path()
            return
        try:
            code = int(status)
            self.status_code = code
            attributes: dict[str, AttributeValue]
            if route and route != self._route:
                attributes = self._named(route)
            elif not self._paths_set:
                attributes = self._paths(self._name)
            else:
                attributes = {}
            attributes[HTTP_RESPONSE_STATUS_CODE] = code
            if code >= 500 and not self._failed:
                attributes[ERROR_TYPE] = str(code)
                self.span.set_status(_ERROR_STATUS)
            self.span.set_attributes(attributes)
        except Exception:
            internal_error("recording the response status")

    def fail(self, exc: BaseException) -> None:
        """An exception left the app: recorded, status ERROR (the caller re-raises it)."""
        if self._ended or self._failed or not self._owned:
            return
        if not isinstance(exc, Exception) or _is_normal_disconnect(exc):
            return  # cancellation, exit, a normal WebSocket close: not a server error
        try:
            self._failed = True
            span = self.span
            span.record_exception(exc, escaped=True)
            span.set_attribute(ERROR_TYPE, exception_type(exc))
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        except Exception:
            internal_error("recording an exception on the server span")

    def incomplete(self) -> None:
        """The app returned without starting a response (the server answers 500)."""
        if self._ended or self._failed or self.status_code is not None or not self._owned:
            return
        try:
            self.span.set_attribute(ERROR_TYPE, "incomplete_response")
            self.span.set_status(_ERROR_STATUS)
        except Exception:
            internal_error("marking an incomplete response")

    def end(self) -> None:
        """End the span; only the first call does anything."""
        if self._ended:
            return
        self._ended = True
        if not self._owned:
            self._refresh_borrowed_path()
            return
        self._ensure_paths()
        try:
            self.span.end()
        except Exception:
            internal_error("ending the server span")


class InboundTracer:
    """Everything per request that the ASGI and WSGI middlewares share, compiled once.

    Options: `tracer_provider` (the global one when None), `excluded_paths` (exact paths and
    compiled patterns; None reads `LAMINAR_EXCLUDED_PATHS`), `trust` (`"continue"`,
    `"restart"`, `"ignore"`, a callable on the ASGI scope / WSGI environ, or None for
    `LAMINAR_TRUST`), and `header_names` (the Laminar header names to read, any case).
    """

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        excluded_paths: ExcludedPathsOption | ExcludedPaths = None,
        trust: TrustOption | TrustPolicy | None = None,
        header_names: Iterable[str] | None = None,
    ) -> None:
        tracer_provider = checked_provider(tracer_provider)
        self._provider = tracer_provider
        self.tracer = get_tracer(tracer_provider)
        self._processor_ready = False
        self._bridge_provider: TracerProvider | None = None
        excluded = (
            excluded_paths
            if isinstance(excluded_paths, ExcludedPaths)
            else ExcludedPaths(excluded_paths, from_env=True)
        )
        self._excluded: ExcludedPaths | None = excluded if excluded else None
        self.trust = trust if isinstance(trust, TrustPolicy) else TrustPolicy(trust)
        self.header_names = checked_header_names(header_names, DEFAULT_HEADER_NAMES)
        # Precomputed per request shape: the method part of a span name and its attribute.
        self._methods: dict[str, tuple[str, dict[str, AttributeValue]]] = {
            m: (m, {HTTP_REQUEST_METHOD: m}) for m in KNOWN_METHODS
        }
        self._hosts: dict[str, tuple[str, int | None]] = {}
        self._ensure_processor()

    def excluded(self, path: str) -> bool:
        """True when the path gets no span (and no context is read)."""
        excluded = self._excluded
        return excluded is not None and excluded.matches(path)

    def start(
        self,
        *,
        method: str | None,
        path: str,
        scheme: str,
        laminar_values: Sequence[str | bytes],
        carrier: Any,
        getter: Getter[Any],
        subject: object,
        host: str | None,
        server: tuple[str, int | None] | None,
        client: str | None,
        user_agent: str | None,
    ) -> ServerRequest | None:
        """Start the SERVER span of a request (`method` None: a WebSocket connection).

        Returns None when starting failed; the adapter then runs the app without us.
        """
        try:
            return self._start(
                method,
                path,
                scheme,
                laminar_values,
                carrier,
                getter,
                subject,
                host,
                server,
                client,
                user_agent,
            )
        except Exception:
            internal_error("starting the server span")
            return None

    def _start(
        self,
        method: str | None,
        path: str,
        scheme: str,
        laminar_values: Sequence[str | bytes],
        carrier: Any,
        getter: Getter[Any],
        subject: object,
        host: str | None,
        server: tuple[str, int | None] | None,
        client: str | None,
        user_agent: str | None,
    ) -> ServerRequest:
        current = trace.get_current_span()
        if current.is_recording() and getattr(current, "kind", None) is SpanKind.SERVER:
            return self._enrich(current, laminar_values, subject)
        # Name and attributes.
        attributes: dict[str, AttributeValue]
        if method is None:
            prefix = WEBSOCKET_SPAN_PREFIX
            attributes = {NETWORK_PROTOCOL_NAME: "websocket"}
        else:
            known = self._methods.get(method)
            if known is None:
                prefix = "HTTP"
                attributes = {HTTP_REQUEST_METHOD: "_OTHER", HTTP_REQUEST_METHOD_ORIGINAL: method}
            else:
                prefix = known[0]
                attributes = known[1].copy()
        attributes[URL_PATH] = path
        attributes[URL_SCHEME] = scheme
        if host:
            hosts = self._hosts
            split = hosts.get(host)
            if split is None:
                if len(hosts) >= _MAX_HOSTS:
                    hosts.clear()  # bounded: a caller can send any Host
                split = hosts[host] = split_host(host)
            address, port = split
            if address:
                attributes[SERVER_ADDRESS] = address
                if port is not None:
                    attributes[SERVER_PORT] = port
        elif server is not None and server[0]:
            attributes[SERVER_ADDRESS] = server[0]
            if server[1] is not None:
                attributes[SERVER_PORT] = server[1]
        if client:
            attributes[CLIENT_ADDRESS] = client
        if user_agent:
            attributes[USER_AGENT_ORIGINAL] = user_agent

        # The remote context: Laminar's header, else the global propagator's.
        base: Context | None = None
        parent: Context | None = None
        links: list[Link] | None = None
        parent_path: tuple[str, ...] = ()
        parent_ids_path: tuple[str, ...] = ()
        continued: LaminarSpanContext | None = None
        remote = self._laminar_remote(laminar_values) if laminar_values else None
        if remote is not None:
            decision = self.trust.decide(subject)
            if decision == "continue":
                parent = remote_parent_context(remote, _ROOT)
                attributes.update(parent_attributes(remote))
                attributes.update(association_attributes(remote))
                parent_path, parent_ids_path = remote.span_path, remote.span_ids_path
                continued = remote
            elif decision == "restart":
                links = [Link(_span_context(remote))]
        else:
            extracted = self._extract(carrier, getter)
            if extracted:
                decision = self.trust.decide(subject)
                if decision == "continue":
                    parent = extracted
                    # Keep what the propagator brought (baggage) in the current context too.
                    base = Context({**otel_context.get_current(), **extracted})
                elif decision == "restart":
                    span_context = trace.get_current_span(extracted).get_span_context()
                    if span_context.is_valid:
                        links = [Link(span_context)]

        # Laminar's SDK, when initialized in this process, gets the span on its provider
        # (unless the user chose one) and as current span in its own context.
        bridge = active_bridge()
        provider: TracerProvider | None = None
        if bridge is not None and self._provider is None:
            tracer = self._bridge_tracer(bridge)
            provider = self._bridge_provider
        else:
            tracer = self.tracer
            if not self._processor_ready:
                self._ensure_processor()
        # The caller's paths go in with the start attributes: Laminar's SDK computes the
        # span's own paths from them when it starts. Ours are set later (ServerRequest).
        span = tracer.start_span(
            prefix,
            context=parent if parent is not None else _ROOT,
            kind=SpanKind.SERVER,
            attributes=attributes,
            links=links,
        )
        warn_if_no_provider(span)
        return ServerRequest(
            span,
            prefix,
            parent_path,
            parent_ids_path,
            base,
            bridge,
            continued,
            provider=provider,
        )

    def _enrich(
        self, span: Span, laminar_values: Sequence[str | bytes], subject: object
    ) -> ServerRequest:
        """Another layer (a contrib ASGI/WSGI/FastAPI/Flask instrumentation, an outer copy of
        this middleware) already opened the request's SERVER span: one SERVER span per
        request, so give that span Laminar's attributes instead of opening a second one.

        The caller's user id, session id and metadata go on it only when that layer made it
        a child of the caller's Laminar context (through `LaminarPropagator`) and the trust
        policy says `continue`.
        """
        remote = self._laminar_remote(laminar_values) if laminar_values else None
        parent = getattr(span, "parent", None)
        attributes: dict[str, AttributeValue] = {}
        parent_path: tuple[str, ...] = ()
        parent_ids_path: tuple[str, ...] = ()
        continued: LaminarSpanContext | None = None
        if (
            remote is not None
            and parent is not None
            and parent.span_id == remote.span_id
            and parent.trace_id == remote.trace_id
            and self.trust.decide(subject) == "continue"
        ):
            attributes.update(parent_attributes(remote))
            attributes.update(association_attributes(remote))
            parent_path, parent_ids_path = remote.span_path, remote.span_ids_path
            continued = remote
        own_id = format_uuid(span.get_span_context().span_id)
        attributes[SPAN_PATH] = (*parent_path, getattr(span, "name", "") or "HTTP")
        attributes[SPAN_IDS_PATH] = (*parent_ids_path, own_id)
        span.set_attributes(attributes)
        return ServerRequest(
            span, "", parent_path, parent_ids_path, None, active_bridge(), continued, owned=False
        )

    def _ensure_processor(self) -> None:
        # Laminar paths for the spans the app starts under ours: once, on an SDK provider
        # (the global one may still be a placeholder on the first requests).
        provider = self._provider if self._provider is not None else trace.get_tracer_provider()
        if type(provider).__name__ != "ProxyTracerProvider":
            self._processor_ready = True
            try:
                ensure_path_processor(provider)
            except Exception:
                internal_error("adding the Laminar path processor")

    def _bridge_tracer(self, bridge: LaminarBridge) -> Tracer:
        provider = bridge.tracer_provider()
        if provider is not self._bridge_provider:
            self._bridge_provider = provider
            try:
                ensure_path_processor(provider)
                warn_if_split_providers(provider)
            except Exception:
                internal_error("adding the Laminar path processor")
        return get_tracer(provider)

    @staticmethod
    def _laminar_remote(values: Sequence[str | bytes]) -> LaminarSpanContext | None:
        value = values[0]
        for other in values[1:]:
            if other != value:
                log_bad_header("several different values", value)
                return None
        remote, reason = parse_with_reason(value)
        if remote is None and reason:
            log_bad_header(reason, value)
        return remote

    @staticmethod
    def _extract(carrier: Any, getter: Getter[Any]) -> Context | None:
        try:
            textmap = global_propagator_without_laminar()
            return None if textmap is None else textmap.extract(carrier, Context(), getter)
        except Exception:
            internal_error("the global OpenTelemetry propagator's extract")
            return None
