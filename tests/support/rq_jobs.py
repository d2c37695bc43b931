"""The RQ jobs of the queue tests, and (imported by `rq worker -c support.rq_jobs`) the
worker's set-up: tracing into the file named by `LAMINAR_TEST_SPANS`, then `instrument_rq()`,
in the worker's main process, before it forks its work horses."""

from __future__ import annotations

import os

from opentelemetry import trace
from rq import get_current_job

tracer = trace.get_tracer("tests.rq")


def add(x: int, y: int) -> int:
    with tracer.start_as_current_span("inside add"):
        return x + y


def fail_twice() -> int:
    job = get_current_job()
    assert job is not None
    if (job.retries_left or 0) > 0:
        raise RuntimeError(f"try with {job.retries_left} retries left")
    return 0


def boom() -> None:
    raise ValueError("boom")


def enqueue_child() -> None:
    from rq import Queue

    job = get_current_job()
    assert job is not None
    Queue(job.origin, connection=job.connection).enqueue(add, 20, 22)


if os.environ.get("LAMINAR_TEST_SPANS"):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    from laminar_middleware.rq import instrument_rq
    from support.span_file import FileSpanExporter

    exporter = FileSpanExporter(os.environ["LAMINAR_TEST_SPANS"])
    provider = TracerProvider()
    if os.environ.get("LAMINAR_TEST_BATCH"):  # a batch that would wait far longer than a job
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=60_000))
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    instrument_rq()
