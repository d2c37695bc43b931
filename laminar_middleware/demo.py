"""`laminar-middleware demo`: the README's first paragraph, run for real, printed as one trace.

On 127.0.0.1, with ports the OS picks and no account or network:

- a *caller* opens a root span and sends one request, with an instrumented httpx client,
  to service A: FastAPI under real uvicorn, with `LaminarASGIMiddleware`;
- service A calls service B with httpx (`instrument_httpx(client)`); B is Flask under
  Werkzeug's threaded WSGI server, with `LaminarWSGIMiddleware`;
- service B calls a second endpoint of A with requests (`instrument_requests(session)`), then
  stores a job with the serialized span context in a SQLite table (the database-storage
  pattern);
- a worker thread picks the job up and continues the trace with `continue_trace`.

Each service has its own `TracerProvider` (so its own `service.name` resource), all writing
to one in-memory exporter; no global tracer provider is set. When every span has ended
(bounded waits throughout) the spans are printed as a tree, as JSON (`--json`), or sent to
an OTLP endpoint (`--export otlp`), and every server is shut down.

Nothing imports this module but the command line: it needs the `fastapi`, `flask`,
`httpx`, `requests` extras and uvicorn.
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations at
# runtime, and their types (fastapi.Request) are imported inside the functions.

import json
import os
import socket
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from .codec import HEADER_NAME, LaminarSpanContext
from .context import continue_trace, serialize_span_context

__all__ = [
    "DemoError",
    "DemoRun",
    "check",
    "print_tree",
    "run_as_json",
    "run_demo",
    "spans_as_json",
]

SERVICES = ("caller", "service-a", "service-b", "worker")
STARTUP_TIMEOUT = 5.0  # seconds for a server to start listening
REQUEST_TIMEOUT = 5.0  # seconds for any HTTP call
SPANS_TIMEOUT = 5.0  # seconds for the last spans (the worker's) to end
SHUTDOWN_TIMEOUT = 5.0  # seconds for a server thread to stop
USER_ID = "user-42"


class DemoError(Exception):
    """Something in the demo went wrong; the message says what, for the user."""


@dataclass
class Hop:
    """One time the context crossed a boundary: who sent it, who got it, how, and what."""

    sender: str
    receiver: str
    via: str
    value: str | None


@dataclass
class DemoRun:
    """What one run produced: the spans, the hops the context took, the servers' ports."""

    spans: list[ReadableSpan]
    hops: list[Hop]
    servers: dict[str, int]
    elapsed: float
    problems: list[str] = field(default_factory=list)


# --- the services ---------------------------------------------------------------------------


class _Shared:
    """What the services need to know about each other, filled in once both are listening."""

    def __init__(self, db_path: str, providers: dict[str, TracerProvider]) -> None:
        self.db_path = db_path
        self.providers = providers
        self.url_a = ""
        self.url_b = ""
        self.hops: list[Hop] = []
        self.lock = threading.Lock()
        self.closers: list[Callable[[], object]] = []

    def hop(self, sender: str, receiver: str, via: str, value: str | None) -> None:
        with self.lock:
            self.hops.append(Hop(sender, receiver, via, value))


def _service_a(shared: _Shared) -> Any:
    """Service A: FastAPI. `POST /summaries` calls B; `GET /users/{user_id}` is what B calls."""
    import httpx
    from fastapi import FastAPI, Request

    from .asgi import LaminarASGIMiddleware
    from .httpx import instrument_httpx

    provider = shared.providers["service-a"]
    clients: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT) as client:
            instrument_httpx(client, tracer_provider=provider)
            clients["b"] = client
            yield

    # FastAPI traces requests itself; its telemetry gets this service's provider (no global
    # provider is set). Its INTERNAL operation spans are turned off to keep the tree short.
    app = FastAPI(
        lifespan=lifespan,
        openapi_url=None,
        telemetry={
            "tracer_provider": provider,
            "operation_spans": False,
            "metrics": False,
            "logs": False,
        },
    )
    app.add_middleware(LaminarASGIMiddleware, tracer_provider=provider)

    @app.post("/summaries")
    async def create_summary(request: Request) -> dict[str, Any]:
        shared.hop("caller", "service-a", "HTTP header (httpx)", request.headers.get(HEADER_NAME))
        response = await clients["b"].post(
            f"{shared.url_b}/documents", json={"user_id": USER_ID, "text": "a long document"}
        )
        response.raise_for_status()
        return {"summary": "queued", "document": response.json()}

    @app.get("/users/{user_id}")
    async def get_user(user_id: str, request: Request) -> dict[str, Any]:
        shared.hop(
            "service-b", "service-a", "HTTP header (requests)", request.headers.get(HEADER_NAME)
        )
        return {"id": user_id, "plan": "pro"}

    return app


def _service_b(shared: _Shared) -> Any:
    """Service B: Flask. `POST /documents` asks A about the user, then enqueues a job."""
    import requests
    from flask import Flask, jsonify, request

    from .requests import instrument_requests
    from .wsgi import LaminarWSGIMiddleware

    provider = shared.providers["service-b"]
    tracer = provider.get_tracer("laminar_middleware.demo")
    session = requests.Session()
    instrument_requests(session, tracer_provider=provider)
    shared.closers.append(session.close)

    app = Flask("service_b")
    app.wsgi_app = LaminarWSGIMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, tracer_provider=provider
    )

    @app.post("/documents")
    def create_document() -> Any:
        shared.hop(
            "service-a", "service-b", "HTTP header (httpx)", request.headers.get(HEADER_NAME)
        )
        body = request.get_json(force=True)
        user = session.get(f"{shared.url_a}/users/{body['user_id']}", timeout=REQUEST_TIMEOUT)
        user.raise_for_status()
        with tracer.start_as_current_span("enqueue summarise", kind=SpanKind.PRODUCER) as span:
            stored = serialize_span_context()
            with _connect(shared.db_path) as db:
                job_id = db.execute(
                    "INSERT INTO jobs (task, payload, span_context, status)"
                    " VALUES ('summarise', ?, ?, 'queued')",
                    (json.dumps({"user": user.json(), "text": body["text"]}), stored),
                ).lastrowid
            span.set_attribute("messaging.system", "sqlite")
            span.set_attribute("messaging.message.id", str(job_id))
        return jsonify({"job": job_id}), 202

    return app


@contextmanager
def _connect(db_path: str) -> Iterator[sqlite3.Connection]:
    """A connection in autocommit mode, closed afterwards (`with sqlite3.connect()` is not)."""
    db = sqlite3.connect(db_path, timeout=REQUEST_TIMEOUT, isolation_level=None)
    try:
        yield db
    finally:
        db.close()


def _create_queue(db_path: str) -> None:
    with _connect(db_path) as db:
        db.execute(
            "CREATE TABLE jobs (id INTEGER PRIMARY KEY, task TEXT NOT NULL, payload TEXT,"
            " span_context TEXT, status TEXT NOT NULL)"
        )


def _worker(shared: _Shared, stop: threading.Event) -> None:
    """Polls the jobs table; runs each job in a span continuing the stored context."""
    provider = shared.providers["worker"]
    tracer = provider.get_tracer("laminar_middleware.demo")
    with _connect(shared.db_path) as db:
        while not stop.is_set():
            row = db.execute(
                "SELECT id, task, span_context FROM jobs WHERE status = 'queued' LIMIT 1"
            ).fetchone()
            if row is None:
                stop.wait(0.01)
                continue
            job_id, task, stored = row
            claimed = db.execute(
                "UPDATE jobs SET status = 'running' WHERE id = ? AND status = 'queued'", (job_id,)
            ).rowcount
            if not claimed:
                continue
            shared.hop("service-b", "worker", "SQLite row jobs.span_context", stored)
            # Maybe an hour later, maybe on another machine: the row is all the worker has.
            with continue_trace(
                stored,
                f"{task} (job {job_id})",
                kind=SpanKind.CONSUMER,
                tracer_provider=provider,
                attributes={"messaging.system": "sqlite", "messaging.message.id": str(job_id)},
            ):
                with tracer.start_as_current_span("call the model"):
                    time.sleep(0.005)
                db.execute("UPDATE jobs SET status = 'done' WHERE id = ?", (job_id,))


# --- the servers ------------------------------------------------------------------------------


@contextmanager
def _uvicorn(app: Any) -> Iterator[int]:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on"))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="service-a", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not server.started:
            if not thread.is_alive():
                raise DemoError("service A (uvicorn) stopped while starting")
            if time.monotonic() > deadline:
                raise DemoError(f"service A (uvicorn) did not start in {STARTUP_TIMEOUT:g} s")
            time.sleep(0.01)
        yield port
    finally:
        server.should_exit = True
        thread.join(SHUTDOWN_TIMEOUT)
        sock.close()
        if thread.is_alive():
            raise DemoError(f"service A (uvicorn) did not stop in {SHUTDOWN_TIMEOUT:g} s")


@contextmanager
def _werkzeug(app: Any) -> Iterator[int]:
    from werkzeug.serving import WSGIRequestHandler, make_server

    class QuietHandler(WSGIRequestHandler):
        def log_request(self, *args: Any, **kwargs: Any) -> None:
            pass

    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=QuietHandler)
    port: int = server.server_port
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="service-b", daemon=True
    )
    thread.start()
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(SHUTDOWN_TIMEOUT)
        if thread.is_alive():
            raise DemoError(f"service B (werkzeug) did not stop in {SHUTDOWN_TIMEOUT:g} s")


@contextmanager
def _worker_thread(shared: _Shared) -> Iterator[None]:
    stop = threading.Event()
    thread = threading.Thread(target=_worker, args=(shared, stop), name="worker", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(SHUTDOWN_TIMEOUT)


# --- one run ----------------------------------------------------------------------------------


def _providers(exporter: InMemorySpanExporter) -> dict[str, TracerProvider]:
    providers = {}
    for name in SERVICES:
        provider = TracerProvider(resource=Resource.create({"service.name": name}))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        providers[name] = provider
    return providers


def _finished(spans: Sequence[ReadableSpan]) -> bool:
    servers = sum(1 for s in spans if s.kind is SpanKind.SERVER)
    consumers = sum(1 for s in spans if s.kind is SpanKind.CONSUMER)
    roots = sum(1 for s in spans if s.parent is None)
    return servers >= 3 and consumers >= 1 and roots >= 1


def _wait_for(
    exporter: InMemorySpanExporter, done: Callable[[Sequence[ReadableSpan]], bool]
) -> list[ReadableSpan]:
    deadline = time.monotonic() + SPANS_TIMEOUT
    while True:
        spans = list(exporter.get_finished_spans())
        if done(spans) or time.monotonic() > deadline:
            return spans
        time.sleep(0.01)


def run_once() -> DemoRun:
    """Start everything, send the one request, wait for the worker, stop everything."""
    import httpx

    from .httpx import instrument_httpx

    started = time.monotonic()
    exporter = InMemorySpanExporter()
    providers = _providers(exporter)
    servers: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="laminar-demo-") as tmp:
        shared = _Shared(os.path.join(tmp, "jobs.sqlite3"), providers)
        _create_queue(shared.db_path)
        with ExitStack() as stack:
            servers["service-a"] = stack.enter_context(_uvicorn(_service_a(shared)))
            servers["service-b"] = stack.enter_context(_werkzeug(_service_b(shared)))
            shared.url_a = f"http://127.0.0.1:{servers['service-a']}"
            shared.url_b = f"http://127.0.0.1:{servers['service-b']}"
            stack.enter_context(_worker_thread(shared))

            tracer = providers["caller"].get_tracer("laminar_middleware.demo")
            with httpx.Client(timeout=REQUEST_TIMEOUT) as client:
                instrument_httpx(client, tracer_provider=providers["caller"])
                with tracer.start_as_current_span("ask for a summary"):
                    try:
                        response = client.post(f"{shared.url_a}/summaries")
                    except httpx.HTTPError as exc:
                        raise DemoError(f"the request to service A failed: {exc!r}") from exc
            if response.status_code != 200:
                raise DemoError(f"service A answered {response.status_code}: {response.text[:200]}")
            spans = _wait_for(exporter, _finished)
        for close in shared.closers:
            close()
        for provider in providers.values():
            provider.shutdown()
    run = DemoRun(spans, list(shared.hops), servers, time.monotonic() - started)
    run.problems = check(run.spans)
    return run


def check(spans: Sequence[ReadableSpan]) -> list[str]:
    """What is wrong with the trace, if anything: the demo's own proof that it connected."""
    problems = []
    traces = {s.context.trace_id for s in spans if s.context}
    if len(traces) != 1:
        problems.append(f"expected one trace, found {len(traces)}")
    ids = {s.context.span_id for s in spans if s.context}
    roots = [s for s in spans if s.parent is None]
    if len(roots) != 1:
        problems.append(f"expected one root span, found {len(roots)}")
    for span in spans:
        if span.parent is not None and span.parent.span_id not in ids:
            problems.append(f"{span.name!r} has a parent that is not in the trace")
    kinds = [s.kind for s in spans]
    if kinds.count(SpanKind.SERVER) != 3:
        problems.append(f"expected 3 SERVER spans, found {kinds.count(SpanKind.SERVER)}")
    if kinds.count(SpanKind.CONSUMER) != 1:
        problems.append("the worker's span is missing")
    return problems


# --- output -----------------------------------------------------------------------------------


def _service(span: ReadableSpan) -> str:
    return str(span.resource.attributes.get("service.name", "?"))


def _duration_ms(span: ReadableSpan) -> float:
    return ((span.end_time or 0) - (span.start_time or 0)) / 1e6


def _hex(value: int | None, width: int) -> str | None:
    return None if value is None else f"{value:0{width}x}"


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def spans_as_json(spans: Sequence[ReadableSpan]) -> list[dict[str, Any]]:
    """The spans, oldest first, as plain JSON-ready dicts."""
    out = []
    for span in sorted(spans, key=lambda s: s.start_time or 0):
        ctx = span.context
        out.append(
            {
                "name": span.name,
                "kind": span.kind.name,
                "trace_id": _hex(ctx.trace_id if ctx else None, 32),
                "span_id": _hex(ctx.span_id if ctx else None, 16),
                "parent_span_id": _hex(span.parent.span_id if span.parent else None, 16),
                "service": _service(span),
                "status": span.status.status_code.name,
                "start_time_unix_nano": span.start_time,
                "duration_ms": round(_duration_ms(span), 3),
                "attributes": {k: _jsonable(v) for k, v in (span.attributes or {}).items()},
            }
        )
    return out


def _glyphs(stream: TextIO) -> tuple[str, str, str, str]:
    """Tree and bar characters: box drawing when the stream can write them, else ASCII."""
    try:
        "├└│█·".encode(stream.encoding or "ascii")
    except (LookupError, UnicodeEncodeError):
        return "|- ", "`- ", "|  ", "#"
    return "├─ ", "└─ ", "│  ", "█"


def _ordered(spans: Sequence[ReadableSpan], out: TextIO) -> list[tuple[ReadableSpan, str]]:
    """Depth-first, children by start time, each with its tree prefix."""
    ids = {s.context.span_id for s in spans if s.context}
    children: dict[int | None, list[ReadableSpan]] = {}
    for span in spans:
        parent = span.parent.span_id if span.parent and span.parent.span_id in ids else None
        children.setdefault(parent, []).append(span)
    for group in children.values():
        group.sort(key=lambda s: s.start_time or 0)
    tee, elbow, pipe, _ = _glyphs(out)
    rows: list[tuple[ReadableSpan, str]] = []

    def walk(parent: int | None, lead: str, top: bool) -> None:
        group = children.get(parent, [])
        for i, span in enumerate(group):
            last = i == len(group) - 1
            rows.append((span, "" if top else lead + (elbow if last else tee)))
            below = "" if top else lead + ("   " if last else pipe)
            walk(span.context.span_id if span.context else None, below, False)

    walk(None, "", True)
    return rows


def _bar(span: ReadableSpan, start: int, total: int, width: int, full: str) -> str:
    offset = round(((span.start_time or start) - start) / total * width)
    length = max(1, round(((span.end_time or start) - (span.start_time or start)) / total * width))
    offset = min(offset, width - 1)
    length = min(length, width - offset)
    return " " * offset + full * length + " " * (width - offset - length)


def print_tree(run: DemoRun, out: TextIO | None = None) -> None:
    """The trace as a waterfall: the trace id once, then one line per span."""
    out = out or sys.stdout
    spans = run.spans
    print(
        "One request: caller -> service-a (FastAPI on uvicorn) -> service-b (Flask on werkzeug),\n"
        "which calls service-a again (requests) and stores a job in SQLite for a worker thread.\n",
        file=out,
    )
    traces = sorted({s.context.trace_id for s in spans if s.context})
    services = sorted({_service(s) for s in spans})
    for trace_id in traces:
        print(
            f"trace {trace_id:032x}  ({len(spans)} spans from {len(services)} services,"
            f" {'one trace' if len(traces) == 1 else f'{len(traces)} traces!'})",
            file=out,
        )
    print(file=out)
    rows = _ordered(spans, out)
    if not rows:
        return
    start = min(s.start_time or 0 for s in spans)
    end = max(s.end_time or 0 for s in spans)
    total = max(end - start, 1)
    full = _glyphs(out)[3]
    name_width = max(len(prefix) + len(span.name) for span, prefix in rows)
    service_width = max(len(s) for s in [*services, "service"])
    bar_width = 30
    print(
        f"{'service':<{service_width}}  {'span':<{name_width}}  {'kind':<8}  {'status':<6}"
        f"  {'duration':>9}  waterfall ({total / 1e6:.1f} ms)",
        file=out,
    )
    for span, prefix in rows:
        print(
            f"{_service(span):<{service_width}}  {prefix + span.name:<{name_width}}"
            f"  {span.kind.name:<8}  {span.status.status_code.name:<6}"
            f"  {_duration_ms(span):>6.1f} ms  |{_bar(span, start, total, bar_width, full)}|",
            file=out,
        )
    print(file=out)
    print(f"How the context travelled, each time as one {HEADER_NAME} value:", file=out)
    by_id = {s.context.span_id: s for s in spans if s.context}
    for hop in run.hops:
        remote = LaminarSpanContext.parse(hop.value)
        parent = None if remote is None else by_id.get(remote.span_id)
        if remote is None:
            what = "no valid context arrived"
        elif parent is None:
            what = f"continues span {remote.span_id:016x}, which is not in the trace"
        else:
            what = f"continues {parent.name!r} ({_service(parent)} {parent.kind.name})"
        print(f"  {hop.sender:<9} -> {hop.receiver:<9}  {hop.via:<28}  {what}", file=out)
    print(file=out)
    ports = ", ".join(f"{name} on 127.0.0.1:{port}" for name, port in run.servers.items())
    print(f"Stopped {ports}. Took {run.elapsed:.2f} s.", file=out)


def run_as_json(run: DemoRun) -> dict[str, Any]:
    traces = sorted({f"{s.context.trace_id:032x}" for s in run.spans if s.context})
    return {
        "trace_ids": traces,
        "servers": {name: {"host": "127.0.0.1", "port": p} for name, p in run.servers.items()},
        "elapsed_s": round(run.elapsed, 3),
        "hops": [
            {"from": h.sender, "to": h.receiver, "via": h.via, "value": h.value} for h in run.hops
        ],
        "problems": run.problems,
        "spans": spans_as_json(run.spans),
    }


def _otlp_exporter() -> Any:
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise DemoError(
            f"--export otlp needs the OTLP exporter: pip install 'laminar-middleware[otlp]' ({exc})"
        ) from exc
    return OTLPSpanExporter()


def _otlp_endpoint() -> str:
    traces = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if traces:
        return traces
    base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318")
    return base.rstrip("/") + "/v1/traces"


def run_demo(as_json: bool = False, export: str | None = None) -> int:
    """The `demo` command. Exit status: 0 when one connected trace was shown or sent."""
    try:
        exporter = _otlp_exporter() if export == "otlp" else None
        run = run_once()
    except DemoError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    except ImportError as exc:
        print(
            f"demo failed: {exc}. The demo needs FastAPI, Flask, httpx, requests and uvicorn:"
            " pip install 'laminar-middleware[all]' uvicorn",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("demo interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # fail open: a clear line, never a hang or a traceback wall
        print(f"demo failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if exporter is not None:
        from opentelemetry.sdk.trace.export import SpanExportResult

        try:
            result = exporter.export(run.spans)
        except Exception as exc:
            print(f"OTLP export raised {type(exc).__name__}: {exc}", file=sys.stderr)
            result = SpanExportResult.FAILURE
        finally:
            exporter.shutdown()
        if result is not SpanExportResult.SUCCESS:
            print(
                f"demo failed: could not send {len(run.spans)} spans to {_otlp_endpoint()}",
                file=sys.stderr,
            )
            return 1
        traces = sorted({f"{s.context.trace_id:032x}" for s in run.spans if s.context})
        print(f"sent {len(run.spans)} spans of trace {', '.join(traces)} to {_otlp_endpoint()}")
    elif as_json:
        print(json.dumps(run_as_json(run), indent=2))
    else:
        print_tree(run)
    if run.problems:
        print("demo failed: the trace is not connected:", file=sys.stderr)
        for problem in run.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    return 0
