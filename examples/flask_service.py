# Run: python examples/flask_service.py   (then: curl localhost:5000/work, or start
# examples/fastapi_service.py too and: curl localhost:8000/chain)
# Needs: pip install 'laminar-middleware[flask,requests]'
"""Service B: Flask with `LaminarWSGIMiddleware`, calling service A back with requests.

`app.wsgi_app = LaminarWSGIMiddleware(app.wsgi_app)` is the whole set-up: each request gets
a SERVER span named by its route (`GET /work`), child of the caller's span when the request
carries `X-Laminar-Span-Context`. The requests session is instrumented, so the call to
service A carries the header onward.
"""

from __future__ import annotations

import os
from typing import Any

import requests
from flask import Flask
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

from laminar_middleware import LaminarWSGIMiddleware, instrument_requests

SERVICE_A_URL = os.environ.get("SERVICE_A_URL", "http://127.0.0.1:8000")

app = Flask(__name__)
app.wsgi_app = LaminarWSGIMiddleware(app.wsgi_app)  # type: ignore[method-assign]

session = requests.Session()
instrument_requests(session)  # or instrument_requests() once for every session


@app.get("/work")
def work() -> dict[str, Any]:
    try:
        greeting = session.get(f"{SERVICE_A_URL}/hello", timeout=5).json()
    except requests.RequestException as exc:
        greeting = {"error": f"service A is not reachable: {type(exc).__name__}"}
    return {"done": True, "service_a": greeting}


def setup_tracing() -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": "service-b"}))
    provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)


def main() -> None:
    setup_tracing()
    app.run(host="127.0.0.1", port=5000)


if __name__ == "__main__":
    main()
