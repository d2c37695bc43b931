"""`LaminarSpanContext` <-> OpenTelemetry: parents, Laminar attributes, carriers.

The codec knows the wire; this module knows OpenTelemetry. Both the inbound middlewares and
the outbound hooks build on the functions here, and so do users with queues and databases:
`serialize_span_context` / `deserialize_span_context`, `inject` / `extract`, and
`continue_trace`.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any, Final, Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context, create_key
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    Tracer,
    TracerProvider,
    TraceState,
)
from opentelemetry.util.types import AttributeValue

from ._lmnr import active_bridge
from .codec import (
    HEADER_NAME,
    HEADER_NAMES_LOWER,
    LaminarSpanContext,
    format_uuid,
    thaw,
    trusted_context,
)
from .config import tolerant_options

__all__ = [
    "ASSOCIATION_PREFIX",
    "METADATA_PREFIX",
    "PARENT_SPAN_IDS_PATH",
    "PARENT_SPAN_PATH",
    "SPAN_IDS_PATH",
    "SPAN_PATH",
    "association_attributes",
    "continue_trace",
    "deserialize_span_context",
    "extract",
    "get_tracer",
    "inject",
    "laminar_paths",
    "parent_attributes",
    "remote_parent_context",
    "serialize_span_context",
    "set_path_attributes",
    "span_context_of",
    "warn_if_no_provider",
]

# Laminar's span attributes (lmnr.opentelemetry_lib.tracing.attributes).
SPAN_PATH: Final = "lmnr.span.path"
SPAN_IDS_PATH: Final = "lmnr.span.ids_path"
PARENT_SPAN_PATH: Final = "lmnr.span.parent_path"
PARENT_SPAN_IDS_PATH: Final = "lmnr.span.parent_ids_path"
ASSOCIATION_PREFIX: Final = "lmnr.association.properties."
USER_ID: Final = ASSOCIATION_PREFIX + "user_id"
SESSION_ID: Final = ASSOCIATION_PREFIX + "session_id"
TRACE_TYPE: Final = ASSOCIATION_PREFIX + "trace_type"
METADATA_PREFIX: Final = ASSOCIATION_PREFIX + "metadata."

INSTRUMENTATION_NAME: Final = "laminar_middleware"
# The inbound middlewares put the request's `ServerRequest` here while it runs: the spans
# this package creates or controls under it go to its tracer provider (Laminar's SDK has its
# own), so no exported span names a parent that went to another provider.
SERVER_REQUEST: Final = create_key("laminar_middleware.server-request")


class PathOwner(Protocol):
    """A live SERVER span of this package's middlewares: the one answer to "its Laminar paths
    now". Its name becomes `GET /route` only once the framework has matched the route, after
    the span started, and children, outbound headers and serialized contexts read the path
    before that; so they ask the owner, which names the span by route if it can, instead of
    reading attributes that are written once, with the response."""

    @property
    def span(self) -> Span: ...

    @property
    def provider(self) -> TracerProvider | None: ...

    def laminar_paths(self) -> tuple[tuple[str, ...], tuple[str, ...]]: ...


# span id -> the owner of that live server span, from its start to its end. Found by span
# rather than through the context, so a span handed to another thread in a context of its
# own (`trace.set_span_in_context(span)`) still answers.
_owners: dict[int, PathOwner] = {}
# Past this many open requests something never ended its spans: start again (the cost is
# only early answers; every span still writes its own paths when it ends).
_MAX_OWNERS: Final = 100_000
_SAMPLED: Final = TraceFlags(TraceFlags.SAMPLED)


def register_owner(span_id: int, owner: PathOwner) -> bool:
    """Make `owner` the one that answers for its span; False when the span has one already
    (an outer copy of the middleware owns it: the inner one must not take over)."""
    if span_id in _owners:
        return False
    if len(_owners) >= _MAX_OWNERS:
        _owners.clear()
    _owners[span_id] = owner
    return True


def forget_owner(span_id: int, owner: PathOwner) -> None:
    if _owners.get(span_id) is owner:
        del _owners[span_id]


# id(provider) -> (a weak reference to that provider, its tracer). The reference tells a
# live provider from a collected one whose id was reused, and drops the entry with it.
_tracers: dict[int, tuple[weakref.ref[TracerProvider], Tracer]] = {}


def get_tracer(tracer_provider: TracerProvider | None = None) -> Tracer:
    """This package's tracer for a provider (the global one when None), made once."""
    provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
    key = id(provider)
    cached = _tracers.get(key)
    if cached is not None and cached[0]() is provider:
        return cached[1]
    from . import __version__

    tracer = provider.get_tracer(INSTRUMENTATION_NAME, __version__)
    # A ProxyTracer (no global provider yet) must not be cached: it would stay a proxy.
    if type(tracer).__name__ != "ProxyTracer":
        try:
            ref = weakref.ref(provider, lambda ref: _forget_tracer(key, ref))
        except TypeError:  # not weakly referenceable: not cached
            return tracer
        _tracers[key] = (ref, tracer)
    return tracer


def request_provider(context: Context | None = None) -> TracerProvider | None:
    """The provider of the current request's server span, when it is not the global one."""
    owner: Any = otel_context.get_value(SERVER_REQUEST, context)
    return None if owner is None else owner.provider


_warned_no_provider = False
_warned_split = False


def warn_if_split_providers(provider: TracerProvider) -> None:
    """One WARNING per process when Laminar's provider is not the global one."""
    global _warned_split
    if _warned_split or provider is trace.get_tracer_provider():
        return
    _warned_split = True
    from ._guard import logger

    logger.warning(
        "laminar_middleware: Laminar's SDK has a tracer provider of its own, not the global "
        "one: this package's spans, FastAPI's and the client spans of a request go to "
        "Laminar's, but spans of other tracers (trace.get_tracer(...), other "
        "instrumentations) go to the global provider, and in Laminar their children lose "
        "their parent. To avoid it, let Laminar.initialize() set the global provider (call "
        "it before any other set-up, without set_global_tracer_provider=False), or give "
        "the other tracers Laminar's provider"
    )


def warn_if_no_provider(span: Span) -> None:
    """One WARNING per process when spans are dropped because no SDK provider is set.

    Only a span that does not record is looked at, so a configured process pays nothing
    past the first `is_recording()`."""
    global _warned_no_provider
    if _warned_no_provider or span.is_recording():
        return
    provider = trace.get_tracer_provider()
    if type(provider).__name__ in ("ProxyTracerProvider", "NoOpTracerProvider"):
        _warned_no_provider = True
        from ._guard import logger

        logger.warning(
            "laminar_middleware: no OpenTelemetry SDK tracer provider is set, so this "
            "package's spans are dropped (the Laminar header is still read and sent, so the "
            "trace stays connected downstream). Set one up: see 'Sending the spans' in the "
            "laminar-middleware README"
        )


def _forget_tracer(key: int, ref: weakref.ref[TracerProvider]) -> None:
    cached = _tracers.get(key)
    if cached is not None and cached[0] is ref:
        del _tracers[key]


class _RemoteParent(NonRecordingSpan):
    """The caller's span as a parent: non-recording and remote, yet still answering with
    the caller's Laminar paths and properties as its attributes. So a span that any layer
    starts under it (a contrib consumer's, a user's) continues the caller's Laminar path
    through `LaminarPathSpanProcessor`, and a header written under it carries them."""

    __slots__ = ("laminar",)
    laminar: LaminarSpanContext

    @property
    def attributes(self) -> dict[str, AttributeValue]:
        remote = self.laminar
        attributes = association_attributes(remote)
        if remote.span_path:
            attributes[SPAN_PATH] = remote.span_path
            attributes[SPAN_IDS_PATH] = remote.span_ids_path
        return attributes


def remote_parent_context(
    remote: LaminarSpanContext,
    context: Context | None = None,
    flags: TraceFlags = _SAMPLED,
    trace_state: TraceState | None = None,
) -> Context:
    """A context whose current span is the remote one: non-recording, remote, and carrying
    the caller's Laminar paths and properties (see `_RemoteParent`). Sampled unless a
    `traceparent` beside the header said otherwise (`_w3c.sampled_parent`)."""
    span_context = SpanContext(
        trace_id=remote.trace_id,
        span_id=remote.span_id,
        is_remote=True,
        trace_flags=flags,
        trace_state=trace_state,
    )
    span = _RemoteParent(span_context)
    span.laminar = remote
    return trace.set_span_in_context(span, context)


def parent_attributes(remote: LaminarSpanContext) -> dict[str, AttributeValue]:
    """Start attributes of a span continuing `remote`, for Laminar's SDK only: its span
    processor computes the span's own paths from them when the span starts. Without the
    SDK nothing reads them (the span's own paths are written in full) and the OpenTelemetry
    SDK's check of two more tuples is one of a server span's larger costs, so the callers
    set them only when Laminar's SDK is active (`_lmnr.active_bridge()`)."""
    if not remote.span_path:
        return {}
    return {PARENT_SPAN_PATH: remote.span_path, PARENT_SPAN_IDS_PATH: remote.span_ids_path}


def association_attributes(remote: LaminarSpanContext) -> dict[str, AttributeValue]:
    """User id, session id, trace type and metadata as Laminar's span attributes."""
    attributes: dict[str, AttributeValue] = {}
    if remote.user_id is not None:
        attributes[USER_ID] = remote.user_id
    if remote.session_id is not None:
        attributes[SESSION_ID] = remote.session_id
    if remote.trace_type is not None:
        attributes[TRACE_TYPE] = remote.trace_type
    for key, value in remote.metadata.items():
        attributes[METADATA_PREFIX + key] = _metadata_attribute(value)
    return attributes


def _int64(value: Any) -> bool:
    # OTLP carries 64-bit integers: a bigger one (JSON has no limit) fails to encode, with an
    # exporter error line per span, so it goes as JSON like any other non-OpenTelemetry value.
    return type(value) is not int or -(1 << 63) <= value < 1 << 63


def _metadata_attribute(value: Any) -> AttributeValue:
    # Laminar's SDK stores OpenTelemetry-typed values as they are and JSON for the rest.
    if isinstance(value, (str, bool, int, float)) and _int64(value):
        return value
    if isinstance(value, tuple) and value:
        kind = type(value[0])
        if kind in (str, bool, int, float) and all(type(v) is kind and _int64(v) for v in value):
            return value
    return json.dumps(thaw(value), separators=(",", ":"))


def set_path_attributes(
    span: Span, name: str, parent_path: Sequence[str] = (), parent_ids_path: Sequence[str] = ()
) -> None:
    """This span's Laminar path: the parent's path plus its own name and id."""
    span_id = format_uuid(span.get_span_context().span_id)
    span.set_attributes(
        {
            SPAN_PATH: (*parent_path, name),
            SPAN_IDS_PATH: (*parent_ids_path, span_id),
        }
    )


def laminar_paths(
    span: Span, attributes: Mapping[str, Any]
) -> tuple[Sequence[str], Sequence[str]] | None:
    """A span's Laminar path and ids path (`attributes` are its attributes), or None.

    A live server span of this package's middlewares answers through its owner (see
    `PathOwner`); any other span has them in its attributes.
    """
    owner = _owners.get(span.get_span_context().span_id)
    if owner is not None and owner.span is span:
        return owner.laminar_paths()
    path = attributes.get(SPAN_PATH)
    if path is None:
        return None
    return path, attributes.get(SPAN_IDS_PATH, ())


def attributes_of(span: Span) -> Mapping[str, Any]:
    """A span's attributes as a plain mapping, cheap to read many times; {} if it has none."""
    attributes: Any = getattr(span, "attributes", None)
    if not attributes:
        return {}
    # The SDK's live attributes lock and look up every key when iterated; copy() is one
    # C-level dict copy (BoundedAttributes and MappingProxyType both have it).
    copy = getattr(attributes, "copy", None)
    try:
        snapshot = copy() if copy is not None else None
    except Exception:
        snapshot = None
    return snapshot if isinstance(snapshot, dict) else dict(attributes)


def span_context_of(span: Span | None = None) -> LaminarSpanContext | None:
    """The `LaminarSpanContext` of a span (the current one when None); None if invalid."""
    if span is None:
        span = trace.get_current_span()
    span_context = span.get_span_context()
    if not span_context.is_valid:
        return None
    attributes = attributes_of(span)
    if not attributes:
        return LaminarSpanContext(span_context.trace_id, span_context.span_id)
    metadata: dict[str, Any] = {}
    for key, value in attributes.items():
        if key.startswith(METADATA_PREFIX):
            metadata[key[len(METADATA_PREFIX) :]] = _metadata_value(value)
    user_id = attributes.get(USER_ID)
    session_id = attributes.get(SESSION_ID)
    span_path, span_ids_path = laminar_paths(span, attributes) or ((), ())
    return LaminarSpanContext(
        trace_id=span_context.trace_id,
        span_id=span_context.span_id,
        span_path=tuple(span_path),
        span_ids_path=tuple(span_ids_path),
        user_id=None if user_id is None else str(user_id),
        session_id=None if session_id is None else str(session_id),
        trace_type=attributes.get(TRACE_TYPE),
        metadata=metadata,
    )


def new_span_context(
    span: Span,
    parent: Span,
    parent_span_context: SpanContext,
    parent_paths: tuple[Sequence[str], Sequence[str]] | None,
    associated: bool,
) -> LaminarSpanContext | None:
    """What a header names for a span just started under `parent`, its Laminar path (the
    parent's plus its name) already a start attribute: its ids path needs the span's id, so
    it is set here, and `associated` says whether the span took association properties.

    Laminar's own span processor, on its provider, has already set both paths (also under a
    parent without a Laminar path) and may have added association properties from its own
    context: while its SDK is active the header is read from the span's attributes.
    """

    span_context = span.get_span_context()
    if not span_context.is_valid or span_context.span_id == parent_span_context.span_id:
        # No SDK (a no-op tracer hands back the parent's context): name the parent.
        return span_context_of(parent)
    own: Mapping[str, Any] | None = getattr(span, "attributes", None)
    if own is None:
        return span_context_of(span)
    span_path: Sequence[str] = own.get(SPAN_PATH, ())
    span_ids_path: Sequence[str] = own.get(SPAN_IDS_PATH, ())
    if parent_paths is not None and not span_ids_path:
        span_ids_path = (*parent_paths[1], format_uuid(span_context.span_id))
        span.set_attribute(SPAN_IDS_PATH, span_ids_path)
    if associated or active_bridge() is not None:
        return span_context_of(span)
    # Nothing but ids and paths to carry: no need to scan the attributes.
    return trusted_context(
        span_context.trace_id, span_context.span_id, tuple(span_path), tuple(span_ids_path)
    )


def _metadata_value(value: Any) -> Any:
    # The reverse of _metadata_attribute. Laminar's SDK JSON-decodes every string, so a
    # caller's "123" would travel on as 123; only what was stored as JSON (objects and
    # lists, which OpenTelemetry attributes cannot hold) is decoded here.
    if isinstance(value, str) and value[:1] in ("{", "["):
        try:
            return json.loads(value, parse_constant=_no_constants)
        except (ValueError, RecursionError):
            return value
    if isinstance(value, tuple):
        return list(value)
    return value


def _no_constants(name: str) -> Any:
    raise ValueError(name)


def serialize_span_context(span: Span | None = None) -> str | None:
    """The header value for a span (the current one when None); None without a valid span."""
    from ._guard import contained

    with contained("serialize_span_context"):
        context = span_context_of(span)
        return None if context is None else context.serialize()
    return None


def deserialize_span_context(
    value: str | bytes | LaminarSpanContext | None,
) -> LaminarSpanContext | None:
    """A header value as a `LaminarSpanContext`, or None; never raises."""
    if isinstance(value, LaminarSpanContext):
        return value if value.is_valid else None
    return LaminarSpanContext.parse(value)


@tolerant_options
@contextmanager
def continue_trace(
    value: str | bytes | LaminarSpanContext | None,
    name: str,
    *,
    tracer_provider: TracerProvider | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, AttributeValue] | None = None,
    links: Sequence[Link] | None = None,
    start_time: int | None = None,
    record_exception: bool = True,
    set_status_on_exception: bool = True,
    end_on_exit: bool = True,
) -> Iterator[Span]:
    """Start and activate a span that continues a serialized context (a queue message, a
    stored workflow); a new trace when the value is missing or invalid. Yields the span.

    The keyword options are those of `Tracer.start_as_current_span`. A bad one (an unknown
    name, a value of the wrong type) is logged once and left out: the span still starts."""
    from ._guard import contained
    from ._lmnr import active_bridge
    from .config import checked_flag, checked_provider
    from .processor import ensure_path_processor

    span_kwargs = _span_options(kind, links, start_time)
    record_exception = checked_flag("record_exception", record_exception, True)
    set_status_on_exception = checked_flag("set_status_on_exception", set_status_on_exception, True)
    end_on_exit = checked_flag("end_on_exit", end_on_exit, True)
    tracer_provider = checked_provider(tracer_provider)
    remote = deserialize_span_context(value)
    bridge = active_bridge()
    start_attributes: dict[str, AttributeValue] = _attributes_option(attributes)
    if remote is not None:
        parent = remote_parent_context(remote, Context())
        if bridge is not None:
            start_attributes.update(parent_attributes(remote))
        start_attributes.update(association_attributes(remote))
        parent_path, parent_ids_path = remote.span_path, remote.span_ids_path
    else:
        parent = Context()
        parent_path, parent_ids_path = (), ()

    # Fail open: a span processor or exporter that raises must not reach the worker's code
    # (nor replace an exception of its own). Each step is contained on its own, so the
    # span still ends when attaching it failed.
    if tracer_provider is None and bridge is not None:
        tracer_provider = bridge.tracer_provider()
    with contained("adding the Laminar path processor"):
        ensure_path_processor(tracer_provider)
    span: Span = trace.INVALID_SPAN
    with contained("continue_trace: starting the span"):
        span = get_tracer(tracer_provider).start_span(
            str(name), parent, attributes=start_attributes, **span_kwargs
        )
        set_path_attributes(span, str(name), parent_path, parent_ids_path)
    token: object = None
    bridge_token: object = None
    with contained("continue_trace: attaching"):
        token = otel_context.attach(trace.set_span_in_context(span))
        if bridge is not None and span is not trace.INVALID_SPAN:
            bridge_token = bridge.attach(span, remote)
    try:
        yield span
    except BaseException as exc:
        if isinstance(exc, Exception):
            if record_exception:
                with contained("continue_trace: recording the exception"):
                    span.record_exception(exc)
            if set_status_on_exception:
                with contained("continue_trace: status"):
                    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        if bridge_token is not None and bridge is not None:
            with contained("continue_trace: detaching from Laminar"):
                bridge.detach(bridge_token)  # type: ignore[arg-type]
        if token is not None:
            with contained("continue_trace: detaching"):
                otel_context.detach(token)  # type: ignore[arg-type]
        if end_on_exit:
            with contained("continue_trace: ending the span"):
                span.end()


def _span_options(kind: object, links: object, start_time: object) -> dict[str, Any]:
    from ._guard import log_bad_setting

    chosen: dict[str, Any] = {}
    if isinstance(kind, SpanKind):
        chosen["kind"] = kind
    else:
        log_bad_setting("continue_trace(kind)", kind, "a SpanKind", "SpanKind.INTERNAL")
    if links is not None:
        if isinstance(links, Sequence) and all(isinstance(link, Link) for link in links):
            chosen["links"] = links
        else:
            log_bad_setting("continue_trace(links)", links, "a sequence of Links", "no links")
    if start_time is not None:
        if isinstance(start_time, int) and not isinstance(start_time, bool):
            chosen["start_time"] = start_time
        else:
            log_bad_setting("continue_trace(start_time)", start_time, "nanoseconds", "now")
    return chosen


def _attributes_option(attributes: object) -> dict[str, AttributeValue]:
    if attributes is None:
        return {}
    if isinstance(attributes, Mapping):
        return dict(attributes)
    from ._guard import log_bad_setting

    log_bad_setting("continue_trace(attributes)", attributes, "a mapping", "no attributes")
    return {}


def inject(
    carrier: MutableMapping[str, str], span: Span | None = None, *, overwrite: bool = False
) -> None:
    """Put the current (or given) span's context into a message or headers mapping.

    A value already there (either name, any case) is left alone, unless `overwrite`: then
    it is replaced, as a retried message copied from the running one needs. Without a valid
    span nothing is added (nor removed).
    """
    present = [k for k in carrier if isinstance(k, str) and k.lower() in HEADER_NAMES_LOWER]
    if present and not overwrite:
        return
    value = serialize_span_context(span)
    if value is not None:
        for key in present:
            del carrier[key]
        carrier[HEADER_NAME] = value


def extract(carrier: Mapping[str, Any]) -> LaminarSpanContext | None:
    """The context in a message or headers mapping (either header name, any case), or None.

    Two different values are ambiguous and count as none.
    """
    found: Any = None
    for key, value in carrier.items():
        if isinstance(key, str) and key.lower() in HEADER_NAMES_LOWER:
            if found is not None and value != found:
                return None
            found = value
    return deserialize_span_context(found)
