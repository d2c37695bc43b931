# Run: python examples/requests_client.py [URL]   (start examples/flask_service.py first;
# the default URL is http://127.0.0.1:5000/work)
# Needs: pip install 'laminar-middleware[requests]'
"""Outbound with requests: the Laminar header on every call made inside a span.

`instrument_requests(session)` wraps the sending of one `requests.Session` and keeps every
adapter mounted on it (retries, mocks); `instrument_requests()` without a session does it
for every session, including the one behind `requests.get`. `propagate_to` limits which
hosts receive the header (it carries user id, session id and metadata).
"""

from __future__ import annotations

import sys

import requests
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

from laminar_middleware import instrument_requests

tracer = trace.get_tracer("examples.requests_client")


def call(url: str) -> int:
    with requests.Session() as session:
        # Only these hosts get the header: exact hosts, ".suffix" entries, "re:" patterns.
        instrument_requests(session, propagate_to=["127.0.0.1", "localhost", ".internal"])
        with tracer.start_as_current_span("requests caller"):
            return session.get(url, timeout=10).status_code


def setup_tracing() -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": "requests-client"}))
    provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)


def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:5000/work"
    setup_tracing()
    print("status:", call(url))


if __name__ == "__main__":
    main()
