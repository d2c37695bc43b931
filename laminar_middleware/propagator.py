"""`LaminarPropagator`: the header as an OpenTelemetry `TextMapPropagator`.

With `OTEL_PROPAGATORS=tracecontext,baggage,laminar` every OpenTelemetry instrumentation
(contrib clients and servers, FastAPI's own tracing) carries and reads the Laminar header.
This module is loaded by `opentelemetry.propagate` while that module is still importing
(entry-point loading), so nothing in this package imports `opentelemetry.propagate` at
import time: the global propagator is looked up when first needed. Otherwise
`import laminar_middleware` under that variable would import this module in the middle of
its own import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ._guard import contained, log_bad_header
from ._w3c import TRACEPARENT, TRACESTATE, StrictTraceContext, sampled_parent
from .codec import HEADER_NAME, HEADER_NAME_ALIAS, HEADER_NAMES_LOWER, parse_with_reason
from .config import TrustOption, TrustPolicy
from .context import remote_parent_context, span_context_of
from .processor import ensure_path_processor

__all__ = ["LaminarPropagator", "global_propagator_without_laminar"]

# Getters differ: some match names exactly (plain dicts), some case-insensitively.
_NAMES = (HEADER_NAME, HEADER_NAME.lower(), HEADER_NAME_ALIAS)
_EXTRACTING: Final = contained("LaminarPropagator.extract")
_INJECTING: Final = contained("LaminarPropagator.inject")


class LaminarPropagator(TextMapPropagator):
    """Reads and writes `X-Laminar-Span-Context` (and reads `laminar-span-context`).

    `trust` defaults to the `LAMINAR_TRUST` variable: under `restart` or `ignore` extract
    gives no Laminar parent, since a layer that extracts through this propagator cannot
    link or drop the context itself.
    """

    def __init__(self, trust: TrustOption | None = None) -> None:
        self._trust_option = trust
        self._trust: TrustPolicy | None = None

    @property
    def trust(self) -> TrustPolicy:
        # Read at the first extract, not when built: `opentelemetry-instrument` builds the
        # global propagators in its launcher process too, which would report a bad
        # `LAMINAR_TRUST` a second time before the app's own process starts.
        trust = self._trust
        if trust is None:
            trust = self._trust = TrustPolicy(self._trust_option)
        return trust

    def extract(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        getter: Getter[CarrierT] = default_getter,
    ) -> Context:
        if context is None:
            context = Context()
        with _EXTRACTING:
            return self._extract(carrier, context, getter)
        return context

    def _extract(self, carrier: Any, context: Context, getter: Getter[Any]) -> Context:
        if self.trust.decide(carrier) != "continue":
            # The policy covers whichever remote context was found: a W3C parent that a
            # propagator before this one extracted is dropped too (list `laminar` last).
            if trace.get_current_span(context).get_span_context().is_remote:
                return trace.set_span_in_context(trace.INVALID_SPAN, context)
            return context
        values: set[str] = set()
        for name in _NAMES:
            found = getter.get(carrier, name)
            if found:
                values.update(found)
        if len(values) != 1:
            return context
        (value,) = values
        remote, reason = parse_with_reason(value)
        if remote is None:
            if reason:
                log_bad_header(reason, value)
            return context
        # Whatever layer starts a span under this context (a contrib consumer) gets the
        # caller's path through the path processor, on the global provider it uses.
        ensure_path_processor(None)
        flags, state = sampled_parent(
            remote.trace_id,
            remote.span_id,
            getter.get(carrier, TRACEPARENT),
            lambda: getter.get(carrier, TRACESTATE),
        )
        return remote_parent_context(remote, context, flags, state)

    def inject(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        setter: Setter[CarrierT] = default_setter,
    ) -> None:
        with _INJECTING:
            self._inject(carrier, context, setter)

    def _inject(self, carrier: Any, context: Context | None, setter: Setter[Any]) -> None:
        # A header the caller set (either name, any case) is kept, never doubled.
        if isinstance(carrier, Mapping) and any(
            isinstance(key, str) and key.lower() in HEADER_NAMES_LOWER for key in carrier
        ):
            return
        remote = span_context_of(trace.get_current_span(context))
        if remote is not None:
            setter.set(carrier, HEADER_NAME, remote.serialize())

    @property
    def fields(self) -> set[str]:
        return {HEADER_NAME}


_filtered: tuple[object, TextMapPropagator | None] = (None, None)


def global_propagator_without_laminar() -> TextMapPropagator | None:
    """The global propagator minus `LaminarPropagator`: what the middlewares and hooks use
    for W3C and other headers, since they read and write the Laminar header themselves
    (so it is sent once and a refused one is not parsed twice), with OpenTelemetry's W3C
    propagator replaced by the strict one (`_w3c`). Recomputed only when the global
    propagator is replaced; None when nothing is left."""
    global _filtered
    from opentelemetry.propagate import get_global_textmap  # late: see the module docstring

    textmap = get_global_textmap()
    seen, filtered = _filtered
    if seen is textmap:
        return filtered
    filtered = _without_laminar(textmap)
    _filtered = (textmap, filtered)
    return filtered


_fields: tuple[object, tuple[str, ...]] = (None, ())


def propagator_fields(textmap: TextMapPropagator | None) -> tuple[str, ...]:
    """The fields a propagator writes (none for None), read once per propagator: a
    composite propagator builds its set anew on each read."""
    global _fields
    seen, fields = _fields
    if seen is not textmap:
        fields = () if textmap is None else tuple(textmap.fields)
        _fields = (textmap, fields)
    return fields


def _without_laminar(textmap: TextMapPropagator) -> TextMapPropagator | None:
    # OpenTelemetry's own W3C propagator (exactly that class: a subclass is someone's
    # choice) is swapped for the strict one, so the W3C headers follow the Recommendation.
    if isinstance(textmap, LaminarPropagator):
        return None
    if type(textmap) is TraceContextTextMapPropagator:
        return StrictTraceContext()
    inner = getattr(textmap, "_propagators", None)
    if isinstance(textmap, CompositePropagator) and isinstance(inner, (list, tuple)):
        kept = [
            StrictTraceContext() if type(p) is TraceContextTextMapPropagator else p
            for p in inner
            if not isinstance(p, LaminarPropagator)
        ]
        return CompositePropagator(kept) if kept else None
    return textmap
