"""Soak: many requests through both middlewares; nothing may grow.

`make soak` runs 100 000 requests through each middleware (raw ASGI calls into a Starlette
app, raw WSGI calls into a Flask app, a mix of valid, hostile and missing headers, streaming
responses, 404s and apps that raise) and then reports:

- spans started and spans ended (a span processor counts both; they must be equal),
- live SDK spans after a garbage collection (a weak set of every started span: must be 0),
- live `contextvars.Token` objects before and after (must not grow), whether the context of
  the task or thread that made each request is the same object after it as before (an
  attach without its detach would leave it changed), and the caller's context,
- traced memory (tracemalloc) after a warm-up and after each tenth of the run: the growth
  must stay within a small bound that does not scale with the number of requests
  (`--diff` lists the source lines whose allocations grew most).

tests/test_hardening_leaks.py runs the same code with 5 000 requests per middleware.

    python tests/soak.py [--requests N] [--warmup N] [--memory-bound BYTES] [--diff]
                         [--no-tracemalloc]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import gc
import io
import json
import logging
import sys
import threading
import time
import tracemalloc
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.trace import SpanKind

from laminar_middleware import LaminarASGIMiddleware, LaminarSpanContext, LaminarWSGIMiddleware
from laminar_middleware.codec import format_uuid


class CountingProcessor(SpanProcessor):
    """Counts started and ended spans and keeps a weak reference to each started one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = 0
        self.ended = 0
        self.server_started = 0
        self.server_ended = 0
        self.live: weakref.WeakSet[Span] = weakref.WeakSet()

    def on_start(self, span: Span, parent_context: Any = None) -> None:
        with self._lock:
            self.started += 1
            self.server_started += span.kind is SpanKind.SERVER
            self.live.add(span)

    def on_end(self, span: ReadableSpan) -> None:
        with self._lock:
            self.ended += 1
            self.server_ended += span.kind is SpanKind.SERVER


# -- the requests: a fixed mix, cycled ----------------------------------------------------


def _valid_headers(count: int) -> list[bytes]:
    headers = []
    for i in range(count):
        span_id = 0x1000 + i
        context = LaminarSpanContext(
            (0xABC << 64) + i + 1,
            span_id,
            ("caller",),
            (format_uuid(span_id),),
            user_id=f"user-{i}",
            metadata={"tenant": f"t{i}"},
        )
        headers.append(context.serialize().encode())
    return headers


VALID = _valid_headers(64)
NAME = b"x-laminar-span-context"
# (path, extra headers); one in eight raises inside the app.
SHAPES: list[tuple[str, list[tuple[bytes, bytes]]]] = [
    ("/items/1", [(NAME, b"<valid>")]),
    ("/items/2", [(NAME, b'{"trace_id": "garbage"')]),
    ("/items/3", []),
    ("/stream", [(b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")]),
    ("/missing", [(NAME, b"x" * 10_000)]),
    ("/items/4", [(NAME, b"<valid>"), (NAME, b"{}")]),
    ("/boom", [(NAME, b"<valid>")]),
    ("/sync/5", [(NAME, b"<valid>")]),
]


def shape(i: int) -> tuple[str, list[tuple[bytes, bytes]]]:
    path, headers = SHAPES[i % len(SHAPES)]
    valid = VALID[i % len(VALID)]
    return path, [(n, valid if v == b"<valid>" else v) for n, v in headers]


class Boom(Exception):
    pass


# -- the apps -------------------------------------------------------------------------------


def make_asgi_app(provider: TracerProvider) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    tracer = provider.get_tracer("soak")

    async def item(request: Request) -> JSONResponse:
        with tracer.start_as_current_span("work"):
            return JSONResponse({"item": request.path_params["item_id"]})

    async def stream(request: Request) -> StreamingResponse:
        async def chunks() -> Any:
            for i in range(3):
                with tracer.start_as_current_span("chunk"):
                    yield b"%d," % i

        return StreamingResponse(chunks())

    async def boom(request: Request) -> JSONResponse:
        raise Boom("boom")

    def sync_item(request: Request) -> JSONResponse:  # runs in a worker thread
        with tracer.start_as_current_span("work"):
            return JSONResponse({"item": request.path_params["item_id"]})

    return Starlette(
        routes=[
            Route("/items/{item_id}", item),
            Route("/sync/{item_id}", sync_item),
            Route("/stream", stream),
            Route("/boom", boom),
        ]
    )


def make_wsgi_app(provider: TracerProvider) -> Any:
    from flask import Flask

    tracer = provider.get_tracer("soak")
    flask = Flask("soak")

    @flask.get("/items/<item_id>")
    @flask.get("/sync/<item_id>")
    def item(item_id: str) -> dict[str, str]:
        with tracer.start_as_current_span("work"):
            return {"item": item_id}

    @flask.get("/stream")
    def stream() -> Any:
        def chunks() -> Iterable[bytes]:
            for i in range(3):
                with tracer.start_as_current_span("chunk"):
                    yield b"%d," % i

        return flask.response_class(chunks())

    flask_app = flask.wsgi_app

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ["PATH_INFO"] == "/boom":
            raise Boom("boom")
        return flask_app(environ, start_response)

    return app


# -- raw calls --------------------------------------------------------------------------------


def asgi_scope(path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
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
        "headers": [(b"host", b"soak"), *headers],
        "client": ("10.0.0.1", 4321),
        "server": ("soak", 80),
    }


async def call_asgi(app: Any, i: int) -> tuple[int, bool]:
    """The response status (0: the app raised) and whether the task's context is as it was."""
    path, headers = shape(i)
    before = otel_context.get_current()
    status = 0

    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if received:  # the client stays connected: a streaming response's listener waits
            await asyncio.Event().wait()
        received = True
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    with contextlib.suppress(Boom):  # Starlette answers 500, then re-raises
        await app(asgi_scope(path, headers), receive, send)
    return status, otel_context.get_current() is before


def wsgi_environ(path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "soak",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "10.0.0.1",
        "HTTP_HOST": "soak",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": io.StringIO(),
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for name, value in headers:
        key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
        text = value.decode("latin-1")
        environ[key] = f"{environ[key]},{text}" if key in environ else text
    return environ


def call_wsgi(app: Any, i: int) -> tuple[int, bool]:
    """The response status (0: the app raised) and whether the thread's context is as it was."""
    path, headers = shape(i)
    before = otel_context.get_current()
    status: list[str] = []

    def start_response(code: str, response_headers: Any, exc_info: Any = None) -> Any:
        status.append(code)
        return lambda data: None

    try:
        result = app(wsgi_environ(path, headers), start_response)
    except Boom:
        return 0, otel_context.get_current() is before
    try:
        for _ in result:
            pass
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return int(status[0].split()[0]), otel_context.get_current() is before


# -- the run --------------------------------------------------------------------------------


class _LogCounter(logging.Handler):
    """Counts the package's log lines (bad headers are logged, rate-limited)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def live_tokens() -> int:
    return sum(1 for o in gc.get_objects() if type(o) is contextvars.Token)


def settle() -> None:
    for _ in range(3):
        gc.collect()


@dataclass
class Report:
    requests_per_middleware: int
    warmup: int
    seconds: float = 0.0
    spans_started: int = 0
    spans_ended: int = 0
    server_spans_started: int = 0
    server_spans_ended: int = 0
    live_spans: int = 0
    tokens_before: int = 0
    tokens_after: int = 0
    context_unchanged: bool = False
    requests_leaving_context: int = 0
    log_lines: int = 0
    traced: bool = False
    memory_after_warmup: int = 0
    memory_halfway: int = 0
    memory_end: int = 0
    # Traced memory at evenly spaced points of the run (after the warm-up).
    memory_checkpoints: list[int] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    # With `diff`: the lines whose allocations grew most between the warm-up and the end.
    top_growth: list[str] = field(default_factory=list)

    @property
    def growth(self) -> int:
        return self.memory_end - self.memory_after_warmup

    @property
    def second_half_growth(self) -> int:
        return self.memory_end - self.memory_halfway


def run(
    requests: int,
    warmup: int = 1000,
    trace_memory: bool = True,
    diff: bool = False,
    checkpoints: int = 10,
) -> Report:
    """`requests` through each middleware after `warmup` through each, measuring traced
    memory at `checkpoints` evenly spaced points (an even number: one is half-way)."""
    provider = TracerProvider()
    counter = CountingProcessor()
    provider.add_span_processor(counter)
    asgi = LaminarASGIMiddleware(make_asgi_app(provider), tracer_provider=provider)
    wsgi = LaminarWSGIMiddleware(make_wsgi_app(provider), tracer_provider=provider)
    report = Report(requests, warmup, traced=trace_memory)
    loop = asyncio.new_event_loop()
    pool = ThreadPoolExecutor(4, thread_name_prefix="soak-wsgi")
    statuses: dict[str, int] = {}

    def batch(start: int, count: int) -> None:
        async def asgi_batch() -> list[tuple[int, bool]]:
            results: list[tuple[int, bool]] = []
            for group in range(start, start + count, 50):  # 50 requests at a time
                size = min(50, start + count - group)
                results += await asyncio.gather(*(call_asgi(asgi, group + k) for k in range(size)))
            return results

        for status, clean in loop.run_until_complete(asgi_batch()):
            statuses[f"asgi {status}"] = statuses.get(f"asgi {status}", 0) + 1
            report.requests_leaving_context += not clean
        for status, clean in pool.map(lambda k: call_wsgi(wsgi, k), range(start, start + count)):
            statuses[f"wsgi {status}"] = statuses.get(f"wsgi {status}", 0) + 1
            report.requests_leaving_context += not clean

    def memory() -> int:
        settle()
        return tracemalloc.get_traced_memory()[0] if trace_memory else 0

    log_lines = _LogCounter()
    package_logger = logging.getLogger("laminar_middleware")
    package_logger.addHandler(log_lines)
    context_before = otel_context.get_current()
    began = time.perf_counter()
    if trace_memory:
        tracemalloc.start()
    try:
        batch(0, warmup)
        report.memory_after_warmup = memory()
        first = tracemalloc.take_snapshot() if trace_memory and diff else None
        report.tokens_before = live_tokens()
        done = 0
        for point in range(1, checkpoints + 1):
            upto = requests * point // checkpoints
            batch(warmup + done, upto - done)
            done = upto
            report.memory_checkpoints.append(memory())
            if 2 * point == checkpoints:
                report.memory_halfway = report.memory_checkpoints[-1]
        report.memory_end = memory()
        if first is not None:
            stats = tracemalloc.take_snapshot().compare_to(first, "lineno")
            report.top_growth = [str(stat) for stat in stats[:10]]
        report.tokens_after = live_tokens()
    finally:
        if trace_memory:
            tracemalloc.stop()
        pool.shutdown()
        loop.close()
        package_logger.removeHandler(log_lines)
    report.log_lines = log_lines.count
    report.seconds = time.perf_counter() - began
    report.context_unchanged = otel_context.get_current() is context_before
    settle()
    report.spans_started = counter.started
    report.spans_ended = counter.ended
    report.server_spans_started = counter.server_started
    report.server_spans_ended = counter.server_ended
    report.live_spans = len(counter.live)
    report.statuses = dict(sorted(statuses.items()))
    provider.shutdown()
    return report


def problems(report: Report, memory_bound: int) -> list[str]:
    """What is wrong with a report (empty: all good)."""
    total = 2 * (report.requests_per_middleware + report.warmup)
    found = []
    if report.server_spans_started != total:
        found.append(f"{report.server_spans_started} server spans for {total} requests")
    if report.spans_started != report.spans_ended:
        found.append(f"spans started {report.spans_started} != ended {report.spans_ended}")
    if report.server_spans_started != report.server_spans_ended:
        found.append("server spans started != ended")
    if report.live_spans:
        found.append(f"{report.live_spans} spans still alive")
    if report.tokens_after > report.tokens_before:
        found.append(f"context tokens grew from {report.tokens_before} to {report.tokens_after}")
    if not report.context_unchanged:
        found.append("the caller's context changed")
    if report.requests_leaving_context:
        found.append(f"{report.requests_leaving_context} requests left their context changed")
    if report.traced and report.growth > memory_bound:
        found.append(f"traced memory grew by {report.growth} bytes (bound {memory_bound})")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000, help="per middleware")
    parser.add_argument("--warmup", type=int, default=2000, help="per middleware")
    parser.add_argument("--memory-bound", type=int, default=1024 * 1024, help="bytes")
    parser.add_argument("--no-tracemalloc", action="store_true")
    parser.add_argument("--diff", action="store_true", help="show where traced memory grew")
    args = parser.parse_args(argv)
    report = run(args.requests, args.warmup, not args.no_tracemalloc, args.diff)
    print(json.dumps(asdict(report), indent=2))
    print(
        f"traced memory growth after warm-up: {report.growth} bytes "
        f"({report.growth / (2 * args.requests):.2f} bytes/request); "
        f"second half: {report.second_half_growth} bytes; "
        f"{report.log_lines} log lines from the package"
    )
    found = problems(report, args.memory_bound)
    for problem in found:
        print("FAIL:", problem)
    print("soak:", "FAIL" if found else "OK")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
