"""The server span sets its Laminar paths when first needed, or with the response.

Nobody may see the difference: every reader (a child span, an outbound header, a serialized
context, the exported span) gets the same paths as if they had been set at start. Real
Flask under Werkzeug and Starlette under uvicorn, called over sockets.
"""

from __future__ import annotations

import contextvars
import random
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import requests
from flask import Flask
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from support.servers import run_uvicorn, run_wsgi, wait_for_spans

from laminar_middleware import (
    HEADER_NAME,
    LaminarASGIMiddleware,
    LaminarPropagator,
    LaminarSpanContext,
    LaminarWSGIMiddleware,
    serialize_span_context,
)
from laminar_middleware.codec import format_uuid

TRACER = trace.get_tracer("tests.lazy_paths")


def remote() -> LaminarSpanContext:
    span_id = random.getrandbits(64) | 1
    return LaminarSpanContext(
        random.getrandbits(128) | 1, span_id, ("caller",), (format_uuid(span_id),)
    )


def handler_work() -> dict[str, Any]:
    """What a handler does that reads the server span's paths before any response."""
    server_span = trace.get_current_span()
    # First reader: what a client injecting through the global propagator writes.
    carrier: dict[str, str] = {}
    LaminarPropagator().inject(carrier)
    # A span started with an explicit parent context.
    explicit = TRACER.start_span("explicit", context=trace.set_span_in_context(server_span))
    explicit.end()
    return {
        "propagated": carrier[HEADER_NAME],
        "explicit": serialize_span_context(explicit),
        "server": serialize_span_context(server_span),  # the span itself, passed explicitly
    }


def flask_app() -> Any:
    app = Flask("lazy")

    @app.get("/items/<int:item_id>")
    def item(item_id: int) -> dict[str, Any]:
        return handler_work()

    @app.get("/boom")
    def boom() -> str:
        raise RuntimeError("boom")

    app.wsgi_app = LaminarWSGIMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    return app


def starlette_app() -> Any:
    async def item(request: Request) -> JSONResponse:
        return JSONResponse(handler_work())

    async def boom(request: Request) -> JSONResponse:
        raise RuntimeError("boom")

    app = Starlette(routes=[Route("/items/{item_id:int}", item), Route("/boom", boom)])
    app.add_middleware(LaminarASGIMiddleware)
    return app


@pytest.fixture(params=["flask", "starlette"])
def base(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "flask":
        with run_wsgi(flask_app()) as url:
            yield url
    else:
        with run_uvicorn(starlette_app()) as url:
            yield url


def server_span(spans: list[ReadableSpan]) -> ReadableSpan:
    (span,) = [s for s in spans if s.kind is SpanKind.SERVER]
    return span


def test_readers_before_the_response_get_the_paths_the_span_ends_with(
    base: str, exporter: InMemorySpanExporter
) -> None:
    caller = remote()
    response = requests.get(
        f"{base}/items/7", headers={HEADER_NAME: caller.serialize()}, timeout=10
    )
    assert response.status_code == 200
    spans = wait_for_spans(exporter, lambda s: len(s) >= 2)
    server = server_span(spans)
    own_id = format_uuid(server.context.span_id)
    attributes = server.attributes or {}
    # Set with the response: the route name, the caller's paths plus its own.
    assert attributes["lmnr.span.path"] == ("caller", server.name)
    assert attributes["lmnr.span.ids_path"] == (*caller.span_ids_path, own_id)
    assert server.name in ("GET /items/{item_id}", "GET /items/<int:item_id>")

    body = response.json()
    seen = LaminarSpanContext.parse(body["server"])
    assert seen is not None and seen.span_id == server.context.span_id
    # The span passed explicitly (no callback asked): the caller's path, then this span.
    assert seen.span_path[:-1] == ("caller",) and seen.span_path[-1].startswith("GET")
    assert seen.span_ids_path == (*caller.span_ids_path, own_id)
    # Through the propagator, from the handler: the route is known, the name final.
    propagated = LaminarSpanContext.parse(body["propagated"])
    assert propagated is not None and propagated.span_id == server.context.span_id
    assert propagated.span_path == ("caller", server.name)
    assert propagated.span_ids_path == (*caller.span_ids_path, own_id)

    (explicit,) = [s for s in spans if s.name == "explicit"]
    explicit_attributes = explicit.attributes or {}
    assert explicit_attributes["lmnr.span.ids_path"] == (
        *caller.span_ids_path,
        own_id,
        format_uuid(explicit.context.span_id),
    )
    assert explicit_attributes["lmnr.span.path"][0] == "caller"
    assert explicit_attributes["lmnr.span.path"][-1] == "explicit"
    onward = LaminarSpanContext.parse(body["explicit"])
    assert onward is not None
    assert onward.span_ids_path == explicit_attributes["lmnr.span.ids_path"]


def test_a_request_that_raises_still_ends_with_its_paths(
    base: str, exporter: InMemorySpanExporter
) -> None:
    caller = remote()
    response = requests.get(f"{base}/boom", headers={HEADER_NAME: caller.serialize()}, timeout=10)
    assert response.status_code == 500
    server = server_span(wait_for_spans(exporter, lambda s: len(s) >= 1))
    attributes = server.attributes or {}
    assert attributes["lmnr.span.path"] == ("caller", server.name)
    assert attributes["lmnr.span.ids_path"] == (
        *caller.span_ids_path,
        format_uuid(server.context.span_id),
    )


def test_a_new_trace_gets_a_root_path(base: str, exporter: InMemorySpanExporter) -> None:
    assert requests.get(f"{base}/items/1", timeout=10).status_code == 200
    server = server_span(wait_for_spans(exporter, lambda s: len(s) >= 2))
    attributes = server.attributes or {}
    assert attributes["lmnr.span.path"] == (server.name,)
    assert attributes["lmnr.span.ids_path"] == (format_uuid(server.context.span_id),)
    assert "lmnr.span.parent_path" not in attributes


def test_a_reader_in_another_thread_before_routing_leaves_the_span_its_route_path(
    exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child span started in another thread before Flask has routed reads the server
    span's paths: it gets the name known then, and writes nothing on the server span (its
    attributes are written only by the request's own thread), so the span still ends with
    its route's path, in whatever order the threads run. The SDK's `set_attributes` is
    wrapped only to see which thread writes."""
    from_worker: list[dict[str, Any]] = []
    original = SdkSpan.set_attributes

    def watched(self: SdkSpan, attributes: Mapping[str, Any]) -> None:
        if self.kind is SpanKind.SERVER and threading.current_thread().name == "child-worker":
            from_worker.append(dict(attributes))
        original(self, attributes)

    monkeypatch.setattr(SdkSpan, "set_attributes", watched)

    app = Flask("race")

    @app.get("/items/<int:item_id>")
    def item(item_id: int) -> str:
        return "ok"

    routed = app.wsgi_app

    def before_routing(environ: dict[str, Any], start_response: Any) -> Any:
        def child() -> None:
            with TRACER.start_as_current_span("background"):
                pass

        worker = threading.Thread(
            target=contextvars.copy_context().run, args=(child,), name="child-worker"
        )
        worker.start()
        worker.join(10)
        return routed(environ, start_response)

    app.wsgi_app = LaminarWSGIMiddleware(before_routing)  # type: ignore[method-assign]
    with run_wsgi(app) as url:
        assert requests.get(f"{url}/items/3", timeout=10).status_code == 200
    spans = wait_for_spans(exporter, lambda s: len(s) >= 2)
    server = server_span(spans)
    (background,) = [s for s in spans if s.name == "background"]
    assert (background.attributes or {})["lmnr.span.path"] == ("GET", "background")
    assert from_worker == []
    assert server.name == "GET /items/<int:item_id>"
    assert (server.attributes or {})["lmnr.span.path"] == (server.name,)


def _call_in_process(app: Any, path: str) -> int:
    """One request through the app in this process: the socket is not the point here."""
    import asyncio

    import httpx

    async def call() -> int:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return (await client.get(path)).status_code

    return asyncio.run(call())


def test_a_route_asked_for_early_inside_a_mount_is_asked_again_with_the_response(
    exporter: InMemorySpanExporter,
) -> None:
    """Starlette leaves the Mount in the scope first and the inner route later: a child
    span started between the two (by the mounted app's own middleware) must not fix the
    server span's name at the Mount's template."""
    from starlette.middleware import Middleware
    from starlette.routing import Mount

    class ChildSpan:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            with TRACER.start_as_current_span("inside the mount"):
                await self.app(scope, receive, send)

    async def item(request: Request) -> JSONResponse:
        return JSONResponse({})

    inner = Starlette(routes=[Route("/items/{item_id}", item)], middleware=[Middleware(ChildSpan)])
    app = LaminarASGIMiddleware(Starlette(routes=[Mount("/api", app=inner)]))
    assert _call_in_process(app, "/api/items/7") == 200
    server = server_span(list(exporter.get_finished_spans()))
    assert server.name == "GET /api/items/{item_id}"
    attributes = server.attributes or {}
    assert attributes["http.route"] == "/api/items/{item_id}"
    assert attributes["lmnr.span.path"] == (server.name,)


def test_an_inner_copy_of_the_middleware_leaves_the_path_to_the_outer_one(
    exporter: InMemorySpanExporter,
) -> None:
    async def item(request: Request) -> JSONResponse:
        with TRACER.start_as_current_span("child"):
            return JSONResponse({})

    routed = Starlette(routes=[Route("/items/{item_id}", item)])
    app = LaminarASGIMiddleware(LaminarASGIMiddleware(routed))
    assert _call_in_process(app, "/items/7") == 200
    spans = list(exporter.get_finished_spans())
    server = server_span(spans)
    (child,) = [s for s in spans if s.name == "child"]
    assert server.name == "GET /items/{item_id}"
    assert (child.attributes or {})["lmnr.span.path"] == (server.name, "child")
    assert (server.attributes or {})["lmnr.span.path"] == (server.name,)
    from laminar_middleware.context import _owners

    assert not _owners  # every request's entry went with its end
