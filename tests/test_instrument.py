"""`instrument()` / `uninstrument()` in code: apps and clients built while
instrumented carry the middleware and hooks, over real servers; after `uninstrument()` new
ones carry nothing."""

from __future__ import annotations

import random
from collections.abc import Iterator

import httpx
import pytest
import requests
from fastapi import FastAPI
from flask import Flask
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from support.servers import run_uvicorn, run_wsgi, wait_for_spans

import laminar_middleware
from laminar_middleware import HEADER_NAME, LaminarSpanContext

SCOPE = "laminar_middleware"


@pytest.fixture
def instrumented() -> Iterator[None]:
    laminar_middleware.instrument()
    try:
        yield
    finally:
        laminar_middleware.uninstrument()


def build_apps() -> tuple[FastAPI, Starlette, Flask]:
    api = FastAPI()

    @api.get("/hello/{name}")
    def hello(name: str) -> dict[str, str]:
        return {"hello": name}

    async def plain(request: object) -> PlainTextResponse:
        return PlainTextResponse("plain")

    star = Starlette(routes=[Route("/plain", plain)])
    web = Flask("instrumented")

    @web.get("/echo")
    def echo() -> dict[str, str]:
        from flask import request

        return {"header": request.headers.get(HEADER_NAME, "")}

    return api, star, web


def ours(spans: list, kind: trace.SpanKind) -> list:  # type: ignore[type-arg]
    return [s for s in spans if s.kind is kind and s.instrumentation_scope.name == SCOPE]


def remote() -> LaminarSpanContext:
    return LaminarSpanContext(random.getrandbits(128) | 1, random.getrandbits(64) | 1)


def test_apps_and_clients_built_while_instrumented_carry_everything(
    instrumented: None, exporter: InMemorySpanExporter
) -> None:
    api, star, web = build_apps()
    caller = remote()
    header = {HEADER_NAME: caller.serialize()}
    with run_uvicorn(api) as api_url, run_uvicorn(star) as star_url, run_wsgi(web) as web_url:
        assert httpx.get(f"{api_url}/hello/x", headers=header).json() == {"hello": "x"}
        assert httpx.get(f"{star_url}/plain", headers=header).text == "plain"
        assert requests.get(f"{web_url}/echo", headers=header, timeout=10).ok
        servers = wait_for_spans(exporter, lambda s: len(ours(s, trace.SpanKind.SERVER)) >= 3)
        names = sorted(s.name for s in ours(servers, trace.SpanKind.SERVER))
        assert names == ["GET /echo", "GET /hello/{name}", "GET /plain"]
        for span in ours(servers, trace.SpanKind.SERVER):
            assert span.parent is not None and span.parent.span_id == caller.span_id
        exporter.clear()
        # Clients made now carry the header of their client span.
        with trace.get_tracer("test").start_as_current_span("caller"):
            with httpx.Client() as client:
                sent = client.get(f"{web_url}/echo").json()["header"]
            sent_requests = requests.get(f"{web_url}/echo", timeout=10).json()["header"]
        clients = wait_for_spans(exporter, lambda s: len(ours(s, trace.SpanKind.CLIENT)) >= 2)
        client_ids = {s.context.span_id for s in ours(clients, trace.SpanKind.CLIENT)}
        for value in (sent, sent_requests):
            parsed = LaminarSpanContext.parse(value)
            assert parsed is not None and parsed.span_id in client_ids


def test_after_uninstrument_new_apps_and_clients_carry_nothing(
    exporter: InMemorySpanExporter,
) -> None:
    laminar_middleware.instrument()
    laminar_middleware.uninstrument()
    api, _, web = build_apps()
    with run_uvicorn(api) as api_url, run_wsgi(web) as web_url:
        assert httpx.get(
            f"{api_url}/hello/y", headers={HEADER_NAME: remote().serialize()}
        ).is_success
        with trace.get_tracer("test").start_as_current_span("caller"):
            with httpx.Client() as client:
                sent = client.get(f"{web_url}/echo").json()["header"]
            sent_requests = requests.get(f"{web_url}/echo", timeout=10).json()["header"]
    assert sent == "" and sent_requests == ""
    spans = list(exporter.get_finished_spans())
    assert not ours(spans, trace.SpanKind.SERVER)
    assert not ours(spans, trace.SpanKind.CLIENT)
    assert not laminar_middleware._auto.is_instrumented()


def test_instrument_twice_adds_one_middleware(instrumented: None) -> None:
    laminar_middleware.instrument()
    api, star, web = build_apps()
    from laminar_middleware import LaminarASGIMiddleware, LaminarWSGIMiddleware

    for app in (api, star, api, star):  # what Starlette does at the first request
        app.build_middleware_stack()
    assert sum(m.cls is LaminarASGIMiddleware for m in api.user_middleware) == 1
    assert sum(m.cls is LaminarASGIMiddleware for m in star.user_middleware) == 1
    assert isinstance(web.wsgi_app, LaminarWSGIMiddleware)
    assert not isinstance(web.wsgi_app.app, LaminarWSGIMiddleware)


def test_a_bad_environment_value_logs_once_and_uses_the_default(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("LAMINAR_TRUST", "sometimes")
    with caplog.at_level("WARNING", logger="laminar_middleware"):
        laminar_middleware.instrument()
        try:
            build_apps()
            build_apps()
        finally:
            laminar_middleware.uninstrument()
    lines = [r for r in caplog.records if "LAMINAR_TRUST" in r.getMessage()]
    assert len(lines) == 1


def test_apps_and_sessions_made_before_instrument_are_covered(
    exporter: InMemorySpanExporter,
) -> None:
    api, star, web = build_apps()
    session = requests.Session()
    laminar_middleware.instrument()
    try:
        caller = remote()
        header = {HEADER_NAME: caller.serialize()}
        with run_uvicorn(api) as api_url, run_uvicorn(star) as star_url, run_wsgi(web) as web_url:
            assert httpx.get(f"{api_url}/hello/x", headers=header).json() == {"hello": "x"}
            assert httpx.get(f"{star_url}/plain", headers=header).text == "plain"
            assert requests.get(f"{web_url}/echo", headers=header, timeout=10).ok
            servers = wait_for_spans(exporter, lambda s: len(ours(s, trace.SpanKind.SERVER)) >= 3)
            names = sorted(s.name for s in ours(servers, trace.SpanKind.SERVER))
            assert names == ["GET /echo", "GET /hello/{name}", "GET /plain"]
            for span in ours(servers, trace.SpanKind.SERVER):
                assert span.parent is not None and span.parent.span_id == caller.span_id
            with trace.get_tracer("test").start_as_current_span("caller"):
                sent = session.get(f"{web_url}/echo", timeout=10).json()["header"]
            assert LaminarSpanContext.parse(sent) is not None
    finally:
        laminar_middleware.uninstrument()
        session.close()


def test_a_second_instrument_with_other_options_warns_and_keeps_the_first(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="laminar_middleware"):
        laminar_middleware.instrument(trust="restart")
        try:
            laminar_middleware.instrument(trust="restart")  # the same: nothing to say
            assert not caplog.records
            laminar_middleware.instrument(trust="continue")
            api, _, _ = build_apps()
            api.build_middleware_stack()
        finally:
            laminar_middleware.uninstrument()
    (line,) = [r.getMessage() for r in caplog.records]
    assert "first call's options stay" in line
    (middleware,) = api.user_middleware
    assert middleware.kwargs["trust"] == "restart"
