"""The Django middleware: the span named by Django's route (with `include()` prefixes) and
continuing the caller, through Django's test client (in process) and through real servers
(werkzeug's WSGI server, uvicorn with Django's ASGI handler); streaming responses end the
span after the last chunk; a view's exception recorded; beside the contrib Django
instrumentation, one SERVER span; bad settings never stop a request."""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import httpx
import pytest
from django.test import Client, override_settings
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from support import django_project
from support.django_project import OURS, asgi_app, wsgi_app
from support.raw_apps import ours
from support.servers import hang_up_while_werkzeug_drains, run_uvicorn, run_wsgi, wait_for_spans

from laminar_middleware import LaminarSpanContext
from laminar_middleware.codec import format_uuid

REMOTE = LaminarSpanContext(
    0x4BF92F3577B34DA6A3CE929D0E0E4736,
    0x00F067AA0BA902B7,
    ("service_a",),
    (format_uuid(0x00F067AA0BA902B7),),
    user_id="u-1",
)
HEADERS = {"X-Laminar-Span-Context": REMOTE.serialize()}
ROUTE = "api/items/<int:item_id>"


def test_the_span_is_named_by_the_route_and_continues_the_caller(
    exporter: InMemorySpanExporter,
) -> None:
    response = Client(headers=HEADERS).get("/api/items/7")
    assert response.status_code == 200
    (span,) = ours(exporter)
    assert span.name == f"GET {ROUTE}"
    assert span.attributes is not None
    assert span.attributes["http.route"] == ROUTE
    assert span.attributes["http.response.status_code"] == 200
    assert span.parent is not None
    assert (span.context.trace_id, span.parent.span_id) == (REMOTE.trace_id, REMOTE.span_id)
    assert span.attributes["lmnr.association.properties.user_id"] == "u-1"


def test_an_unsampled_caller_is_not_recorded(exporter: InMemorySpanExporter) -> None:
    traceparent = f"00-{REMOTE.trace_id:032x}-{REMOTE.span_id:016x}-00"
    response = Client(headers={**HEADERS, "traceparent": traceparent}).get("/api/items/7")
    assert response.status_code == 200
    assert ours(exporter) == []


def test_a_streaming_response_ends_the_span_after_the_last_chunk(
    exporter: InMemorySpanExporter,
) -> None:
    django_project.produced.clear()
    response = Client().get("/api/stream")
    chunks = iter(response.streaming_content)  # type: ignore[attr-defined]
    next(chunks)
    assert django_project.produced == ["chunk 0"]
    assert ours(exporter) == []  # still streaming: the span is open
    body = b"".join(chunks)
    assert body == b"chunk 1\nchunk 2\n"
    (span,) = ours(exporter)
    assert span.name == "GET api/stream"


def test_a_stream_closed_early_is_closed_inside_the_span(
    exporter: InMemorySpanExporter,
) -> None:
    """The server closes a streaming response before its end (the client went away): the
    view's generator runs its `finally` with the server span current, as it ran its body."""
    django_project.produced.clear()
    response = Client().get("/api/stream")
    next(iter(response.streaming_content))  # type: ignore[attr-defined]
    response.close()
    assert django_project.produced == ["chunk 0", "done under GET api/stream"]
    (span,) = ours(exporter)
    assert span.name == "GET api/stream"


def test_a_body_closed_before_it_was_read_is_closed_inside_the_span(
    exporter: InMemorySpanExporter,
) -> None:
    django_project.produced.clear()
    Client().get("/api/closing-stream").close()  # never iterated: the client went away
    assert django_project.produced == ["closed under GET api/closing-stream"]
    assert [span.name for span in ours(exporter)] == ["GET api/closing-stream"]


async def test_an_async_stream_the_client_left_is_closed_inside_the_span(
    exporter: InMemorySpanExporter,
) -> None:
    """Under ASGI the client goes away while the view awaits its next part (an LLM's next
    token): Django cancels it there, and its `finally` runs with the span current."""
    django_project.produced.clear()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/api/async-endless",
        "raw_path": b"/api/async-endless",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
    }
    streaming, asked = asyncio.Event(), []

    async def receive() -> dict[str, Any]:
        asked.append(True)
        if len(asked) == 1:
            return {"type": "http.request", "body": b"", "more_body": False}
        await streaming.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            streaming.set()

    await asyncio.wait_for(asgi_app([OURS])(scope, receive, send), 5)
    assert django_project.produced == ["closed under GET api/async-endless"]
    assert [span.name for span in ours(exporter)] == ["GET api/async-endless"]


def test_a_views_exception_is_recorded_and_djangos_500_is_sent(
    exporter: InMemorySpanExporter,
) -> None:
    response = Client(raise_request_exception=False).get("/api/boom")
    assert response.status_code == 500
    (span,) = ours(exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert [e.name for e in span.events] == ["exception"]
    assert span.events[0].attributes is not None
    assert span.events[0].attributes["exception.type"] == "ValueError"


def test_under_a_real_wsgi_server(exporter: InMemorySpanExporter) -> None:
    with run_wsgi(wsgi_app([OURS])) as url:
        response = httpx.get(f"{url}/api/items/3", headers=HEADERS, timeout=10)
    assert response.json() == {"item": 3}
    wait_for_spans(exporter, lambda spans: bool(ours(exporter)))
    (span,) = ours(exporter)
    assert span.name == f"GET {ROUTE}"
    assert span.parent is not None and span.parent.span_id == REMOTE.span_id


def test_the_span_ends_when_the_server_drops_the_response_unclosed(
    exporter: InMemorySpanExporter,
) -> None:
    # Werkzeug skips close() when the client resets the connection after its response.
    received = hang_up_while_werkzeug_drains(wsgi_app([OURS]), "/api/items/4")
    assert received.startswith(b"HTTP/1.1 200")
    wait_for_spans(exporter, lambda spans: bool(ours(exporter)))
    (span,) = ours(exporter)
    assert span.name == f"GET {ROUTE}"
    assert span.attributes is not None
    assert span.attributes["http.response.status_code"] == 200


@pytest.mark.parametrize("path", ["/api/items/4", "/api/stream"])
def test_a_response_dropped_unclosed_ends_its_span_without_the_collector(
    exporter: InMemorySpanExporter, path: str
) -> None:
    """No reference cycle through the response: the span ends the moment the server lets
    go of it, not at some later collection (and not inside one)."""
    from werkzeug.test import EnvironBuilder

    app = wsgi_app([OURS])
    environ = EnvironBuilder(path=path).get_environ()
    gc.disable()
    try:
        body = app(environ, lambda status, headers, exc_info=None: None)
        b"".join(body)
        assert ours(exporter) == []
        del body
        ended = ours(exporter)
    finally:
        gc.enable()
    assert len(ended) == 1


def test_a_cache_middleware_outside_ours_stores_and_serves_the_response(
    exporter: InMemorySpanExporter,
) -> None:
    """Django's cache middleware comes first in MIDDLEWARE, outside ours, and pickles the
    response: what we hook on it must pickle, and a cached copy must carry no span."""
    cached = [
        "django.middleware.cache.UpdateCacheMiddleware",
        OURS,
        "django.middleware.cache.FetchFromCacheMiddleware",
    ]
    caches = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    with override_settings(MIDDLEWARE=cached, CACHES=caches):
        from django.core.cache import cache

        cache.clear()
        first, second = (Client().get("/api/items/6") for _ in range(2))
        assert first.status_code == second.status_code == 200
        assert first.json() == second.json() == {"item": 6}
        cache.clear()
    # The second came from the cache: no URL resolved, no view ran, so no route in the name.
    assert [span.name for span in ours(exporter)] == [f"GET {ROUTE}", "GET"]


def test_under_uvicorn_with_an_async_view(exporter: InMemorySpanExporter) -> None:
    with run_uvicorn(asgi_app([OURS]), lifespan="off") as url:
        response = httpx.get(f"{url}/api/async/5", headers=HEADERS, timeout=10)
    assert response.json() == {"item": 5}
    wait_for_spans(exporter, lambda spans: bool(ours(exporter)))
    (span,) = ours(exporter)
    assert span.name == "GET api/async/<int:item_id>"
    assert span.parent is not None and span.parent.span_id == REMOTE.span_id


def test_an_async_streaming_responses_chunks_are_made_inside_the_span(
    exporter: InMemorySpanExporter,
) -> None:
    with run_uvicorn(asgi_app([OURS]), lifespan="off") as url:
        response = httpx.get(f"{url}/api/async-stream", headers=HEADERS, timeout=10)
    assert response.text == "chunk 0\nchunk 1\nchunk 2\n"
    spans = wait_for_spans(exporter, lambda spans: bool(ours(exporter)))
    (server,) = ours(exporter)
    assert server.name == "GET api/async-stream"
    chunks = [s for s in spans if s.name.startswith("chunk ")]
    assert len(chunks) == 3
    assert all(c.parent is not None and c.parent.span_id == server.context.span_id for c in chunks)
    assert all(c.end_time is not None and c.end_time <= server.end_time for c in chunks)  # type: ignore[operator]


def test_beside_the_contrib_django_instrumentation_one_server_span(
    exporter: InMemorySpanExporter,
) -> None:
    from opentelemetry.instrumentation.django import DjangoInstrumentor

    DjangoInstrumentor().instrument()
    try:
        response = Client(headers=HEADERS).get("/api/items/7")
    finally:
        DjangoInstrumentor().uninstrument()
    assert response.status_code == 200
    servers = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]
    assert len(servers) == 1
    (span,) = servers
    assert span.instrumentation_scope is not None
    assert span.instrumentation_scope.name == "opentelemetry.instrumentation.django"
    assert span.attributes is not None
    assert span.attributes["http.route"] == ROUTE
    # Ours gave contrib's span Laminar's path instead of opening a second span.
    assert span.attributes["lmnr.span.path"][-1] == f"GET {ROUTE}"


@pytest.mark.parametrize(
    "options", ["not a dict", {"trust": "bogus"}, {"no_such_option": 1}, {"excluded_paths": 3}]
)
def test_bad_settings_are_logged_and_the_request_is_served(
    options: object, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "laminar_middleware")
    with override_settings(LAMINAR_MIDDLEWARE=options):
        response = Client(headers=HEADERS).get("/api/items/7")
    assert response.status_code == 200
    assert response.json() == {"item": 7}
    assert any("laminar_middleware" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("middleware", [[], [OURS]], ids=["not in MIDDLEWARE", "in MIDDLEWARE"])
def test_instrument_puts_the_middleware_in_every_handler_once(
    middleware: list[str], exporter: InMemorySpanExporter
) -> None:
    from support.raw_apps import call_wsgi, wsgi_environ

    from laminar_middleware import instrument, uninstrument

    instrument()
    try:
        app = wsgi_app(middleware)
    finally:
        uninstrument()
    header = [(b"x-laminar-span-context", REMOTE.serialize().encode())]
    status, _, body = call_wsgi(app, wsgi_environ(header, "/api/items/9"))
    assert (status, body) == ("200 OK", b'{"item": 9}')
    (span,) = ours(exporter)
    assert span.name == f"GET {ROUTE}"
    assert span.parent is not None and span.parent.span_id == REMOTE.span_id


def test_the_hooks_get_djangos_request_and_the_response(exporter: InMemorySpanExporter) -> None:
    seen: list[object] = []

    def on_request(span: Any, request: Any) -> None:
        span.set_attribute("app.tenant", request.headers["x-tenant"])

    def on_response(span: Any, status: Any, headers: Any) -> None:
        seen.append((status, dict(headers)["x-app"]))

    hooks = {"server_request_hook": on_request, "server_response_hook": on_response}
    with override_settings(LAMINAR_MIDDLEWARE=hooks):
        response = Client(headers={"x-tenant": "t-1"}).get("/api/items/7")
    assert response.status_code == 200
    (span,) = ours(exporter)
    assert span.attributes is not None
    assert span.attributes["app.tenant"] == "t-1"
    assert seen == [(200, "1")]


def test_options_from_settings_apply(exporter: InMemorySpanExporter) -> None:
    with override_settings(LAMINAR_MIDDLEWARE={"excluded_paths": ["/api/items/7"]}):
        assert Client().get("/api/items/7").status_code == 200
        assert ours(exporter) == []
        assert Client().get("/api/items/8").status_code == 200
    assert [s.name for s in ours(exporter)] == [f"GET {ROUTE}"]
