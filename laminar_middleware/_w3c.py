"""W3C trace context (`traceparent`, `tracestate`) read and written as the Recommendation says.

`StrictTraceContext` takes the place of OpenTelemetry's `TraceContextTextMapPropagator` in
the global propagator this package uses for W3C headers (`propagator.global_propagator_
without_laminar`), so the middlewares' fallback and every header the hooks write follow
these rules where that propagator's (depending on its release) do not:

- Several `traceparent` lines, or one line a server combined from several (a comma), are
  no context: which one the caller meant cannot be known. Empty lines add nothing (as in
  an HTTP list) and are skipped.
- A `tracestate` with a malformed member (the key and value grammar), a duplicated key, or
  more than 32 members is dropped whole; empty members are skipped.
- A `tracestate` longer than 512 characters is cut, not dropped: members over 128
  characters go first (rightmost first), then members from the right until it fits. The
  same cut applies to the `tracestate` written on the way out.

It also carries the sampled flag across a Laminar hop: the Laminar header has none, so a
`traceparent` naming the same span sits beside it (see `sampled_parent`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators import textmap
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = [
    "TRACEPARENT",
    "TRACESTATE",
    "StrictTraceContext",
    "format_traceparent",
    "parse_traceparent",
    "parse_tracestate",
    "sampled_parent",
]

TRACEPARENT: Final = "traceparent"
TRACESTATE: Final = "tracestate"
_MAX_MEMBERS: Final = 32
_MAX_LENGTH: Final = 512
_LONG_MEMBER: Final = 128
_SAMPLED: Final = TraceFlags(TraceFlags.SAMPLED)

_TRACEPARENT_RE: Final = re.compile(
    r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[^,]*)?"
)
_KEY: Final = r"[a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13}"
_VALUE: Final = r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
_MEMBER_RE: Final = re.compile(f"({_KEY})=({_VALUE})")


def parse_traceparent(value: object) -> SpanContext | None:
    """A `traceparent` value as a remote span context, or None when it is not valid (an
    unknown future version is read by its first four fields, as the Recommendation says)."""
    fields = _fields(value)
    if fields is None:
        return None
    trace_id, span_id, flags = fields
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=flags)


def _fields(value: object) -> tuple[int, int, TraceFlags] | None:
    # Without a SpanContext: the inbound path asks only whether the ids match.
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not isinstance(value, str):
        return None
    found = _TRACEPARENT_RE.fullmatch(value.strip(" \t"))
    if found is None:
        return None
    version, trace_hex, span_hex, flags_hex, rest = found.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    flags = _SAMPLED if flags_hex == "01" else TraceFlags(int(flags_hex, 16))
    return trace_id, span_id, flags


def _lines(values: Sequence[object] | None) -> list[object]:
    """The `traceparent` lines that say something: blank ones are skipped."""
    return [value for value in values or () if not _blank(value)]


def _blank(value: object) -> bool:
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return isinstance(value, str) and not value.strip(" \t")


def parse_tracestate(values: Sequence[object] | None) -> TraceState | None:
    """The `tracestate` lines as one `TraceState`: None when there are none, an empty one
    when they break the rules (see the module docstring)."""
    if not values:
        return None
    members: list[tuple[str, str]] = []
    keys: set[str] = set()
    for value in values:
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if not isinstance(value, str):
            return TraceState()
        for member in value.split(","):
            member = member.strip(" \t")
            if not member:
                continue
            found = _MEMBER_RE.fullmatch(member)
            if found is None or found.group(1) in keys or len(members) == _MAX_MEMBERS:
                return TraceState()
            keys.add(found.group(1))
            members.append((found.group(1), found.group(2)))
    return TraceState(cut(members))


def cut(members: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The members that fit in 512 characters: long ones dropped first, then from the right."""
    sizes = [len(key) + 1 + len(value) for key, value in members]
    total = sum(sizes) + len(sizes) - 1
    if total <= _MAX_LENGTH:
        return members
    kept = list(zip(members, sizes, strict=True))
    for index in range(len(kept) - 1, -1, -1):
        if total <= _MAX_LENGTH:
            break
        size = kept[index][1]
        if size > _LONG_MEMBER:
            total -= size + 1
            del kept[index]
    while kept and total > _MAX_LENGTH:
        total -= kept.pop()[1] + 1
    return [member for member, _ in kept]


def format_traceparent(span_context: SpanContext) -> str:
    return (
        f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}"
        f"-{span_context.trace_flags & 0xFF:02x}"
    )


def sampled_parent(
    trace_id: int, span_id: int, traceparents: Sequence[object] | None, tracestates: Any = None
) -> tuple[TraceFlags, TraceState | None]:
    """The flags (and `tracestate`) of a caller named by a Laminar header: a single
    `traceparent` naming the same span carries them; with none, the caller is sampled, as
    Laminar's SDKs assume. `tracestates` is read only when the `traceparent` matched; a
    callable is called for the lines then."""
    lines = _lines(traceparents) if traceparents and len(traceparents) > 1 else traceparents
    if lines and len(lines) == 1:
        fields = _fields(lines[0])
        if fields is not None and fields[0] == trace_id and fields[1] == span_id:
            states = tracestates() if callable(tracestates) else tracestates
            return fields[2], parse_tracestate(states)
    return _SAMPLED, None


class StrictTraceContext(TraceContextTextMapPropagator):
    """OpenTelemetry's W3C propagator with the Recommendation's rules (module docstring)."""

    def extract(
        self,
        carrier: textmap.CarrierT,
        context: Context | None = None,
        getter: textmap.Getter[textmap.CarrierT] = textmap.default_getter,
    ) -> Context:
        if context is None:
            context = Context()
        lines = _lines(getter.get(carrier, TRACEPARENT))
        if len(lines) != 1:
            return context
        parsed = parse_traceparent(lines[0])
        if parsed is None:
            return context
        state = parse_tracestate(getter.get(carrier, TRACESTATE))
        span_context = SpanContext(
            parsed.trace_id,
            parsed.span_id,
            is_remote=True,
            trace_flags=parsed.trace_flags,
            trace_state=state,
        )
        return trace.set_span_in_context(NonRecordingSpan(span_context), context)

    def inject(
        self,
        carrier: textmap.CarrierT,
        context: Context | None = None,
        setter: textmap.Setter[textmap.CarrierT] = textmap.default_setter,
    ) -> None:
        span_context = trace.get_current_span(context).get_span_context()
        if not span_context.is_valid:
            return
        setter.set(carrier, TRACEPARENT, format_traceparent(span_context))
        state = span_context.trace_state
        if state:
            members = cut(list(state.items()))
            if members:
                setter.set(carrier, TRACESTATE, ",".join(f"{k}={v}" for k, v in members))
