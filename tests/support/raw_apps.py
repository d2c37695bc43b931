"""The apps and raw calls of the hostile-input tests: a Starlette and a Flask app called
with hand-built ASGI scopes and WSGI environs, no server in between."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from flask import Flask
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

SCOPE = "laminar_middleware"
NAME = b"x-laminar-span-context"
ALIAS = b"laminar-span-context"


# -- the apps ---------------------------------------------------------------------------------


async def starlette_endpoint(request: Request) -> JSONResponse:
    return JSONResponse({"item": request.path_params["item_id"]}, headers={"x-app": "1"})


STARLETTE = Starlette(routes=[Route("/items/{item_id}", starlette_endpoint)])

FLASK = Flask(__name__)


@FLASK.get("/items/<item_id>")
def flask_endpoint(item_id: str) -> tuple[dict[str, str], int, dict[str, str]]:
    return {"item": item_id}, 200, {"X-App": "1"}


FLASK_WSGI = FLASK.wsgi_app


# -- raw calls --------------------------------------------------------------------------------


def asgi_scope(headers: Sequence[tuple[bytes, bytes]], path: str = "/items/7") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("10.0.0.1", 4321),
        "server": ("testserver", 80),
    }


async def call_asgi(app: Any, scope: dict[str, Any]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        messages.append(dict(message))

    await app(scope, receive, send)
    return messages


def wsgi_environ(headers: Sequence[tuple[bytes, bytes]], path: str = "/items/7") -> dict[str, Any]:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "10.0.0.1",
        "HTTP_HOST": "testserver",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": io.StringIO(),
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for name, value in headers:
        # As a WSGI server does it: latin-1 strings, repeated lines joined with ",".
        key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
        text = value.decode("latin-1")
        environ[key] = f"{environ[key]},{text}" if key in environ else text
    return environ


def call_wsgi(app: Any, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
    started: list[Any] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        started.append((status, list(headers)))
        return lambda data: None

    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    status, headers = started[0]
    return status, headers, body


def ours(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [
        s
        for s in exporter.get_finished_spans()
        if s.kind is SpanKind.SERVER and s.instrumentation_scope.name == SCOPE
    ]
