"""`instrument_fastapi(app)`: the middleware first in the app, FastAPI's own request span
handed over (one SERVER span per request, FastAPI's operation spans under it), over uvicorn."""

from __future__ import annotations

import logging
import random
import re

import httpx
import pytest
from fastapi import FastAPI
from flask import Flask
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support.servers import run_uvicorn, wait_for_spans

from laminar_middleware import (
    HEADER_NAME,
    LaminarASGIMiddleware,
    LaminarSpanContext,
    instrument_fastapi,
)


def build() -> FastAPI:
    app = FastAPI()

    @app.get("/items/{item_id}")
    def item(item_id: int) -> dict[str, int]:
        return {"item": item_id}

    return app


def test_one_server_span_in_the_callers_trace_with_fastapis_spans_under_it(
    exporter: InMemorySpanExporter,
) -> None:
    app = build()
    instrument_fastapi(app, excluded_paths=["/health"])
    instrument_fastapi(app)  # twice: one middleware
    assert [m.cls for m in app.user_middleware] == [LaminarASGIMiddleware]
    caller = LaminarSpanContext(random.getrandbits(128) | 1, random.getrandbits(64) | 1)
    with run_uvicorn(app) as url:
        answer = httpx.get(f"{url}/items/3", headers={HEADER_NAME: caller.serialize()})
        assert answer.json() == {"item": 3}
        spans = wait_for_spans(exporter, lambda s: any(x.kind is trace.SpanKind.SERVER for x in s))
    # FastAPI's operation spans end before the request's server span.
    (server,) = [s for s in spans if s.kind is trace.SpanKind.SERVER]
    assert server.name == "GET /items/{item_id}"
    assert server.instrumentation_scope.name == "laminar_middleware"
    assert server.parent is not None and server.parent.span_id == caller.span_id
    (endpoint,) = [s for s in spans if s.name == "fastapi.endpoint"]
    assert endpoint.context.trace_id == caller.trace_id
    assert [s.instrumentation_scope.name for s in spans].count("fastapi") >= 1


def test_an_app_that_has_served_is_left_alone_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = build()
    app.middleware_stack = app.build_middleware_stack()  # what its first request does
    with caplog.at_level(logging.WARNING, logger="laminar_middleware"):
        instrument_fastapi(app)
    assert app.user_middleware == []
    assert any("served a request already" in r.getMessage() for r in caplog.records)


def test_anything_but_a_fastapi_app_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=re.escape("fastapi.FastAPI")):
        instrument_fastapi(Flask("not-fastapi"))
