"""Concurrency isolation under real servers, with every request in flight at once.

300 requests through real uvicorn (Starlette behind the ASGI middleware) and 100 through
Werkzeug's threaded server (Flask behind the WSGI middleware), each from its own caller (its
own trace, parent span, path and user id). Each handler waits until all requests are inside
handlers (bounded), then echoes the context it sees; so do the places a request's work moves
to: `anyio.to_thread`, Starlette's `run_in_threadpool`, a sync endpoint's worker thread,
background tasks after the response, and a streaming WSGI body. Every echo must be the
request's own, and every exported span must sit under its own request's server span.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
import requests
from flask import Flask, Response
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.background import BackgroundTasks
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from support.servers import run_aiohttp, run_uvicorn, run_wsgi, wait_for_spans

from laminar_middleware import (
    HEADER_NAME,
    LaminarASGIMiddleware,
    LaminarSpanContext,
    LaminarWSGIMiddleware,
    serialize_span_context,
)
from laminar_middleware.codec import format_uuid

SCOPE = "laminar_middleware"
ASGI_REQUESTS = 300
WSGI_REQUESTS = 100
GATE_TIMEOUT = 30.0
TRACER = trace.get_tracer("hardening.concurrency")


def callers(count: int, seed: int) -> list[LaminarSpanContext]:
    """Distinct callers: own trace, own parent span, own path and user id."""
    rng = random.Random(seed)
    result = []
    for i in range(count):
        span_id = rng.getrandbits(64) | 1
        result.append(
            LaminarSpanContext(
                (rng.getrandbits(96) << 32) | i + 1,
                span_id,
                (f"caller-{i}",),
                (format_uuid(span_id),),
                user_id=f"user-{i}",
            )
        )
    assert len({c.trace_id for c in result}) == len({c.span_id for c in result}) == count
    return result


def here(label: str | None = None) -> str:
    """The current span as `trace-span` (and a child span named `label`, to check later)."""
    context = trace.get_current_span().get_span_context()
    if label is not None:
        TRACER.start_span(label).end()
    return f"{context.trace_id:032x}-{context.span_id:016x}"


def ids(span: ReadableSpan) -> str:
    return f"{span.context.trace_id:032x}-{span.context.span_id:016x}"


def ours(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    return [s for s in spans if s.kind is SpanKind.SERVER and s.instrumentation_scope.name == SCOPE]


def check_echo(echo: str, caller: LaminarSpanContext, route: str) -> LaminarSpanContext:
    """The handler's serialized context: its own request's trace, path and user."""
    seen = LaminarSpanContext.parse(echo)
    assert seen is not None
    assert seen.trace_id == caller.trace_id
    assert seen.span_path == (*caller.span_path, route)
    assert seen.span_ids_path[:-1] == caller.span_ids_path
    assert seen.span_ids_path[-1] == format_uuid(seen.span_id)
    assert seen.user_id == caller.user_id
    return seen


def check_server_spans(
    spans: list[ReadableSpan], callers: list[LaminarSpanContext], echoed: list[LaminarSpanContext]
) -> dict[int, ReadableSpan]:
    """One server span per request, each the child of its own caller: returns them by id."""
    mine = {c.trace_id for c in callers}
    servers = {s.context.span_id: s for s in ours(spans) if s.context.trace_id in mine}
    assert len(servers) == len(callers)
    for caller, seen in zip(callers, echoed, strict=True):
        span = servers[seen.span_id]
        assert span.context.trace_id == caller.trace_id
        assert span.parent is not None and span.parent.span_id == caller.span_id
        assert span.end_time is not None
    return servers


def check_children(spans: list[ReadableSpan], servers: dict[int, ReadableSpan], name: str) -> None:
    """Each request made one span named `name`, a child of that request's server span."""
    traces = {s.context.trace_id for s in servers.values()}
    children = [s for s in spans if s.name == name and s.context.trace_id in traces]
    assert len(children) == len(servers), name
    for child in children:
        assert child.parent is not None
        server = servers[child.parent.span_id]
        assert server.context.trace_id == child.context.trace_id


# -- ASGI: real uvicorn ---------------------------------------------------------------------


@dataclass
class Gate:
    """Holds every handler until `size` of them are in flight (bounded by a timeout)."""

    size: int
    inflight: int = 0
    peak: int = 0
    event: asyncio.Event | None = None
    background: dict[str, str] = field(default_factory=dict)

    async def wait(self) -> None:
        if self.event is None:
            self.event = asyncio.Event()  # in uvicorn's loop
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        if self.inflight >= self.size:
            self.event.set()
        with anyio.move_on_after(GATE_TIMEOUT):
            await self.event.wait()


def starlette_app(gate: Gate) -> Starlette:
    async def ctx(request: Request) -> PlainTextResponse:
        before = here()
        await gate.wait()
        after = here()  # after thousands of other tasks ran on this loop
        in_thread = await anyio.to_thread.run_sync(here, "to_thread")
        in_pool = await run_in_threadpool(here, "threadpool")
        number = request.headers["x-request"]

        def background_sync() -> None:
            gate.background[f"sync {number}"] = here("background sync")

        async def background_async() -> None:
            await anyio.sleep(0)
            gate.background[f"async {number}"] = here("background async")

        tasks = BackgroundTasks()
        tasks.add_task(background_sync)
        tasks.add_task(background_async)
        echo = serialize_span_context() or ""
        return PlainTextResponse(
            "ok",
            headers={
                "x-echo": echo,
                "x-before": before,
                "x-after": after,
                "x-thread": in_thread,
                "x-pool": in_pool,
            },
            background=tasks,
        )

    def sync_ctx(request: Request) -> PlainTextResponse:  # Starlette runs it in a thread
        return PlainTextResponse(
            "ok", headers={"x-echo": serialize_span_context() or "", "x-here": here("sync")}
        )

    return Starlette(routes=[Route("/ctx", ctx), Route("/sync", sync_ctx)])


@pytest.fixture
def gate() -> Gate:
    return Gate(ASGI_REQUESTS)


@pytest.fixture
def uvicorn_url(gate: Gate) -> Iterator[str]:
    with run_uvicorn(LaminarASGIMiddleware(starlette_app(gate)), backlog=4096) as url:
        yield url


@pytest.mark.timeout(120)
async def test_300_concurrent_uvicorn_requests_each_see_their_own_context(
    exporter: InMemorySpanExporter, uvicorn_url: str, gate: Gate
) -> None:
    remotes = callers(ASGI_REQUESTS, seed=300)
    limits = httpx.Limits(max_connections=ASGI_REQUESTS + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        responses = await asyncio.gather(
            *(
                client.get(
                    f"{uvicorn_url}/ctx",
                    headers={HEADER_NAME: remote.serialize(), "x-request": str(i)},
                )
                for i, remote in enumerate(remotes)
            )
        )
    # Every request was inside a handler at the same time.
    assert gate.peak == ASGI_REQUESTS

    echoed = []
    for remote, response in zip(remotes, responses, strict=True):
        assert response.status_code == 200
        seen = check_echo(response.headers["x-echo"], remote, "GET /ctx")
        own = f"{remote.trace_id:032x}-{seen.span_id:016x}"
        # The same span before and after the wait, in anyio's worker thread and in
        # Starlette's thread pool.
        for name in ("x-before", "x-after", "x-thread", "x-pool"):
            assert response.headers[name] == own, name
        echoed.append(seen)

    # Background tasks run after the response: wait for them (bounded).
    deadline = time.monotonic() + 20
    while len(gate.background) < 2 * ASGI_REQUESTS and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    for i, seen in enumerate(echoed):
        own = f"{remotes[i].trace_id:032x}-{seen.span_id:016x}"
        assert gate.background[f"sync {i}"] == own
        assert gate.background[f"async {i}"] == own

    spans = wait_for_spans(
        exporter,
        lambda s: (
            len(ours(s)) >= ASGI_REQUESTS
            and sum(x.name == "background async" for x in s) >= ASGI_REQUESTS
        ),
        20.0,
    )
    servers = check_server_spans(spans, remotes, echoed)
    for name in ("to_thread", "threadpool", "background sync", "background async"):
        check_children(spans, servers, name)


@pytest.mark.timeout(60)
async def test_concurrent_sync_endpoints_in_the_thread_pool(
    exporter: InMemorySpanExporter, uvicorn_url: str
) -> None:
    remotes = callers(60, seed=60)
    async with httpx.AsyncClient(timeout=30) as client:
        responses = await asyncio.gather(
            *(
                client.get(f"{uvicorn_url}/sync", headers={HEADER_NAME: remote.serialize()})
                for remote in remotes
            )
        )
    echoed = []
    for remote, response in zip(remotes, responses, strict=True):
        seen = check_echo(response.headers["x-echo"], remote, "GET /sync")
        assert response.headers["x-here"] == f"{remote.trace_id:032x}-{seen.span_id:016x}"
        echoed.append(seen)
    spans = wait_for_spans(exporter, lambda s: len(ours(s)) >= len(remotes), 10.0)
    servers = check_server_spans(spans, remotes, echoed)
    check_children(spans, servers, "sync")


# -- WSGI: Werkzeug's threaded server -------------------------------------------------------


def ctx_view(
    in_view: threading.Barrier, in_body: threading.Barrier
) -> tuple[Iterator[bytes], dict[str, str]]:
    """What the `/ctx` view does in either framework: the context it saw before and after
    the gate, and a body that echoes it before and after the second gate."""
    before = here()
    in_view.wait()  # every request is inside a view now
    after = here("view")

    def body() -> Iterator[bytes]:
        yield (serialize_span_context() or "").encode() + b"\n"
        in_body.wait()  # every response is being streamed now
        yield here("body").encode()

    headers = {"x-echo": serialize_span_context() or "", "x-before": before, "x-after": after}
    return body(), headers


def flask_app(in_view: threading.Barrier, in_body: threading.Barrier) -> Flask:
    app = Flask(__name__)

    @app.get("/ctx")
    def ctx() -> Response:
        body, headers = ctx_view(in_view, in_body)
        return Response(body, headers=headers)

    return app


def check_threaded_ctx(
    app: Any,
    remotes: list[LaminarSpanContext],
    gates: tuple[threading.Barrier, threading.Barrier],
    name: str,
    exporter: InMemorySpanExporter,
) -> None:
    """All requests at once through Werkzeug's threaded server to an app whose `/ctx` view
    and body wait at the gates: each saw only its own caller, in the view and in the body."""

    def call(index: int) -> requests.Response:
        return requests.get(
            f"{url}/ctx", headers={HEADER_NAME: remotes[index].serialize()}, timeout=60
        )

    with run_wsgi(app) as url, ThreadPoolExecutor(len(remotes)) as pool:
        responses = list(pool.map(call, range(len(remotes))))
    # Both barriers let everyone through: all were in views, then in bodies, at once.
    assert not any(gate.broken for gate in gates)

    echoed = []
    for remote, response in zip(remotes, responses, strict=True):
        assert response.status_code == 200
        seen = check_echo(response.headers["x-echo"], remote, name)
        own = f"{remote.trace_id:032x}-{seen.span_id:016x}"
        assert response.headers["x-before"] == response.headers["x-after"] == own
        first, second = response.content.split(b"\n")
        assert check_echo(first.decode(), remote, name) == seen
        assert second.decode() == own
        echoed.append(seen)

    spans = wait_for_spans(exporter, lambda s: len(ours(s)) >= len(remotes), 20.0)
    servers = check_server_spans(spans, remotes, echoed)
    check_children(spans, servers, "view")
    check_children(spans, servers, "body")


def gates() -> tuple[threading.Barrier, threading.Barrier]:
    """In the view, then in the body: every request waits there until all are."""
    return (
        threading.Barrier(WSGI_REQUESTS, timeout=GATE_TIMEOUT),
        threading.Barrier(WSGI_REQUESTS, timeout=GATE_TIMEOUT),
    )


@pytest.mark.timeout(120)
def test_100_concurrent_threaded_wsgi_requests_each_see_their_own_context(
    exporter: InMemorySpanExporter,
) -> None:
    in_view, in_body = both = gates()
    app = flask_app(in_view, in_body)
    app.wsgi_app = LaminarWSGIMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    check_threaded_ctx(app, callers(WSGI_REQUESTS, seed=100), both, "GET /ctx", exporter)


# -- Django under Werkzeug's threaded server ------------------------------------------------


def django_ctx(in_view: threading.Barrier, in_body: threading.Barrier) -> Any:
    from django.http import HttpRequest, StreamingHttpResponse

    def ctx(request: HttpRequest) -> StreamingHttpResponse:
        body, headers = ctx_view(in_view, in_body)
        return StreamingHttpResponse(body, headers=headers)

    return ctx


@pytest.mark.timeout(120)
def test_100_concurrent_django_requests_each_see_their_own_context(
    exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    from support import django_project

    in_view, in_body = both = gates()
    monkeypatch.setattr(django_project, "ctx_view", django_ctx(in_view, in_body))
    app = django_project.wsgi_app([django_project.OURS])
    check_threaded_ctx(app, callers(WSGI_REQUESTS, seed=101), both, "GET ctx", exporter)


# -- aiohttp under its own runner -----------------------------------------------------------


def aiohttp_app(gate: Gate) -> Any:
    from aiohttp import web

    from laminar_middleware.aiohttp import middleware

    async def ctx(request: web.Request) -> web.StreamResponse:
        before = here()
        await gate.wait()
        after = here()  # after hundreds of other handlers ran on this loop
        in_thread = await asyncio.to_thread(here, "to_thread")
        response = web.StreamResponse(
            headers={
                "x-echo": serialize_span_context() or "",
                "x-before": before,
                "x-after": after,
                "x-thread": in_thread,
            }
        )
        await response.prepare(request)
        await asyncio.sleep(0)
        await response.write(here("body").encode())
        return response

    app = web.Application(middlewares=[middleware()])
    app.router.add_get("/ctx", ctx)
    return app


@pytest.mark.timeout(120)
async def test_300_concurrent_aiohttp_requests_each_see_their_own_context(
    exporter: InMemorySpanExporter,
) -> None:
    gate = Gate(ASGI_REQUESTS)
    remotes = callers(ASGI_REQUESTS, seed=301)
    limits = httpx.Limits(max_connections=ASGI_REQUESTS + 10, max_keepalive_connections=0)
    with run_aiohttp(aiohttp_app(gate), backlog=4096) as url:
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            responses = await asyncio.gather(
                *(
                    client.get(f"{url}/ctx", headers={HEADER_NAME: remote.serialize()})
                    for remote in remotes
                )
            )
    assert gate.peak == ASGI_REQUESTS

    echoed = []
    for remote, response in zip(remotes, responses, strict=True):
        assert response.status_code == 200
        seen = check_echo(response.headers["x-echo"], remote, "GET /ctx")
        own = f"{remote.trace_id:032x}-{seen.span_id:016x}"
        for name in ("x-before", "x-after", "x-thread"):
            assert response.headers[name] == own, name
        assert response.text == own
        echoed.append(seen)

    spans = wait_for_spans(exporter, lambda s: len(ours(s)) >= ASGI_REQUESTS, 20.0)
    servers = check_server_spans(spans, remotes, echoed)
    check_children(spans, servers, "to_thread")
    check_children(spans, servers, "body")
