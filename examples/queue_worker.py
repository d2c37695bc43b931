# Run: python examples/queue_worker.py   (self-contained: prints its spans as JSON)
# Needs: pip install laminar-middleware
"""The queue pattern: a producer puts its span context into a message, a worker continues it.

Run: python examples/queue_worker.py
"""

from __future__ import annotations

import queue
import threading

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

from laminar_middleware import continue_trace, serialize_span_context

provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
trace.set_tracer_provider(provider)
tracer = trace.get_tracer("example")

jobs: queue.Queue[dict[str, str | None]] = queue.Queue()


def worker() -> None:
    message = jobs.get()
    with continue_trace(message["trace"], "summarise") as span:
        span.set_attribute("task", str(message["task"]))


def main() -> None:
    thread = threading.Thread(target=worker)
    thread.start()
    with tracer.start_as_current_span("handle request"):
        jobs.put({"task": "summarise", "trace": serialize_span_context()})
    thread.join(10)


if __name__ == "__main__":
    main()
