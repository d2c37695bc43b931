"""The hooks, with the contrib instrumentations' names and arguments: each is called once per
request or call with the span this package records for it and the framework's or library's
own objects; a hook that raises is logged at the rate limit and changes nothing else.

Server hooks run through both middlewares in-process (httpx's ASGI transport, Werkzeug's
test client) and once through real servers; client hooks through the echo server, for
httpx and requests alike."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import requests
from flask import Flask
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import Span, SpanKind
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from support.outbound import TRACER, client_spans, echo_server, laminar
from support.servers import run_uvicorn, run_wsgi, wait_for_spans
from werkzeug.test import Client as WerkzeugClient

import laminar_middleware
from laminar_middleware import (
    HEADER_NAME,
    LaminarASGIMiddleware,
    LaminarSpanContext,
    LaminarWSGIMiddleware,
    instrument_httpx,
    instrument_requests,
)


class Recorder:
    """Hooks that record their calls and put an attribute on the span they were given."""

    def __init__(self) -> None:
        self.requests: list[tuple[Span, Any]] = []
        self.responses: list[tuple[Any, ...]] = []

    def on_request(self, span: Span, request: Any) -> None:
        self.requests.append((span, request))
        span.set_attribute("app.tenant", "acme")

    def on_response(self, span: Span, *rest: Any) -> None:
        self.responses.append((span, *rest))
        span.set_attribute("app.answered", True)


def explode(*args: Any) -> None:
    raise RuntimeError("the user's hook is broken")


def server_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]


def hook_warnings(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "laminar_middleware" and r.levelno == logging.WARNING and name in r.message
    ]


async def greet(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hi", headers={"x-answer": "42"})


def starlette_app(**options: Any) -> Starlette:
    app = Starlette(routes=[Route("/items/{item_id}", greet)])
    app.add_middleware(LaminarASGIMiddleware, **options)
    return app


def flask_app() -> Flask:
    app = Flask("hooks")

    @app.get("/items/<item_id>")
    def item(item_id: str) -> tuple[str, int, dict[str, str]]:
        return "hi", 200, {"X-Answer": "42"}

    return app


async def asgi_get(app: Any, path: str = "/items/7", **headers: str) -> httpx.Response:
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.get(path, headers=headers)


def wsgi_get(app: Any, path: str = "/items/7", **headers: str) -> tuple[int, str, str]:
    response = WerkzeugClient(app).get(path, headers=headers, buffered=True)
    return response.status_code, response.get_data(as_text=True), response.headers["X-Answer"]


# --- server hooks --------------------------------------------------------------------------


async def test_asgi_hooks_get_the_span_the_scope_and_the_response(
    exporter: InMemorySpanExporter,
) -> None:
    hooks = Recorder()
    app = starlette_app(
        server_request_hook=hooks.on_request, server_response_hook=hooks.on_response
    )
    response = await asgi_get(app)
    assert response.text == "hi"
    (span,) = server_spans(exporter)
    ((request_span, scope),) = hooks.requests
    ((response_span, status, headers),) = hooks.responses
    assert request_span is response_span
    assert request_span.get_span_context().span_id == span.context.span_id
    assert scope["type"] == "http" and scope["path"] == "/items/7"
    assert status == 200 and type(status) is int
    assert (b"x-answer", b"42") in [tuple(pair) for pair in headers]  # ASGI byte pairs
    assert span.name == "GET /items/{item_id}"
    assert span.attributes is not None
    assert span.attributes["app.tenant"] == "acme" and span.attributes["app.answered"] is True


def test_wsgi_hooks_get_the_span_the_environ_and_the_response(
    exporter: InMemorySpanExporter,
) -> None:
    hooks = Recorder()
    app = flask_app()
    app.wsgi_app = LaminarWSGIMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, server_request_hook=hooks.on_request, server_response_hook=hooks.on_response
    )
    assert wsgi_get(app) == (200, "hi", "42")
    (span,) = server_spans(exporter)
    ((request_span, environ),) = hooks.requests
    ((response_span, status, headers),) = hooks.responses
    assert request_span is response_span
    assert request_span.get_span_context().span_id == span.context.span_id
    assert environ["PATH_INFO"] == "/items/7" and environ["REQUEST_METHOD"] == "GET"
    assert status == 200 and type(status) is int
    assert ("X-Answer", "42") in list(headers)  # WSGI string pairs
    assert span.attributes is not None
    assert span.attributes["app.tenant"] == "acme" and span.attributes["app.answered"] is True


async def test_raising_server_hooks_change_nothing_but_a_log_line(
    exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="laminar_middleware")
    bare_asgi = await asgi_get(Starlette(routes=[Route("/items/{item_id}", greet)]))
    app = starlette_app(server_request_hook=explode, server_response_hook=explode)
    for _ in range(30):
        response = await asgi_get(app)
        assert (response.status_code, response.text) == (bare_asgi.status_code, bare_asgi.text)
        assert response.headers["x-answer"] == "42"
    flask = flask_app()
    flask.wsgi_app = LaminarWSGIMiddleware(  # type: ignore[method-assign]
        flask.wsgi_app, server_request_hook=explode, server_response_hook=explode
    )
    assert wsgi_get(flask) == (200, "hi", "42")
    spans = server_spans(exporter)
    assert len(spans) == 31  # every span still ended, with its status and name
    assert all(s.attributes and s.attributes["http.response.status_code"] == 200 for s in spans)
    assert {s.name for s in spans} == {"GET /items/{item_id}", "GET /items/<item_id>"}
    lines = hook_warnings(caplog, "hook raised")
    assert 1 <= len(lines) <= 11  # the rate limit: 10 a minute, then one "suppressed" count
    assert "server_request_hook raised" in lines[0].message
    assert lines[0].exc_info is not None


async def test_hooks_are_not_called_for_a_span_that_does_not_record() -> None:
    unsampled = TracerProvider(sampler=ALWAYS_OFF)
    hooks = Recorder()
    app = starlette_app(
        tracer_provider=unsampled,
        server_request_hook=hooks.on_request,
        server_response_hook=hooks.on_response,
    )
    assert (await asgi_get(app)).text == "hi"
    assert hooks.requests == [] and hooks.responses == []


@pytest.mark.parametrize("bad", ["not a function", 42, ["a", "list"]])
async def test_a_hook_that_is_not_callable_is_reported_once_and_ignored(
    bad: Any, exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="laminar_middleware")
    app = starlette_app(server_request_hook=bad, server_response_hook=bad)
    assert (await asgi_get(app)).text == "hi"
    assert (await asgi_get(app)).text == "hi"
    errors = [r.message for r in caplog.records if r.levelno == logging.ERROR]
    assert any("server_request_hook" in e and "a callable or None" in e for e in errors)
    assert any("server_response_hook" in e for e in errors)
    assert len(errors) == 2  # once per mistake, not per request
    assert len(server_spans(exporter)) == 2


async def test_beside_contrib_the_hooks_get_the_one_server_span(
    exporter: InMemorySpanExporter,
) -> None:
    """Contrib's middleware outside ours opened the request's SERVER span: our hooks get that
    span (which we enriched), once, and there is still one SERVER span."""
    hooks = Recorder()
    inner = starlette_app(
        server_request_hook=hooks.on_request, server_response_hook=hooks.on_response
    )
    app = OpenTelemetryMiddleware(inner)
    assert (await asgi_get(app)).text == "hi"
    (span,) = server_spans(exporter)
    assert span.instrumentation_scope is not None
    assert span.instrumentation_scope.name != "laminar_middleware"
    assert len(hooks.requests) == 1 and len(hooks.responses) == 1
    assert hooks.requests[0][0].get_span_context().span_id == span.context.span_id
    assert span.attributes is not None and span.attributes["app.tenant"] == "acme"


def test_server_hooks_through_real_servers(exporter: InMemorySpanExporter) -> None:
    """uvicorn and Werkzeug's threaded server, a caller's Laminar header: the hooks see the
    request the server built and their attributes reach the exported span."""
    asgi_hooks, wsgi_hooks = Recorder(), Recorder()
    flask = flask_app()
    flask.wsgi_app = LaminarWSGIMiddleware(  # type: ignore[method-assign]
        flask.wsgi_app,
        server_request_hook=wsgi_hooks.on_request,
        server_response_hook=wsgi_hooks.on_response,
    )
    asgi = starlette_app(
        server_request_hook=asgi_hooks.on_request, server_response_hook=asgi_hooks.on_response
    )
    caller = LaminarSpanContext(
        0xABC, 0xDEF, ("caller",), ("00000000-0000-0000-0000-000000000def",)
    )
    with run_uvicorn(asgi) as asgi_url, run_wsgi(flask) as wsgi_url:
        for url in (asgi_url, wsgi_url):
            got = httpx.get(f"{url}/items/7", headers={HEADER_NAME: caller.serialize()}, timeout=5)
            assert (got.status_code, got.text, got.headers["x-answer"]) == (200, "hi", "42")
        spans = wait_for_spans(
            exporter, lambda s: len([x for x in s if x.kind is SpanKind.SERVER]) >= 2
        )
    for span in [s for s in spans if s.kind is SpanKind.SERVER]:
        assert span.context.trace_id == 0xABC and span.parent is not None
        assert span.attributes is not None
        assert span.attributes["app.tenant"] == "acme" and span.attributes["app.answered"] is True
    assert asgi_hooks.requests[0][1]["client"][0] == "127.0.0.1"
    assert wsgi_hooks.requests[0][1]["REMOTE_ADDR"] == "127.0.0.1"
    assert [r[1] for r in asgi_hooks.responses + wsgi_hooks.responses] == [200, 200]


def test_instrument_passes_the_hooks_to_every_app(exporter: InMemorySpanExporter) -> None:
    hooks = Recorder()
    laminar_middleware.instrument(
        server_request_hook=hooks.on_request, server_response_hook=hooks.on_response
    )
    try:
        app = flask_app()  # built after instrument(): the zero-code path
        assert wsgi_get(app) == (200, "hi", "42")
    finally:
        laminar_middleware.uninstrument()
    assert len(hooks.requests) == 1 and [r[1] for r in hooks.responses] == [200]
    (span,) = server_spans(exporter)
    assert span.attributes is not None and span.attributes["app.tenant"] == "acme"


# --- client hooks --------------------------------------------------------------------------

LIBRARIES: dict[str, tuple[Callable[[], Any], Callable[..., None], type, type]] = {
    "httpx": (httpx.Client, instrument_httpx, httpx.Request, httpx.Response),
    "requests": (
        requests.Session,
        instrument_requests,
        requests.PreparedRequest,
        requests.Response,
    ),
}


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    with echo_server() as url:
        yield url


@contextmanager
def hooked_client(name: str, hooks: Recorder, **options: Any) -> Iterator[Any]:
    """A new client (or session) of the library, instrumented with the recorder's hooks."""
    make, instrument, _, _ = LIBRARIES[name]
    with make() as client:
        instrument(
            client,
            client_request_hook=hooks.on_request,
            client_response_hook=hooks.on_response,
            **options,
        )
        yield client


@pytest.mark.parametrize("name", LIBRARIES)
def test_client_hooks_get_the_span_and_the_library_objects(
    name: str, base: str, exporter: InMemorySpanExporter
) -> None:
    _, _, request_type, response_type = LIBRARIES[name]
    hooks = Recorder()
    with hooked_client(name, hooks) as client:
        with TRACER.start_as_current_span("caller"):
            response = client.get(f"{base}/echo", timeout=5)
    assert response.status_code == 200
    (span,) = client_spans(exporter.get_finished_spans())
    ((request_span, request),) = hooks.requests
    ((response_span, same_request, got),) = hooks.responses
    assert request_span is response_span
    assert request_span.get_span_context().span_id == span.context.span_id
    assert type(request) is request_type and same_request is request
    assert type(got) is response_type and got is response
    # The request hook runs after our headers went on: it sees what will be sent.
    assert HEADER_NAME.lower() in {k.lower() for k in request.headers}
    assert span.attributes is not None
    assert span.attributes["app.tenant"] == "acme" and span.attributes["app.answered"] is True


@pytest.mark.parametrize("name", LIBRARIES)
def test_raising_client_hooks_change_nothing_but_a_log_line(
    name: str, base: str, exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="laminar_middleware")
    make, instrument, _, _ = LIBRARIES[name]
    with make() as client:
        instrument(client, client_request_hook=explode, client_response_hook=explode)
        with TRACER.start_as_current_span("caller"):
            bodies = [client.get(f"{base}/echo", timeout=5).json() for _ in range(15)]
    assert all(laminar(body) is not None for body in bodies)  # the headers still went
    spans = client_spans(exporter.get_finished_spans())
    assert len(spans) == 15
    assert all(s.attributes and s.attributes["http.response.status_code"] == 200 for s in spans)
    lines = hook_warnings(caplog, "hook raised")
    assert 1 <= len(lines) <= 11
    assert "client_request_hook raised" in lines[0].message
    assert any("client_response_hook raised" in line.message for line in lines)


@pytest.mark.parametrize("name", LIBRARIES)
def test_client_hooks_only_run_with_our_span(
    name: str, base: str, exporter: InMemorySpanExporter
) -> None:
    """Outside any trace, or with `client_spans=False`, there is no CLIENT span of ours, so
    no hook call (the header still goes in the second case)."""
    hooks = Recorder()
    with hooked_client(name, hooks) as client:
        assert client.get(f"{base}/echo", timeout=5).status_code == 200
    with hooked_client(name, hooks, client_spans=False) as client:
        with TRACER.start_as_current_span("caller"):
            assert laminar(client.get(f"{base}/echo", timeout=5).json()) is not None
    assert hooks.requests == [] and hooks.responses == []
    assert client_spans(exporter.get_finished_spans()) == []


def test_instrument_passes_the_client_hooks(base: str, exporter: InMemorySpanExporter) -> None:
    hooks = Recorder()
    laminar_middleware.instrument(
        client_request_hook=hooks.on_request, client_response_hook=hooks.on_response
    )
    try:
        with TRACER.start_as_current_span("caller"):
            with httpx.Client() as client:
                assert client.get(f"{base}/echo", timeout=5).status_code == 200
            assert requests.get(f"{base}/echo", timeout=5).status_code == 200
    finally:
        laminar_middleware.uninstrument()
    assert [type(r[1]) for r in hooks.requests] == [httpx.Request, requests.PreparedRequest]
    assert len(hooks.responses) == 2
    assert len(client_spans(exporter.get_finished_spans())) == 2


def test_the_hooks_see_the_provider_their_span_went_to() -> None:
    """With a provider of the user's own, the hooks get a span of that provider."""
    exporter = InMemorySpanExporter()
    own = TracerProvider()
    own.add_span_processor(SimpleSpanProcessor(exporter))
    hooks = Recorder()
    flask = flask_app()
    flask.wsgi_app = LaminarWSGIMiddleware(  # type: ignore[method-assign]
        flask.wsgi_app, tracer_provider=own, server_request_hook=hooks.on_request
    )
    assert wsgi_get(flask) == (200, "hi", "42")
    (span,) = exporter.get_finished_spans()
    assert span.attributes is not None and span.attributes["app.tenant"] == "acme"
