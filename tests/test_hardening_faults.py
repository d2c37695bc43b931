"""Faults: whatever breaks, the response is the one the bare app gives, and the server keeps
serving.

Each fault runs under real servers (uvicorn for a Starlette app, Werkzeug's threaded server for
a Flask app). One server per protocol serves the bare app and the app behind the middleware
side by side (an `x-variant` header picks one), so the same requests go to both over the
same sockets and their responses are compared: status, headers (except `date`) and body.

The faults inside OpenTelemetry: an exporter that raises (under a simple and under a
batch span processor), a span processor that raises in `on_start` or in `on_end`, a tracer
provider that was shut down, a global propagator whose `extract` raises. Each uses a tracer
provider of its own, passed as `tracer_provider=`. Then the faults of the connection and the
app: a client that disconnects in the middle of a streaming response, and an app that raises
after it has sent the response headers (compared byte for byte on the raw socket).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import requests
from flask import Flask, request
from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from support.servers import run_uvicorn, run_wsgi, wait_for_spans

from laminar_middleware import (
    HEADER_NAME,
    LaminarASGIMiddleware,
    LaminarSpanContext,
    LaminarWSGIMiddleware,
)

SCOPE = "laminar_middleware"
VALID = LaminarSpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7).serialize()


# -- faulty parts of OpenTelemetry ------------------------------------------------------------


class RaisingExporter(SpanExporter):
    def __init__(self) -> None:
        self.calls = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.calls += 1
        raise RuntimeError("exporter failed")

    def shutdown(self) -> None:
        pass


class RaisingProcessor(SpanProcessor):
    def __init__(self, where: str) -> None:
        self.where = where

    def on_start(self, span: Any, parent_context: Context | None = None) -> None:
        if self.where == "on_start":
            raise RuntimeError("span processor on_start failed")

    def on_end(self, span: ReadableSpan) -> None:
        if self.where == "on_end":
            raise RuntimeError("span processor on_end failed")


class CountingProcessor(SpanProcessor):
    """Started and ended spans by span id: every span must end exactly once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started: dict[int, int] = {}
        self.ended: dict[int, int] = {}
        self.spans: list[ReadableSpan] = []

    def on_start(self, span: Any, parent_context: Context | None = None) -> None:
        with self.lock:
            key = span.context.span_id
            self.started[key] = self.started.get(key, 0) + 1

    def on_end(self, span: ReadableSpan) -> None:
        with self.lock:
            key = span.context.span_id
            self.ended[key] = self.ended.get(key, 0) + 1
            self.spans.append(span)


class RaisingPropagator(TextMapPropagator):
    def extract(self, carrier: Any, context: Context | None = None, getter: Any = None) -> Context:
        raise RuntimeError("propagator failed")

    def inject(self, carrier: Any, context: Context | None = None, setter: Any = None) -> None:
        raise RuntimeError("propagator failed")

    @property
    def fields(self) -> set[str]:
        return {"traceparent"}


@dataclass
class Fault:
    """A tracer provider with something broken in it (or broken around it)."""

    provider: TracerProvider
    counter: CountingProcessor
    # Our own log lines ("internal error ...") are expected for this fault.
    logs_internal_errors: bool = False
    global_propagator: TextMapPropagator | None = None
    cleanups: list[Callable[[], Any]] = field(default_factory=list)


def _provider(
    *processors: SpanProcessor, counter_last: bool = False
) -> tuple[TracerProvider, CountingProcessor]:
    provider = TracerProvider()
    counter = CountingProcessor()
    if not counter_last:
        provider.add_span_processor(counter)
    for processor in processors:
        provider.add_span_processor(processor)
    if counter_last:
        provider.add_span_processor(counter)
    return provider, counter


def fault_exporter_raises_simple() -> Fault:
    provider, counter = _provider(SimpleSpanProcessor(RaisingExporter()))
    return Fault(provider, counter)


def fault_exporter_raises_batch() -> Fault:
    provider, counter = _provider(
        BatchSpanProcessor(RaisingExporter(), schedule_delay_millis=10, max_export_batch_size=2)
    )
    return Fault(provider, counter, cleanups=[provider.shutdown])


def fault_processor_on_start() -> Fault:
    # The SDK calls processors in order and stops at the one that raises, so that
    # `start_span` raises: a processor before it would see a start and never an end. The
    # counter goes after it and so sees what the requests really got: no span.
    provider, counter = _provider(RaisingProcessor("on_start"), counter_last=True)
    return Fault(provider, counter, logs_internal_errors=True)


def fault_processor_on_end() -> Fault:
    provider, counter = _provider(RaisingProcessor("on_end"))
    return Fault(provider, counter, logs_internal_errors=True)


def fault_provider_shut_down() -> Fault:
    exporter = InMemorySpanExporter()
    provider, counter = _provider(SimpleSpanProcessor(exporter))
    provider.shutdown()
    return Fault(provider, counter)


def fault_propagator_raises() -> Fault:
    provider, counter = _provider()
    return Fault(
        provider, counter, logs_internal_errors=True, global_propagator=RaisingPropagator()
    )


FAULTS: dict[str, Callable[[], Fault]] = {
    "exporter raises (simple processor)": fault_exporter_raises_simple,
    "exporter raises (batch processor)": fault_exporter_raises_batch,
    "span processor raises in on_start": fault_processor_on_start,
    "span processor raises in on_end": fault_processor_on_end,
    "tracer provider shut down": fault_provider_shut_down,
    "global propagator raises": fault_propagator_raises,
}


# -- the apps: bare and wrapped side by side ------------------------------------------------


class Failure(Exception):
    pass


@dataclass
class Observed:
    """What the apps' streaming generators saw, by request id."""

    closed: dict[str, bool] = field(default_factory=dict)


def starlette_app(observed: Observed) -> Any:
    async def item(request: Request) -> JSONResponse:
        return JSONResponse({"item": request.path_params["item_id"]}, headers={"x-app": "1"})

    async def echo(request: Request) -> Response:
        return Response(await request.body(), media_type="application/octet-stream")

    async def stream(request: Request) -> StreamingResponse:
        async def chunks() -> Any:
            for i in range(3):
                yield b"chunk %d\n" % i

        return StreamingResponse(chunks(), media_type="text/plain")

    async def server_error(request: Request) -> PlainTextResponse:
        return PlainTextResponse("it broke", status_code=503)

    async def slow_stream(request: Request) -> StreamingResponse:
        key = request.headers["x-request"]

        async def chunks() -> Any:
            observed.closed[key] = False
            try:
                yield b"first\n"
                for _ in range(500):  # 5 s at most
                    await asyncio.sleep(0.01)
                    yield b"x" * 1024
            finally:
                observed.closed[key] = True

        return StreamingResponse(chunks(), media_type="text/plain")

    starlette = Starlette(
        routes=[
            Route("/items/{item_id}", item),
            Route("/echo", echo, methods=["POST"]),
            Route("/stream", stream),
            Route("/error", server_error),
            Route("/slow-stream", slow_stream),
        ]
    )

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/raise-after-start":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/plain")],
                }
            )
            await send({"type": "http.response.body", "body": b"partial", "more_body": True})
            raise Failure("the app failed after sending its headers")
        await starlette(scope, receive, send)

    return app


def flask_app(observed: Observed) -> Any:
    flask = Flask(__name__)

    @flask.get("/items/<item_id>")
    def item(item_id: str) -> tuple[dict[str, str], int, dict[str, str]]:
        return {"item": item_id}, 200, {"X-App": "1"}

    @flask.post("/echo")
    def echo() -> Any:
        return flask.response_class(request.get_data(), mimetype="application/octet-stream")

    @flask.get("/stream")
    def stream() -> Any:
        def chunks() -> Iterator[bytes]:
            for i in range(3):
                yield b"chunk %d\n" % i

        return flask.response_class(chunks(), mimetype="text/plain")

    @flask.get("/error")
    def server_error() -> tuple[str, int]:
        return "it broke", 503

    @flask.get("/slow-stream")
    def slow_stream() -> Any:
        key = request.headers["x-request"]

        def chunks() -> Iterator[bytes]:
            observed.closed[key] = False
            try:
                yield b"first\n"
                for _ in range(500):  # 5 s at most
                    time.sleep(0.01)
                    yield b"x" * 1024
            finally:
                observed.closed[key] = True

        return flask.response_class(chunks(), mimetype="text/plain")

    inner = flask.wsgi_app

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if environ["PATH_INFO"] == "/raise-after-start":
            return raise_after_start(start_response)
        return inner(environ, start_response)

    def raise_after_start(start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"partial"
        raise Failure("the app failed after sending its headers")

    return app


def asgi_dispatch(variants: dict[str, Any]) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        headers = dict(scope.get("headers") or ())
        variant = headers.get(b"x-variant", b"bare").decode()
        await variants[variant](scope, receive, send)

    return app


def wsgi_dispatch(variants: dict[str, Any]) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        return variants[environ.get("HTTP_X_VARIANT", "bare")](environ, start_response)

    return app


@dataclass
class Servers:
    """A uvicorn and a Werkzeug server, each serving the variants `bare`, `healthy` (the
    middleware on the global provider) and `faulty` (the middleware on the fault's)."""

    asgi_url: str
    wsgi_url: str
    observed: Observed

    @property
    def urls(self) -> list[str]:
        return [self.asgi_url, self.wsgi_url]


@contextmanager
def serve(provider: TracerProvider | None) -> Iterator[Servers]:
    observed = Observed()
    asgi_bare = starlette_app(observed)
    wsgi_bare = flask_app(observed)
    asgi = asgi_dispatch(
        {
            "bare": asgi_bare,
            "healthy": LaminarASGIMiddleware(asgi_bare),
            "faulty": LaminarASGIMiddleware(asgi_bare, tracer_provider=provider),
        }
    )
    wsgi = wsgi_dispatch(
        {
            "bare": wsgi_bare,
            "healthy": LaminarWSGIMiddleware(wsgi_bare),
            "faulty": LaminarWSGIMiddleware(wsgi_bare, tracer_provider=provider),
        }
    )
    with run_uvicorn(asgi) as asgi_url, run_wsgi(wsgi) as wsgi_url:
        yield Servers(asgi_url, wsgi_url, observed)


# -- requests -------------------------------------------------------------------------------

REQUESTS: list[tuple[str, str, dict[str, str], bytes]] = [
    ("GET", "/items/7", {HEADER_NAME: VALID}, b""),
    ("GET", "/items/8", {HEADER_NAME: '{"trace_id": "garbage"'}, b""),
    ("GET", "/items/9", {}, b""),
    ("POST", "/echo", {HEADER_NAME: VALID}, b"hello " * 1000),
    ("GET", "/stream", {}, b""),
    ("GET", "/missing", {HEADER_NAME: VALID}, b""),
    ("GET", "/error", {}, b""),
]


def new_client() -> httpx.Client:
    # A connection per request: uvicorn answers on a kept-alive connection only after the
    # client's delayed ACK (40 ms a request), which would make these tests slow, not better.
    return httpx.Client(timeout=10, limits=httpx.Limits(max_keepalive_connections=0))


def fetch(
    client: httpx.Client, url: str, variant: str, request: tuple[str, str, dict[str, str], bytes]
) -> tuple[int, list[tuple[str, str]], bytes]:
    method, path, headers, body = request
    response = client.request(
        method, url + path, headers={**headers, "x-variant": variant}, content=body or None
    )
    kept = [(k, v) for k, v in response.headers.multi_items() if k.lower() != "date"]
    return response.status_code, kept, response.content


class ServerErrors(logging.Handler):
    """The servers' own error lines: an exception that escaped to uvicorn or Werkzeug."""

    LOGGERS = ("uvicorn.error", "werkzeug")

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def server_errors() -> Iterator[ServerErrors]:
    handler = ServerErrors()
    for name in ServerErrors.LOGGERS:
        logging.getLogger(name).addHandler(handler)
    try:
        yield handler
    finally:
        for name in ServerErrors.LOGGERS:
            logging.getLogger(name).removeHandler(handler)


def server_spans(counter: CountingProcessor) -> list[ReadableSpan]:
    with counter.lock:
        return [s for s in counter.spans if s.kind is SpanKind.SERVER]


# -- faults inside OpenTelemetry ------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", list(FAULTS))
def test_fault_inside_opentelemetry_changes_no_response(
    name: str,
    exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
    server_errors: ServerErrors,
) -> None:
    fault = FAULTS[name]()
    previous = propagate.get_global_textmap()
    try:
        with caplog.at_level(logging.WARNING), serve(fault.provider) as servers:
            with new_client() as client:
                for url in servers.urls:
                    for _ in range(2):  # and again: the server keeps serving
                        for request in REQUESTS:
                            expected = fetch(client, url, "bare", request)
                            if fault.global_propagator is not None:
                                propagate.set_global_textmap(fault.global_propagator)
                            try:
                                got = fetch(client, url, "faulty", request)
                            finally:
                                propagate.set_global_textmap(previous)
                            assert got == expected, (url, request[:2])
                    # The server still serves, and the middleware still traces there.
                    exporter.clear()
                    status, _, body = fetch(client, url, "healthy", REQUESTS[0])
                    assert (status, json.loads(body)) == (200, {"item": "7"})
                    spans = wait_for_spans(exporter, lambda s: len(s) >= 1)
                    assert [s.kind for s in spans] == [SpanKind.SERVER]
    finally:
        propagate.set_global_textmap(previous)
        for cleanup in fault.cleanups:
            cleanup()

    # No exception reached either server.
    assert server_errors.records == []
    # Every span that started ended, once.
    counter = fault.counter
    assert counter.started == counter.ended
    assert all(count == 1 for count in counter.ended.values())
    requests_sent = 2 * 2 * len(REQUESTS)
    if name == "span processor raises in on_start":
        assert counter.started == {}  # no span could start: the requests ran without one
    else:
        assert len(server_spans(counter)) == requests_sent
    ours = [r for r in caplog.records if r.name == "laminar_middleware"]
    internal = [r for r in ours if "internal error" in r.getMessage()]
    if fault.logs_internal_errors:
        # Logged, and rate-limited: at most 10 lines a minute.
        assert 1 <= len(internal) <= 10
    else:
        assert internal == []


# -- a client that disconnects mid-stream -----------------------------------------------------


def read_first_chunk_then_disconnect(url: str, variant: str, key: str) -> bytes:
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(
            (
                f"GET /slow-stream HTTP/1.1\r\nHost: {parts.netloc}\r\nx-variant: {variant}\r\n"
                f"x-request: {key}\r\n{HEADER_NAME}: {VALID}\r\n\r\n"
            ).encode()
        )
        received = b""
        while b"first\n" not in received:
            data = sock.recv(4096)
            if not data:
                break
            received += data
        # Close with a reset, as a client that goes away does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    return received


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.timeout(60)
def test_client_disconnecting_mid_stream() -> None:
    provider, counter = _provider()
    with serve(provider) as servers, new_client() as client:
        for url in servers.urls:
            seen = {}
            for variant in ("bare", "faulty"):
                key = f"{variant}-{uuid.uuid4()}"
                received = read_first_chunk_then_disconnect(url, variant, key)
                assert received.startswith(b"HTTP/1.1 200 OK\r\n")
                # The app's generator is closed (its `finally` runs) in both cases.
                assert wait_until(lambda k=key: servers.observed.closed.get(k) is True), variant
                seen[variant] = received.split(b"\r\n\r\n", 1)[1]
            assert b"first\n" in seen["bare"] and b"first\n" in seen["faulty"]
            # One server span for the cut-off request, ended once.
            assert wait_until(lambda: len(server_spans(counter)) == 1)
            (span,) = server_spans(counter)
            assert span.end_time is not None
            assert dict(span.attributes or {})["http.response.status_code"] == 200
            # The server keeps serving, through the middleware too.
            for variant in ("bare", "faulty"):
                status, _, body = fetch(client, url, variant, REQUESTS[0])
                assert (status, json.loads(body)) == (200, {"item": "7"})
            assert wait_until(lambda: len(server_spans(counter)) == 2)
            with counter.lock:
                counter.spans.clear()
    assert counter.started == counter.ended
    assert all(count == 1 for count in counter.ended.values())


# -- an app that raises after sending its headers -------------------------------------------


def raw_exchange(url: str, variant: str) -> tuple[bytes, str]:
    """The raw bytes of the response to GET /raise-after-start, and how the connection ended."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(
            (
                f"GET /raise-after-start HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                f"x-variant: {variant}\r\n{HEADER_NAME}: {VALID}\r\n\r\n"
            ).encode()
        )
        received = b""
        ended = "eof"
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                ended = "reset"
                break
            except TimeoutError:
                ended = "timeout"
                break
            if not data:
                break
            received += data
    lines = [line for line in received.split(b"\r\n") if not line.lower().startswith(b"date:")]
    return b"\r\n".join(lines), ended


@pytest.mark.timeout(60)
def test_app_raising_after_sending_headers() -> None:
    provider, counter = _provider()
    with serve(provider) as servers, new_client() as client:
        for url in servers.urls:
            bare = raw_exchange(url, "bare")
            wrapped = raw_exchange(url, "faulty")
            # The same bytes and the same end of the connection as without the middleware:
            # the headers and the first chunk, then the server cuts the response off.
            assert wrapped == bare
            assert bare[0].startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"partial" in bare[0] and bare[1] != "timeout"
            # The server keeps serving.
            for variant in ("bare", "faulty"):
                status, _, body = fetch(client, url, variant, REQUESTS[0])
                assert (status, json.loads(body)) == (200, {"item": "7"})
    spans = server_spans(counter)
    failed = [s for s in spans if dict(s.attributes or {}).get("url.path") == "/raise-after-start"]
    assert len(failed) == 2  # one per server
    for span in failed:
        assert span.status.status_code is StatusCode.ERROR
        attributes = dict(span.attributes or {})
        assert attributes["http.response.status_code"] == 200
        assert attributes["error.type"].endswith("Failure")
    assert counter.started == counter.ended
    assert all(count == 1 for count in counter.ended.values())


def test_requests_session_keeps_working_against_a_faulty_provider() -> None:
    """The same through `requests` (a second real client), for the nastiest fault."""
    fault = fault_processor_on_end()
    with serve(fault.provider) as servers, requests.Session() as session:
        for url in servers.urls:
            for _ in range(5):
                bare = session.get(
                    url + "/items/7",
                    headers={"x-variant": "bare", "Connection": "close"},
                    timeout=10,
                )
                got = session.get(
                    url + "/items/7",
                    headers={"x-variant": "faulty", HEADER_NAME: VALID, "Connection": "close"},
                    timeout=10,
                )
                assert (got.status_code, got.content) == (bare.status_code, bare.content)
    assert len(server_spans(fault.counter)) == 10
