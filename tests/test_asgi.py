"""LaminarASGIMiddleware with FastAPI and Starlette under real uvicorn, called over sockets."""

from __future__ import annotations

import asyncio
import json
import random
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI, HTTPException, WebSocket
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Mount, Route, WebSocketRoute
from support.servers import run_uvicorn, wait_for_spans
from websockets.sync.client import connect as ws_connect

from laminar_middleware import HEADER_NAME, LaminarASGIMiddleware, LaminarSpanContext
from laminar_middleware.codec import format_uuid

SCOPE = "laminar_middleware"


def make_remote(**fields: Any) -> LaminarSpanContext:
    """A caller's context as service A would send it: random ids, a two-span path."""
    trace_id = random.getrandbits(128) | 1
    span_id = random.getrandbits(64) | 1
    root_id = random.getrandbits(64) | 1
    values: dict[str, Any] = {
        "span_path": ("service_a", "call_b"),
        "span_ids_path": (format_uuid(root_id), format_uuid(span_id)),
        "user_id": "user-7",
        "session_id": "session-9",
        "trace_type": "DEFAULT",
        "metadata": {"tenant": "acme", "tier": 2},
    }
    values.update(fields)
    return LaminarSpanContext(trace_id, span_id, **values)


def ours(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    return [s for s in spans if s.kind is SpanKind.SERVER and s.instrumentation_scope.name == SCOPE]


def server_spans(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    return [s for s in spans if s.kind is SpanKind.SERVER]


def wait_ours(exporter: InMemorySpanExporter, count: int) -> list[ReadableSpan]:
    return ours(wait_for_spans(exporter, lambda spans: len(ours(spans)) >= count))


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def current_trace_id() -> str:
    return f"{trace.get_current_span().get_span_context().trace_id:032x}"


def build_fastapi(*, tracing: bool = True, **options: Any) -> FastAPI:
    app = FastAPI() if tracing else FastAPI(telemetry={"tracing": False})

    @app.get("/items/{item_id}")
    async def get_item(item_id: int) -> dict[str, Any]:
        await asyncio.sleep(0.001)
        with trace.get_tracer("handler").start_as_current_span("handler work"):
            return {"item_id": item_id, "trace_id": current_trace_id()}

    @app.get("/sync/{name}")
    def get_sync(name: str) -> dict[str, str]:
        return {"name": name, "trace_id": current_trace_id()}

    @app.get("/boom")
    async def boom() -> None:
        raise ValueError("the handler failed")

    @app.get("/unavailable")
    async def unavailable() -> None:
        raise HTTPException(status_code=503, detail="try later")

    @app.get("/health")
    async def health() -> str:
        return "ok"

    @app.get("/metrics/{kind}")
    async def metrics(kind: str) -> str:
        return kind

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(3):
                await asyncio.sleep(0.1)
                STREAM_MARKS.append(time.time_ns())
                yield f"chunk {i}\n".encode()

        return StreamingResponse(chunks(), media_type="text/plain")

    @app.websocket("/ws/{room}")
    async def chat(websocket: WebSocket, room: str) -> None:
        await websocket.accept()
        message = await websocket.receive_text()
        await websocket.send_text(f"{room}:{message}:{current_trace_id()}")
        await websocket.close()

    router = APIRouter(prefix="/api/{version}")

    @router.get("/users/{user_id}")
    async def get_user(version: str, user_id: int) -> dict[str, Any]:
        return {"user_id": user_id}

    inner = APIRouter(prefix="/orders")

    @inner.get("/{order_id}")
    async def get_order(version: str, order_id: int) -> dict[str, Any]:
        return {"order_id": order_id}

    router.include_router(inner)
    app.include_router(router)

    sub = FastAPI(telemetry={"tracing": False})

    @sub.get("/docs/{doc_id}")
    async def get_doc(doc_id: str) -> str:
        return doc_id

    app.mount("/tenants/{tenant}", sub)
    app.add_middleware(LaminarASGIMiddleware, **options)
    return app


STREAM_MARKS: list[int] = []


@pytest.fixture(scope="module")
def fastapi_url() -> Iterator[str]:
    with run_uvicorn(build_fastapi()) as url:
        yield url


@pytest.fixture(scope="module")
def fastapi_untraced_url() -> Iterator[str]:
    with run_uvicorn(build_fastapi(tracing=False)) as url:
        yield url


# -- continuing the caller's context ---------------------------------------------------------


@pytest.mark.parametrize(
    "tracing", [True, False], ids=["fastapi-tracing-on", "fastapi-tracing-off"]
)
def test_server_span_is_the_child_of_the_laminar_header(
    exporter: InMemorySpanExporter, fastapi_url: str, fastapi_untraced_url: str, tracing: bool
) -> None:
    url = fastapi_url if tracing else fastapi_untraced_url
    remote = make_remote()
    response = httpx.get(
        f"{url}/items/42", headers={HEADER_NAME: remote.serialize(), "User-Agent": "agent/1.0"}
    )
    assert response.status_code == 200
    assert response.json()["trace_id"] == f"{remote.trace_id:032x}"

    spans = wait_for_spans(exporter, lambda s: len(ours(s)) >= 1 and len(s) >= 2)
    (span,) = ours(spans)
    assert span.context.trace_id == remote.trace_id
    assert span.parent is not None and span.parent.span_id == remote.span_id
    assert span.parent.is_remote
    assert span.name == "GET /items/{item_id}"
    a = attrs(span)
    port = int(url.rsplit(":", 1)[1])
    assert a["http.request.method"] == "GET"
    assert a["url.path"] == "/items/42"
    assert a["url.scheme"] == "http"
    assert a["http.route"] == "/items/{item_id}"
    assert a["http.response.status_code"] == 200
    assert a["server.address"] == "127.0.0.1"
    assert a["server.port"] == port
    assert a["client.address"] == "127.0.0.1"
    assert a["user_agent.original"] == "agent/1.0"
    assert "error.type" not in a
    # Laminar's attributes: the remote path plus this span, and the caller's association.
    own_id = format_uuid(span.context.span_id)
    assert a["lmnr.span.path"] == (*remote.span_path, "GET /items/{item_id}")
    assert a["lmnr.span.ids_path"] == (*remote.span_ids_path, own_id)
    # The caller's paths are start attributes for Laminar's SDK only (not initialized here).
    assert "lmnr.span.parent_path" not in a
    assert "lmnr.span.parent_ids_path" not in a
    assert a["lmnr.association.properties.user_id"] == "user-7"
    assert a["lmnr.association.properties.session_id"] == "session-9"
    assert a["lmnr.association.properties.trace_type"] == "DEFAULT"
    assert a["lmnr.association.properties.metadata.tenant"] == "acme"
    assert a["lmnr.association.properties.metadata.tier"] == 2
    assert span.status.status_code is StatusCode.UNSET
    # The handler's span is inside ours.
    (work,) = [s for s in spans if s.name == "handler work"]
    assert work.context.trace_id == remote.trace_id


def test_alias_header_name_and_any_case(exporter: InMemorySpanExporter, fastapi_url: str) -> None:
    for name in ("laminar-span-context", "X-LAMINAR-SPAN-CONTEXT"):
        exporter.clear()
        remote = make_remote()
        assert httpx.get(f"{fastapi_url}/sync/x", headers={name: remote.serialize()}).is_success
        (span,) = wait_ours(exporter, 1)
        assert span.parent is not None and span.parent.span_id == remote.span_id


def test_fastapi_tracing_on_gives_exactly_one_server_span(
    exporter: InMemorySpanExporter, fastapi_url: str
) -> None:
    remote = make_remote()
    for i in range(3):
        assert httpx.get(f"{fastapi_url}/items/{i}", headers={HEADER_NAME: remote.serialize()})
    spans = wait_for_spans(exporter, lambda s: len(ours(s)) >= 3)
    time.sleep(0.1)  # give a second SERVER span, if there were one, time to arrive
    spans = list(exporter.get_finished_spans())
    assert len(server_spans(spans)) == 3
    assert all(s.instrumentation_scope.name == SCOPE for s in server_spans(spans))
    # FastAPI's operation spans are still there, inside our span, in the caller's trace.
    by_id = {s.context.span_id: s for s in spans}
    operations = [s for s in spans if s.instrumentation_scope.name == "fastapi"]
    assert {s.name for s in operations} >= {"fastapi.endpoint"}
    for op in operations:
        assert op.context.trace_id == remote.trace_id
        ancestor = op
        while ancestor.parent is not None and ancestor.parent.span_id in by_id:
            ancestor = by_id[ancestor.parent.span_id]
        assert ancestor.kind is SpanKind.SERVER and ancestor.instrumentation_scope.name == SCOPE


def test_fastapi_tracing_off_gives_exactly_one_server_span(
    exporter: InMemorySpanExporter, fastapi_untraced_url: str
) -> None:
    remote = make_remote()
    assert httpx.get(f"{fastapi_untraced_url}/items/1", headers={HEADER_NAME: remote.serialize()})
    wait_ours(exporter, 1)
    time.sleep(0.1)
    spans = list(exporter.get_finished_spans())
    assert [s.instrumentation_scope.name for s in server_spans(spans)] == [SCOPE]
    assert not [s for s in spans if s.instrumentation_scope.name == "fastapi"]


def test_fastapi_app_wrapped_directly_also_has_one_server_span(
    exporter: InMemorySpanExporter,
) -> None:
    app = FastAPI()

    @app.get("/direct/{x}")
    async def direct(x: str) -> str:
        return x

    remote = make_remote()
    with run_uvicorn(LaminarASGIMiddleware(app)) as url:
        assert httpx.get(f"{url}/direct/1", headers={HEADER_NAME: remote.serialize()}).is_success
        wait_ours(exporter, 1)
        time.sleep(0.1)
    spans = server_spans(list(exporter.get_finished_spans()))
    assert len(spans) == 1
    assert spans[0].name == "GET /direct/{x}"
    assert spans[0].parent is not None and spans[0].parent.span_id == remote.span_id


def test_fastapi_own_tracer_provider_is_used(exporter: InMemorySpanExporter) -> None:
    provider = TracerProvider()
    separate = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(separate))
    app = FastAPI(telemetry={"tracer_provider": provider})

    @app.get("/own/{x}")
    async def own(x: str) -> str:
        return x

    app.add_middleware(LaminarASGIMiddleware)
    remote = make_remote()
    with run_uvicorn(app) as url:
        assert httpx.get(f"{url}/own/1", headers={HEADER_NAME: remote.serialize()}).is_success
        wait_for_spans(separate, lambda s: len(ours(s)) >= 1)
        time.sleep(0.1)
    spans = list(separate.get_finished_spans())
    (span,) = server_spans(spans)
    assert span.instrumentation_scope.name == SCOPE and span.name == "GET /own/{x}"
    assert span.parent is not None and span.parent.span_id == remote.span_id
    assert [s for s in spans if s.instrumentation_scope.name == "fastapi"]  # operation spans
    assert not server_spans(list(exporter.get_finished_spans()))


def test_the_requests_other_spans_go_to_the_middlewares_own_provider(
    exporter: InMemorySpanExporter,
) -> None:
    """A CLIENT span and a PRODUCER span made in the request go where its SERVER span went,
    so none of them names a parent exported elsewhere."""
    import dramatiq
    from dramatiq.brokers.stub import StubBroker
    from support.outbound import echo_app

    from laminar_middleware.dramatiq import instrument_dramatiq
    from laminar_middleware.httpx import AsyncLaminarTransport

    provider = TracerProvider()
    separate = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(separate))
    broker = StubBroker()
    instrument_dramatiq(broker)
    task = dramatiq.actor(lambda: None, actor_name="noop", broker=broker)

    async def handler(request: Request) -> PlainTextResponse:
        transport = AsyncLaminarTransport(httpx.ASGITransport(app=echo_app))
        async with httpx.AsyncClient(transport=transport, base_url="http://echo") as client:
            await client.get("/echo")
        task.send()
        return PlainTextResponse("ok")

    app = LaminarASGIMiddleware(Starlette(routes=[Route("/", handler)]), tracer_provider=provider)

    async def go() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            assert (await client.get("/")).text == "ok"

    asyncio.run(go())
    spans = {s.kind: s for s in separate.get_finished_spans()}
    assert set(spans) == {SpanKind.SERVER, SpanKind.CLIENT, SpanKind.PRODUCER}
    server_id = spans[SpanKind.SERVER].context.span_id
    assert spans[SpanKind.CLIENT].parent.span_id == server_id  # type: ignore[union-attr]
    assert spans[SpanKind.PRODUCER].parent.span_id == server_id  # type: ignore[union-attr]
    assert list(exporter.get_finished_spans()) == []


def test_fastapi_span_found_late_is_enriched_then_taken_over(
    exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if the middleware had been built outside FastAPI's build_middleware_stack.
    import laminar_middleware.fastapi as fastapi_module

    monkeypatch.setattr(fastapi_module, "_app_being_built", lambda: None)
    app = FastAPI()

    @app.get("/late")
    async def late() -> str:
        return "late"

    app.add_middleware(LaminarASGIMiddleware)
    with run_uvicorn(app) as url:
        assert httpx.get(f"{url}/late").is_success
        wait_for_spans(exporter, lambda spans: len(server_spans(spans)) >= 1)  # FastAPI's
        time.sleep(0.1)
        first = server_spans(list(exporter.get_finished_spans()))
        exporter.clear()
        assert httpx.get(f"{url}/late").is_success
        wait_ours(exporter, 1)
        time.sleep(0.1)
        second = server_spans(list(exporter.get_finished_spans()))
    # The first request: FastAPI's span was already open, so the middleware enriched it
    # rather than opening a second SERVER span; from the next request on the span is ours.
    (fastapi_span,) = first
    assert fastapi_span.instrumentation_scope.name == "fastapi"
    assert (fastapi_span.attributes or {})["lmnr.span.path"] == ("GET /late",)
    assert [s.instrumentation_scope.name for s in second] == [SCOPE]


# -- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tracing", [True, False], ids=["fastapi-tracing-on", "fastapi-tracing-off"]
)
def test_route_templates_name_the_span_never_the_raw_path(
    exporter: InMemorySpanExporter, fastapi_url: str, fastapi_untraced_url: str, tracing: bool
) -> None:
    url = fastapi_url if tracing else fastapi_untraced_url
    expected = {
        "/items/7": "GET /items/{item_id}",
        "/api/v2/users/5": "GET /api/{version}/users/{user_id}",
        "/api/v2/orders/9": "GET /api/{version}/orders/{order_id}",
        "/tenants/acme/docs/readme": "GET /tenants/{tenant}/docs/{doc_id}",
        "/no/such/path/123": "GET",
    }
    with httpx.Client(base_url=url) as client:
        for path in expected:
            client.get(path)
        client.request("BREW", "/items/7")
    spans = wait_ours(exporter, len(expected) + 1)
    names = {attrs(s)["url.path"]: s.name for s in spans if not s.name.startswith("HTTP")}
    assert names == expected
    (other,) = [s for s in spans if s.name.startswith("HTTP")]
    assert other.name == "HTTP /items/{item_id}"
    assert attrs(other)["http.request.method"] == "_OTHER"
    assert attrs(other)["http.request.method_original"] == "BREW"
    for span in spans:
        assert attrs(span)["lmnr.span.path"] == (span.name,)


def test_starlette_routes_mounts_and_one_server_span(exporter: InMemorySpanExporter) -> None:
    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse(f"hello {request.path_params['name']} {current_trace_id()}")

    inner = Starlette(routes=[Route("/files/{file_id}", hello)])
    app = Starlette(
        routes=[
            Route("/hello/{name}", hello),
            Mount("/orgs/{org}", routes=[Route("/people/{name}", hello)]),
            Mount("/static", app=inner),
        ]
    )
    app.add_middleware(LaminarASGIMiddleware)
    remote = make_remote()
    with run_uvicorn(app) as url, httpx.Client(base_url=url) as client:
        r = client.get("/hello/ann", headers={HEADER_NAME: remote.serialize()})
        assert r.text == f"hello ann {remote.trace_id:032x}"
        client.get("/orgs/o1/people/bob")
        client.get("/static/files/f9")
        spans = wait_ours(exporter, 3)
    names = {attrs(s)["url.path"]: s.name for s in spans}
    assert names == {
        "/hello/ann": "GET /hello/{name}",
        "/orgs/o1/people/bob": "GET /orgs/{org}/people/{name}",
        "/static/files/f9": "GET /static/files/{file_id}",
    }
    assert len(server_spans(list(exporter.get_finished_spans()))) == 3


# -- the span's life --------------------------------------------------------------------------


def test_streaming_response_ends_the_span_after_the_last_chunk(
    exporter: InMemorySpanExporter, fastapi_url: str
) -> None:
    STREAM_MARKS.clear()
    remote = make_remote()
    with httpx.stream(
        "GET", f"{fastapi_url}/stream", headers={HEADER_NAME: remote.serialize()}
    ) as r:
        body = b"".join(r.iter_bytes())
    assert body == b"chunk 0\nchunk 1\nchunk 2\n"
    (span,) = wait_ours(exporter, 1)
    assert span.name == "GET /stream"
    assert len(STREAM_MARKS) == 3
    assert span.start_time is not None and span.end_time is not None
    assert span.end_time > STREAM_MARKS[-1]
    assert span.end_time - span.start_time >= 300_000_000  # three chunks 0.1 s apart
    assert span.parent is not None and span.parent.span_id == remote.span_id


def test_exception_is_recorded_and_reraised_unchanged(
    exporter: InMemorySpanExporter, fastapi_url: str
) -> None:
    bare = FastAPI(telemetry={"tracing": False})

    @bare.get("/boom")
    async def boom() -> None:
        raise ValueError("the handler failed")

    with run_uvicorn(bare) as bare_url:
        expected = httpx.get(f"{bare_url}/boom")
    response = httpx.get(f"{fastapi_url}/boom")
    assert response.status_code == expected.status_code == 500
    assert response.content == expected.content
    (span,) = wait_ours(exporter, 1)
    assert span.name == "GET /boom"
    assert span.status.status_code is StatusCode.ERROR
    assert attrs(span)["error.type"] == "ValueError"
    (event,) = [e for e in span.events if e.name == "exception"]
    assert (event.attributes or {})["exception.type"] == "ValueError"
    assert (event.attributes or {})["exception.message"] == "the handler failed"


def test_5xx_response_is_an_error_and_4xx_is_not(
    exporter: InMemorySpanExporter, fastapi_url: str
) -> None:
    assert httpx.get(f"{fastapi_url}/unavailable").status_code == 503
    assert httpx.get(f"{fastapi_url}/items/not-a-number").status_code == 422
    spans = {attrs(s)["url.path"]: s for s in wait_ours(exporter, 2)}
    failed, invalid = spans["/unavailable"], spans["/items/not-a-number"]
    assert failed.status.status_code is StatusCode.ERROR
    assert attrs(failed)["error.type"] == "503"
    assert attrs(failed)["http.response.status_code"] == 503
    assert invalid.status.status_code is StatusCode.UNSET
    assert attrs(invalid)["http.response.status_code"] == 422


def test_excluded_paths_get_no_span(exporter: InMemorySpanExporter) -> None:
    app = build_fastapi(excluded_paths=["/health", re.compile(r"/metrics/.+")])
    with run_uvicorn(app) as url, httpx.Client(base_url=url) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/metrics/cpu").status_code == 200
        wait_ours(exporter, 0)
        time.sleep(0.1)
        # Nothing at all: no SERVER span, and no FastAPI operation spans as roots of traces.
        assert list(exporter.get_finished_spans()) == []
        assert client.get("/items/1").status_code == 200
        wait_ours(exporter, 1)
        time.sleep(0.1)
    spans = server_spans(list(exporter.get_finished_spans()))
    assert [attrs(s)["url.path"] for s in spans] == ["/items/1"]


def test_websocket_connection_gets_one_span(
    exporter: InMemorySpanExporter, fastapi_url: str
) -> None:
    remote = make_remote()
    ws_url = fastapi_url.replace("http://", "ws://") + "/ws/lobby"
    with ws_connect(ws_url, additional_headers={HEADER_NAME: remote.serialize()}) as ws:
        ws.send("hi")
        assert ws.recv(timeout=5) == f"lobby:hi:{remote.trace_id:032x}"
    (span,) = wait_ours(exporter, 1)
    time.sleep(0.1)
    assert len(server_spans(list(exporter.get_finished_spans()))) == 1
    assert span.name == "WS /ws/{room}"
    assert span.parent is not None and span.parent.span_id == remote.span_id
    a = attrs(span)
    assert a["url.path"] == "/ws/lobby"
    assert a["url.scheme"] == "ws"
    assert a["network.protocol.name"] == "websocket"
    assert a["lmnr.span.path"] == (*remote.span_path, "WS /ws/{room}")
    assert span.status.status_code is StatusCode.UNSET


def test_starlette_websocket_error_is_recorded(exporter: InMemorySpanExporter) -> None:
    async def broken(websocket: WebSocket) -> None:
        await websocket.accept()
        raise RuntimeError("socket handler failed")

    app = Starlette(routes=[WebSocketRoute("/broken", broken)])
    app.add_middleware(LaminarASGIMiddleware)
    with run_uvicorn(app) as url:
        with ws_connect(url.replace("http://", "ws://") + "/broken") as ws:
            with pytest.raises(Exception):  # noqa: B017 - the server closes with 1011
                ws.recv(timeout=5)
        (span,) = wait_ours(exporter, 1)
    assert span.name == "WS /broken"
    assert span.status.status_code is StatusCode.ERROR
    assert attrs(span)["error.type"] == "RuntimeError"


def test_lifespan_passes_through(exporter: InMemorySpanExporter) -> None:
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        events.append("startup")
        yield
        events.append("shutdown")

    app = FastAPI(lifespan=lifespan)

    @app.get("/")
    async def index() -> str:
        return "up"

    app.add_middleware(LaminarASGIMiddleware)
    with run_uvicorn(app, lifespan="on") as url:
        assert events == ["startup"]
        assert httpx.get(url).json() == "up"
        wait_ours(exporter, 1)
    assert events == ["startup", "shutdown"]
    assert len(ours(list(exporter.get_finished_spans()))) == 1


# -- trust ------------------------------------------------------------------------------------


def serve_items(**options: Any) -> Any:
    app = Starlette(
        routes=[
            Route(
                "/items/{item_id}",
                lambda request: PlainTextResponse(current_trace_id()),
            )
        ]
    )
    app.add_middleware(LaminarASGIMiddleware, **options)
    return run_uvicorn(app)


def test_trust_restart_starts_a_new_trace_linked_to_the_caller(
    exporter: InMemorySpanExporter,
) -> None:
    remote = make_remote()
    with serve_items(trust="restart") as url:
        r = httpx.get(f"{url}/items/1", headers={HEADER_NAME: remote.serialize()})
        (span,) = wait_ours(exporter, 1)
    assert r.text == f"{span.context.trace_id:032x}"
    assert span.parent is None
    assert span.context.trace_id != remote.trace_id
    (link,) = span.links
    assert link.context.trace_id == remote.trace_id and link.context.span_id == remote.span_id
    a = attrs(span)
    assert not [k for k in a if k.startswith("lmnr.association.")]
    assert "lmnr.span.parent_path" not in a
    assert a["lmnr.span.path"] == ("GET /items/{item_id}",)
    assert a["lmnr.span.ids_path"] == (format_uuid(span.context.span_id),)


def test_trust_ignore_starts_a_new_trace_without_a_link(exporter: InMemorySpanExporter) -> None:
    remote = make_remote()
    with serve_items(trust="ignore") as url:
        httpx.get(f"{url}/items/1", headers={HEADER_NAME: remote.serialize()})
        (span,) = wait_ours(exporter, 1)
    assert span.parent is None and not span.links
    assert span.context.trace_id != remote.trace_id
    assert not [k for k in attrs(span) if k.startswith("lmnr.association.")]


def test_trust_callable_decides_per_request_from_the_scope(
    exporter: InMemorySpanExporter,
) -> None:
    seen: list[str] = []

    def policy(scope: dict[str, Any]) -> str:
        seen.append(scope["type"])
        headers = dict(scope["headers"])
        return "continue" if headers.get(b"x-internal") == b"yes" else "restart"

    internal, public = make_remote(), make_remote()
    with serve_items(trust=policy) as url, httpx.Client(base_url=url) as client:
        client.get("/items/1", headers={HEADER_NAME: internal.serialize(), "X-Internal": "yes"})
        client.get("/items/2", headers={HEADER_NAME: public.serialize()})
        client.get("/items/3")  # no remote context: the policy is not asked
        spans = {attrs(s)["url.path"]: s for s in wait_ours(exporter, 3)}
    assert seen == ["http", "http"]
    assert spans["/items/1"].context.trace_id == internal.trace_id
    assert "lmnr.association.properties.user_id" in attrs(spans["/items/1"])
    assert spans["/items/2"].context.trace_id != public.trace_id
    assert spans["/items/2"].links[0].context.span_id == public.span_id
    assert "lmnr.association.properties.user_id" not in attrs(spans["/items/2"])
    assert spans["/items/3"].parent is None


def test_trust_from_the_environment(
    exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAMINAR_TRUST", "ignore")
    remote = make_remote()
    with serve_items() as url:
        httpx.get(f"{url}/items/1", headers={HEADER_NAME: remote.serialize()})
        (span,) = wait_ours(exporter, 1)
    assert span.parent is None and not span.links


# -- the W3C fallback -------------------------------------------------------------------------


def traceparent() -> tuple[int, int, str]:
    trace_id, span_id = random.getrandbits(128) | 1, random.getrandbits(64) | 1
    return trace_id, span_id, f"00-{trace_id:032x}-{span_id:016x}-01"


def test_w3c_traceparent_is_continued_without_a_laminar_header(
    exporter: InMemorySpanExporter, fastapi_url: str
) -> None:
    trace_id, span_id, header = traceparent()
    r = httpx.get(f"{fastapi_url}/items/3", headers={"traceparent": header})
    assert r.json()["trace_id"] == f"{trace_id:032x}"
    (span,) = wait_ours(exporter, 1)
    assert span.context.trace_id == trace_id
    assert span.parent is not None and span.parent.span_id == span_id
    a = attrs(span)
    assert a["lmnr.span.path"] == ("GET /items/{item_id}",)
    assert "lmnr.span.parent_path" not in a


def test_invalid_laminar_header_falls_back_to_w3c(
    exporter: InMemorySpanExporter, fastapi_url: str
) -> None:
    _, span_id, header = traceparent()
    httpx.get(f"{fastapi_url}/items/3", headers={"traceparent": header, HEADER_NAME: "{broken"})
    (span,) = wait_ours(exporter, 1)
    assert span.parent is not None and span.parent.span_id == span_id


def test_laminar_header_wins_over_w3c(exporter: InMemorySpanExporter, fastapi_url: str) -> None:
    remote = make_remote()
    _, _, header = traceparent()
    httpx.get(
        f"{fastapi_url}/items/3", headers={"traceparent": header, HEADER_NAME: remote.serialize()}
    )
    (span,) = wait_ours(exporter, 1)
    assert span.parent is not None and span.parent.span_id == remote.span_id


def test_trust_restart_applies_to_w3c_too(exporter: InMemorySpanExporter) -> None:
    trace_id, span_id, header = traceparent()
    with serve_items(trust="restart") as url:
        httpx.get(f"{url}/items/1", headers={"traceparent": header})
        (span,) = wait_ours(exporter, 1)
    assert span.parent is None and span.context.trace_id != trace_id
    assert span.links[0].context.span_id == span_id


# -- concurrency ------------------------------------------------------------------------------


async def test_concurrent_requests_keep_their_own_parents(
    exporter: InMemorySpanExporter, fastapi_url: str
) -> None:
    remotes = [make_remote() for _ in range(200)]
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(base_url=fastapi_url, limits=limits, timeout=30) as client:
        responses = await asyncio.gather(
            *(
                client.get(f"/items/{i}", headers={HEADER_NAME: remote.serialize()})
                for i, remote in enumerate(remotes)
            )
        )
    for remote, response in zip(remotes, responses, strict=True):
        assert response.json()["trace_id"] == f"{remote.trace_id:032x}"
    spans = await asyncio.to_thread(wait_for_spans, exporter, lambda s: len(ours(s)) >= 200, 20.0)
    by_path = {attrs(s)["url.path"]: s for s in ours(spans)}
    assert len(by_path) == 200
    for i, remote in enumerate(remotes):
        span = by_path[f"/items/{i}"]
        assert span.context.trace_id == remote.trace_id
        assert span.parent is not None and span.parent.span_id == remote.span_id
        assert attrs(span)["lmnr.span.ids_path"][:-1] == remote.span_ids_path
    # And each handler span sits in its own request's trace.
    work = [s for s in spans if s.name == "handler work"]
    assert len(work) == 200
    traces = {r.trace_id for r in remotes}
    assert {s.context.trace_id for s in work} == traces


# -- Laminar's SDK in the same process ---------------------------------------------------------

LMNR_SCRIPT = """
import asyncio, json
import httpx
from lmnr import Laminar, observe
from lmnr.opentelemetry_lib.tracing import init_tracing
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from laminar_middleware import HEADER_NAME, LaminarASGIMiddleware, LaminarSpanContext
from laminar_middleware.codec import format_uuid

exporter = InMemorySpanExporter()
init_tracing(exporter=exporter, disable_batch=True, instruments=set(),
             set_global_tracer_provider=False)
Laminar.initialize(project_api_key="offline-test", instruments=set())

@observe(name="work")
def work():
    return "done"

async def endpoint(request):
    return PlainTextResponse(work())

app = Starlette(routes=[Route("/items/{item_id}", endpoint)])
app.add_middleware(LaminarASGIMiddleware)
remote = LaminarSpanContext(0xABC, 0xDEF, ("service_a",), (format_uuid(0xDEF),), user_id="u-9")

async def main():
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/items/1", headers={HEADER_NAME: remote.serialize()})
        assert response.text == "done", response.text

asyncio.run(main())
print(json.dumps([
    {"name": s.name, "kind": s.kind.name, "trace_id": s.context.trace_id,
     "span_id": s.context.span_id, "parent": s.parent.span_id if s.parent else None,
     "user_id": (s.attributes or {}).get("lmnr.association.properties.user_id")}
    for s in exporter.get_finished_spans()
]))
"""


def test_lmnr_observe_spans_are_children_of_the_server_span() -> None:
    # Laminar's SDK changes process-wide state: it runs in a process of its own.
    done = subprocess.run(
        [sys.executable, "-c", LMNR_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    spans = {s["name"]: s for s in json.loads(done.stdout.strip().splitlines()[-1])}
    server, work = spans["GET /items/{item_id}"], spans["work"]
    assert server["kind"] == "SERVER"
    assert server["trace_id"] == work["trace_id"] == 0xABC
    assert server["parent"] == 0xDEF
    assert work["parent"] == server["span_id"]
    assert work["user_id"] == "u-9"
