"""The bridge to Laminar's Python SDK (`lmnr`), used only when it is imported and initialized.

`lmnr` keeps its own OpenTelemetry context in a ContextVar of its own: `@observe` takes its
parent from there, not from OpenTelemetry's global context, and exports through its own
tracer provider. So a span of ours must be created on Laminar's provider and made current
in Laminar's context as well, or `@observe` spans inside a request start traces of their own.
Nothing here imports `lmnr`: it looks in `sys.modules`, so a process without the SDK pays a
dictionary lookup.
"""

from __future__ import annotations

import sys
from contextvars import Token
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context, set_value
from opentelemetry.trace import Span, TracerProvider

from .codec import LaminarSpanContext

__all__ = ["LaminarBridge", "active_bridge"]


class LaminarBridge:
    """What the package needs from an initialized `lmnr`: its provider and its context."""

    def __init__(self, sdk_context: Any, tracer_module: Any) -> None:
        self._sdk_context = sdk_context
        self._tracer_module = tracer_module

    def tracer_provider(self) -> TracerProvider:
        provider: TracerProvider = self._tracer_module.get_laminar_tracer_provider()
        return provider

    def attach(self, span: Span, remote: LaminarSpanContext | None) -> Token[Context]:
        """Make `span` current in Laminar's context; carry the caller's association
        properties there too, so Laminar's span processor stamps them on `@observe` spans."""
        sdk = self._sdk_context
        context = trace.set_span_in_context(span, sdk.get_current_context())
        if remote is not None:
            if remote.user_id is not None:
                context = set_value(sdk.CONTEXT_USER_ID_KEY, remote.user_id, context)
            if remote.session_id is not None:
                context = set_value(sdk.CONTEXT_SESSION_ID_KEY, remote.session_id, context)
            if remote.trace_type is not None:
                context = set_value(sdk.CONTEXT_TRACE_TYPE_KEY, remote.trace_type, context)
            if remote.metadata:
                from .codec import thaw

                context = set_value(sdk.CONTEXT_METADATA_KEY, thaw(remote.metadata), context)
        token: Token[Context] = sdk.attach_context(context)
        return token

    def detach(self, token: Token[Context]) -> None:
        self._sdk_context.detach_context(token)


_bridge: LaminarBridge | None = None


def active_bridge() -> LaminarBridge | None:
    """The bridge when `lmnr` is imported and `Laminar.is_initialized()`, else None."""
    global _bridge
    lmnr = sys.modules.get("lmnr")
    if lmnr is None:
        return None
    try:
        if not lmnr.Laminar.is_initialized():
            return None
        if _bridge is None:
            from lmnr.opentelemetry_lib.tracing import context as sdk_context
            from lmnr.opentelemetry_lib.tracing import tracer as tracer_module

            _bridge = LaminarBridge(sdk_context, tracer_module)
    except Exception:
        # An lmnr release that moved these names: behave as without the SDK.
        return None
    return _bridge
