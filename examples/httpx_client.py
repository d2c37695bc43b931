# Run: python examples/httpx_client.py [URL]   (start examples/fastapi_service.py first;
# the default URL is http://127.0.0.1:8000/hello)
# Needs: pip install 'laminar-middleware[httpx]'
"""Outbound with httpx: the Laminar header on every call made inside a span.

`instrument_httpx(client)` wraps one `httpx.Client` or `httpx.AsyncClient` (its transports);
`instrument_httpx()` without a client does it for every client created afterwards. Each
call gets a CLIENT span and carries `X-Laminar-Span-Context` naming it; a call made outside
any span carries nothing.
"""

from __future__ import annotations

import asyncio
import sys

import httpx
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

from laminar_middleware import instrument_httpx

tracer = trace.get_tracer("examples.httpx_client")


def call_sync(url: str) -> int:
    with httpx.Client(timeout=10) as client:
        instrument_httpx(client)
        with tracer.start_as_current_span("sync caller"):
            return client.get(url).status_code


async def call_async(url: str) -> int:
    async with httpx.AsyncClient(timeout=10) as client:
        instrument_httpx(client)
        with tracer.start_as_current_span("async caller"):
            response = await client.get(url)
            return response.status_code


def setup_tracing() -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": "httpx-client"}))
    provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)


def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/hello"
    setup_tracing()
    print("sync:", call_sync(url))
    print("async:", asyncio.run(call_async(url)))


if __name__ == "__main__":
    main()
