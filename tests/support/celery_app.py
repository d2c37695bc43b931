"""The Celery app of the queue tests: imported by the test process, which publishes, and run
by real `celery worker` and `celery beat` processes (tests/test_celery.py starts them).

In those processes `LAMINAR_TEST_SPANS` names the file spans are written to, and
`LAMINAR_TEST_LAYERS` which instrumentations are on, in the order they are turned on:
`ours`, `contrib,ours`, `ours,contrib` or `contrib`.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.exceptions import Ignore
from opentelemetry import trace

app = Celery("laminar_tests", broker=os.environ.get("LAMINAR_TEST_BROKER", "memory://"))
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_default_queue="laminar-tests",
    beat_schedule={
        "tick": {"task": "tests.tick", "schedule": 0.5, "options": {"queue": "beat"}},
    },
)
tracer = trace.get_tracer("tests.celery")


@app.task(name="tests.add")
def add(x: int, y: int) -> int:
    with tracer.start_as_current_span("inside add"):
        return x + y


@app.task(name="tests.retry_twice", bind=True, max_retries=5)
def retry_twice(self: Any) -> int:
    with tracer.start_as_current_span(f"try {self.request.retries}"):
        pass
    if self.request.retries < 2:
        raise self.retry(countdown=0)
    return self.request.retries


@app.task(name="tests.boom")
def boom() -> None:
    raise ValueError("boom")


@app.task(name="tests.ignored")
def ignored() -> None:
    raise Ignore()


@app.task(name="tests.step")
def step(total: int, add_this: int) -> int:
    return total + add_this


@app.task(name="tests.publish_child")
def publish_child() -> None:
    add.delay(20, 22)


@app.task(name="tests.tick")
def tick() -> None:
    pass


def _set_up_tracing(path: str, layers: list[str]) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from support.span_file import FileSpanExporter

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(FileSpanExporter(path)))
    trace.set_tracer_provider(provider)
    for layer in layers:
        if layer == "ours":
            from laminar_middleware.celery import instrument_celery

            instrument_celery()
        elif layer == "contrib":
            from opentelemetry.instrumentation.celery import CeleryInstrumentor

            CeleryInstrumentor().instrument()


if os.environ.get("LAMINAR_TEST_SPANS"):
    _set_up_tracing(
        os.environ["LAMINAR_TEST_SPANS"],
        os.environ.get("LAMINAR_TEST_LAYERS", "ours").split(","),
    )
