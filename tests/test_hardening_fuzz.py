"""Fuzzing the inbound middlewares with hypothesis: header names, raw header bytes, and
JSON contexts built from the wire format's own keys, then broken.

Every example goes through both middlewares with raw ASGI and WSGI calls, and through the
bare apps: the response must be the bare app's, nothing may escape, the caller's context must
be restored, and there must be exactly one ended SERVER span, whose parent is the one the
headers name: the Laminar context when the codec accepts the one value sent (unsampled when a
`traceparent` naming it says so), else the W3C `traceparent` as the Recommendation reads it
(one non-blank line), else none.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support.raw_apps import (
    ALIAS,
    FLASK_WSGI,
    NAME,
    STARLETTE,
    asgi_scope,
    call_asgi,
    call_wsgi,
    ours,
    wsgi_environ,
)

from laminar_middleware import LaminarASGIMiddleware, LaminarSpanContext, LaminarWSGIMiddleware
from laminar_middleware.codec import format_uuid

RAW_EXAMPLES = 600
JSON_EXAMPLES = 600

Headers = Sequence[tuple[bytes, bytes]]
LAMINAR_NAMES = (NAME, ALIAS)
WSGI_KEYS = ("HTTP_X_LAMINAR_SPAN_CONTEXT", "HTTP_LAMINAR_SPAN_CONTEXT")

# -- strategies -------------------------------------------------------------------------------

header_names = st.one_of(
    st.sampled_from(
        [
            NAME,
            ALIAS,
            b"X-Laminar-Span-Context",
            b"LAMINAR-SPAN-CONTEXT",
            b"traceparent",
            b"tracestate",
            b"baggage",
            b"user-agent",
            b"x-laminar-span-context ",
            b"x_laminar_span_context",
        ]
    ),
    st.binary(min_size=1, max_size=24),
)
valid_trace_ids = st.integers(1, (1 << 128) - 1)
valid_span_ids = st.integers(1, (1 << 64) - 1)


def _uuid_spellings(value: int) -> st.SearchStrategy[str]:
    text = format_uuid(value)
    return st.sampled_from(
        [text, text.upper(), text.replace("-", ""), "{%s}" % text, "urn:uuid:" + text]
    )


ids = st.one_of(
    valid_trace_ids.flatmap(_uuid_spellings),
    valid_span_ids.flatmap(_uuid_spellings),
    st.just(format_uuid(0)),
    st.integers(-(1 << 70), 1 << 130),
    st.text(max_size=40),
    st.none(),
)
json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 80), 1 << 80),
    st.floats(),
    st.text(max_size=30),
)
json_values = st.recursive(
    json_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=24,
)
paths = st.one_of(st.lists(st.text(max_size=20), max_size=6), json_values)
contexts = st.fixed_dictionaries(
    {"trace_id": ids, "span_id": ids},
    optional={
        "traceId": ids,
        "spanId": ids,
        "span_path": paths,
        "span_ids_path": paths,
        "spanPath": paths,
        "spanIdsPath": paths,
        "user_id": json_values,
        "session_id": json_values,
        "trace_type": st.one_of(st.sampled_from(["DEFAULT", "EVALUATION", "other"]), json_values),
        "metadata": st.one_of(st.dictionaries(st.text(max_size=10), json_values), json_values),
        "is_remote": json_values,
        "debug": json_values,
        "tracingLevel": json_values,
    },
)


@st.composite
def mangled_json(draw: st.DrawFn) -> bytes:
    """A JSON context, sometimes cut short or with bytes spliced in."""
    text = json.dumps(draw(contexts), ensure_ascii=draw(st.booleans()))
    data = text.encode("utf-8", "surrogatepass")
    how = draw(st.sampled_from(["as is", "as is", "truncate", "splice", "duplicate key"]))
    if how == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "splice":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    elif how == "duplicate key" and data.endswith(b"}"):
        extra = json.dumps({draw(st.sampled_from(["trace_id", "span_id"])): draw(ids)})
        data = data[:-1] + b"," + extra[1:].encode()
    return data


valid_headers = st.builds(
    lambda t, s, path: (
        LaminarSpanContext(t, s, tuple(path), tuple(format_uuid(s) for _ in path))
        .serialize()
        .encode()
    ),
    valid_trace_ids,
    valid_span_ids,
    st.lists(st.text(max_size=10), max_size=3),
)
traceparents = st.builds(
    lambda t, s, flags: b"00-%032x-%016x-%02x" % (t, s, flags),
    st.integers(0, (1 << 128) - 1),
    st.integers(0, (1 << 64) - 1),
    st.integers(0, 255),
)
header_values = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=120).map(lambda t: t.encode("utf-8", "surrogatepass")),
    mangled_json(),
    valid_headers,
    traceparents,
)
raw_header_lists = st.lists(st.tuples(header_names, header_values), max_size=5)
json_header_lists = st.one_of(
    st.tuples(st.sampled_from(LAMINAR_NAMES), mangled_json()).map(lambda h: [h]),
    st.lists(
        st.tuples(st.sampled_from([*LAMINAR_NAMES, b"traceparent"]), header_values),
        min_size=1,
        max_size=3,
    ),
)

# -- what the headers say ---------------------------------------------------------------------


# What the headers name: None (a new trace), a parent's (trace id, span id), or NOT_SAMPLED (a
# W3C parent that asks for no sampling: the SDK's default sampler then records nothing).
Parent = tuple[int, int] | str | None
NOT_SAMPLED = "not sampled"


_TRACEPARENT = re.compile(
    r"[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[^,]*)?[ \t]*"
)


def _traceparent(lines: list[str]) -> tuple[int, int, bool] | None:
    """(trace id, span id, sampled) from the `traceparent` lines: exactly one that is not
    blank, no comma (several lines combined), version ff and a 00 with more fields invalid."""
    said = [line for line in lines if line.strip(" \t")]
    found = _TRACEPARENT.fullmatch(said[0]) if len(said) == 1 else None
    if found is None:
        return None
    version, trace_id, span_id, flags, rest = found.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    if not int(trace_id, 16) or not int(span_id, 16):
        return None
    return int(trace_id, 16), int(span_id, 16), bool(int(flags, 16) & 1)


def _parent(laminar: tuple[int, int] | None, traceparents: list[str]) -> Parent:
    w3c = _traceparent(traceparents)
    if laminar is not None:
        # The Laminar header has no sampled flag: a traceparent naming the same span has it.
        if w3c is not None and w3c[:2] == laminar and not w3c[2]:
            return NOT_SAMPLED
        return laminar
    if w3c is None:
        return None
    return w3c[:2] if w3c[2] else NOT_SAMPLED


def _laminar_parent(values: list[bytes]) -> tuple[int, int] | None:
    if not values or any(v != values[0] for v in values):
        return None
    remote = LaminarSpanContext.parse(values[0])
    return None if remote is None else (remote.trace_id, remote.span_id)


def expected_asgi_parent(headers: Headers) -> Parent:
    lines = [(name.lower(), value) for name, value in headers]
    laminar = _laminar_parent([v for n, v in lines if n in LAMINAR_NAMES])
    return _parent(laminar, [v.decode("latin-1") for n, v in lines if n == b"traceparent"])


def expected_wsgi_parent(environ: dict[str, Any]) -> Parent:
    laminar = _laminar_parent([environ[k].encode("latin-1") for k in WSGI_KEYS if k in environ])
    traceparent = environ.get("HTTP_TRACEPARENT")
    return _parent(laminar, [] if traceparent is None else [traceparent])


def parent_of(span: ReadableSpan) -> tuple[int, int] | None:
    return None if span.parent is None else (span.context.trace_id, span.parent.span_id)


# -- one example through both middlewares -----------------------------------------------------

ASGI = LaminarASGIMiddleware(STARLETTE)
WSGI = LaminarWSGIMiddleware(FLASK_WSGI)


class Checker:
    def __init__(self, exporter: InMemorySpanExporter, loop: asyncio.AbstractEventLoop) -> None:
        self.exporter = exporter
        self.loop = loop
        self.examples = 0

    def check(self, headers: Headers) -> None:
        self.examples += 1
        before = trace.get_current_span()

        expected = self.loop.run_until_complete(call_asgi(STARLETTE, asgi_scope(headers)))
        self.exporter.clear()
        got = self.loop.run_until_complete(call_asgi(ASGI, asgi_scope(headers)))
        assert got == expected
        self.check_span(expected_asgi_parent(headers))

        environ = wsgi_environ(headers)
        expected_wsgi = call_wsgi(FLASK_WSGI, wsgi_environ(headers))
        self.exporter.clear()
        assert call_wsgi(WSGI, environ) == expected_wsgi
        self.check_span(expected_wsgi_parent(environ))

        assert trace.get_current_span() is before

    def check_span(self, parent: Parent) -> None:
        spans = ours(self.exporter)
        if parent == NOT_SAMPLED:
            assert spans == []
            return
        (span,) = spans
        assert span.end_time is not None
        assert parent_of(span) == parent


@pytest.fixture
def checker(exporter: InMemorySpanExporter) -> Iterator[Checker]:
    loop = asyncio.new_event_loop()
    try:
        yield Checker(exporter, loop)
    finally:
        loop.close()


def fuzz(checker: Checker, strategy: st.SearchStrategy[Headers], examples: int) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(headers=strategy)
    def run(headers: Headers) -> None:
        checker.check(headers)

    run()
    # Each generated example ran (more when hypothesis replays or shrinks).
    assert checker.examples >= examples


def test_fuzzed_header_names_and_bytes(checker: Checker) -> None:
    fuzz(checker, raw_header_lists, RAW_EXAMPLES)


def test_fuzzed_json_contexts(checker: Checker) -> None:
    fuzz(checker, json_header_lists, JSON_EXAMPLES)
