"""Two tracer providers in one process, as users end up with them: the app sets its own
global provider first, then `Laminar.initialize()` (offline) keeps one of its own. A FastAPI
service with the ASGI middleware calls a Flask service with an instrumented httpx client.

Usage: python lmnr_providers.py HEADER  ->  JSON on stdout: the spans each provider
exported. The test reads the WARNINGs on stderr."""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from flask import Flask
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from werkzeug.serving import make_server

from laminar_middleware import LaminarASGIMiddleware, instrument_httpx

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")

GLOBAL, LAMINAR = InMemorySpanExporter(), InMemorySpanExporter()
own = TracerProvider()
own.add_span_processor(SimpleSpanProcessor(GLOBAL))
trace.set_tracer_provider(own)  # the app's own set-up, before Laminar's

from lmnr import Laminar  # noqa: E402
from lmnr.opentelemetry_lib.tracing import init_tracing  # noqa: E402

init_tracing(exporter=LAMINAR, disable_batch=True, instruments=set())
Laminar.initialize(project_api_key="offline-test", instruments=set())

b = Flask("b")


@b.get("/b")
def leaf() -> str:
    return "leaf"


b_server = make_server("127.0.0.1", 0, b, threaded=True)
threading.Thread(target=b_server.serve_forever, daemon=True).start()
client = httpx.AsyncClient()
instrument_httpx(client)
app = FastAPI()
app.add_middleware(LaminarASGIMiddleware)


@app.get("/a/{item}")
async def call_b(item: str) -> str:
    return (await client.get(f"http://127.0.0.1:{b_server.server_port}/b")).text


sock = socket.socket()
sock.bind(("127.0.0.1", 0))
server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
thread.start()
deadline = time.monotonic() + 10
while not server.started and time.monotonic() < deadline:
    time.sleep(0.01)
url = f"http://127.0.0.1:{sock.getsockname()[1]}"
answers = [
    httpx.get(f"{url}/a/{n}", headers={"X-Laminar-Span-Context": sys.argv[1]}, timeout=10).text
    for n in range(2)
]
time.sleep(0.3)
server.should_exit = True
thread.join(10)
b_server.shutdown()


def described(span: ReadableSpan) -> dict[str, Any]:
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": span.context.trace_id,
        "span_id": span.context.span_id,
        "parent_id": span.parent.span_id if span.parent else None,
        "path": list(span.attributes.get("lmnr.span.path", ())),
    }


print(
    json.dumps(
        {
            "answers": answers,
            "global": [described(s) for s in GLOBAL.get_finished_spans()],
            "laminar": [described(s) for s in LAMINAR.get_finished_spans()],
        }
    )
)
