"""What both inbound middlewares do per request, written once.

`InboundTracer` is built when a middleware is constructed: it compiles the options (trust
policy, excluded paths, header names) and picks the tracer. Per request an adapter hands it
one `InboundRequest`, the protocol-neutral facts it read from its framework's shapes, and
gets back a `ServerRequest` (see `_server_request`), which owns the SERVER span from then on.
The adapter's entry point contains any failure (see `_guard`): the app then runs without us.

Choosing the remote context (see docs/wire-format.md for what the header may carry):

1. The Laminar header (any of the configured names, any case). Several lines with the same
   value count as one; different values are ambiguous and count as none. An empty value is
   none, silently; an invalid one is none, with a rate-limited log line. The header has no
   sampled flag: a `traceparent` naming the same span gives it (and its `tracestate`);
   without one the caller is sampled.
2. Without a usable Laminar header: whatever the globally configured OpenTelemetry
   propagator extracts (W3C `traceparent` by default, read strictly: see `_w3c`).
3. The trust policy decides what the remote context is worth: `continue` (child of it, with
   the carried user id, session id, trace type and metadata as attributes), `restart` (a new
   trace with a span link to it) or `ignore` (a new trace).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Final, NamedTuple

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.semconv.attributes.client_attributes import CLIENT_ADDRESS
from opentelemetry.semconv.attributes.http_attributes import (
    HTTP_REQUEST_METHOD,
    HTTP_REQUEST_METHOD_ORIGINAL,
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
    TraceFlags,
    Tracer,
    TracerProvider,
)
from opentelemetry.util.types import AttributeValue

from ._guard import contained, log_bad_header
from ._http import KNOWN_METHODS
from ._lmnr import LaminarBridge, active_bridge
from ._server_request import EnrichedRequest, OwnedRequest, RouteFinder, ServerRequest
from ._w3c import sampled_parent
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
    ServerRequestHook,
    ServerResponseHook,
    TrustOption,
    TrustPolicy,
    checked_header_names,
    checked_hook,
    checked_provider,
)
from .context import (
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
    "InboundRequest",
    "InboundTracer",
    "laminar_remote",
    "remote_span_context",
    "split_host",
]

DEFAULT_HEADER_NAMES: Final = (HEADER_NAME, HEADER_NAME_ALIAS)

WEBSOCKET_SPAN_PREFIX: Final = "WS"
_ROOT: Final = Context()
_MAX_HOSTS: Final = 256
_ADDING_PROCESSOR: Final = contained("adding the Laminar path processor")
_EXTRACTING: Final = contained("the global OpenTelemetry propagator's extract")
_REQUEST_HOOK: Final = contained("server_request_hook", theirs=True)


class InboundRequest(NamedTuple):
    """The facts of one request, as an adapter read them from its framework's shapes."""

    method: str | None  # None: a WebSocket connection
    path: str
    scheme: str
    # The Laminar header's values (every configured name, every line), raw.
    laminar_values: Sequence[str | bytes]
    # The W3C lines, read in the same pass: a `traceparent` beside the Laminar header gives
    # it the sampled flag.
    traceparents: Sequence[str | bytes]
    tracestates: Sequence[str | bytes]
    # The request's headers and how to read them, for the global OpenTelemetry propagator.
    carrier: Any
    getter: Getter[Any]
    # What a trust callable is given: the ASGI scope, the WSGI environ.
    subject: object
    host: str | None
    server: tuple[str, int | None] | None
    client: str | None
    user_agent: str | None
    find_route: RouteFinder | None


class _Parent(NamedTuple):
    """What the trust policy made of the caller's context."""

    context: Context  # the span's parent context (the empty one: a new trace)
    links: list[Link] | None
    remote: LaminarSpanContext | None  # the caller's Laminar context, continued
    base: Context | None  # what to attach the span on top of (W3C baggage kept)


_NEW_TRACE: Final = _Parent(_ROOT, None, None, None)


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


def laminar_remote(values: Sequence[str | bytes]) -> LaminarSpanContext | None:
    """The caller's context from the Laminar header's values (at least one): several lines
    with the same value count as one, different ones as none; an invalid value is logged."""
    value = values[0]
    for other in values[1:]:
        if other != value:
            log_bad_header("several different values", value)
            return None
    remote, reason = parse_with_reason(value)
    if remote is None and reason:
        log_bad_header(reason, value)
    return remote


def remote_span_context(remote: LaminarSpanContext) -> SpanContext:
    """The caller's span context, as a span link names it."""
    return SpanContext(
        trace_id=remote.trace_id,
        span_id=remote.span_id,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )


class InboundTracer:
    """Everything per request that the inbound middlewares share, compiled once.

    Options: `tracer_provider` (the global one when None), `excluded_paths` (exact paths and
    compiled patterns; None reads `LAMINAR_EXCLUDED_PATHS`), `trust` (`"continue"`,
    `"restart"`, `"ignore"`, a callable on the ASGI scope / WSGI environ, or None for
    `LAMINAR_TRUST`), `header_names` (the Laminar header names to read, any case), and the
    hooks `server_request_hook(span, scope_or_environ)` and `server_response_hook(span,
    status, headers)`, each called once per request with its SERVER span (ours, or the one
    another layer opened and we enriched) while it records, as contrib's hooks are.
    """

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        excluded_paths: ExcludedPathsOption | ExcludedPaths = None,
        trust: TrustOption | TrustPolicy | None = None,
        header_names: Iterable[str] | None = None,
        server_request_hook: ServerRequestHook | None = None,
        server_response_hook: ServerResponseHook | None = None,
    ) -> None:
        tracer_provider = checked_provider(tracer_provider)
        self._request_hook = checked_hook("server_request_hook", server_request_hook)
        self._response_hook = checked_hook("server_response_hook", server_response_hook)
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

    def start(self, request: InboundRequest) -> ServerRequest:
        """Start the SERVER span of a request, or enrich the one another layer started."""
        current = trace.get_current_span()
        if current.is_recording() and getattr(current, "kind", None) is SpanKind.SERVER:
            server_request = self._enrich(current, request)
        else:
            server_request = self._open(request)
        hook = self._request_hook
        if hook is not None and server_request.span.is_recording():
            with _REQUEST_HOOK:
                hook(server_request.span, request.subject)
        return server_request

    def _open(self, request: InboundRequest) -> OwnedRequest:
        """This package's SERVER span for the request, under the caller's context."""
        # Laminar's SDK, when initialized in this process, gets the span on its provider
        # (unless the user chose one) and as current span in its own context.
        bridge = active_bridge()
        prefix, attributes = self._attributes(request)
        parent = self._parent(request, attributes, bridge)
        tracer, provider = self._tracer_now(bridge)
        # With Laminar's SDK the caller's paths went in with the start attributes: it
        # computes the span's own paths from them when it starts. Ours are written with the
        # response.
        span = tracer.start_span(
            prefix,
            context=parent.context,
            kind=SpanKind.SERVER,
            attributes=attributes,
            links=parent.links,
        )
        warn_if_no_provider(span)
        return OwnedRequest(
            span,
            prefix,
            request.find_route,
            parent.remote,
            bridge,
            provider,
            parent.base,
            self._response_hook,
        )

    def _attributes(self, request: InboundRequest) -> tuple[str, dict[str, AttributeValue]]:
        """The span name's prefix (the method, `HTTP` or `WS`) and the start attributes."""
        attributes: dict[str, AttributeValue]
        method = request.method
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
        attributes[URL_PATH] = request.path
        attributes[URL_SCHEME] = request.scheme
        host = request.host
        server = request.server
        if host:
            hosts = self._hosts
            split = hosts.get(host)
            if split is None:
                if len(hosts) >= _MAX_HOSTS:
                    hosts.clear()  # bounded: a caller can send any Host
                split = hosts[host] = split_host(host)
            address, port = split
        elif server is not None:
            address, port = server
        else:
            address, port = "", None
        if address:
            attributes[SERVER_ADDRESS] = address
            if port is not None:
                attributes[SERVER_PORT] = port
        if request.client:
            attributes[CLIENT_ADDRESS] = request.client
        if request.user_agent:
            attributes[USER_AGENT_ORIGINAL] = request.user_agent
        return prefix, attributes

    def _parent(
        self,
        request: InboundRequest,
        attributes: dict[str, AttributeValue],
        bridge: LaminarBridge | None,
    ) -> _Parent:
        """The caller's context (Laminar's header, else the global propagator's) as the
        trust policy takes it; when continued, the caller's attributes join `attributes`."""
        values = request.laminar_values
        remote = laminar_remote(values) if values else None
        if remote is not None:
            decision = self.trust.decide(request.subject)
            if decision == "continue":
                if bridge is not None:
                    attributes.update(parent_attributes(remote))
                attributes.update(association_attributes(remote))
                flags, state = sampled_parent(
                    remote.trace_id, remote.span_id, request.traceparents, request.tracestates
                )
                context = remote_parent_context(remote, _ROOT, flags, state)
                return _Parent(context, None, remote, None)
            if decision == "restart":
                return _Parent(_ROOT, [Link(remote_span_context(remote))], None, None)
            return _NEW_TRACE
        extracted = self._extract(request.carrier, request.getter)
        if not extracted:
            return _NEW_TRACE
        decision = self.trust.decide(request.subject)
        if decision == "continue":
            # Keep what the propagator brought (baggage) in the current context too.
            return _Parent(
                extracted, None, None, Context({**otel_context.get_current(), **extracted})
            )
        if decision == "restart":
            span_context = trace.get_current_span(extracted).get_span_context()
            if span_context.is_valid:
                return _Parent(_ROOT, [Link(span_context)], None, None)
        return _NEW_TRACE

    def _tracer_now(self, bridge: LaminarBridge | None) -> tuple[Tracer, TracerProvider | None]:
        """The tracer for this request, and its provider when it is not the global one (the
        user's, or Laminar's): the request's other spans go where its server span went."""
        if bridge is not None and self._provider is None:
            provider = bridge.tracer_provider()
            if provider is not self._bridge_provider:
                self._bridge_provider = provider
                with _ADDING_PROCESSOR:
                    ensure_path_processor(provider)
                    warn_if_split_providers(provider)
            return get_tracer(provider), provider
        if not self._processor_ready:
            self._ensure_processor()
        return self.tracer, self._provider

    def _enrich(self, span: Span, request: InboundRequest) -> ServerRequest:
        """Another layer (a contrib ASGI/WSGI/FastAPI/Flask instrumentation, an outer copy of
        this middleware) already opened the request's SERVER span: one SERVER span per
        request, so give that span Laminar's attributes instead of opening a second one.

        The caller's user id, session id and metadata go on it only when that layer made it
        a child of the caller's Laminar context (through `LaminarPropagator`) and the trust
        policy says `continue`.
        """
        values = request.laminar_values
        remote = laminar_remote(values) if values else None
        parent = getattr(span, "parent", None)
        bridge = active_bridge()
        attributes: dict[str, AttributeValue] = {}
        if (
            remote is not None
            and parent is not None
            and parent.span_id == remote.span_id
            and parent.trace_id == remote.trace_id
            and self.trust.decide(request.subject) == "continue"
        ):
            if bridge is not None:
                attributes.update(parent_attributes(remote))
            attributes.update(association_attributes(remote))
        else:
            remote = None
        name = getattr(span, "name", None) or "HTTP"
        parent_path = () if remote is None else remote.span_path
        parent_ids_path = () if remote is None else remote.span_ids_path
        attributes[SPAN_PATH] = (*parent_path, name)
        attributes[SPAN_IDS_PATH] = (
            *parent_ids_path,
            format_uuid(span.get_span_context().span_id),
        )
        span.set_attributes(attributes)
        # Made once the span is written: nothing is registered for a request that failed.
        return EnrichedRequest(span, remote, bridge, response_hook=self._response_hook)

    def _ensure_processor(self) -> None:
        # Laminar paths for the spans the app starts under ours: once, on an SDK provider
        # (the global one may still be a placeholder on the first requests).
        provider = self._provider if self._provider is not None else trace.get_tracer_provider()
        if type(provider).__name__ != "ProxyTracerProvider":
            self._processor_ready = True
            with _ADDING_PROCESSOR:
                ensure_path_processor(provider)

    @staticmethod
    def _extract(carrier: Any, getter: Getter[Any]) -> Context | None:
        # The global propagator is someone else's code: its failure means "no context".
        textmap = global_propagator_without_laminar()
        if textmap is None:
            return None
        with _EXTRACTING:
            return textmap.extract(carrier, Context(), getter)
        return None
