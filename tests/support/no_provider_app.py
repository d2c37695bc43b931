"""A process with no tracer provider: service A (Starlette under uvicorn, the ASGI
middleware, an instrumented httpx client) calls service B (Flask under Werkzeug, the WSGI
middleware), which echoes the Laminar header it got. Prints the echoed headers as JSON, one
per request; the test reads the process's stderr for the warnings."""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time

import httpx
import uvicorn
from flask import Flask, request
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from werkzeug.serving import make_server

from laminar_middleware import (
    LaminarASGIMiddleware,
    LaminarWSGIMiddleware,
    instrument_httpx,
)

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")

b = Flask("b")
b.wsgi_app = LaminarWSGIMiddleware(b.wsgi_app)  # type: ignore[method-assign]


@b.get("/echo")
def echo() -> str:
    return request.headers.get("X-Laminar-Span-Context", "")


b_server = make_server("127.0.0.1", 0, b, threaded=True)
threading.Thread(target=b_server.serve_forever, daemon=True).start()
b_url = f"http://127.0.0.1:{b_server.server_port}"
client = httpx.AsyncClient()
instrument_httpx(client)


async def call_b(_: Request) -> PlainTextResponse:
    return PlainTextResponse((await client.get(f"{b_url}/echo")).text)


a = LaminarASGIMiddleware(Starlette(routes=[Route("/a", call_b)]))
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
server = uvicorn.Server(uvicorn.Config(a, log_level="warning"))
thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
thread.start()
deadline = time.monotonic() + 10
while not server.started and time.monotonic() < deadline:
    time.sleep(0.01)
a_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
header = sys.argv[1]
echoed = [
    httpx.get(f"{a_url}/a", headers={"X-Laminar-Span-Context": header}, timeout=10).text
    for _ in range(3)
]
print(json.dumps(echoed))
server.should_exit = True
thread.join(10)
b_server.shutdown()
