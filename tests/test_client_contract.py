"""The contract every client hook keeps, run for httpx, requests and aiohttp against a
real uvicorn echo server on 127.0.0.1: where the headers may go, a header the caller set,
errors on the span, and a failing span processor or `propagate_to` callable changing
nothing. What only one library has (httpx transports and mounts, requests adapters and
redirect hops inside `Session.send`) stays in `test_httpx.py` / `test_requests.py`."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx
import pytest
import requests
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from support.aiohttp_sync import SyncSession
from support.outbound import (
    SIGV4,
    TRACER,
    Exploding,
    assert_names,
    assert_nothing_sent,
    client_spans,
    closed_port_url,
    echo_server,
    laminar,
    only,
    other_host,
    values,
)

from laminar_middleware import (
    HEADER_NAME,
    LaminarSpanContext,
    instrument_httpx,
    instrument_requests,
)
from laminar_middleware.aiohttp import instrument_aiohttp

TRACEPARENT = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"


@dataclass(frozen=True)
class Library:
    """One client library as the contract drives it."""

    name: str
    make: Callable[[], Any]  # a new client (httpx.Client) or session (requests.Session)
    instrument: Callable[..., None]
    connect_error: type[BaseException]
    connect_error_type: str  # the `error.type` the span records for it

    def get(self, client: Any, url: str, **kwargs: Any) -> Any:
        return client.get(url, timeout=5, **kwargs)

    def payload(self, client: Any, url: str, **kwargs: Any) -> dict[str, Any]:
        response = self.get(client, url, **kwargs)
        assert response.status_code == 200
        return dict(response.json())


LIBRARIES = [
    Library(
        "httpx",
        httpx.Client,
        instrument_httpx,
        httpx.ConnectError,
        "httpx.ConnectError",
    ),
    Library(
        "requests",
        requests.Session,
        instrument_requests,
        requests.exceptions.ConnectionError,
        "requests.exceptions.ConnectionError",
    ),
    Library(
        "aiohttp",
        SyncSession,
        lambda session, **options: instrument_aiohttp(session.session, **options),
        aiohttp.ClientConnectorError,
        "aiohttp.client_exceptions.ClientConnectorError",
    ),
]


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    with echo_server() as url:
        yield url


@pytest.fixture(params=LIBRARIES, ids=lambda library: library.name)
def library(request: pytest.FixtureRequest) -> Library:
    chosen: Library = request.param
    return chosen


@pytest.fixture
def client(library: Library) -> Iterator[Any]:
    with library.make() as made:
        yield made


def test_no_current_span_no_header_no_span(
    base: str, library: Library, client: Any, exporter: InMemorySpanExporter
) -> None:
    library.instrument(client)
    assert_nothing_sent(library.payload(client, f"{base}/echo"))
    assert exporter.get_finished_spans() == ()


# --- where the header may go ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("propagate_to", "allowed", "refused"),
    [
        (["127.0.0.1"], "127.0.0.1", "localhost"),
        ("127.0.0.1", "127.0.0.1", "localhost"),
        ([".0.0.1"], "127.0.0.1", "localhost"),
        (["re:local.*"], "localhost", "127.0.0.1"),
        ([re.compile(r"127\.0\.0\.\d+")], "127.0.0.1", "localhost"),
        (lambda url: "//localhost:" in url, "localhost", "127.0.0.1"),
    ],
)
def test_propagate_to(
    base: str,
    library: Library,
    client: Any,
    exporter: InMemorySpanExporter,
    propagate_to: Any,
    allowed: str,
    refused: str,
) -> None:
    library.instrument(client, propagate_to=propagate_to)
    with TRACER.start_as_current_span("caller"):
        yes = library.payload(client, base.replace("127.0.0.1", allowed) + "/echo")
        no = library.payload(client, base.replace("127.0.0.1", refused) + "/echo")
    first, second = client_spans(exporter.get_finished_spans())
    assert_names(yes, first)
    assert_nothing_sent(no)  # no Laminar header and no traceparent either
    assert dict(second.attributes or {})["server.address"] == refused  # still a span


def test_propagate_to_from_environment(
    base: str, library: Library, exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAMINAR_PROPAGATE_TO", "localhost, .example.internal")
    with library.make() as client, library.make() as explicit:
        library.instrument(client)
        library.instrument(explicit, propagate_to="127.0.0.1")  # the code option wins
        with TRACER.start_as_current_span("caller"):
            assert laminar(library.payload(client, other_host(base) + "/echo")) is not None
            assert_nothing_sent(library.payload(client, f"{base}/echo"))
            assert laminar(library.payload(explicit, f"{base}/echo")) is not None
            assert_nothing_sent(library.payload(explicit, other_host(base) + "/echo"))
    assert len(client_spans(exporter.get_finished_spans())) == 4


def test_signed_requests_get_no_header(
    base: str, library: Library, client: Any, exporter: InMemorySpanExporter
) -> None:
    library.instrument(client)
    with TRACER.start_as_current_span("caller"):
        signed = library.payload(client, f"{base}/echo", headers={"Authorization": SIGV4})
        presigned = library.payload(client, f"{base}/echo?X-Amz-Signature=abc&X-Amz-Expires=60")
        bearer = library.payload(client, f"{base}/echo", headers={"Authorization": "Bearer t"})
    assert_nothing_sent(signed)
    assert only(signed, "authorization") == SIGV4
    assert_nothing_sent(presigned)
    assert laminar(bearer) is not None
    assert len(client_spans(exporter.get_finished_spans())) == 3


def test_explicit_headers_are_kept(base: str, library: Library, client: Any) -> None:
    library.instrument(client)
    mine = LaminarSpanContext(0xAB, 0xCD).serialize()
    with TRACER.start_as_current_span("caller"):
        lower = library.payload(client, f"{base}/echo", headers={"x-laminar-span-context": mine})
        upper = library.payload(client, f"{base}/echo", headers={"X-LAMINAR-SPAN-CONTEXT": mine})
        alias = library.payload(client, f"{base}/echo", headers={"Laminar-Span-Context": mine})
        w3c = library.payload(client, f"{base}/echo", headers={"TraceParent": TRACEPARENT})
    assert values(lower, HEADER_NAME) == [mine]
    assert only(lower, "traceparent") is not None
    assert values(upper, HEADER_NAME) == [mine]
    assert values(alias, "laminar-span-context") == [mine]
    assert values(alias, HEADER_NAME) == []  # the alias is the same header: nothing added
    assert only(w3c, "traceparent") == TRACEPARENT
    assert laminar(w3c) is not None


# --- errors --------------------------------------------------------------------------------


def test_server_errors_mark_the_span(
    base: str, library: Library, client: Any, exporter: InMemorySpanExporter
) -> None:
    library.instrument(client)
    with TRACER.start_as_current_span("caller"):
        assert library.get(client, f"{base}/status/500").status_code == 500
        assert library.get(client, f"{base}/status/503").status_code == 503
        assert library.get(client, f"{base}/status/404").status_code == 404
    server_error, unavailable, missing = client_spans(exporter.get_finished_spans())
    for failed, code in ((server_error, "500"), (unavailable, "503")):
        assert failed.status.status_code is StatusCode.ERROR
        assert dict(failed.attributes or {})["error.type"] == code
    assert missing.status.status_code is StatusCode.UNSET
    assert dict(missing.attributes or {})["http.response.status_code"] == 404


def test_connection_refused_reraises_the_original(
    library: Library, client: Any, exporter: InMemorySpanExporter
) -> None:
    library.instrument(client)
    with (
        TRACER.start_as_current_span("caller"),
        pytest.raises(library.connect_error) as caught,
    ):
        library.get(client, closed_port_url())
    assert type(caught.value) is library.connect_error
    (span,) = client_spans(exporter.get_finished_spans())
    assert span.status.status_code is StatusCode.ERROR
    assert dict(span.attributes or {})["error.type"] == library.connect_error_type
    assert [event.name for event in span.events] == ["exception"]


# --- fail open -----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["on_start", "on_end"])
def test_a_failing_span_processor_changes_nothing(
    base: str, library: Library, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    provider = TracerProvider()
    provider.add_span_processor(Exploding(**{where: True}))
    with library.make() as plain, library.make() as client:
        library.instrument(client, tracer_provider=provider)
        with TRACER.start_as_current_span("caller"):
            expected = library.get(plain, f"{base}/status/201")
            response = library.get(client, f"{base}/status/201")
            with pytest.raises(library.connect_error):
                library.get(client, closed_port_url())
    assert (response.status_code, response.headers["content-type"]) == (201, "application/json")
    if where == "on_start":  # no span could start: the request went out as it was
        assert response.json() == expected.json()
    assert "internal error" in caplog.text


def test_a_failing_propagate_to_callable_changes_nothing(
    base: str, library: Library, client: Any, exporter: InMemorySpanExporter
) -> None:
    def broken(url: str) -> bool:
        raise ValueError("boom")

    library.instrument(client, propagate_to=broken)
    with TRACER.start_as_current_span("caller"):
        payload = library.payload(client, f"{base}/echo")
    assert_nothing_sent(payload)  # fails closed for the header, open for the request
    assert len(client_spans(exporter.get_finished_spans())) == 1
