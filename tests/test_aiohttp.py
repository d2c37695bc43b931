"""aiohttp: the server middleware under aiohttp's own runner on 127.0.0.1, and what only the
aiohttp client hook has (its trace configs, redirects inside one call, contrib beside it).
The rules every client hook keeps are in `test_client_contract.py`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from support.aiohttp_sync import SyncSession
from support.outbound import (
    client_spans,
    closed_port_url,
    echo_server,
    laminar,
    only,
    other_host,
)
from support.servers import run_aiohttp, wait_for_spans

from laminar_middleware import HEADER_NAME, LaminarSpanContext
from laminar_middleware.aiohttp import instrument_aiohttp, middleware, uninstrument_aiohttp
from laminar_middleware.codec import format_uuid

TRACER = trace.get_tracer("tests.aiohttp")
CALLER = LaminarSpanContext(
    0x4BF92F3577B34DA6A3CE929D0E0E4736,
    0x00F067AA0BA902B7,
    ("service_a",),
    (format_uuid(0x00F067AA0BA902B7),),
    user_id="u-1",
)


async def item(request: web.Request) -> web.Response:
    with TRACER.start_as_current_span("lookup"):
        pass
    return web.json_response({"item": request.match_info["item_id"]})


async def user(request: web.Request) -> web.Response:
    return web.json_response({"user": request.match_info["user_id"]})


async def boom(request: web.Request) -> web.Response:
    raise RuntimeError("boom")


async def moved(request: web.Request) -> web.Response:
    raise web.HTTPFound("/items/1")


async def stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    await response.prepare(request)
    for i in range(3):
        with TRACER.start_as_current_span(f"chunk {i}"):
            await response.write(b"chunk\n")
            await asyncio.sleep(0.01)
    return response


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(0.5)  # longer than the callers wait
    return web.Response(text="late")


async def echo_socket(request: web.Request) -> web.WebSocketResponse:
    socket = web.WebSocketResponse()
    await socket.prepare(request)
    async for message in socket:
        with TRACER.start_as_current_span("message"):
            await socket.send_str(f"echo {message.data}")
    return socket


def make_app(*middlewares: Any) -> web.Application:
    app = web.Application(middlewares=list(middlewares))
    app.router.add_get("/items/{item_id}", item)
    app.router.add_get("/boom", boom)
    app.router.add_get("/moved", moved)
    app.router.add_get("/stream", stream)
    app.router.add_get("/slow", slow)
    app.router.add_get("/ws/{room}", echo_socket)
    admin = web.Application()
    admin.router.add_get("/users/{user_id}", user)
    app.add_subapp("/admin", admin)
    return app


def servers(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    return [s for s in spans if s.kind is SpanKind.SERVER]


def get(base: str, path: str, **kwargs: Any) -> tuple[int, bytes]:
    with SyncSession() as session:
        response = session.get(base + path, allow_redirects=False, **kwargs)
        return response.status_code, response.body


def served(exporter: InMemorySpanExporter, count: int = 1) -> list[ReadableSpan]:
    return servers(wait_for_spans(exporter, lambda s: len(servers(s)) >= count))


@pytest.fixture
def base() -> Iterator[str]:
    with run_aiohttp(make_app(middleware())) as url:
        yield url


# --- the server span ------------------------------------------------------------------------


def test_span_named_by_canonical_route_continuing_the_caller(
    base: str, exporter: InMemorySpanExporter
) -> None:
    status, _ = get(base, "/items/7", headers={HEADER_NAME: CALLER.serialize()})
    assert status == 200
    spans = wait_for_spans(exporter, lambda s: len(s) >= 2)
    (span,) = servers(spans)
    assert span.name == "GET /items/{item_id}"
    attributes = dict(span.attributes or {})
    assert attributes["http.route"] == "/items/{item_id}"
    assert attributes["http.response.status_code"] == 200
    assert attributes["lmnr.association.properties.user_id"] == "u-1"
    assert span.parent is not None
    assert (span.context.trace_id, span.parent.span_id) == (CALLER.trace_id, CALLER.span_id)
    (lookup,) = [s for s in spans if s.name == "lookup"]
    assert lookup.parent is not None and lookup.parent.span_id == span.context.span_id
    assert dict(lookup.attributes or {})["lmnr.span.path"] == (
        "service_a",
        "GET /items/{item_id}",
        "lookup",
    )


def test_sub_application_routes_keep_their_prefix(
    base: str, exporter: InMemorySpanExporter
) -> None:
    assert get(base, "/admin/users/3")[0] == 200
    (span,) = served(exporter)
    assert span.name == "GET /admin/users/{user_id}"


def test_a_sub_application_with_its_own_middleware_gives_one_span(
    exporter: InMemorySpanExporter,
) -> None:
    app = web.Application(middlewares=[middleware()])
    admin = web.Application(middlewares=[middleware()])
    admin.router.add_get("/users/{user_id}", user)
    app.add_subapp("/admin", admin)
    with run_aiohttp(app) as url:
        assert get(url, "/admin/users/3")[0] == 200
        (span,) = served(exporter)
    assert span.name == "GET /admin/users/{user_id}"
    assert [s.name for s in exporter.get_finished_spans()] == [span.name]


def test_w3c_traceparent_when_no_laminar_header(base: str, exporter: InMemorySpanExporter) -> None:
    traceparent = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    assert get(base, "/items/1", headers={"traceparent": traceparent})[0] == 200
    (span,) = served(exporter)
    assert span.parent is not None
    assert (span.context.trace_id, span.parent.span_id) == (int("a" * 32, 16), int("b" * 16, 16))


def test_handler_exception_is_recorded_and_the_response_is_aiohttps(
    base: str, exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.CRITICAL, logger="aiohttp.server"):
        assert get(base, "/boom")[0] == 500
    (span,) = served(exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert dict(span.attributes or {})["error.type"] == "RuntimeError"
    assert [event.name for event in span.events] == ["exception"]


def test_raised_http_exceptions_are_responses_not_failures(
    base: str, exporter: InMemorySpanExporter
) -> None:
    assert get(base, "/moved")[0] == 302
    assert get(base, "/nowhere")[0] == 404
    moved_span, missing = served(exporter, 2)
    assert moved_span.name == "GET /moved"
    assert dict(moved_span.attributes or {})["http.response.status_code"] == 302
    assert missing.name == "GET"  # no route matched: the method only
    assert dict(missing.attributes or {})["http.response.status_code"] == 404
    for span in (moved_span, missing):
        assert span.status.status_code is StatusCode.UNSET
        assert span.events == ()


def test_streaming_response_is_inside_the_span(base: str, exporter: InMemorySpanExporter) -> None:
    assert get(base, "/stream") == (200, b"chunk\n" * 3)
    spans = wait_for_spans(exporter, lambda s: len(s) >= 4)
    (span,) = servers(spans)
    chunks = [s for s in spans if s.name.startswith("chunk")]
    assert len(chunks) == 3
    for chunk in chunks:
        assert chunk.parent is not None and chunk.parent.span_id == span.context.span_id
    assert span.end_time is not None
    assert all(chunk.end_time is not None and chunk.end_time <= span.end_time for chunk in chunks)


async def test_a_websocket_session_is_one_server_span_around_its_messages(
    exporter: InMemorySpanExporter,
) -> None:
    headers = {HEADER_NAME: CALLER.serialize()}
    with run_aiohttp(make_app(middleware())) as url:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{url}/ws/lobby", headers=headers) as socket:
                for word in ("one", "two"):
                    await socket.send_str(word)
                    assert await socket.receive_str() == f"echo {word}"
        (span,) = served(exporter)
    attributes = dict(span.attributes or {})
    assert span.name == "GET /ws/{room}" and attributes["http.response.status_code"] == 101
    assert span.parent is not None and span.parent.span_id == CALLER.span_id
    assert attributes["lmnr.span.path"] == ("service_a", "GET /ws/{room}")
    messages = [s for s in exporter.get_finished_spans() if s.name == "message"]
    assert len(messages) == 2
    for message in messages:
        assert message.parent is not None and message.parent.span_id == span.context.span_id
        assert dict(message.attributes or {})["lmnr.span.path"] == (
            "service_a",
            "GET /ws/{room}",
            "message",
        )


def test_options_excluded_paths_hooks_and_an_unknown_name(
    exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[Any] = []
    chosen = middleware(
        excluded_paths=["/items/0"],
        server_request_hook=lambda span, request: span.set_attribute("tenant", request.path),
        server_response_hook=lambda span, status, headers: seen.append((status, headers)),
        excluded_pathz=["/typo"],  # type: ignore[call-arg]
    )
    assert "excluded_pathz" in caplog.text
    with run_aiohttp(make_app(chosen)) as url:
        assert get(url, "/items/0")[0] == 200
        assert get(url, "/items/5")[0] == 200
        (span,) = served(exporter)
    assert dict(span.attributes or {})["tenant"] == "/items/5"
    assert seen[0][0] == 200 and seen[0][1]["Content-Type"].startswith("application/json")


def test_raising_hooks_change_no_response(exporter: InMemorySpanExporter) -> None:
    def broken(*args: Any) -> None:
        raise ValueError("hook")

    chosen = middleware(server_request_hook=broken, server_response_hook=broken)
    with run_aiohttp(make_app(chosen)) as url:
        assert get(url, "/items/5") == (200, b'{"item": "5"}')
        (span,) = served(exporter)
    assert span.end_time is not None


@pytest.mark.parametrize(
    "value",
    [b"garbage", b"[" * 5000, b'{"trace_id":"\xff\xfe","span_id":"\xc3\x28"}', b"\x00" * 10],
    ids=["garbage", "deep", "invalid UTF-8", "NUL"],
)
def test_hostile_headers_give_the_bare_apps_response(
    value: bytes, exporter: InMemorySpanExporter
) -> None:
    def raw(url: str) -> bytes:
        import socket

        host, port = url.removeprefix("http://").split(":")
        request = b"GET /items/7 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        request += b"X-Laminar-Span-Context: " + value + b"\r\n\r\n"
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(request)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        lines = b"".join(chunks).split(b"\r\n")
        return b"\r\n".join(line for line in lines if not line.startswith(b"Date:"))

    with run_aiohttp(make_app()) as url:
        expected = raw(url)
    with run_aiohttp(make_app(middleware())) as url:
        got = raw(url)
    assert got == expected
    if expected.startswith(b"HTTP/1.1 200"):
        (span,) = served(exporter)
        assert span.parent is None and span.end_time is not None


async def test_concurrent_requests_each_see_their_own_caller(
    exporter: InMemorySpanExporter,
) -> None:
    callers = [
        LaminarSpanContext(0x1000 + i, 0x2000 + i, (f"caller{i}",), (format_uuid(0x2000 + i),))
        for i in range(50)
    ]
    with run_aiohttp(make_app(middleware())) as url:
        async with aiohttp.ClientSession() as session:

            async def one(caller: LaminarSpanContext) -> None:
                headers = {HEADER_NAME: caller.serialize()}
                async with session.get(f"{url}/stream", headers=headers) as response:
                    assert response.status == 200
                    await response.read()

            await asyncio.gather(*(one(caller) for caller in callers))
        spans = wait_for_spans(exporter, lambda s: len(s) >= 200)
    by_id = {s.context.span_id: s for s in servers(spans)}
    assert len(by_id) == 50
    for span in by_id.values():
        assert span.parent is not None
        assert span.context.trace_id - 0x1000 == span.parent.span_id - 0x2000
    for chunk in (s for s in spans if s.name.startswith("chunk")):
        assert chunk.parent is not None
        parent = by_id[chunk.parent.span_id]
        index = parent.context.trace_id - 0x1000
        assert dict(chunk.attributes or {})["lmnr.span.path"][0] == f"caller{index}"


def test_beside_contrib_one_server_span(exporter: InMemorySpanExporter) -> None:
    from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor

    instrumentor = AioHttpServerInstrumentor()
    instrumentor.instrument()
    try:
        app = make_app(middleware())
    finally:
        instrumentor.uninstrument()
    with run_aiohttp(app) as url:
        # As this package's clients send it: a traceparent naming the same span, which
        # contrib's span continues; ours then gives that span the caller's Laminar path.
        traceparent = f"00-{CALLER.trace_id:032x}-{CALLER.span_id:016x}-01"
        headers = {HEADER_NAME: CALLER.serialize(), "traceparent": traceparent}
        assert get(url, "/items/2", headers=headers)[0] == 200
        spans = wait_for_spans(exporter, lambda s: len(s) >= 2)
    (span,) = servers(spans)
    assert span.instrumentation_scope is not None
    assert span.instrumentation_scope.name == "opentelemetry.instrumentation.aiohttp_server"
    assert dict(span.attributes or {})["lmnr.span.path"] == ("service_a", span.name)


def test_instrument_covers_apps_built_before_and_after(exporter: InMemorySpanExporter) -> None:
    from laminar_middleware import instrument, uninstrument

    early = make_app()
    instrument()
    try:
        late = make_app()
        listed = make_app(middleware())
        for app in (early, late, listed):
            with run_aiohttp(app) as url:
                headers = {HEADER_NAME: CALLER.serialize()}
                assert get(url, "/admin/users/1", headers=headers)[0] == 200
                (span,) = served(exporter)
                exporter.clear()
            assert span.name == "GET /admin/users/{user_id}"  # one span, sub-app included
            assert span.parent is not None and span.parent.span_id == CALLER.span_id
    finally:
        uninstrument()


# --- the client hook ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def echo() -> Iterator[str]:
    with echo_server() as url:
        yield url


def test_redirect_keeps_headers_only_for_allowed_hosts(
    echo: str, exporter: InMemorySpanExporter
) -> None:
    with SyncSession() as session:
        instrument_aiohttp(session.session, propagate_to=["127.0.0.1"])
        with TRACER.start_as_current_span("caller"):
            away = session.get(f"{echo}/redirect?to={other_host(echo)}/echo").json()
            home = session.get(f"{echo}/redirect?to={echo}/echo").json()
    assert laminar(away) is None and only(away, "traceparent") is None
    assert laminar(home) is not None
    assert len(client_spans(exporter.get_finished_spans())) == 2  # one per call, hops inside


def test_global_and_session_instrumentation_give_one_span_and_one_header(
    echo: str, exporter: InMemorySpanExporter
) -> None:
    instrument_aiohttp()
    try:
        with SyncSession() as session:
            instrument_aiohttp(session.session)
            instrument_aiohttp(session.session)  # again: replaced, not added
            with TRACER.start_as_current_span("caller"):
                payload = session.get(f"{echo}/echo").json()
    finally:
        uninstrument_aiohttp()
    (span,) = client_spans(exporter.get_finished_spans())
    remote = laminar(payload)
    assert remote is not None and remote.span_id == span.context.span_id
    with SyncSession() as later, TRACER.start_as_current_span("caller"):
        assert laminar(later.get(f"{echo}/echo").json()) is None  # uninstrumented


def test_hooks_get_aiohttps_objects_and_may_raise(
    echo: str, exporter: InMemorySpanExporter
) -> None:
    seen: list[Any] = []

    def on_request(span: Any, params: Any) -> None:
        seen.append(params)
        raise ValueError("hook")

    def on_response(span: Any, params: Any, response: Any) -> None:
        seen.append(response)
        span.set_attribute("seen.status", response.status)

    with SyncSession() as session:
        instrument_aiohttp(
            session.session, client_request_hook=on_request, client_response_hook=on_response
        )
        with TRACER.start_as_current_span("caller"):
            assert session.get(f"{echo}/status/201").status_code == 201
    assert isinstance(seen[0], aiohttp.TraceRequestStartParams)
    assert isinstance(seen[1], aiohttp.ClientResponse)
    (span,) = client_spans(exporter.get_finished_spans())
    assert dict(span.attributes or {})["seen.status"] == 201


@pytest.mark.parametrize("contrib_first", [True, False], ids=["contrib first", "ours first"])
def test_beside_contrib_client_one_span_one_header(
    echo: str, exporter: InMemorySpanExporter, contrib_first: bool
) -> None:
    from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor

    instrumentor = AioHttpClientInstrumentor()
    if contrib_first:
        instrumentor.instrument()
    instrument_aiohttp()
    if not contrib_first:
        instrumentor.instrument()
    try:
        with SyncSession() as session, TRACER.start_as_current_span("caller"):
            payload = session.get(f"{echo}/echo").json()
    finally:  # undone in the reverse order: each restores what it found
        if contrib_first:
            uninstrument_aiohttp()
            instrumentor.uninstrument()
        else:
            instrumentor.uninstrument()
            uninstrument_aiohttp()
    (span,) = client_spans(exporter.get_finished_spans())
    remote = laminar(payload)
    assert remote is not None and remote.span_id == span.context.span_id
    traceparent = only(payload, "traceparent")
    assert traceparent is not None and traceparent.split("-")[2] == f"{span.context.span_id:016x}"


def test_client_to_server_one_trace(exporter: InMemorySpanExporter) -> None:
    with run_aiohttp(make_app(middleware())) as url, SyncSession() as session:
        instrument_aiohttp(session.session)
        with TRACER.start_as_current_span("caller") as caller:
            assert session.get(f"{url}/items/4").status_code == 200
        spans = wait_for_spans(exporter, lambda s: len(servers(s)) == 1 and len(s) >= 4)
    (server,) = servers(spans)
    (client,) = client_spans(spans)
    assert client.parent is not None and client.parent.span_id == caller.get_span_context().span_id
    assert server.parent is not None and server.parent.span_id == client.context.span_id
    assert server.context.trace_id == caller.get_span_context().trace_id


@pytest.mark.parametrize("contrib", [None, "first", "last"])
async def test_the_callers_span_is_current_again_after_every_call(
    exporter: InMemorySpanExporter, contrib: str | None
) -> None:
    """The CLIENT span is current only inside the call, whatever its end (a response, a
    refused connection, a timeout that cancels it in the caller's own task) and whichever
    trace config, ours or contrib's, comes first."""
    from opentelemetry.instrumentation.aiohttp_client import create_trace_config

    def contrib_config() -> aiohttp.TraceConfig:
        config = create_trace_config()
        config.freeze()
        return config

    refused_url = closed_port_url()
    with run_aiohttp(make_app()) as url:
        configs = [contrib_config()] if contrib == "first" else []
        async with aiohttp.ClientSession(trace_configs=configs) as session:
            instrument_aiohttp(session)
            if contrib == "last":
                session.trace_configs.append(contrib_config())
            with TRACER.start_as_current_span("caller") as caller:
                async with session.get(f"{url}/items/1") as response:
                    await response.read()
                assert trace.get_current_span() is caller
                with pytest.raises(aiohttp.ClientError):
                    await session.get(refused_url)
                assert trace.get_current_span() is caller
                with pytest.raises(asyncio.TimeoutError):
                    await session.get(f"{url}/slow", timeout=aiohttp.ClientTimeout(total=0.1))
                assert trace.get_current_span() is caller
    # One finished CLIENT span per call (a span left open would be missing), each the
    # caller's child, the refused one an error.
    spans = client_spans(exporter.get_finished_spans())
    assert len(spans) == 3
    assert all(s.parent is not None and s.parent.span_id == caller.context.span_id for s in spans)
    ok, refused, timed_out = sorted(spans, key=lambda s: s.start_time or 0)
    assert ok.status.status_code is not StatusCode.ERROR
    assert refused.status.status_code is StatusCode.ERROR
    if timed_out.instrumentation_scope.name == "laminar_middleware":  # not beside contrib's
        assert dict(timed_out.attributes or {})["error.type"] == "TimeoutError"
