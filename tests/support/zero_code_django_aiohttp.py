"""Run under `opentelemetry-instrument` with no code of this package's: a Django project
whose MIDDLEWARE does not name the middleware, served by Werkzeug, and an aiohttp
application without it, served by its runner; an aiohttp session made afterwards calls
both inside a span. Prints the spans the SDK finished, as JSON."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import django
from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.urls import path

settings.configure(
    DEBUG=False,
    SECRET_KEY="zero-code",
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    MIDDLEWARE=[],
    INSTALLED_APPS=[],
    LOGGING_CONFIG=None,
)
django.setup()


def item(request: HttpRequest, item_id: int) -> JsonResponse:
    return JsonResponse({"item": item_id})


urlpatterns = [path("items/<int:item_id>", item)]


def main() -> None:
    import aiohttp
    from aiohttp import web
    from django.core.wsgi import get_wsgi_application
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from werkzeug.serving import make_server

    exporter = InMemorySpanExporter()
    trace.get_tracer_provider().add_span_processor(SimpleSpanProcessor(exporter))  # type: ignore[attr-defined]

    django_server = make_server("127.0.0.1", 0, get_wsgi_application(), threaded=True)
    threading.Thread(target=django_server.serve_forever, daemon=True).start()

    async def aio_item(request: web.Request) -> web.Response:
        return web.json_response({"item": request.match_info["item_id"]})

    async def run() -> None:
        app = web.Application()
        app.router.add_get("/items/{item_id}", aio_item)
        runner = web.AppRunner(app)
        await runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(runner, sock).start()
        urls = [
            f"http://127.0.0.1:{django_server.server_port}/items/1",
            f"http://127.0.0.1:{sock.getsockname()[1]}/items/2",
        ]
        with trace.get_tracer("zero-code").start_as_current_span("caller"):
            async with aiohttp.ClientSession() as session:
                for url in urls:
                    async with session.get(url) as response:
                        assert response.status == 200, response.status
        await runner.cleanup()

    asyncio.run(run())
    # Django's span ends when the server closes the response, just after the client read it.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(
        s.name.startswith("GET items/") for s in exporter.get_finished_spans()
    ):
        time.sleep(0.01)
    django_server.shutdown()
    spans = [
        {
            "name": s.name,
            "kind": s.kind.name,
            "trace_id": s.context.trace_id,
            "span_id": s.context.span_id,
            "parent_id": s.parent.span_id if s.parent else None,
        }
        for s in exporter.get_finished_spans()
    ]
    print(json.dumps(spans))


if __name__ == "__main__":
    main()
