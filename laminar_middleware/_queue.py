"""What the queue integrations (Celery, RQ, Dramatiq) do per message, written once.

An engine's adapter hands `QueueTracer` one `OutgoingMessage` when a message is published
and one `IncomingMessage` when a worker runs it, read from that engine's shapes.

- **Publish**, while a valid span is current: a PRODUCER span `publish <task>`, child of
  the current span, and the message's headers naming it: Laminar's header and whatever the
  global propagator writes (W3C `traceparent`). A value already in the headers was copied
  from another message (a retry copies the running task's headers), so it is replaced,
  never kept. Outside any span: no span and no header, as on HTTP. When another layer (the
  contrib Celery instrumentation) made the publish span, the headers name that one instead.
- **Consume**: a CONSUMER span `run <task>` continuing the headers' context under the trust
  policy (Laminar's header first, else the global propagator's), with the caller's Laminar
  paths and association properties; the adapter makes it current while the task runs. When
  another layer made the consume span, that span gets Laminar's attributes instead.

The context travels only in headers (message headers, job metadata), never in a task's
arguments: those show up in worker logs and task results.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any, Final, NamedTuple

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import default_getter
from opentelemetry.semconv._incubating.attributes.messaging_attributes import (
    MESSAGING_DESTINATION_NAME,
    MESSAGING_MESSAGE_ID,
    MESSAGING_OPERATION_TYPE,
    MESSAGING_SYSTEM,
)
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer, TracerProvider
from opentelemetry.util.types import AttributeValue

from ._guard import contained
from ._lmnr import LaminarBridge, active_bridge
from ._server import laminar_remote, remote_span_context
from ._w3c import TRACEPARENT, TRACESTATE, format_traceparent, sampled_parent
from .codec import HEADER_NAME, HEADER_NAMES_LOWER, LaminarSpanContext, format_uuid
from .config import TrustOption, TrustPolicy, checked_provider
from .context import (
    ASSOCIATION_PREFIX,
    INSTRUMENTATION_NAME,
    SPAN_IDS_PATH,
    SPAN_PATH,
    association_attributes,
    attributes_of,
    get_tracer,
    laminar_paths,
    new_span_context,
    parent_attributes,
    remote_parent_context,
    request_provider,
    span_context_of,
)
from .processor import ensure_path_processor
from .propagator import global_propagator_without_laminar, propagator_fields

__all__ = ["ConsumerRun", "IncomingMessage", "OutgoingMessage", "QueueTracer", "retry_count"]

_ROOT: Final = Context()
_INJECTING: Final = contained("the global OpenTelemetry propagator's inject")
_SERIALIZING: Final = contained("the message's Laminar header")
_EXTRACTING: Final = contained("the global OpenTelemetry propagator's extract")
_ADDING_PROCESSOR: Final = contained("adding the Laminar path processor")


class OutgoingMessage(NamedTuple):
    """A message about to be published, as an engine's adapter read it."""

    task: str
    destination: str | None  # the queue
    message_id: str | None
    headers: MutableMapping[str, Any]  # where the worker will read the context


class IncomingMessage(NamedTuple):
    """A message a worker is about to run."""

    task: str
    destination: str | None
    message_id: str | None
    headers: Mapping[str, Any]
    attributes: Mapping[str, AttributeValue]  # the engine's own (the retry count)


def _is_other_layers(span: Span, kind: SpanKind) -> bool:
    scope = getattr(span, "instrumentation_scope", None)
    return (
        span.is_recording()
        and getattr(span, "kind", None) is kind
        and getattr(scope, "name", None) != INSTRUMENTATION_NAME
    )


class QueueTracer:
    """Everything per message that the queue integrations share, compiled once.

    Options: `tracer_provider` (the global one when None; Laminar's when its SDK is
    initialized and none was given) and `trust` (`"continue"`, `"restart"`, `"ignore"`, a
    callable given the message's headers, or None for `LAMINAR_TRUST`).
    """

    def __init__(
        self,
        system: str,
        *,
        tracer_provider: TracerProvider | None = None,
        trust: TrustOption | TrustPolicy | None = None,
    ) -> None:
        self.system = system
        self._provider = checked_provider(tracer_provider)
        self.trust = trust if isinstance(trust, TrustPolicy) else TrustPolicy(trust)
        # The provider last given the path processor: asked on every message.
        self._ready: TracerProvider | None = None

    def _tracer(
        self, bridge: LaminarBridge | None, context: Context | None
    ) -> tuple[Tracer, TracerProvider | None]:
        """The tracer for a span, and its provider (None: the global one)."""
        provider = self._provider
        if provider is None:
            # Where the current request's spans go, else Laminar's SDK's: a span's parent
            # must be exported beside it.
            provider = request_provider(context)
            if provider is None and bridge is not None:
                provider = bridge.tracer_provider()
        resolved = provider if provider is not None else trace.get_tracer_provider()
        if resolved is not self._ready:
            with _ADDING_PROCESSOR:
                ensure_path_processor(resolved)
            self._ready = resolved
        return get_tracer(provider), provider

    def publish(self, message: OutgoingMessage) -> Span | None:
        """Write the message's headers, under a PRODUCER span of ours unless another layer
        made one; returns the span to end once the message is sent, or None."""
        current = trace.get_current_span()
        if not current.get_span_context().is_valid:
            return None
        if _is_other_layers(current, SpanKind.PRODUCER):
            # Its Laminar path came from the path processor, as for any span under ours.
            self._tracer(None, None)
            _write_headers(message.headers, current, _header_value(span_context_of, current))
            return None
        name = f"publish {message.task}"
        attributes = self._attributes(message, "send")
        inherited = attributes_of(current)
        associated = False
        for key, value in inherited.items():
            if key.startswith(ASSOCIATION_PREFIX):
                attributes[key] = value
                associated = True
        # A publish outside any Laminar path starts one: it is where the task's trace is.
        paths = laminar_paths(current, inherited) or ((), ())
        attributes[SPAN_PATH] = (*paths[0], name)
        context = otel_context.get_current()
        tracer, _ = self._tracer(active_bridge(), context)
        span = tracer.start_span(name, context, SpanKind.PRODUCER, attributes)
        try:
            value = _header_value(
                new_span_context, span, current, current.get_span_context(), paths, associated
            )
            _write_headers(message.headers, span, value)
        except BaseException:
            span.end()
            raise
        return span

    def consume(self, message: IncomingMessage) -> ConsumerRun:
        """The CONSUMER span of a message (or another layer's, enriched), not yet current."""
        headers = message.headers
        values = [v for k, v in headers.items() if _is_laminar_key(k) and v]
        remote = laminar_remote(values) if values else None
        current = trace.get_current_span()
        bridge = active_bridge()
        if _is_other_layers(current, SpanKind.CONSUMER):
            return self._enrich(current, remote, headers, bridge)
        name = f"run {message.task}"
        attributes = self._attributes(message, "process")
        attributes.update(message.attributes)
        parent, links, continued = self._parent(remote, headers)
        parent_path: Sequence[str] = ()
        parent_ids: Sequence[str] = ()
        if continued is not None:
            if bridge is not None:
                attributes.update(parent_attributes(continued))
            attributes.update(association_attributes(continued))
            parent_path, parent_ids = continued.span_path, continued.span_ids_path
        elif parent is None:
            # No context in the message: run in the current one (an eager `apply()`, a
            # synchronous queue), where the task's caller is.
            parent = otel_context.get_current()
            inherited = attributes_of(current)
            for key, value in inherited.items():
                if key.startswith(ASSOCIATION_PREFIX):
                    attributes[key] = value
            parent_path, parent_ids = laminar_paths(current, inherited) or ((), ())
        attributes[SPAN_PATH] = (*parent_path, name)
        tracer, provider = self._tracer(bridge, parent)
        span = tracer.start_span(name, parent, SpanKind.CONSUMER, attributes, links)
        try:
            ids = (*parent_ids, format_uuid(span.get_span_context().span_id))
            span.set_attribute(SPAN_IDS_PATH, ids)
        except BaseException:
            span.end()
            raise
        return ConsumerRun(span, continued, bridge, owned=True, provider=provider)

    def _attributes(self, message: OutgoingMessage | IncomingMessage, operation: str) -> Any:
        attributes: dict[str, AttributeValue] = {
            MESSAGING_SYSTEM: self.system,
            MESSAGING_OPERATION_TYPE: operation,
        }
        if message.destination:
            attributes[MESSAGING_DESTINATION_NAME] = message.destination
        if message.message_id:
            attributes[MESSAGING_MESSAGE_ID] = message.message_id
        return attributes

    def _parent(
        self, remote: LaminarSpanContext | None, headers: Mapping[str, Any]
    ) -> tuple[Context | None, list[Link] | None, LaminarSpanContext | None]:
        """The span's parent context (None: the message carries none), its links, and the
        Laminar context it continues. A context the trust policy refuses is a new trace."""
        if remote is not None:
            decision = self.trust.decide(headers)
            if decision == "continue":
                flags, state = sampled_parent(
                    remote.trace_id,
                    remote.span_id,
                    _values(headers, TRACEPARENT),
                    lambda: _values(headers, TRACESTATE),
                )
                return remote_parent_context(remote, _ROOT, flags, state), None, remote
            if decision == "restart":
                return _ROOT, [Link(remote_span_context(remote))], None
            return _ROOT, None, None
        extracted = _extract(headers)
        span_context = trace.get_current_span(extracted).get_span_context() if extracted else None
        if extracted is None or span_context is None or not span_context.is_valid:
            return None, None, None
        decision = self.trust.decide(headers)
        if decision == "continue":
            return extracted, None, None
        if decision == "restart":
            return _ROOT, [Link(span_context)], None
        return _ROOT, None, None

    def _enrich(
        self,
        span: Span,
        remote: LaminarSpanContext | None,
        headers: Mapping[str, Any],
        bridge: LaminarBridge | None,
    ) -> ConsumerRun:
        """Another layer's CONSUMER span: the caller's Laminar path and properties go on it
        when it is a child of the caller's Laminar context and the policy continues it."""
        parent = getattr(span, "parent", None)
        if (
            remote is None
            or parent is None
            or parent.span_id != remote.span_id
            or parent.trace_id != remote.trace_id
            or self.trust.decide(headers) != "continue"
        ):
            return ConsumerRun(span, None, bridge, owned=False)
        attributes = association_attributes(remote)
        name = getattr(span, "name", None) or "run"
        attributes[SPAN_PATH] = (*remote.span_path, name)
        attributes[SPAN_IDS_PATH] = (
            *remote.span_ids_path,
            format_uuid(span.get_span_context().span_id),
        )
        span.set_attributes(attributes)
        return ConsumerRun(span, remote, bridge, owned=False)


def retry_count(value: object) -> int:
    """A retry count read from a message, fit for an attribute: a hostile int beyond 64
    bits would fail the span's export, anything else is 0."""
    return min(value, 1 << 31) if type(value) is int and value >= 0 else 0


_NAME_LENGTHS: Final = frozenset(len(name) for name in HEADER_NAMES_LOWER)


def _is_laminar_key(key: object) -> bool:
    # A message has a score of headers: the length rules out nearly all before lower().
    return isinstance(key, str) and len(key) in _NAME_LENGTHS and key.lower() in HEADER_NAMES_LOWER


def _values(headers: Mapping[str, Any], name: str) -> list[Any]:
    # The exact key, as OpenTelemetry's default getter reads a message's headers.
    value = headers.get(name)
    return [] if value is None else [value]


def _header_value(make: Callable[..., LaminarSpanContext | None], *args: Any) -> str | None:
    # The span's attributes are anyone's (hostile metadata): a failure means no Laminar
    # header, while the stale one is still removed and the W3C headers still written.
    with _SERIALIZING:
        target = make(*args)
        return None if target is None else target.serialize()
    return None


def _write_headers(headers: MutableMapping[str, Any], span: Span, value: str | None) -> None:
    # Copied from another message (a retry copies the running task's headers), a value
    # already there is stale: replaced, never kept, and the W3C fields would pile up or win.
    for key in [k for k in headers if _is_laminar_key(k)]:
        del headers[key]
    if value is not None:
        headers[HEADER_NAME] = value
    textmap = global_propagator_without_laminar()
    with _INJECTING:
        for field in (TRACEPARENT, *propagator_fields(textmap)):
            headers.pop(field, None)
        if textmap is not None:
            textmap.inject(headers, trace.set_span_in_context(span))
        if TRACEPARENT not in headers:
            # The sampled flag travels beside the Laminar header, whatever the propagators.
            headers[TRACEPARENT] = format_traceparent(span.get_span_context())


def _extract(headers: Mapping[str, Any]) -> Context | None:
    textmap = global_propagator_without_laminar()
    if textmap is None:
        return None
    with _EXTRACTING:
        return textmap.extract(headers, Context(), default_getter)
    return None


class ConsumerRun:
    """One run of a task: its CONSUMER span, current while the task body runs."""

    __slots__ = ("_bridge", "_remote", "_tokens", "owned", "provider", "span")

    def __init__(
        self,
        span: Span,
        remote: LaminarSpanContext | None,
        bridge: LaminarBridge | None,
        *,
        owned: bool,
        provider: TracerProvider | None = None,
    ) -> None:
        self.span = span
        # Where the span goes (None: the global provider), for a process that must flush.
        self.provider = provider
        self._remote = remote
        self._bridge = bridge
        # False: another layer's span, which that layer makes current, ends and marks.
        self.owned = owned
        self._tokens: tuple[object, object] | None = None

    def attach(self) -> None:
        if not self.owned:
            return
        token = otel_context.attach(trace.set_span_in_context(self.span))
        bridge_token: object = None
        if self._bridge is not None:
            with contained("attaching the task's span to Laminar's context"):
                bridge_token = self._bridge.attach(self.span, self._remote)
        self._tokens = (token, bridge_token)

    def fail(self, exc: BaseException) -> None:
        """The task failed (not a retry, ignore or reject: the adapter tells)."""
        if not self.owned:
            return
        self.span.record_exception(exc, escaped=True)
        self.span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))

    def abandon(self) -> None:
        """End the span without detaching: for a run whose end never came, from a thread
        that is not the run's own (its context is not this thread's to change)."""
        self._tokens = None
        if self.owned:
            self.span.end()

    def end(self) -> None:
        tokens, self._tokens = self._tokens, None
        if tokens is not None:
            token, bridge_token = tokens
            if bridge_token is not None and self._bridge is not None:
                with contained("detaching the task's span from Laminar's context"):
                    self._bridge.detach(bridge_token)  # type: ignore[arg-type]
            otel_context.detach(token)  # type: ignore[arg-type]
        if self.owned:
            self.span.end()
