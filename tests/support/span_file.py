"""Spans written to a JSON-lines file as they end, so a test can read what another process
(a worker) recorded."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult


def span_json(span: ReadableSpan) -> dict[str, Any]:
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": span.context.trace_id if span.context else None,
        "span_id": span.context.span_id if span.context else None,
        "parent_id": span.parent.span_id if span.parent else None,
        "links": [link.context.span_id for link in span.links],
        "status": span.status.status_code.name,
        "events": [event.name for event in span.events],
        "scope": span.instrumentation_scope.name if span.instrumentation_scope else None,
        "attributes": {
            k: list(v) if isinstance(v, tuple) else v for k, v in (span.attributes or {}).items()
        },
    }


class FileSpanExporter(SpanExporter):
    """Appends one JSON line per span; safe across the threads of one process."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(span_json(s)) + "\n" for s in spans)
        with self._lock, open(self._path, "a", encoding="utf-8") as out:
            out.write(lines)
        return SpanExportResult.SUCCESS


def read_spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.endswith("}")]


def wait_for_file_spans(
    path: Path, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 30.0
) -> list[dict[str, Any]]:
    """Bounded: the spans once `predicate` holds, else what is there at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        spans = read_spans(path)
        if predicate(spans) or time.monotonic() > deadline:
            return spans
        time.sleep(0.05)
