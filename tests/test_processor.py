"""LaminarPathSpanProcessor: Laminar paths and association properties flow to every span
started under a span that has them, whatever tracer starts it."""

from __future__ import annotations

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from laminar_middleware import LaminarSpanContext, continue_trace, serialize_span_context
from laminar_middleware.codec import format_uuid
from laminar_middleware.processor import LaminarPathSpanProcessor, ensure_path_processor

REMOTE = LaminarSpanContext(
    0xAB, 0xCD, ("caller",), (format_uuid(0xCD),), user_id="u-1", metadata={"tenant": "acme"}
)


def make_provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def test_grandchild_of_a_continued_span_has_the_full_path_and_association() -> None:
    provider, exporter = make_provider()
    ensure_path_processor(provider)
    tracer = provider.get_tracer("user-code")
    with (
        continue_trace(REMOTE, "server", tracer_provider=provider),
        tracer.start_as_current_span("child"),
        tracer.start_as_current_span("grandchild") as grandchild,
    ):
        header = serialize_span_context()
    parsed = LaminarSpanContext.parse(header)
    assert parsed is not None
    assert parsed.span_path == ("caller", "server", "child", "grandchild")
    assert parsed.span_ids_path[-1] == format_uuid(grandchild.get_span_context().span_id)
    assert len(parsed.span_ids_path) == 4
    assert parsed.user_id == "u-1" and dict(parsed.metadata) == {"tenant": "acme"}
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert (spans["child"].attributes or {})["lmnr.span.path"] == ("caller", "server", "child")


def test_spans_outside_a_laminar_tree_are_left_alone() -> None:
    provider, exporter = make_provider()
    ensure_path_processor(provider)
    with provider.get_tracer("t").start_as_current_span("plain"):
        pass
    (span,) = exporter.get_finished_spans()
    assert "lmnr.span.path" not in (span.attributes or {})


def test_installed_once_per_provider() -> None:
    provider, _ = make_provider()
    ensure_path_processor(provider)
    ensure_path_processor(provider)
    processors = provider._active_span_processor._span_processors
    assert sum(isinstance(p, LaminarPathSpanProcessor) for p in processors) == 1
