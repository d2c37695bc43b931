"""The Dramatiq broker and actors of the queue tests: imported by the test process, which
sends, and by real `dramatiq` worker processes (tests/test_dramatiq.py starts them), which
trace into the file named by `LAMINAR_TEST_SPANS`."""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from opentelemetry import trace

from laminar_middleware.dramatiq import instrument_dramatiq

if os.environ.get("LAMINAR_TEST_SPANS"):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from support.span_file import FileSpanExporter

    provider = TracerProvider()
    provider.add_span_processor(
        SimpleSpanProcessor(FileSpanExporter(os.environ["LAMINAR_TEST_SPANS"]))
    )
    trace.set_tracer_provider(provider)

broker = RedisBroker(unix_socket_path=os.environ.get("LAMINAR_TEST_REDIS", "/nonexistent"))
broker.add_middleware(dramatiq.middleware.CurrentMessage())
dramatiq.set_broker(broker)
instrument_dramatiq(broker)
tracer = trace.get_tracer("tests.dramatiq")


@dramatiq.actor(queue_name="laminar-tests")
def add(x: int, y: int) -> int:
    with tracer.start_as_current_span("inside add"):
        return x + y


@dramatiq.actor(queue_name="laminar-tests", max_retries=2, min_backoff=1, max_backoff=10)
def fail_twice() -> None:
    message = dramatiq.middleware.CurrentMessage.get_current_message()
    if message is None or message.options.get("retries", 0) < 2:
        raise RuntimeError("not yet")


@dramatiq.actor(queue_name="laminar-tests", max_retries=0)
def boom() -> None:
    raise ValueError("boom")
