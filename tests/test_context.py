"""Carriers and helpers for queues and stored workflows: serialize/deserialize, inject/extract,
continue_trace, with spans read from the SDK's in-memory exporter."""

from __future__ import annotations

import json
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from laminar_middleware import (
    HEADER_NAME,
    LaminarSpanContext,
    continue_trace,
    deserialize_span_context,
    extract,
    inject,
    serialize_span_context,
)
from laminar_middleware.codec import format_uuid

REMOTE = LaminarSpanContext(
    trace_id=0x118901D5DEC023991E5875A2ED3A685B,
    span_id=0x07151BE863D82D13,
    span_path=("serviceAHandler", "inner"),
    span_ids_path=(format_uuid(0xF8A694F303C397A1), format_uuid(0x07151BE863D82D13)),
    user_id="user-42",
    session_id="sess-7",
    trace_type="DEFAULT",
    metadata={"tenant": "acme", "tier": 2, "tags": ["a", "b"], "nested": {"k": "v"}},
)


def test_no_current_span_means_nothing() -> None:
    assert serialize_span_context() is None
    carrier: dict[str, str] = {}
    inject(carrier)
    assert carrier == {}


def test_continue_trace_is_a_child_of_the_serialized_context(
    exporter: InMemorySpanExporter,
) -> None:
    message = {"job": "x", "trace": REMOTE.serialize()}
    with continue_trace(message["trace"], "worker", kind=SpanKind.CONSUMER) as span:
        assert trace.get_current_span() is span
        inner_header = serialize_span_context()
    (finished,) = exporter.get_finished_spans()
    assert finished.context.trace_id == REMOTE.trace_id
    assert finished.parent is not None and finished.parent.span_id == REMOTE.span_id
    assert finished.parent.is_remote
    assert finished.kind is SpanKind.CONSUMER
    attrs = finished.attributes or {}
    assert attrs["lmnr.span.path"] == ("serviceAHandler", "inner", "worker")
    assert attrs["lmnr.span.ids_path"] == (
        *REMOTE.span_ids_path,
        format_uuid(finished.context.span_id),
    )
    assert "lmnr.span.parent_path" not in attrs  # for Laminar's SDK only
    assert attrs["lmnr.association.properties.user_id"] == "user-42"
    assert attrs["lmnr.association.properties.session_id"] == "sess-7"
    assert attrs["lmnr.association.properties.trace_type"] == "DEFAULT"
    assert attrs["lmnr.association.properties.metadata.tenant"] == "acme"
    assert attrs["lmnr.association.properties.metadata.nested"] == '{"k":"v"}'
    # The context serialized inside extends the remote path and keeps the association.
    inner = LaminarSpanContext.parse(inner_header)
    assert inner is not None
    assert inner.span_path == ("serviceAHandler", "inner", "worker")
    assert inner.span_id == finished.context.span_id
    assert inner.user_id == "user-42" and inner.session_id == "sess-7"
    assert inner.metadata == REMOTE.metadata


def test_continue_trace_starts_a_new_trace_on_missing_or_invalid(
    exporter: InMemorySpanExporter,
) -> None:
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("unrelated") as unrelated:
        for value in (None, "", "{garbage", '{"trace_id":"0"}'):
            with continue_trace(value, "job"):
                pass
    spans = [s for s in exporter.get_finished_spans() if s.name == "job"]
    assert len(spans) == 4
    for span in spans:
        assert span.parent is None
        assert span.context.trace_id != unrelated.get_span_context().trace_id
        assert (span.attributes or {})["lmnr.span.path"] == ("job",)


def test_continue_trace_accepts_a_context_object(exporter: InMemorySpanExporter) -> None:
    with continue_trace(REMOTE, "job"):
        pass
    (span,) = exporter.get_finished_spans()
    assert span.context.trace_id == REMOTE.trace_id


def test_inject_and_extract_round_trip(exporter: InMemorySpanExporter) -> None:
    tracer = trace.get_tracer("test")
    carrier: dict[str, str] = {}
    with tracer.start_as_current_span("producer") as span:
        inject(carrier)
    assert set(carrier) == {HEADER_NAME}
    assert json.loads(carrier[HEADER_NAME])["span_id"] == format_uuid(
        span.get_span_context().span_id
    )
    got = extract({k.lower(): v for k, v in carrier.items()})
    assert got is not None and got.span_id == span.get_span_context().span_id
    assert extract({"Laminar-Span-Context": carrier[HEADER_NAME]}) == got


def test_inject_keeps_a_value_already_there() -> None:
    tracer = trace.get_tracer("test")
    carrier = {"x-laminar-span-context": "mine"}
    with tracer.start_as_current_span("producer"):
        inject(carrier)
    assert carrier == {"x-laminar-span-context": "mine"}


def test_inject_with_overwrite_replaces_a_value_copied_from_another_message() -> None:
    tracer = trace.get_tracer("test")
    carrier = {"x-laminar-span-context": "stale", "Laminar-Span-Context": "stale too", "a": "b"}
    with tracer.start_as_current_span("producer") as span:
        inject(carrier, overwrite=True)
    assert set(carrier) == {HEADER_NAME, "a"}
    fresh = extract(carrier)
    assert fresh is not None and fresh.span_id == span.get_span_context().span_id


@pytest.mark.parametrize("overwrite", [False, True])
def test_inject_into_a_carrier_with_keys_that_are_not_strings(overwrite: bool) -> None:
    carrier: dict[Any, Any] = {1: "one", b"x-laminar-span-context": "bytes"}
    with trace.get_tracer("test").start_as_current_span("producer"):
        inject(carrier, overwrite=overwrite)
    assert carrier[1] == "one" and HEADER_NAME in carrier


def test_inject_with_overwrite_and_no_span_leaves_the_carrier_alone() -> None:
    carrier = {"x-laminar-span-context": "kept"}
    inject(carrier, overwrite=True)
    assert carrier == {"x-laminar-span-context": "kept"}


def test_extract_ambiguous_or_invalid_is_none() -> None:
    a, b = REMOTE.serialize(), LaminarSpanContext(5, 6).serialize()
    assert extract({HEADER_NAME: a, "laminar-span-context": b}) is None
    assert extract({HEADER_NAME: a, "laminar-span-context": a}) == REMOTE
    assert extract({HEADER_NAME: "garbage"}) is None
    assert extract({}) is None


def test_deserialize_is_parse() -> None:
    assert deserialize_span_context(REMOTE.serialize()) == REMOTE
    assert deserialize_span_context(REMOTE) == REMOTE
    assert deserialize_span_context(LaminarSpanContext(0, 1)) is None
    assert deserialize_span_context(None) is None


def test_string_metadata_keeps_its_type_across_a_hop(exporter: InMemorySpanExporter) -> None:
    metadata = {"s": "123", "b": "true", "n": "null", "l": [1, 2], "d": {"k": "v"}, "i": 7}
    with continue_trace(LaminarSpanContext(1, 2, metadata=metadata), "worker"):
        onward = LaminarSpanContext.parse(serialize_span_context())
    assert onward is not None
    assert onward.metadata == LaminarSpanContext(1, 2, metadata=metadata).metadata


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
