"""The sampled decision travels across a Laminar hop. The Laminar header has no flag, so a
`traceparent` naming the same span goes beside it; inbound, such a `traceparent` gives the
remote parent its flag (and `tracestate`), so `ParentBased` samplers follow the caller; the
Laminar header alone means sampled. A caller whose span is not sampled still propagates.

Inbound through both middlewares in-process, outbound through both clients to the echo
server, a real two-service hop (uvicorn, then Werkzeug's server), and a Dramatiq message."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import dramatiq
import httpx
import pytest
import requests
from dramatiq.brokers.stub import StubBroker
from opentelemetry import propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from support.outbound import TRACER, echo_server, laminar, only
from support.servers import run_uvicorn, run_wsgi
from werkzeug.test import Client as WerkzeugClient

from laminar_middleware import (
    HEADER_NAME,
    LaminarASGIMiddleware,
    LaminarPropagator,
    LaminarSpanContext,
    LaminarWSGIMiddleware,
    instrument_httpx,
    instrument_requests,
)
from laminar_middleware.dramatiq import OPTIONS_KEY, instrument_dramatiq

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
SPAN_ID = 0xB7AD6B7169203331
CALLER = LaminarSpanContext(TRACE_ID, SPAN_ID, span_path=("caller",))


def traceparent(flags: str, span_id: int = SPAN_ID) -> str:
    return f"00-{TRACE_ID:032x}-{span_id:016x}-{flags}"


def current_span_facts() -> dict[str, Any]:
    span = trace.get_current_span()
    context = span.get_span_context()
    return {
        "trace_id": context.trace_id,
        "sampled": context.trace_flags.sampled,
        "recording": span.is_recording(),
        "trace_state": dict(context.trace_state.items()),
    }


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = json.dumps(current_span_facts()).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("content-type", "application/json")])
    return [json.dumps(current_span_facts()).encode()]


def call_asgi(headers: list[tuple[str, str]]) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        transport = httpx.ASGITransport(app=LaminarASGIMiddleware(asgi_app))
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            response = await client.get("/", headers=headers)
        result: dict[str, Any] = response.json()
        return result

    import anyio

    return anyio.run(go)


def call_wsgi(headers: list[tuple[str, str]]) -> dict[str, Any]:
    response = WerkzeugClient(LaminarWSGIMiddleware(wsgi_app)).get("/", headers=headers)
    result: dict[str, Any] = json.loads(response.get_data())
    response.close()  # the server span ends with the response
    return result


CALLS = {"ASGI": call_asgi, "WSGI": call_wsgi}


@pytest.fixture(params=list(CALLS))
def call(request: pytest.FixtureRequest) -> Callable[[list[tuple[str, str]]], dict[str, Any]]:
    return CALLS[request.param]


def server_spans(exporter: InMemorySpanExporter) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]


# --- inbound -------------------------------------------------------------------------------


def test_an_unsampled_traceparent_naming_the_laminar_span_makes_the_request_unsampled(
    call: Callable[[list[tuple[str, str]]], dict[str, Any]], exporter: InMemorySpanExporter
) -> None:
    facts = call([(HEADER_NAME, CALLER.serialize()), ("traceparent", traceparent("00"))])
    assert facts["trace_id"] == TRACE_ID  # still in the caller's trace
    assert (facts["sampled"], facts["recording"]) == (False, False)
    assert server_spans(exporter) == []


def test_a_sampled_traceparent_naming_the_laminar_span_keeps_it_sampled(
    call: Callable[[list[tuple[str, str]]], dict[str, Any]], exporter: InMemorySpanExporter
) -> None:
    facts = call([(HEADER_NAME, CALLER.serialize()), ("traceparent", traceparent("01"))])
    assert (facts["sampled"], facts["recording"]) == (True, True)
    (span,) = server_spans(exporter)
    assert span.parent is not None and span.parent.span_id == SPAN_ID
    assert span.parent.trace_flags.sampled


def test_the_laminar_header_alone_means_sampled(
    call: Callable[[list[tuple[str, str]]], dict[str, Any]], exporter: InMemorySpanExporter
) -> None:
    facts = call([(HEADER_NAME, CALLER.serialize())])
    assert (facts["trace_id"], facts["sampled"], facts["recording"]) == (TRACE_ID, True, True)
    assert len(server_spans(exporter)) == 1


@pytest.mark.parametrize(
    "w3c",
    [
        [("traceparent", traceparent("00", span_id=SPAN_ID + 1))],  # another span
        [("traceparent", traceparent("00")), ("traceparent", traceparent("00"))],  # two lines
        [("traceparent", traceparent("00") + "-extra")],  # invalid for version 00
    ],
    ids=["another-span", "duplicated", "invalid"],
)
def test_a_traceparent_that_does_not_name_the_laminar_span_says_nothing(
    w3c: list[tuple[str, str]],
    call: Callable[[list[tuple[str, str]]], dict[str, Any]],
    exporter: InMemorySpanExporter,
) -> None:
    facts = call([(HEADER_NAME, CALLER.serialize()), *w3c])
    assert (facts["trace_id"], facts["sampled"], facts["recording"]) == (TRACE_ID, True, True)
    (span,) = server_spans(exporter)
    assert span.parent is not None and span.parent.span_id == SPAN_ID


def test_the_matching_traceparents_tracestate_is_kept(
    call: Callable[[list[tuple[str, str]]], dict[str, Any]],
) -> None:
    facts = call(
        [
            (HEADER_NAME, CALLER.serialize()),
            ("traceparent", traceparent("01")),
            ("tracestate", "vendor=1,other=two"),
        ]
    )
    assert facts["trace_state"] == {"vendor": "1", "other": "two"}


def test_laminar_propagator_extract_takes_the_flag_of_a_matching_traceparent() -> None:
    composite = CompositePropagator([TraceContextTextMapPropagator(), LaminarPropagator()])
    for flags, sampled in (("00", False), ("01", True)):
        carrier = {HEADER_NAME: CALLER.serialize(), "traceparent": traceparent(flags)}
        for propagator in (composite, LaminarPropagator()):
            context = trace.get_current_span(propagator.extract(carrier)).get_span_context()
            assert (context.span_id, context.trace_flags.sampled) == (SPAN_ID, sampled)
    alone = LaminarPropagator().extract({HEADER_NAME: CALLER.serialize()})
    assert trace.get_current_span(alone).get_span_context().trace_flags.sampled


# --- outbound ------------------------------------------------------------------------------


@contextmanager
def unsampled_parent() -> Iterator[None]:
    """What the app runs under when its caller was not sampled."""
    context = SpanContext(TRACE_ID, SPAN_ID, is_remote=True, trace_flags=TraceFlags(0))
    with trace.use_span(NonRecordingSpan(context)):
        yield


def get_httpx(base: str) -> dict[str, Any]:
    with httpx.Client() as client:
        instrument_httpx(client)
        result: dict[str, Any] = client.get(f"{base}/echo").json()
        return result


def get_requests(base: str) -> dict[str, Any]:
    with requests.Session() as session:
        instrument_requests(session)
        result: dict[str, Any] = session.get(f"{base}/echo", timeout=10).json()
        return result


CLIENTS = {"httpx": get_httpx, "requests": get_requests}


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    with echo_server() as base:
        yield base


@pytest.mark.parametrize("client", list(CLIENTS))
@pytest.mark.parametrize("sampled", [True, False], ids=["sampled", "unsampled"])
def test_the_traceparent_beside_the_laminar_header_names_its_span_with_its_flag(
    client: str, sampled: bool, base: str, exporter: InMemorySpanExporter
) -> None:
    if sampled:
        with TRACER.start_as_current_span("caller"):
            payload = CLIENTS[client](base)
    else:
        with unsampled_parent():
            payload = CLIENTS[client](base)
    header = laminar(payload)
    assert header is not None  # an unsampled caller still propagates
    sent = only(payload, "traceparent") or ""
    assert sent[:-3] == f"00-{header.trace_id:032x}-{header.span_id:016x}"
    assert int(sent[-2:], 16) & 1 == sampled
    clients = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.CLIENT]
    assert [s.context.span_id for s in clients] == ([header.span_id] if sampled else [])


@pytest.mark.parametrize("client", list(CLIENTS))
def test_the_traceparent_goes_even_when_the_global_propagator_has_no_w3c(
    client: str, base: str
) -> None:
    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(W3CBaggagePropagator())
    try:
        with unsampled_parent():
            payload = CLIENTS[client](base)
    finally:
        propagate.set_global_textmap(previous)
    header = laminar(payload)
    assert header is not None
    assert only(payload, "traceparent") == f"00-{TRACE_ID:032x}-{header.span_id:016x}-00"


# --- a real hop: an unsampled caller, a downstream service that follows it -----------------


def recording_provider(sampler: Any) -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@contextmanager
def two_services(
    caller_sampler: Any,
) -> Iterator[tuple[str, InMemorySpanExporter, InMemorySpanExporter]]:
    """Service A (uvicorn) calls service B (Werkzeug's server) with httpx; each has its own
    provider, B's under the SDK's default `ParentBased(ALWAYS_ON)`."""
    a_provider, a_spans = recording_provider(caller_sampler)
    b_provider, b_spans = recording_provider(None)

    def service_b(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        facts = current_span_facts()
        facts["laminar"] = environ.get("HTTP_X_LAMINAR_SPAN_CONTEXT")
        start_response("200 OK", [("content-type", "application/json")])
        return [json.dumps(facts).encode()]

    with run_wsgi(LaminarWSGIMiddleware(service_b, tracer_provider=b_provider)) as b_base:

        async def service_a(scope: dict[str, Any], receive: Any, send: Any) -> None:
            async with httpx.AsyncClient() as client:
                instrument_httpx(client)
                body = (await client.get(f"{b_base}/b")).content
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})

        app = LaminarASGIMiddleware(service_a, tracer_provider=a_provider)
        with run_uvicorn(app, lifespan="off") as a_base:
            yield a_base, a_spans, b_spans


def test_a_caller_that_samples_nothing_gets_nothing_recorded_downstream() -> None:
    with two_services(ALWAYS_OFF) as (a_base, a_spans, b_spans):
        seen = httpx.get(f"{a_base}/a", timeout=10).json()
    assert seen["laminar"]  # the header still went
    assert (seen["sampled"], seen["recording"]) == (False, False)
    assert a_spans.get_finished_spans() == ()
    assert b_spans.get_finished_spans() == ()


def test_a_sampled_caller_gets_its_downstream_span_recorded() -> None:
    with two_services(ALWAYS_ON) as (a_base, a_spans, b_spans):
        seen = httpx.get(f"{a_base}/a", timeout=10).json()
    assert (seen["sampled"], seen["recording"]) == (True, True)
    (client,) = [s for s in a_spans.get_finished_spans() if s.kind is SpanKind.CLIENT]
    (server,) = b_spans.get_finished_spans()
    assert server.parent is not None and server.parent.span_id == client.context.span_id


# --- a queue hop ---------------------------------------------------------------------------


def test_an_unsampled_publisher_gets_an_unsampled_consumer(exporter: InMemorySpanExporter) -> None:
    broker = StubBroker()
    instrument_dramatiq(broker)
    ran: list[dict[str, Any]] = []

    @dramatiq.actor(broker=broker, queue_name="sampling")
    def task() -> None:
        ran.append(current_span_facts())

    with unsampled_parent():
        message = task.send()
    headers = message.options[OPTIONS_KEY]
    assert LaminarSpanContext.parse(headers[HEADER_NAME]) is not None  # still propagated
    assert headers["traceparent"].endswith("-00")
    worker = dramatiq.Worker(broker, worker_timeout=50)
    worker.start()
    try:
        broker.join("sampling", timeout=10_000)
        worker.join()
    finally:
        worker.stop()
    assert [(r["trace_id"], r["sampled"], r["recording"]) for r in ran] == [
        (TRACE_ID, False, False)
    ]
    assert [s.kind for s in exporter.get_finished_spans()] == []
