"""The demo's Celery side: the app, its one task, and the worker process's own tracing.

The demo imports this module to publish (service B) and starts
`python -m celery -A laminar_middleware._demo_celery worker` to consume. In that worker
process `RECORDS_ENV` names a JSON-lines file: every span the worker ends and the header
each task received are written there, for the demo to read back (a worker is another
process, so its spans cannot reach the demo's in-memory exporter). `JOBS_ENV` names the
SQLite file the task stores its follow-up job in: the stored-workflow hop.

Nothing imports this module but `demo.py` and the worker the demo starts.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from typing import Any, Final

from celery import Celery
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind

from .celery import instrument_celery
from .codec import HEADER_NAME
from .context import serialize_span_context

__all__ = ["BROKER_ENV", "JOBS_ENV", "RECORDS_ENV", "TASK", "app", "span_record", "summarise"]

BROKER_ENV: Final = "LAMINAR_DEMO_BROKER"
RECORDS_ENV: Final = "LAMINAR_DEMO_RECORDS"
JOBS_ENV: Final = "LAMINAR_DEMO_JOBS"
TASK: Final = "summarise"
SERVICE: Final = "worker"

app = Celery("laminar_demo", broker=os.environ.get(BROKER_ENV, "memory://"), set_as_current=False)
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_default_queue="laminar-demo",
)
_tracer_provider: TracerProvider | None = None


@app.task(name=TASK, bind=True)  # type: ignore[untyped-decorator]  # Celery has no hints
def summarise(self: Any, user: dict[str, Any], text: str) -> str:
    """Calls the model, then stores a job for the mailer with the serialized span context."""
    _record({"hop": getattr(self.request, HEADER_NAME, None)})
    provider = _tracer_provider
    tracer = (provider or TracerProvider()).get_tracer("laminar_middleware.demo")
    with tracer.start_as_current_span("call the model"):
        time.sleep(0.005)
        summary = f"{len(text.split())} words for {user.get('id')}"
    with tracer.start_as_current_span("store the email job", kind=SpanKind.PRODUCER) as span:
        db = sqlite3.connect(os.environ[JOBS_ENV], timeout=5.0, isolation_level=None)
        try:
            job = db.execute(
                "INSERT INTO jobs (task, payload, span_context, status)"
                " VALUES ('email summary', ?, ?, 'queued')",
                (summary, serialize_span_context()),
            ).lastrowid
        finally:
            db.close()
        span.set_attribute("messaging.system", "sqlite")
        span.set_attribute("messaging.message.id", str(job))
    return summary


class _RecordExporter(SpanExporter):
    """Appends each ended span as one JSON line, read back by `demo.span_from_record`."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        for span in spans:
            _record({"span": span_record(span)})
        return SpanExportResult.SUCCESS


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """What the demo prints and exports of a span, with its times in nanoseconds."""
    scope = span.instrumentation_scope
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": span.context.trace_id if span.context else 0,
        "span_id": span.context.span_id if span.context else 0,
        "parent_id": span.parent.span_id if span.parent else None,
        "start_time": span.start_time,
        "end_time": span.end_time,
        "status": span.status.status_code.name,
        "description": span.status.description,
        "attributes": {
            k: list(v) if isinstance(v, tuple) else v for k, v in (span.attributes or {}).items()
        },
        "resource": dict(span.resource.attributes),
        "scope": scope.name if scope else None,
    }


_lock = threading.Lock()


def _record(value: dict[str, Any]) -> None:
    path = os.environ.get(RECORDS_ENV)
    if path:
        with _lock, open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(value) + "\n")


if os.environ.get(RECORDS_ENV):  # only in the worker process the demo starts
    _tracer_provider = TracerProvider(resource=Resource.create({"service.name": SERVICE}))
    _tracer_provider.add_span_processor(SimpleSpanProcessor(_RecordExporter()))
    instrument_celery(app, tracer_provider=_tracer_provider)
