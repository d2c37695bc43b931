# Run: python examples/aiohttp_service.py   (then: curl localhost:8080/work, or start
# examples/fastapi_service.py too, so the call to service A answers)
# Needs: pip install 'laminar-middleware[aiohttp]'
"""Service C: aiohttp with the Laminar middleware, calling service A with an aiohttp client.

`web.Application(middlewares=[middleware()])` is the server's whole set-up: each request gets
a SERVER span named by its route (`GET /work`), child of the caller's span when the request
carries `X-Laminar-Span-Context`. `instrument_aiohttp()` covers every `ClientSession` made
afterwards, so the call to service A carries the header onward.
"""

from __future__ import annotations

import os

import aiohttp
from aiohttp import web
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

from laminar_middleware.aiohttp import instrument_aiohttp, middleware

SERVICE_A_URL = os.environ.get("SERVICE_A_URL", "http://127.0.0.1:8000")


async def work(request: web.Request) -> web.Response:
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{SERVICE_A_URL}/hello") as response,
        ):
            greeting = await response.json()
    except aiohttp.ClientError as exc:
        greeting = {"error": f"service A is not reachable: {type(exc).__name__}"}
    return web.json_response({"done": True, "service_a": greeting})


def make_app() -> web.Application:
    instrument_aiohttp()  # every ClientSession from now on; or instrument_aiohttp(session)
    app = web.Application(middlewares=[middleware()])
    app.router.add_get("/work", work)
    return app


def setup_tracing() -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": "service-c"}))
    provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)


def main() -> None:
    setup_tracing()
    web.run_app(make_app(), host="127.0.0.1", port=8080)


if __name__ == "__main__":
    main()
