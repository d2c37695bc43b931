"""`laminar-middleware demo`: one trace carried through a queue, printed as a tree.

A producer span serializes its context into a job stored in SQLite; a worker thread picks
the job up and continues the trace with `continue_trace`. Everything runs in-process on an
SDK tracer provider with an in-memory exporter, so it needs no account and no network.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from .context import continue_trace, get_tracer, serialize_span_context

__all__ = ["print_tree", "run_demo", "spans_as_json"]


def run_demo(as_json: bool = False, export: str | None = None) -> int:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    if export == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter()))

    db = sqlite3.connect(":memory:", check_same_thread=False)
    db.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, payload TEXT, trace TEXT)")
    tracer = get_tracer(provider)
    with (
        tracer.start_as_current_span("service_a", kind=SpanKind.SERVER),
        tracer.start_as_current_span("enqueue", kind=SpanKind.PRODUCER),
    ):
        db.execute(
            "INSERT INTO jobs (payload, trace) VALUES (?, ?)",
            ("summarise", serialize_span_context()),
        )

    def worker() -> None:
        for _, payload, stored in db.execute("SELECT id, payload, trace FROM jobs").fetchall():
            with continue_trace(
                stored, f"worker {payload}", kind=SpanKind.CONSUMER, tracer_provider=provider
            ):
                pass

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(30)
    provider.force_flush()
    spans = list(exporter.get_finished_spans())
    if export == "otlp":
        provider.shutdown()
        print(f"sent {len(spans)} spans to the OTLP endpoint")
        return 0
    if as_json:
        print(json.dumps(spans_as_json(spans), indent=2))
    else:
        print_tree(spans)
    return 0


def spans_as_json(spans: Sequence[ReadableSpan]) -> list[dict[str, Any]]:
    out = []
    for span in sorted(spans, key=lambda s: s.start_time or 0):
        ctx = span.get_span_context()
        out.append(
            {
                "name": span.name,
                "kind": span.kind.name,
                "trace_id": f"{ctx.trace_id:032x}" if ctx else None,
                "span_id": f"{ctx.span_id:016x}" if ctx else None,
                "parent_span_id": f"{span.parent.span_id:016x}" if span.parent else None,
                "service": span.resource.attributes.get("service.name"),
                "status": span.status.status_code.name,
                "duration_ms": ((span.end_time or 0) - (span.start_time or 0)) / 1e6,
                "attributes": {k: _jsonable(v) for k, v in (span.attributes or {}).items()},
            }
        )
    return out


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def print_tree(spans: Sequence[ReadableSpan]) -> None:
    by_parent: dict[int | None, list[ReadableSpan]] = {}
    ids = {s.context.span_id for s in spans if s.context}
    for span in spans:
        parent = span.parent.span_id if span.parent and span.parent.span_id in ids else None
        by_parent.setdefault(parent, []).append(span)
    traces = {s.context.trace_id for s in spans if s.context}
    for trace_id in sorted(traces):
        print(f"trace {trace_id:032x}")

    def walk(parent: int | None, depth: int) -> None:
        for span in sorted(by_parent.get(parent, []), key=lambda s: s.start_time or 0):
            ms = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
            print(
                f"{'  ' * depth}{span.name:<{40 - 2 * depth}} {span.kind.name:<9}"
                f" {span.status.status_code.name:<6} {ms:8.2f} ms"
            )
            walk(span.context.span_id if span.context else -1, depth + 1)

    walk(None, 1)
    print(f"{len(spans)} spans, {len(traces)} trace{'s' if len(traces) != 1 else ''}")
