"""Outbound, shared by the httpx and requests tests: the echo server they call and helpers
to read what it received."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qs

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.trace import SpanKind

from laminar_middleware import HEADER_NAME, LaminarSpanContext
from support.servers import run_uvicorn

TRACER = trace.get_tracer("tests.outbound")
SIGV4 = (
    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260101/us-east-1/s3/aws4_request, "
    "SignedHeaders=host;x-amz-date, Signature=abcdef0123456789"
)


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A raw ASGI app that answers with every request header line it got, in order.

    /status/<n> answers n; /sleep?s=<seconds> sleeps first; /redirect?to=<url> answers 302;
    /stream sends the JSON line, then three more chunks.
    """
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    path = scope["path"]
    query = parse_qs(scope["query_string"].decode())
    status = 200
    extra: list[tuple[bytes, bytes]] = []
    if path.startswith("/status/"):
        status = int(path.rsplit("/", 1)[1])
    elif path == "/sleep":
        await asyncio.sleep(float(query.get("s", ["0.5"])[0]))
    elif path == "/redirect":
        status = 302
        extra.append((b"location", query["to"][0].encode()))
    body = json.dumps(
        {
            "path": path,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
        }
    ).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), *extra],
    }
    await send(start)
    if path == "/stream":
        await send({"type": "http.response.body", "body": body + b"\n", "more_body": True})
        for i in range(3):
            await send({"type": "http.response.body", "body": b"chunk%d\n" % i, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    await send({"type": "http.response.body", "body": body})


@contextmanager
def echo_server() -> Iterator[str]:
    with run_uvicorn(echo_app) as base:
        yield base


# Bound for the whole run and never listening: connecting is refused, and no other process
# can take the port in the meantime, as it could a port merely found free.
_REFUSING = socket.socket()
_REFUSING.bind(("127.0.0.1", 0))


def closed_port_url() -> str:
    """A URL on loopback where nothing listens: connecting is refused."""
    return f"http://127.0.0.1:{_REFUSING.getsockname()[1]}/"


def other_host(base: str) -> str:
    """The same server under a second host name."""
    return base.replace("127.0.0.1", "localhost")


def values(payload: dict[str, Any], name: str) -> list[str]:
    """Every line of one header the server received (any case)."""
    return [v for k, v in payload["headers"] if k.lower() == name.lower()]


def only(payload: dict[str, Any], name: str) -> str | None:
    """The header's single value, None when absent; fails when it came more than once."""
    found = values(payload, name)
    assert len(found) <= 1, f"{name} sent {len(found)} times: {found}"
    return found[0] if found else None


def laminar(payload: dict[str, Any]) -> LaminarSpanContext | None:
    value = only(payload, HEADER_NAME)
    return None if value is None else LaminarSpanContext.parse(value)


def client_spans(spans: Sequence[ReadableSpan]) -> list[ReadableSpan]:
    return [s for s in spans if s.kind is SpanKind.CLIENT]


def span_id(span: Any) -> int:
    return int(span.get_span_context().span_id)


def assert_names(payload: dict[str, Any], span: Any) -> None:
    """The Laminar header and traceparent both name `span`, once each."""
    context = span.get_span_context()
    remote = laminar(payload)
    assert remote is not None
    assert (remote.trace_id, remote.span_id) == (context.trace_id, context.span_id)
    traceparent = only(payload, "traceparent")
    assert traceparent is not None
    assert traceparent.split("-")[1:3] == [f"{context.trace_id:032x}", f"{context.span_id:016x}"]


def assert_nothing_sent(payload: dict[str, Any]) -> None:
    for name in (HEADER_NAME, "laminar-span-context", "traceparent", "tracestate", "baggage"):
        assert values(payload, name) == [], name


class Exploding(SpanProcessor):
    def __init__(self, on_start: bool = False, on_end: bool = False) -> None:
        self.start, self.end = on_start, on_end

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        if self.start:
            raise RuntimeError("on_start exploded")

    def on_end(self, span: Any) -> None:
        if self.end:
            raise RuntimeError("on_end exploded")
