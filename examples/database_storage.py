# Run: python examples/database_storage.py   (self-contained: SQLite in a temporary file)
# Needs: pip install laminar-middleware
"""The database-storage pattern: a long-running workflow keeps its span context in a row.

A request starts a workflow and stores `serialize_span_context()` next to it. Much later,
another process (here: another connection, after the first one is closed) loads the row and
resumes inside `continue_trace(row.span_context, ...)`: the resumed steps are in the
request's trace. A missing or damaged value starts a new trace instead of failing.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from contextlib import closing

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from laminar_middleware import continue_trace, serialize_span_context

exporter = InMemorySpanExporter()  # print the spans at the end instead of sending them
provider = TracerProvider(resource=Resource.create({"service.name": "workflows"}))
provider.add_span_processor(SimpleSpanProcessor(exporter))
tracer = provider.get_tracer("examples.database_storage")


def start_workflow(db_path: str) -> int:
    """In the request: create the workflow row, with the span context beside it."""
    with tracer.start_as_current_span("POST /workflows"), closing(sqlite3.connect(db_path)) as db:
        with db:
            cursor = db.execute(
                "INSERT INTO workflows (state, span_context) VALUES ('waiting', ?)",
                (serialize_span_context(),),
            )
        return int(cursor.lastrowid or 0)


def resume_workflow(db_path: str, workflow_id: int) -> None:
    """Later, anywhere: load the row and continue its trace."""
    with closing(sqlite3.connect(db_path)) as db:
        (stored,) = db.execute(
            "SELECT span_context FROM workflows WHERE id = ?", (workflow_id,)
        ).fetchone()
        with continue_trace(stored, "resume workflow", tracer_provider=provider) as span:
            span.set_attribute("workflow.id", workflow_id)
            with tracer.start_as_current_span("approve"), db:
                db.execute("UPDATE workflows SET state = 'approved' WHERE id = ?", (workflow_id,))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db_path = os.path.join(tmp, "workflows.sqlite3")
        with closing(sqlite3.connect(db_path)) as db, db:
            db.execute(
                "CREATE TABLE workflows (id INTEGER PRIMARY KEY, state TEXT, span_context TEXT)"
            )
        workflow_id = start_workflow(db_path)
        resume_workflow(db_path, workflow_id)

    spans = exporter.get_finished_spans()
    for span in spans:
        parent = f"{span.parent.span_id:016x}" if span.parent else "-"
        print(
            f"trace {span.context.trace_id:032x}  span {span.context.span_id:016x}"
            f"  parent {parent:<16}  {span.name}"
        )
    traces = {span.context.trace_id for span in spans}
    print(f"{len(spans)} spans in {len(traces)} trace{'s' if len(traces) != 1 else ''}")
    if len(traces) != 1:
        raise SystemExit("the resumed workflow is not in the request's trace")


if __name__ == "__main__":
    main()
