"""Outbound: what one client call does, once, for every client adapter.

`OutboundHook` is built when a client is instrumented (options parsed, tracer found, method
table ready); per call an adapter (httpx.py, requests.py) translates its request into
`begin(...)` and its outcome into the returned `Call`. Nothing here imports a client library.

Per call, in order:

1. OpenTelemetry's `suppress_instrumentation()` is on (an exporter sending spans): nothing.
2. One of our own hooks is already handling this very request further out (a wrapped
   transport on an instrumented client, a session instrumented both globally and on its
   own): nothing, so stacking gives one span and one header. A *different* request inside
   our call is a redirect hop (requests follows redirects inside `Session.send`): the
   headers we added are kept only if the new host may receive them.
3. No valid current span: nothing (no header, no span): a call outside any trace is not
   worth a trace of its own.
4. Another HTTP instrumentation (the contrib httpx/requests ones) already opened this call's
   CLIENT span further out: no second span; the Laminar header names that span (it has
   already injected the W3C headers itself).
5. Otherwise a CLIENT span, child of the current span, named by the method; the Laminar
   header names it, and the global OpenTelemetry propagator's headers (W3C `traceparent`
   by default) are added beside it. The inner call runs with that span current and inside
   OpenTelemetry's `suppress_http_instrumentation()`, so contrib instrumentation further in
   skips its own span (one CLIENT span per call).

Every header we add obeys `propagate_to` and the signed-request rule; a header the caller
set (either Laminar name, any case; `traceparent`, ...) is never replaced.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Container, Mapping, MutableMapping
from typing import Any, Final, NamedTuple, cast

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagators.textmap import Setter
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.http_attributes import (
    HTTP_REQUEST_METHOD,
    HTTP_REQUEST_METHOD_ORIGINAL,
    HTTP_RESPONSE_STATUS_CODE,
)
from opentelemetry.semconv.attributes.server_attributes import SERVER_ADDRESS, SERVER_PORT
from opentelemetry.semconv.attributes.url_attributes import URL_FULL
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, TracerProvider
from opentelemetry.util.types import AttributeValue

from ._guard import contained
from ._http import KNOWN_METHODS, exception_type
from ._lmnr import active_bridge
from ._w3c import TRACEPARENT, format_traceparent
from .codec import HEADER_NAME, HEADER_NAMES_LOWER, LaminarSpanContext
from .config import (
    ClientRequestHook,
    ClientResponseHook,
    PropagateToOption,
    PropagationTargets,
    checked_flag,
    checked_hook,
    checked_provider,
    is_signed_request,
)
from .context import (
    ASSOCIATION_PREFIX,
    SPAN_PATH,
    attributes_of,
    get_tracer,
    laminar_paths,
    new_span_context,
    request_provider,
    span_context_of,
    warn_if_no_provider,
)
from .propagator import global_propagator_without_laminar

__all__ = [
    "EXTENSION_KEY",
    "Call",
    "Headers",
    "OutboundHook",
    "OutgoingRequest",
    "finish_or_end",
    "redact_url",
]

# What both clients' header containers give us: case-insensitive get/contains/set/delete.
Headers = MutableMapping[str, str]

# Where the httpx adapter remembers, on the request, the headers it added: httpx copies a
# request's extensions onto its redirect requests, so the next hop can recognise them.
EXTENSION_KEY: Final = "laminar_middleware.injected"

_SUPPRESS_KEY: Final[str] = getattr(
    otel_context, "_SUPPRESS_INSTRUMENTATION_KEY", "suppress_instrumentation"
)
_SUPPRESS_KEY_PLAIN: Final = "suppress_instrumentation"
_SUPPRESS_HTTP_KEY: Final[str | None] = getattr(
    otel_context, "_SUPPRESS_HTTP_INSTRUMENTATION_KEY", None
)
_CALL_KEY: Final = otel_context.create_key("laminar_middleware.outbound_call")
# What the inner send runs under besides our span: contrib HTTP client spans suppressed.
_INNER_VALUES: Final[dict[str, object]] = (
    {} if _SUPPRESS_HTTP_KEY is None else {_SUPPRESS_HTTP_KEY: True}
)

# method -> (span name, start attributes), per the HTTP client span conventions.
_METHODS: Final[dict[str, tuple[str, dict[str, AttributeValue]]]] = {
    method: (method, {HTTP_REQUEST_METHOD: method}) for method in KNOWN_METHODS
}
_DEFAULT_PORTS: Final = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_HTTP_METHOD_KEYS: Final = (HTTP_REQUEST_METHOD, "http.method")
# Query parameters whose values the conventions say url.full must not show.
_SENSITIVE_QUERY: Final = re.compile(
    r"([?&](?:AWSAccessKeyId|Signature|sig|X-Goog-Signature)=)[^&#]*"
)


def _method_info(method: str) -> tuple[str, dict[str, AttributeValue]]:
    info = _METHODS.get(method)
    if info is not None:
        return info
    upper = method.upper()
    if upper in _METHODS:
        return upper, {HTTP_REQUEST_METHOD: upper, HTTP_REQUEST_METHOD_ORIGINAL: method}
    return "HTTP", {HTTP_REQUEST_METHOD: "_OTHER", HTTP_REQUEST_METHOD_ORIGINAL: method}


@functools.lru_cache(maxsize=256)
def redact_url(url: str) -> str:
    """url.full as the conventions want it: no userinfo credentials, no signature values."""
    start = url.find("://")
    if start >= 0:
        start += 3
        end = len(url)
        for mark in "/?#":
            found = url.find(mark, start)
            if 0 <= found < end:
                end = found
        at = url.rfind("@", start, end)
        if at >= 0:
            url = f"{url[:start]}REDACTED:REDACTED@{url[at + 1 :]}"
    if "?" in url:
        url = _SENSITIVE_QUERY.sub(r"\1REDACTED", url)
    return url


def _is_http_client_span(span: Span) -> bool:
    """A CLIENT span that some HTTP instrumentation opened for the call being made."""
    if getattr(span, "kind", None) is not SpanKind.CLIENT:
        return False
    attributes: Mapping[str, Any] | None = getattr(span, "attributes", None)
    return attributes is not None and any(key in attributes for key in _HTTP_METHOD_KEYS)


def _has_laminar_header(present: Container[str]) -> bool:
    return HEADER_NAMES_LOWER[0] in present or HEADER_NAMES_LOWER[1] in present


def _strip(headers: Headers, added: Mapping[str, str]) -> None:
    """Remove headers an earlier hop of ours added (same name, same value) and nothing else."""
    for name, value in added.items():
        if headers.get(name) == value:
            del headers[name]


class _Carrier:
    """The request's headers as the global propagator sees them: it may add, not replace."""

    __slots__ = ("added", "headers", "present")

    def __init__(self, headers: Headers, present: Container[str], added: dict[str, str]) -> None:
        self.headers = headers
        self.present = present
        self.added = added


class _AddMissing(Setter[_Carrier]):
    def set(self, carrier: _Carrier, key: str, value: str) -> None:
        if key.lower() not in carrier.present:
            carrier.headers[key] = value
            carrier.added[key] = value


_ADD_MISSING: Final = _AddMissing()


class OutgoingRequest(NamedTuple):
    """The facts of one outgoing request, as a client adapter read them from its library."""

    key: object  # the request object: the same one through stacked wrappers
    method: str
    url: str
    host: str | None
    port: int | None
    scheme: str
    query: str
    headers: Headers
    # The lowercased names of the headers the request has (a set, or a case-insensitive
    # mapping).
    present: Container[str]
    # Headers an earlier send of this request (or the hop it was redirected from) added.
    previous: Mapping[str, str] | None
    # What the hooks are given as the request, when it is not `key` (aiohttp: the key is
    # the headers every trace config of one call shares, the hooks get its start params).
    native: object = None


# The entry points where a client library calls into a call's work: each step is contained
# on its own, so a failure in one (recording an error) does not skip another (ending).
_RESPONDING: Final = contained("outbound response")
_RECORDING_ERROR: Final = contained("outbound error")
_ENDING: Final = contained("outbound span end")
_WRAPPING: Final = contained("outbound response wrapper")
_REQUEST_HOOK: Final = contained("client_request_hook", theirs=True)
_RESPONSE_HOOK: Final = contained("client_response_hook", theirs=True)


class Call:
    """One outgoing request in flight: its span (if any), the headers we added, the
    context token. Every method is safe to call in any state and contains its own
    failures: these are the adapters' boundaries after the send."""

    __slots__ = ("_ended", "injected", "key", "native", "response_hook", "span", "token")

    def __init__(self, key: object, native: object = None) -> None:
        self.key = key
        self.native = key if native is None else native
        self.span: Span | None = None
        # Called once, with the first response, when our span records.
        self.response_hook: ClientResponseHook | None = None
        self.injected: dict[str, str] = {}
        self.token: object = None
        self._ended = False

    def detach(self) -> None:
        """Leave the context `begin` attached; call right after the inner send returns."""
        token, self.token = self.token, None
        if token is not None:
            otel_context.detach(token)  # type: ignore[arg-type]  # contains its own failures

    def respond(self, status_code: object, response: object = None) -> None:
        """The response (the library's own object) has arrived, with this status code."""
        span = self.span
        if span is None:
            return
        if isinstance(status_code, int):
            with _RESPONDING:
                _set_status_code(span, status_code)
        hook, self.response_hook = self.response_hook, None
        if hook is not None:
            with _RESPONSE_HOOK:
                hook(span, self.native, response)

    def error(self, exc: BaseException) -> None:
        """The call (or reading its body) raised `exc`."""
        if self.span is not None:
            with _RECORDING_ERROR:
                _record_error(self.span, exc)

    def end(self) -> None:
        """End the span (once): the response is closed, or there will be none."""
        if self._ended:
            return
        self._ended = True
        if self.span is not None:
            with _ENDING:
                self.span.end()

    def fail(self, exc: BaseException) -> None:
        """The inner send raised: detach, record, end. The caller re-raises `exc` itself."""
        self.detach()
        self.error(exc)
        self.end()


def _set_status_code(span: Span, status_code: int) -> None:
    span.set_attribute(HTTP_RESPONSE_STATUS_CODE, status_code)
    if status_code >= 500:
        span.set_attribute(ERROR_TYPE, str(status_code))
        span.set_status(Status(StatusCode.ERROR))


def _record_error(span: Span, exc: BaseException) -> None:
    name = exception_type(exc)
    span.set_attribute(ERROR_TYPE, name)
    if isinstance(exc, Exception):
        span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, name))


class OutboundHook:
    """The per-call logic of every client adapter, configured once.

    `propagate_to`: see `config.PropagationTargets` (None: `LAMINAR_PROPAGATE_TO`, unset:
    every host). `client_spans=False`: no CLIENT span; the header names the current span.
    `client_request_hook(span, request)` and `client_response_hook(span, request, response)`
    get the library's own objects, once per call, when this package's CLIENT span records.
    `enabled` is cleared by uninstrument so any wrapper left behind passes calls through.
    """

    __slots__ = (
        "_fixed_provider",
        "_request_hook",
        "_response_hook",
        "_targets",
        "_tracer",
        "client_spans",
        "enabled",
    )

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        propagate_to: PropagateToOption = None,
        client_spans: bool = True,
        client_request_hook: ClientRequestHook | None = None,
        client_response_hook: ClientResponseHook | None = None,
    ) -> None:
        tracer_provider = checked_provider(tracer_provider)
        self._request_hook = checked_hook("client_request_hook", client_request_hook)
        self._response_hook = checked_hook("client_response_hook", client_response_hook)
        self._tracer = get_tracer(tracer_provider)
        self._fixed_provider = tracer_provider is not None
        # No path processor is added here (the middlewares add it for the spans an app
        # starts under theirs): a client span is a leaf, and its own path is set in begin.
        targets = PropagationTargets(propagate_to)
        self._targets: PropagationTargets | None = None if targets.everywhere else targets
        self.client_spans = checked_flag("client_spans", client_spans, True)
        self.enabled = True

    def may_send(self, request: OutgoingRequest) -> bool:
        """May this request carry our headers: an allowed host, and not a signed request."""
        query = request.query
        present = request.present
        if query or "authorization" in present:
            authorization = (
                request.headers.get("authorization") if "authorization" in present else None
            )
            if is_signed_request(authorization, query):
                return False
        targets = self._targets
        return targets is None or targets.allows(request.url, request.host)

    def begin(self, request: OutgoingRequest) -> Call | None:
        """Before the inner send: maybe start a span, add headers, attach a context.
        Returns None when there is nothing to finish afterwards."""
        ctx = otel_context.get_current()
        if ctx.get(_SUPPRESS_KEY) or ctx.get(_SUPPRESS_KEY_PLAIN):
            return None
        outer = cast("Call | None", ctx.get(_CALL_KEY))
        if outer is not None:
            if outer.key is not request.key:
                self.redirect_hop(outer.injected, request)
            return None
        if request.previous:
            _strip(request.headers, request.previous)
            request = request._replace(present={name.lower() for name in request.headers})
        parent = trace.get_current_span(ctx)
        parent_span_context = parent.get_span_context()
        if not parent_span_context.is_valid:
            return None
        foreign = _is_http_client_span(parent)
        if foreign or (_SUPPRESS_HTTP_KEY is not None and ctx.get(_SUPPRESS_HTTP_KEY)):
            # Another instrumentation owns this call's span (or HTTP instrumentation is
            # suppressed on purpose): no span of ours; name its span in the Laminar header.
            if foreign and not _has_laminar_header(request.present) and self.may_send(request):
                value = span_context_of(parent)
                if value is not None:
                    request.headers[HEADER_NAME] = value.serialize()
            return None
        call = Call(request.key, request.native)
        if not self.client_spans:
            if self.may_send(request):
                self._inject(call, request, span_context_of(parent), ctx)
            call.token = otel_context.attach(otel_context.set_value(_CALL_KEY, call, ctx))
            return call
        span, target = self._start_span(request, ctx, parent, parent_span_context)
        call.span = span
        try:
            # One new context: our span current, contrib HTTP instrumentation inside
            # suppressed, and the marker that makes stacked hooks of ours stand aside.
            new_ctx = otel_context.Context(
                {**trace.set_span_in_context(span, ctx), **_INNER_VALUES, _CALL_KEY: call}
            )
            if self.may_send(request):
                self._inject(call, request, target, new_ctx)
            call.token = otel_context.attach(new_ctx)
        except BaseException:
            call.end()
            raise
        if span.is_recording():
            self._hook_request(call, span, call.native)
        return call

    def _hook_request(self, call: Call, span: Span, native_request: object) -> None:
        call.response_hook = self._response_hook
        hook = self._request_hook
        if hook is not None:
            with _REQUEST_HOOK:
                hook(span, native_request)

    def _start_span(
        self,
        request: OutgoingRequest,
        ctx: otel_context.Context,
        parent: Span,
        parent_span_context: trace.SpanContext,
    ) -> tuple[Span, LaminarSpanContext | None]:
        """The CLIENT span, child of `parent`, and the context the header will carry."""
        name, method_attributes = _method_info(request.method)
        attributes: dict[str, AttributeValue] = dict(method_attributes)
        attributes[URL_FULL] = redact_url(request.url)
        if request.host:
            attributes[SERVER_ADDRESS] = request.host
            port = request.port or _DEFAULT_PORTS.get(request.scheme)
            if port:
                attributes[SERVER_PORT] = port
        parent_attributes = attributes_of(parent)
        associated = False
        for attribute, value in parent_attributes.items():
            if attribute.startswith(ASSOCIATION_PREFIX):
                attributes[attribute] = value
                associated = True
        paths = laminar_paths(parent, parent_attributes)
        if paths is not None:
            # As a start attribute, so path processors have nothing left to do; the ids
            # path needs this span's id and is set once it has started.
            attributes[SPAN_PATH] = (*paths[0], name)
        span = self._tracer_for(ctx).start_span(name, ctx, SpanKind.CLIENT, attributes)
        warn_if_no_provider(span)
        try:
            target = new_span_context(span, parent, parent_span_context, paths, associated)
        except BaseException:
            span.end()
            raise
        return span, target

    def _tracer_for(self, ctx: otel_context.Context) -> Tracer:
        if self._fixed_provider:
            return self._tracer
        # Where the request's server span went, else (Laminar's SDK initialized) where its
        # spans go: a client span's parent must be exported beside it.
        provider = request_provider(ctx)
        if provider is not None:
            return get_tracer(provider)
        bridge = active_bridge()
        if bridge is not None:
            return get_tracer(bridge.tracer_provider())
        return self._tracer

    @staticmethod
    def _inject(
        call: Call,
        request: OutgoingRequest,
        target: LaminarSpanContext | None,
        ctx: otel_context.Context,
    ) -> None:
        headers = request.headers
        present = request.present
        added = call.injected
        if target is not None and not _has_laminar_header(present):
            value = target.serialize()
            headers[HEADER_NAME] = value
            added[HEADER_NAME] = value
        w3c = global_propagator_without_laminar()
        if w3c is not None:
            w3c.inject(_Carrier(headers, present, added), ctx, _ADD_MISSING)
        if target is not None and TRACEPARENT not in present and TRACEPARENT not in added:
            # The sampled flag travels beside the Laminar header, whatever the propagators.
            value = format_traceparent(trace.get_current_span(ctx).get_span_context())
            headers[TRACEPARENT] = value
            added[TRACEPARENT] = value

    def redirect_hop(self, added: Mapping[str, str], request: OutgoingRequest) -> None:
        """The call goes on to a new target (a redirect) with the same headers: keep the
        headers we `added` only if the new target may receive them."""
        if not added:
            return
        headers = request.headers
        if self.may_send(request._replace(present=headers)):
            for name, value in added.items():
                if name not in headers:
                    headers[name] = value
        else:
            _strip(headers, added)


def finish_or_end(call: Call, wrap: Callable[[], bool]) -> None:
    """After the inner send returned: let `wrap` arrange for the span to end when the
    response is closed; when it cannot (or raises), end the span now."""
    wrapped = False
    if call.span is not None:
        with _WRAPPING:
            wrapped = wrap()
    if not wrapped:
        call.end()
