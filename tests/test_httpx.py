"""httpx, sync and async, against a real uvicorn server on 127.0.0.1 that echoes the header
lines it received: the header, the CLIENT span, the allow-list, stacking, streaming, errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry import propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.instrumentation.utils import (
    suppress_http_instrumentation,
    suppress_instrumentation,
)
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from support.outbound import (
    TRACER,
    assert_names,
    assert_nothing_sent,
    client_spans,
    echo_server,
    laminar,
    only,
    other_host,
    span_id,
)

from laminar_middleware import (
    HEADER_NAME,
    LaminarPropagator,
    LaminarSpanContext,
    continue_trace,
    instrument_httpx,
    uninstrument_httpx,
)
from laminar_middleware.codec import format_uuid
from laminar_middleware.httpx import AsyncLaminarTransport, LaminarTransport
from laminar_middleware.processor import _installed

TRACEPARENT = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    with echo_server() as url:
        yield url


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client() as c:
        yield c


@pytest.fixture
def global_instrumentation() -> Iterator[None]:
    yield
    uninstrument_httpx()


def get(client: httpx.Client, url: str, **kwargs: Any) -> dict[str, Any]:
    response = client.get(url, **kwargs)
    assert response.status_code == 200
    return dict(response.json())


# --- the header and the client span ------------------------------------------------------


def test_sync_client_header_names_the_client_span(
    base: str, client: httpx.Client, exporter: InMemorySpanExporter
) -> None:
    instrument_httpx(client)
    with TRACER.start_as_current_span("caller") as caller:
        payload = get(client, f"{base}/echo?x=1")
    (span,) = client_spans(exporter.get_finished_spans())
    assert span.parent is not None and span.parent.span_id == span_id(caller)
    assert span.context.trace_id == caller.get_span_context().trace_id
    assert_names(payload, span)
    assert span.name == "GET"
    assert span.instrumentation_scope is not None
    assert span.instrumentation_scope.name == "laminar_middleware"
    port = int(base.rsplit(":", 1)[1])
    attributes = dict(span.attributes or {})
    assert attributes["http.request.method"] == "GET"
    assert attributes["server.address"] == "127.0.0.1"
    assert attributes["server.port"] == port
    assert attributes["url.full"] == f"{base}/echo?x=1"
    assert attributes["http.response.status_code"] == 200
    assert "error.type" not in attributes
    assert span.status.status_code is StatusCode.UNSET
    # The caller is a plain OpenTelemetry span without a Laminar path: none is invented.
    assert "lmnr.span.path" not in attributes
    sent = laminar(payload)
    assert sent is not None and sent.span_path == () and sent.span_ids_path == ()


async def test_async_client_header_names_the_client_span(
    base: str, exporter: InMemorySpanExporter
) -> None:
    async with httpx.AsyncClient() as client:
        instrument_httpx(client)
        assert isinstance(client._transport, AsyncLaminarTransport)
        with TRACER.start_as_current_span("caller") as caller:
            response = await client.post(f"{base}/echo", content=b"body")
    (span,) = client_spans(exporter.get_finished_spans())
    assert span.parent is not None and span.parent.span_id == span_id(caller)
    assert span.name == "POST"
    assert_names(response.json(), span)


def test_nested_spans_laminar_path_and_association_properties(
    base: str, client: httpx.Client, exporter: InMemorySpanExporter
) -> None:
    remote = LaminarSpanContext(
        trace_id=0x1234,
        span_id=0x99,
        span_path=("service_a",),
        span_ids_path=(format_uuid(0x99),),
        user_id="user-1",
        session_id="session-1",
        metadata={"tenant": "acme"},
    )
    instrument_httpx(client)
    with continue_trace(remote, "handler") as handler:
        with TRACER.start_as_current_span("step") as step:
            payload = get(client, f"{base}/echo")
    (span,) = client_spans(exporter.get_finished_spans())
    assert span.parent is not None and span.parent.span_id == span_id(step)
    attributes = dict(span.attributes or {})
    client_id = format_uuid(span.context.span_id)
    # `step` is a plain OpenTelemetry span: it got its Laminar path from the package's
    # path processor, and the client span extends it.
    assert attributes["lmnr.span.path"] == ("service_a", "handler", "step", "GET")
    assert attributes["lmnr.span.ids_path"] == (
        format_uuid(0x99),
        format_uuid(span_id(handler)),
        format_uuid(span_id(step)),
        client_id,
    )
    assert attributes["lmnr.association.properties.user_id"] == "user-1"
    assert attributes["lmnr.association.properties.metadata.tenant"] == "acme"
    sent = laminar(payload)
    assert sent is not None
    assert (sent.trace_id, sent.span_id) == (0x1234, span.context.span_id)
    assert sent.span_path == ("service_a", "handler", "step", "GET")
    assert sent.span_ids_path == attributes["lmnr.span.ids_path"]
    assert (sent.user_id, sent.session_id) == ("user-1", "session-1")
    assert dict(sent.metadata) == {"tenant": "acme"}


def test_laminar_path_without_the_path_processor(base: str) -> None:
    # A provider the path processor is not on (it is skipped for Laminar's own provider,
    # whose processor does the same): the hook extends the parent's path itself.
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _installed.add(provider)
    remote = LaminarSpanContext(0x1234, 0x99, ("service_a",), (format_uuid(0x99),), "u-1")
    with httpx.Client() as client:
        instrument_httpx(client, tracer_provider=provider)
        with continue_trace(remote, "handler", tracer_provider=provider) as handler:
            payload = get(client, f"{base}/echo")
    (span,) = client_spans(exporter.get_finished_spans())
    attributes = dict(span.attributes or {})
    assert attributes["lmnr.span.path"] == ("service_a", "handler", "GET")
    assert attributes["lmnr.span.ids_path"][-2:] == (
        format_uuid(span_id(handler)),
        format_uuid(span.context.span_id),
    )
    sent = laminar(payload)
    assert sent is not None and sent.span_path == ("service_a", "handler", "GET")
    assert sent.user_id == "u-1"


def test_suppressed_instrumentation_means_nothing(
    base: str, client: httpx.Client, exporter: InMemorySpanExporter
) -> None:
    # Exporters send spans inside suppress_instrumentation(); a caller may suppress HTTP
    # instrumentation on purpose: no span, no header, even under a current span.
    instrument_httpx(client)
    with TRACER.start_as_current_span("caller"):
        with suppress_instrumentation():
            assert_nothing_sent(get(client, f"{base}/echo"))
        with suppress_http_instrumentation():
            assert_nothing_sent(get(client, f"{base}/echo"))
    assert client_spans(exporter.get_finished_spans()) == []


async def test_concurrent_async_calls_do_not_bleed(
    base: str, exporter: InMemorySpanExporter
) -> None:
    async def call(client: httpx.AsyncClient, i: int) -> tuple[int, dict[str, Any]]:
        with TRACER.start_as_current_span(f"task-{i}") as task:
            await asyncio.sleep(0)
            response = await client.get(f"{base}/sleep?s=0.05")
            return span_id(task), response.json()

    async with httpx.AsyncClient() as client:
        instrument_httpx(client)
        results = await asyncio.gather(*(call(client, i) for i in range(8)))
    spans = {s.context.span_id: s for s in client_spans(exporter.get_finished_spans())}
    assert len(spans) == 8
    for task_id, payload in results:
        sent = laminar(payload)
        assert sent is not None
        span = spans[sent.span_id]
        assert span.parent is not None and span.parent.span_id == task_id
        assert_names(payload, span)


def test_client_spans_false_names_the_current_span(
    base: str, client: httpx.Client, exporter: InMemorySpanExporter
) -> None:
    instrument_httpx(client, client_spans=False)
    with TRACER.start_as_current_span("caller") as caller:
        payload = get(client, f"{base}/echo")
    assert_names(payload, caller)
    assert client_spans(exporter.get_finished_spans()) == []


def test_any_inner_transport_and_mounts(base: str, exporter: InMemorySpanExporter) -> None:
    class Counting(httpx.BaseTransport):
        def __init__(self) -> None:
            self.calls = 0
            self.real = httpx.HTTPTransport()

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            self.calls += 1
            return self.real.handle_request(request)

        def close(self) -> None:
            self.real.close()

    inner = Counting()
    with httpx.Client(transport=LaminarTransport(inner)) as client:
        with TRACER.start_as_current_span("caller"):
            payload = get(client, f"{base}/echo")
        (span,) = client_spans(exporter.get_finished_spans())
        assert_names(payload, span)
        assert inner.calls == 1
        assert client._transport.calls == 1  # type: ignore[attr-defined]  # via the inner

    mounted = Counting()
    with httpx.Client(mounts={"http://127.0.0.1": mounted}) as client:
        instrument_httpx(client)
        with TRACER.start_as_current_span("caller"):
            payload = get(client, f"{base}/echo")
        assert mounted.calls == 1
        assert laminar(payload) is not None


# --- where the header may go ---------------------------------------------------------------


def test_redirect_to_a_refused_host_drops_our_headers(
    base: str, exporter: InMemorySpanExporter
) -> None:
    with httpx.Client(follow_redirects=True) as client:
        instrument_httpx(client, propagate_to=["127.0.0.1"])
        with TRACER.start_as_current_span("caller"):
            away = client.get(f"{base}/redirect", params={"to": other_host(base) + "/echo"})
            home = client.get(f"{base}/redirect", params={"to": f"{base}/echo"})
    first, second, third, fourth = client_spans(exporter.get_finished_spans())
    assert away.status_code == 200 and len(away.history) == 1
    assert_nothing_sent(away.json())
    assert dict(first.attributes or {})["server.address"] == "127.0.0.1"
    assert dict(second.attributes or {})["server.address"] == "localhost"
    # Followed to an allowed host, each hop names its own client span.
    assert_names(home.json(), fourth)
    assert span_id(third) != span_id(fourth)


def test_url_credentials_are_not_recorded(
    base: str, client: httpx.Client, exporter: InMemorySpanExporter
) -> None:
    instrument_httpx(client)
    with TRACER.start_as_current_span("caller"):
        payload = get(client, base.replace("http://", "http://user:secret@") + "/echo")
    assert only(payload, "authorization") is not None  # httpx still sent basic auth
    (span,) = client_spans(exporter.get_finished_spans())
    assert "secret" not in str(dict(span.attributes or {}))
    assert dict(span.attributes or {})["url.full"].startswith("http://REDACTED:REDACTED@")


# --- the global propagator -----------------------------------------------------------------


def test_global_propagator_with_laminar_sends_the_header_once(
    base: str, client: httpx.Client, exporter: InMemorySpanExporter
) -> None:
    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(
        CompositePropagator(
            [TraceContextTextMapPropagator(), W3CBaggagePropagator(), LaminarPropagator()]
        )
    )
    try:
        instrument_httpx(client)
        with TRACER.start_as_current_span("caller"):
            payload = get(client, f"{base}/echo")
    finally:
        propagate.set_global_textmap(previous)
    (span,) = client_spans(exporter.get_finished_spans())
    assert_names(payload, span)  # `only` inside: each header exactly once


# --- stacking ------------------------------------------------------------------------------


def test_global_and_per_client_instrumentation_stack_to_one(
    base: str, exporter: InMemorySpanExporter, global_instrumentation: None
) -> None:
    instrument_httpx()
    with httpx.Client() as client:
        assert isinstance(client._transport, LaminarTransport)
        instrument_httpx(client, propagate_to="127.0.0.1")
        with TRACER.start_as_current_span("caller"):
            payload = get(client, f"{base}/echo")
            assert_nothing_sent(get(client, other_host(base) + "/echo"))  # new options
    first, _ = client_spans(exporter.get_finished_spans())
    assert_names(payload, first)


def test_wrapped_transport_on_an_instrumented_client(
    base: str, exporter: InMemorySpanExporter
) -> None:
    inner = LaminarTransport(httpx.HTTPTransport())
    with httpx.Client(transport=inner) as client:
        instrument_httpx(client)
        instrument_httpx(client)  # twice: still one wrapper of ours around the user's
        assert isinstance(client._transport, LaminarTransport)
        assert client._transport.inner is inner
        with TRACER.start_as_current_span("caller"):
            payload = get(client, f"{base}/echo")
        (span,) = client_spans(exporter.get_finished_spans())
        assert_names(payload, span)
        uninstrument_httpx(client)
        assert client._transport is inner  # the user's own wrapper stays


async def test_async_wrapped_transport_stack(base: str, exporter: InMemorySpanExporter) -> None:
    transport = AsyncLaminarTransport(AsyncLaminarTransport(httpx.AsyncHTTPTransport()))
    async with httpx.AsyncClient(transport=transport) as client:
        with TRACER.start_as_current_span("caller"):
            response = await client.get(f"{base}/echo")
    (span,) = client_spans(exporter.get_finished_spans())
    assert_names(response.json(), span)


def test_with_contrib_instrumentor_inside(
    base: str, client: httpx.Client, exporter: InMemorySpanExporter
) -> None:
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    HTTPXClientInstrumentor().instrument()
    try:
        with httpx.Client() as client:
            instrument_httpx(client)
            with TRACER.start_as_current_span("caller"):
                payload = get(client, f"{base}/echo")
    finally:
        HTTPXClientInstrumentor().uninstrument()
    (span,) = client_spans(exporter.get_finished_spans())
    assert span.instrumentation_scope is not None
    assert span.instrumentation_scope.name == "laminar_middleware"  # contrib stood aside
    assert_names(payload, span)


def test_with_contrib_instrumentor_outside(base: str, exporter: InMemorySpanExporter) -> None:
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    with httpx.Client() as client:
        instrument_httpx(client)
        HTTPXClientInstrumentor.instrument_client(client)  # wraps our transport
        try:
            with TRACER.start_as_current_span("caller"):
                payload = get(client, f"{base}/echo")
        finally:
            HTTPXClientInstrumentor.uninstrument_client(client)
    (span,) = client_spans(exporter.get_finished_spans())
    assert span.instrumentation_scope is not None
    assert "httpx" in span.instrumentation_scope.name  # contrib's span: we did not add one
    assert_names(payload, span)


# --- streaming, status, errors ---------------------------------------------------------------


def test_streaming_download_ends_the_span_on_close(
    base: str, client: httpx.Client, exporter: InMemorySpanExporter
) -> None:
    instrument_httpx(client)
    with TRACER.start_as_current_span("caller"):
        with client.stream("GET", f"{base}/stream") as response:
            assert response.status_code == 200
            assert client_spans(exporter.get_finished_spans()) == []  # headers only so far
            lines = list(response.iter_lines())
            assert lines[1:] == ["chunk0", "chunk1", "chunk2"]
        (span,) = client_spans(exporter.get_finished_spans())
    assert_names(json.loads(lines[0]), span)


async def test_async_streaming_download_ends_the_span_on_close(
    base: str, exporter: InMemorySpanExporter
) -> None:
    async with httpx.AsyncClient() as client:
        instrument_httpx(client)
        with TRACER.start_as_current_span("caller"):
            async with client.stream("GET", f"{base}/stream") as response:
                assert client_spans(exporter.get_finished_spans()) == []
                chunks = [chunk async for chunk in response.aiter_bytes()]
            assert b"chunk2" in b"".join(chunks)
    assert len(client_spans(exporter.get_finished_spans())) == 1


def test_a_response_read_by_the_transport_ends_the_span(exporter: InMemorySpanExporter) -> None:
    # httpx.Response(content=...) is read and closed when made (MockTransport, caching and
    # mocking transports): no close() of its stream follows, and the span must still end.
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201, content=b"made in memory")

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        instrument_httpx(client)
        with TRACER.start_as_current_span("caller"):
            for _ in range(3):
                assert client.get("http://svc.internal/items").content == b"made in memory"
            with client.stream("GET", "http://svc.internal/items") as response:
                assert response.read() == b"made in memory"
    spans = client_spans(exporter.get_finished_spans())
    assert len(spans) == 4 and len(seen) == 4
    for span, request in zip(spans, seen, strict=True):
        assert (span.attributes or {})["http.response.status_code"] == 201
        sent = LaminarSpanContext.parse(request.headers[HEADER_NAME])
        assert sent is not None and sent.span_id == span.context.span_id


async def test_async_response_read_by_the_transport_ends_the_span(
    exporter: InMemorySpanExporter,
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"ok")

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        instrument_httpx(client)
        with TRACER.start_as_current_span("caller"):
            for _ in range(3):
                assert (await client.get("http://svc.internal/")).content == b"ok"
    assert len(client_spans(exporter.get_finished_spans())) == 3


async def test_timeout_reraises_the_original(base: str, exporter: InMemorySpanExporter) -> None:
    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=0.1)) as client:
        instrument_httpx(client)
        with TRACER.start_as_current_span("caller"), pytest.raises(httpx.ReadTimeout) as caught:
            await client.get(f"{base}/sleep?s=0.5")
    assert type(caught.value) is httpx.ReadTimeout
    (span,) = client_spans(exporter.get_finished_spans())
    assert span.status.status_code is StatusCode.ERROR
    assert dict(span.attributes or {})["error.type"] == "httpx.ReadTimeout"


# --- uninstrument --------------------------------------------------------------------------


def test_uninstrument_client_restores_the_transports(
    base: str, exporter: InMemorySpanExporter
) -> None:
    mounted = httpx.HTTPTransport()
    with httpx.Client(mounts={"http://localhost": mounted}) as client:
        original = client._transport
        instrument_httpx(client)
        assert client._transport is not original
        uninstrument_httpx(client)
        assert client._transport is original
        assert list(client._mounts.values()) == [mounted]
        with TRACER.start_as_current_span("caller"):
            assert_nothing_sent(get(client, f"{base}/echo"))
    assert client_spans(exporter.get_finished_spans()) == []


def test_global_instrumentation_and_uninstrument(
    base: str, exporter: InMemorySpanExporter, global_instrumentation: None
) -> None:
    original_init = httpx.Client.__init__
    before = httpx.Client()
    instrument_httpx()
    during = httpx.Client()
    async_during = httpx.AsyncClient()
    assert isinstance(async_during._transport, AsyncLaminarTransport)
    with TRACER.start_as_current_span("caller"):
        assert_nothing_sent(get(before, f"{base}/echo"))  # made before: left alone
        assert laminar(get(during, f"{base}/echo")) is not None
    uninstrument_httpx()
    assert httpx.Client.__init__ is original_init
    assert not isinstance(during._transport, LaminarTransport)
    assert not isinstance(async_during._transport, AsyncLaminarTransport)
    after = httpx.Client()
    with TRACER.start_as_current_span("caller"):
        assert_nothing_sent(get(during, f"{base}/echo"))
        assert_nothing_sent(get(after, f"{base}/echo"))
    assert len(client_spans(exporter.get_finished_spans())) == 1
    for c in (before, during, after):
        c.close()


def test_spans_kind_is_client(base: str, client: httpx.Client, exporter: Any) -> None:
    instrument_httpx(client)
    with trace.get_tracer("t").start_as_current_span("caller"):
        client.get(f"{base}/echo")
    assert [s.kind for s in exporter.get_finished_spans()] == [SpanKind.CLIENT, SpanKind.INTERNAL]
