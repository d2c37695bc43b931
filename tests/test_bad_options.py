"""Options never break requests: a bad option of a middleware, hook, `instrument()` or
`continue_trace` is one ERROR line naming it, then the safe default. Security options fail
closed (a bad `trust` is `restart`; a `propagate_to` with no usable entry sends nothing).
Served by real uvicorn and Werkzeug servers, since the point is what a request sees."""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
from fastapi import FastAPI
from flask import Flask
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support.servers import run_uvicorn, run_wsgi, wait_for_spans

import laminar_middleware
from laminar_middleware import (
    HEADER_NAME,
    LaminarASGIMiddleware,
    LaminarSpanContext,
    LaminarWSGIMiddleware,
    continue_trace,
    instrument_httpx,
    instrument_requests,
)

CALLER = LaminarSpanContext(random.getrandbits(128) | 1, random.getrandbits(64) | 1)
HEADERS = {HEADER_NAME: CALLER.serialize()}


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "laminar_middleware" and r.levelno == logging.ERROR
    ]


def servers(exporter: InMemorySpanExporter, count: int = 1) -> list[Any]:
    def done(spans: list[Any]) -> bool:
        return len([s for s in spans if s.kind is trace.SpanKind.SERVER]) >= count

    spans = wait_for_spans(exporter, done)
    return [s for s in spans if s.kind is trace.SpanKind.SERVER]


def fastapi_app(**options: Any) -> FastAPI:
    app = FastAPI()
    app.add_middleware(LaminarASGIMiddleware, **options)

    @app.get("/items/{item_id}")
    def item(item_id: int) -> dict[str, int]:
        return {"item": item_id}

    return app


def flask_app(**options: Any) -> Flask:
    app = Flask("bad-options")
    app.wsgi_app = LaminarWSGIMiddleware(app.wsgi_app, **options)  # type: ignore[method-assign]

    @app.get("/items/<int:item_id>")
    def item(item_id: int) -> dict[str, int]:
        return {"item": item_id}

    return app


BAD_INBOUND = [
    pytest.param({"trust": "bogus"}, "trust='bogus'", True, id="trust-bogus"),
    pytest.param({"trust": 3}, "trust=3", True, id="trust-int"),
    pytest.param({"trust": ["continue"]}, "trust=['continue']", True, id="trust-list"),
    pytest.param({"trst": "continue"}, "(trst)='continue'", False, id="unknown-name"),
    pytest.param({"excluded_paths": 5}, "excluded_paths=5", False, id="excluded-int"),
    pytest.param({"excluded_paths": ["/x", 5]}, "excluded_paths entry=5", False, id="entry"),
    pytest.param({"header_names": 7}, "header_names=7", False, id="header-names-int"),
    pytest.param({"header_names": [""]}, "header_names=['']", False, id="header-empty"),
    pytest.param({"tracer_provider": "mine"}, "tracer_provider='mine'", False, id="provider"),
]


@pytest.mark.parametrize(("options", "named", "restarts"), BAD_INBOUND)
def test_a_bad_fastapi_middleware_option_never_breaks_a_request(
    options: dict[str, Any],
    named: str,
    restarts: bool,
    exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="laminar_middleware"):
        with run_uvicorn(fastapi_app(**options)) as url:
            answers = [httpx.get(f"{url}/items/{n}", headers=HEADERS) for n in range(3)]
        assert [(a.status_code, a.json()) for a in answers] == [
            (200, {"item": n}) for n in range(3)
        ]
        spans = servers(exporter, 3)
    (line,) = errors(caplog)  # once per process, not once per request
    assert named in line and "accepted:" in line
    assert len(spans) == 3 and {s.name for s in spans} == {"GET /items/{item_id}"}
    for span in spans:
        if restarts:  # fails closed: a new trace, linked to the caller
            assert span.parent is None and span.context.trace_id != CALLER.trace_id
            assert [link.context.span_id for link in span.links] == [CALLER.span_id]
        else:
            assert span.parent is not None and span.parent.span_id == CALLER.span_id


@pytest.mark.parametrize(("options", "named", "restarts"), BAD_INBOUND)
def test_a_bad_wsgi_middleware_option_never_breaks_a_request(
    options: dict[str, Any],
    named: str,
    restarts: bool,
    exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="laminar_middleware"):
        with run_wsgi(flask_app(**options)) as url:
            answer = requests.get(f"{url}/items/4", headers=HEADERS, timeout=10)
        assert (answer.status_code, answer.json()) == (200, {"item": 4})
        (span,) = servers(exporter)
    (line,) = errors(caplog)
    assert named in line
    if restarts:
        assert span.parent is None and span.context.trace_id != CALLER.trace_id
    else:
        assert span.parent is not None and span.parent.span_id == CALLER.span_id


def test_a_bad_value_is_escaped_and_cut_in_its_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="laminar_middleware"):
        LaminarWSGIMiddleware(flask_app(), trust="\x1b[31mred\n" + "x" * 500)
    (line,) = errors(caplog)
    assert "\x1b" not in line and "\n" not in line and "\\x1b[31mred\\n" in line
    assert len(line) < 300


def test_each_distinct_mistake_is_one_line_per_process(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="laminar_middleware"):
        for _ in range(3):
            LaminarWSGIMiddleware(flask_app(), trust="bogus")
            LaminarASGIMiddleware(fastapi_app(), trust="bogus")
        LaminarWSGIMiddleware(flask_app(), trust="other")
    assert len(errors(caplog)) == 2


@pytest.fixture
def echo_url() -> Iterator[str]:
    app = Flask("echo")

    @app.get("/echo")
    def echo() -> dict[str, str]:
        from flask import request

        return {"header": request.headers.get(HEADER_NAME, "")}

    with run_wsgi(app) as url:
        yield url


def sent_by_httpx(url: str, **options: Any) -> str:
    with httpx.Client() as client:
        instrument_httpx(client, **options)
        with trace.get_tracer("test").start_as_current_span("caller"):
            answer = client.get(f"{url}/echo")
    assert answer.status_code == 200
    return str(answer.json()["header"])


def sent_by_requests(url: str, **options: Any) -> str:
    with requests.Session() as session:
        instrument_requests(session, **options)
        with trace.get_tracer("test").start_as_current_span("caller"):
            answer = session.get(f"{url}/echo", timeout=10)
    assert answer.status_code == 200
    return str(answer.json()["header"])


SENDERS = [sent_by_httpx, sent_by_requests]


@pytest.mark.parametrize("send", SENDERS)
@pytest.mark.parametrize(
    "propagate_to",
    [123, ["re:(unclosed"], [b"127.0.0.1"], [42, None], re.compile(b"127")],
    ids=["int", "bad-regex", "bytes-entry", "wrong-types", "bytes-pattern"],
)
def test_a_propagate_to_with_no_usable_entry_sends_nothing(
    send: Any, propagate_to: Any, echo_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="laminar_middleware"):
        assert send(echo_url, propagate_to=propagate_to) == ""
    assert errors(caplog) and all("propagate_to" in line for line in errors(caplog))


@pytest.mark.parametrize("send", SENDERS)
def test_a_bad_propagate_to_entry_is_skipped_and_the_rest_holds(
    send: Any, echo_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="laminar_middleware"):
        assert send(echo_url, propagate_to=["re:(unclosed", "127.0.0.1"]) != ""
        assert send(echo_url, propagate_to=["re:(unclosed", "elsewhere.example"]) == ""
    assert len(errors(caplog)) == 1


@pytest.mark.parametrize("send", SENDERS)
def test_a_bad_environment_allow_list_sends_nothing(
    send: Any, echo_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("LAMINAR_PROPAGATE_TO", "re:(unclosed")
    with caplog.at_level(logging.ERROR, logger="laminar_middleware"):
        assert send(echo_url) == ""
        assert send(echo_url) == ""
    (line,) = errors(caplog)
    assert "LAMINAR_PROPAGATE_TO" in line


@pytest.mark.parametrize("send", SENDERS)
@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"client_spans": "no"}, "client_spans='no'"),
        ({"propagate": ["x"]}, "(propagate)=['x']"),
        ({"tracer_provider": 1}, "tracer_provider=1"),
    ],
)
def test_a_bad_hook_option_is_logged_and_the_call_still_carries_the_header(
    send: Any,
    options: dict[str, Any],
    named: str,
    echo_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="laminar_middleware"):
        assert LaminarSpanContext.parse(send(echo_url, **options)) is not None
    (line,) = errors(caplog)
    assert named in line


def test_a_helper_given_the_wrong_object_raises_a_clear_type_error() -> None:
    with pytest.raises(TypeError, match=re.escape("httpx.Client")):
        instrument_httpx(requests.Session())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=re.escape("requests.Session")):
        instrument_requests(httpx.Client())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=re.escape("flask.Flask")):
        laminar_middleware.instrument_flask(FastAPI())


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"kindd": 1}, "continue_trace(kindd)=1"),
        ({"kind": 1}, "continue_trace(kind)=1"),
        ({"attributes": ["a"]}, "continue_trace(attributes)=['a']"),
        ({"links": [1]}, "continue_trace(links)=[1]"),
        ({"start_time": "soon"}, "continue_trace(start_time)='soon'"),
        ({"end_on_exit": "yes"}, "end_on_exit='yes'"),
    ],
)
def test_continue_trace_with_a_bad_option_still_starts_a_real_span(
    options: dict[str, Any],
    named: str,
    exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="laminar_middleware"):
        with continue_trace(CALLER.serialize(), "job", **options) as span:
            assert span.get_span_context().is_valid
            assert span.get_span_context().trace_id == CALLER.trace_id
    (line,) = [r.getMessage() for r in caplog.records]  # an ERROR, no internal error
    assert named in line
    (finished,) = exporter.get_finished_spans()
    assert finished.name == "job" and finished.parent is not None
    assert finished.parent.span_id == CALLER.span_id


def test_instrument_with_a_bad_option_serves_and_fails_closed(
    exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="laminar_middleware"):
        laminar_middleware.instrument(trust="bogus", colour="blue")
        try:
            app = FastAPI()

            @app.get("/")
            def root() -> str:
                return "ok"

            with run_uvicorn(app) as url:
                answer = httpx.get(url, headers=HEADERS)
            (span,) = servers(exporter)
        finally:
            laminar_middleware.uninstrument()
    assert (answer.status_code, answer.json()) == (200, "ok")
    assert span.parent is None and [link.context.span_id for link in span.links] == [CALLER.span_id]
    lines = errors(caplog)
    assert len(lines) == 2
    assert any("trust='bogus'" in line for line in lines)
    assert any("instrument(colour)='blue'" in line for line in lines)
