"""`LaminarPathSpanProcessor`: Laminar's span path on every span inside a traced request.

Laminar draws its tree from `lmnr.span.path` / `lmnr.span.ids_path`. Spans that this package
opens carry them; this processor gives them to every other span started under one of those
(any tracer: a user's, a contrib instrumentation's), extending the parent's path, and copies
the parent's association properties (user id, session id, metadata) down, so a header
serialized from a grandchild span has the full path and the caller's user and session.

The middlewares and `continue_trace` add it to the SDK tracer provider they use, once (the
client hooks need not: a client span sets its own path, and its children are other
services' spans). Laminar's own provider is left alone: its span processor computes the
same attributes.
"""

from __future__ import annotations

import weakref
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace import TracerProvider as SDKTracerProvider
from opentelemetry.trace import TracerProvider

from ._guard import contained
from .codec import format_uuid
from .context import (
    ASSOCIATION_PREFIX,
    INSTRUMENTATION_NAME,
    PARENT_SPAN_IDS_PATH,
    PARENT_SPAN_PATH,
    SPAN_IDS_PATH,
    SPAN_PATH,
    attributes_of,
    laminar_paths,
)

__all__ = ["LaminarPathSpanProcessor", "ensure_path_processor"]

_ON_START: Final = contained("LaminarPathSpanProcessor.on_start")


class LaminarPathSpanProcessor(SpanProcessor):
    """Sets `lmnr.span.path`, `lmnr.span.ids_path` and the association properties on spans
    whose parent has a Laminar path (or that start with `lmnr.span.parent_path`)."""

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        # Spans this package opens set their own paths (a server span with its response,
        # see context.PathOwner): nothing to do, and the cheapest check first.
        with _ON_START:
            scope = span.instrumentation_scope
            if scope is not None and scope.name == INSTRUMENTATION_NAME:
                return
            self._on_start(span, parent_context)

    def _on_start(self, span: Span, parent_context: Context | None) -> None:
        own: Any = span.attributes or {}
        if SPAN_PATH in own:
            return
        parent_path = own.get(PARENT_SPAN_PATH)
        if parent_path is not None:
            parent_ids = own.get(PARENT_SPAN_IDS_PATH, ())
            inherited: Any = {}
        else:
            parent = trace.get_current_span(parent_context)
            inherited = attributes_of(parent)
            paths = laminar_paths(parent, inherited)
            if paths is None:
                return
            parent_path, parent_ids = paths
        updates: dict[str, Any] = {
            SPAN_PATH: (*parent_path, span.name),
            SPAN_IDS_PATH: (*parent_ids, format_uuid(span.get_span_context().span_id)),
        }
        for key, value in inherited.items():
            if key.startswith(ASSOCIATION_PREFIX) and key not in own:
                updates[key] = value
        span.set_attributes(updates)

    def on_end(self, span: ReadableSpan) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


_installed: weakref.WeakSet[SDKTracerProvider] = weakref.WeakSet()


def ensure_path_processor(provider: TracerProvider | None) -> None:
    """Add the processor to an SDK provider once (not to Laminar's, which has its own)."""
    if provider is None:
        provider = trace.get_tracer_provider()
    if not isinstance(provider, SDKTracerProvider) or provider in _installed:
        return
    _installed.add(provider)
    processors = getattr(provider._active_span_processor, "_span_processors", ())
    if any(type(p).__module__.startswith("lmnr.") for p in processors):
        return
    provider.add_span_processor(LaminarPathSpanProcessor())
