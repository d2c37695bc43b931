# Run: python examples/fastapi_service.py   (then: curl localhost:8000/hello, or start
# examples/flask_service.py too and: curl localhost:8000/chain)
# Needs: pip install 'laminar-middleware[fastapi,httpx]' uvicorn
"""Service A: FastAPI with `LaminarASGIMiddleware`, calling service B with httpx.

The middleware opens one SERVER span per request, continuing the caller's
`X-Laminar-Span-Context` header (or W3C `traceparent`). The httpx client is instrumented,
so its calls carry the header of a CLIENT span inside that request: service B joins the
trace. FastAPI's own request tracing is folded into the middleware's span (one SERVER span
per request, not two).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

from laminar_middleware import LaminarASGIMiddleware, instrument_httpx

SERVICE_B_URL = os.environ.get("SERVICE_B_URL", "http://127.0.0.1:5000")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with httpx.AsyncClient(timeout=10) as client:
        instrument_httpx(client)  # or instrument_httpx() once for every client
        app.state.http = client
        yield


app = FastAPI(lifespan=lifespan)
app.add_middleware(LaminarASGIMiddleware, excluded_paths=["/health"])


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}  # excluded: no span, no context read


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "world"}


@app.get("/chain")
async def chain(request: Request) -> dict[str, Any]:
    response = await request.app.state.http.get(f"{SERVICE_B_URL}/work")
    return {"service_b": response.json()}


def setup_tracing() -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": "service-a"}))
    provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)


def main() -> None:
    setup_tracing()
    uvicorn.run(app, host="127.0.0.1", port=8000)


if __name__ == "__main__":
    main()
