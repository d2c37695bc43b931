"""A FastAPI and a Flask service with this package's middleware, handlers that make spans
(`@observe` when Laminar's SDK is initialized, a plain OpenTelemetry tracer otherwise) and
call out with httpx. Runs in its own process, because `lmnr` keeps process-wide state.

Usage: python lmnr_interop.py lmnr|plain  ->  JSON on stdout: the spans, the headers sent.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

import httpx
from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace import TracerProvider as OtherProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

MODE = sys.argv[1] if len(sys.argv) > 1 else "plain"
EXPORTER = InMemorySpanExporter()

if MODE == "lmnr":
    from lmnr import Laminar, observe
    from lmnr.opentelemetry_lib.tracing import init_tracing

    init_tracing(
        exporter=EXPORTER, disable_batch=True, instruments=set(), set_global_tracer_provider=False
    )
    Laminar.initialize(project_api_key="offline-test", instruments=set())
    assert Laminar.is_initialized()
else:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(provider)
    tracer = trace.get_tracer("handler-code")

    def observe(name: str) -> Any:  # the plain-OpenTelemetry stand-in for @observe
        def decorate(func: Any) -> Any:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                with tracer.start_as_current_span(name):
                    return func(*args, **kwargs)

            return wrapper

        return decorate


from fastapi import FastAPI  # noqa: E402
from flask import Flask  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402

from laminar_middleware import (  # noqa: E402
    HEADER_NAME,
    LaminarASGIMiddleware,
    LaminarSpanContext,
    LaminarWSGIMiddleware,
    instrument_httpx,
)
from laminar_middleware.codec import format_uuid  # noqa: E402

received: list[dict[str, str]] = []


def recorder(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    received.append(
        {"path": environ["PATH_INFO"], "header": environ.get("HTTP_X_LAMINAR_SPAN_CONTEXT", "")}
    )
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


@contextmanager
def serve_wsgi(app: Any) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextmanager
def serve_asgi(app: Any) -> Iterator[str]:
    import socket

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(1000):
        if server.started:
            break
        threading.Event().wait(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def build(recorder_url: str) -> tuple[Any, Any]:
    client = httpx.Client()
    instrument_httpx(client)
    bare = httpx.Client()
    instrument_httpx(bare, client_spans=False)

    @observe(name="call_llm")
    def call_out(label: str) -> None:
        client.get(f"{recorder_url}/{label}")
        bare.get(f"{recorder_url}/{label}-bare")

    @observe(name="handle")
    def handle(label: str) -> str:
        call_out(label)
        return "done"

    api = FastAPI()

    @api.get("/items/{item_id}")
    def fastapi_item(item_id: int) -> dict[str, str]:
        return {"result": handle("fastapi")}

    api.add_middleware(LaminarASGIMiddleware)

    web = Flask("interop")

    @web.get("/items/<int:item_id>")
    def flask_item(item_id: int) -> dict[str, str]:
        return {"result": handle("flask")}

    web.wsgi_app = LaminarWSGIMiddleware(web.wsgi_app)  # type: ignore[method-assign]
    return api, web


W3C_PARENT: Final = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def calls_under_parents_without_paths(recorder_url: str) -> None:
    """Calls whose parent carries no Laminar path: a span of a provider Laminar's SDK does
    not know, and a W3C context extracted from a message (a queue worker)."""
    client = httpx.Client()
    instrument_httpx(client)
    with OtherProvider().get_tracer("other").start_as_current_span("job"):
        client.get(f"{recorder_url}/foreign-parent")
    token = otel_context.attach(propagate.extract({"traceparent": W3C_PARENT}))
    try:
        client.get(f"{recorder_url}/w3c-parent")
    finally:
        otel_context.detach(token)


def wait_for_server_spans(count: int) -> None:
    """A server span ends in the server's thread after the client has its response: the
    servers must not stop, nor the spans be printed, before they have ended."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if sum(s.kind is SpanKind.SERVER for s in EXPORTER.get_finished_spans()) >= count:
            return
        time.sleep(0.01)


def span_json(span: ReadableSpan) -> dict[str, Any]:
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": span.context.trace_id if span.context else None,
        "span_id": span.context.span_id if span.context else None,
        "parent_id": span.parent.span_id if span.parent else None,
        "scope": span.instrumentation_scope.name if span.instrumentation_scope else None,
        "attributes": {
            k: list(v) if isinstance(v, tuple) else v for k, v in (span.attributes or {}).items()
        },
    }


def main() -> None:
    caller = LaminarSpanContext(
        trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736,
        span_id=0x00F067AA0BA902B7,
        span_path=("caller",),
        span_ids_path=(format_uuid(0x00F067AA0BA902B7),),
        user_id="user-7",
        session_id="session-9",
    )
    with serve_wsgi(recorder) as recorder_url:
        api, web = build(recorder_url)
        with serve_asgi(api) as api_url, serve_wsgi(web) as web_url:
            for url in (f"{api_url}/items/1", f"{web_url}/items/2"):
                response = httpx.get(url, headers={HEADER_NAME: caller.serialize()}, timeout=10)
                response.raise_for_status()
            wait_for_server_spans(2)
        calls_under_parents_without_paths(recorder_url)
    if MODE == "lmnr":
        Laminar.flush()
    print(
        json.dumps(
            {
                "caller": {"trace_id": caller.trace_id, "span_id": caller.span_id},
                "w3c_trace_id": int(W3C_PARENT.split("-")[1], 16),
                "spans": [span_json(s) for s in EXPORTER.get_finished_spans()],
                "received": received,
            }
        )
    )


if __name__ == "__main__":
    main()
