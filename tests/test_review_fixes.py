"""Regression tests for faults found in review: each names the behaviour it pins down."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from laminar_middleware import (
    HEADER_NAME,
    LaminarPropagator,
    LaminarSpanContext,
    continue_trace,
    serialize_span_context,
)
from laminar_middleware.config import ExcludedPaths, PropagationTargets

TRACEPARENT = "00-0000000000000000000000000000abcd-00000000000000ef-01"


def test_unclosed_string_of_escaped_quotes_parses_in_linear_time() -> None:
    # Over 16 brackets take the scanning path; the string never closes.
    nasty = '{"a":' + "[" * 17 + "]" * 17 + ',"b":"' + '\\"' * 4000
    assert len(nasty) < 8192
    started = time.perf_counter()
    for _ in range(20):
        assert LaminarSpanContext.parse(nasty) is None
    # 20 quadratic scans took seconds; linear ones take milliseconds. A runaway guard only.
    assert time.perf_counter() - started < 2


@pytest.mark.parametrize(
    ("trace_id", "span_id"), [(0, 0), (1 << 128, 1), (-1, 5), (1, 1 << 64), (1, 0)]
)
def test_serialize_refuses_ids_no_reader_accepts(trace_id: int, span_id: int) -> None:
    with pytest.raises(ValueError):
        LaminarSpanContext(trace_id, span_id).serialize()


def test_string_metadata_keeps_its_type_across_a_hop(exporter: InMemorySpanExporter) -> None:
    metadata = {"s": "123", "b": "true", "n": "null", "l": [1, 2], "d": {"k": "v"}, "i": 7}
    with continue_trace(LaminarSpanContext(1, 2, metadata=metadata), "worker"):
        onward = LaminarSpanContext.parse(serialize_span_context())
    assert onward is not None
    assert onward.metadata == LaminarSpanContext(1, 2, metadata=metadata).metadata


def test_propagator_inject_keeps_a_header_the_caller_set() -> None:
    carrier = {"x-laminar-span-context": "mine"}
    with trace.get_tracer("t").start_as_current_span("s"):
        LaminarPropagator().inject(carrier)
    assert carrier == {"x-laminar-span-context": "mine"}


@pytest.mark.parametrize("trust", ["ignore", "restart"])
def test_propagator_trust_also_drops_a_w3c_parent(trust: str) -> None:
    composite = CompositePropagator([TraceContextTextMapPropagator(), LaminarPropagator(trust)])
    carrier = {"traceparent": TRACEPARENT, HEADER_NAME: LaminarSpanContext(5, 6).serialize()}
    context = composite.extract(carrier)
    assert not trace.get_current_span(context).get_span_context().is_valid
    # Under `continue` the same carrier gives the Laminar parent.
    trusted = CompositePropagator([TraceContextTextMapPropagator(), LaminarPropagator()])
    parent = trace.get_current_span(trusted.extract(carrier)).get_span_context()
    assert (parent.trace_id, parent.span_id) == (5, 6)


class Exploding(SpanProcessor):
    def __init__(self, where: str) -> None:
        self.where = where

    def on_start(self, span: Span, parent_context: Any = None) -> None:
        if self.where == "start":
            raise RuntimeError("processor on_start")

    def on_end(self, span: ReadableSpan) -> None:
        if self.where == "end":
            raise RuntimeError("processor on_end")


@pytest.mark.parametrize("where", ["start", "end"])
def test_continue_trace_fails_open_on_a_raising_processor(where: str) -> None:
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(Exploding(where))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    ran = []
    with continue_trace(LaminarSpanContext(1, 2), "job", tracer_provider=provider):
        ran.append(True)
    assert ran == [True]
    # The worker's own exception is the one that comes out.
    with (
        pytest.raises(KeyError, match="mine"),
        continue_trace(LaminarSpanContext(1, 2), "job", tracer_provider=provider),
    ):
        raise KeyError("mine")


def test_continue_trace_records_the_workers_exception(exporter: InMemorySpanExporter) -> None:
    with pytest.raises(ValueError), continue_trace(None, "job"):
        raise ValueError("bad job")
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code is trace.StatusCode.ERROR
    assert span.events[0].name == "exception"


def test_propagation_targets_accept_one_compiled_pattern_case_insensitively() -> None:
    targets = PropagationTargets(re.compile(r"API\.internal"))
    assert targets.allows("http://API.internal/x")
    assert targets.allows("http://api.internal/x")
    assert not targets.allows("http://other.internal/x")


def test_propagation_targets_compare_hosts_without_the_port() -> None:
    targets = PropagationTargets("api.internal:8443")
    assert targets.allows("https://api.internal:8443/x")
    assert targets.allows("https://api.internal/x")
    assert not targets.allows("https://evil.example/x")


def test_excluded_paths_accept_one_compiled_pattern() -> None:
    excluded = ExcludedPaths(re.compile(r"/health(/.*)?"))
    assert excluded.matches("/health") and excluded.matches("/health/db")
    assert not excluded.matches("/healthy")


def test_a_refused_header_is_parsed_and_logged_once_with_laminar_in_the_global_propagator(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry import propagate

    from laminar_middleware import LaminarWSGIMiddleware

    monkeypatch.setattr(
        propagate,
        "_HTTP_TEXT_FORMAT",
        CompositePropagator([TraceContextTextMapPropagator(), LaminarPropagator()]),
    )

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    middleware = LaminarWSGIMiddleware(app)
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/",
        "wsgi.url_scheme": "http",
        "HTTP_X_LAMINAR_SPAN_CONTEXT": '{"trace_id": "not an id"}',
    }
    with caplog.at_level("WARNING", logger="laminar_middleware"):
        body = middleware(environ, lambda status, headers, exc_info=None: None)
        assert list(body) == [b"ok"]
        body.close()  # type: ignore[attr-defined]
    refusals = [r for r in caplog.records if "invalid Laminar span context" in r.getMessage()]
    assert len(refusals) == 1
