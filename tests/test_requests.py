"""requests sessions and module-level calls against a real uvicorn server on 127.0.0.1 that
echoes the header lines it received: the header, the CLIENT span, the allow-list, stacking
with the contrib instrumentation, the session's own adapters, streaming, errors."""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from requests.adapters import HTTPAdapter
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
    values,
)
from urllib3.util.retry import Retry

from laminar_middleware import (
    HEADER_NAME,
    instrument_requests,
    uninstrument_requests,
)


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    with echo_server() as url:
        yield url


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


@pytest.fixture
def global_instrumentation() -> Iterator[None]:
    yield
    uninstrument_requests()


def get(session: Any, url: str, **kwargs: Any) -> dict[str, Any]:
    response = session.get(url, timeout=5, **kwargs)
    assert response.status_code == 200
    return dict(response.json())


class CountingAdapter(HTTPAdapter):
    """A session's own adapter, with its own retry settings."""

    def __init__(self) -> None:
        super().__init__(max_retries=Retry(total=2, backoff_factor=0))
        self.calls = 0

    def send(self, request: Any, *args: Any, **kwargs: Any) -> requests.Response:
        self.calls += 1
        return super().send(request, *args, **kwargs)


# --- the header and the client span ------------------------------------------------------


def test_session_header_names_the_client_span(
    base: str, session: requests.Session, exporter: InMemorySpanExporter
) -> None:
    adapters = dict(session.adapters)
    instrument_requests(session)
    assert session.adapters == adapters  # nothing mounted over them
    with TRACER.start_as_current_span("caller") as caller:
        payload = get(session, f"{base}/echo?x=1")
    (span,) = client_spans(exporter.get_finished_spans())
    assert span.parent is not None and span.parent.span_id == span_id(caller)
    assert span.name == "GET"
    assert_names(payload, span)
    attributes = dict(span.attributes or {})
    assert attributes["http.request.method"] == "GET"
    assert attributes["server.address"] == "127.0.0.1"
    assert attributes["server.port"] == int(base.rsplit(":", 1)[1])
    assert attributes["url.full"] == f"{base}/echo?x=1"
    assert attributes["http.response.status_code"] == 200


def test_module_level_calls_with_global_instrumentation(
    base: str, exporter: InMemorySpanExporter, global_instrumentation: None
) -> None:
    instrument_requests()
    with TRACER.start_as_current_span("caller") as caller:
        response = requests.post(f"{base}/echo", data=b"x", timeout=5)
        payload = get(requests, f"{base}/echo")
    posted, got = client_spans(exporter.get_finished_spans())
    assert posted.name == "POST" and got.name == "GET"
    assert posted.parent is not None and posted.parent.span_id == span_id(caller)
    assert_names(response.json(), posted)
    assert_names(payload, got)


def test_custom_mounted_adapter_is_still_used(
    base: str, session: requests.Session, exporter: InMemorySpanExporter
) -> None:
    adapter = CountingAdapter()
    session.mount("http://127.0.0.1", adapter)
    instrument_requests(session)
    assert session.get_adapter(f"{base}/echo") is adapter
    with TRACER.start_as_current_span("caller"):
        payload = get(session, f"{base}/echo")
    assert adapter.calls == 1
    (span,) = client_spans(exporter.get_finished_spans())
    assert_names(payload, span)


# --- where the header may go ---------------------------------------------------------------


def test_redirect_to_a_refused_host_drops_our_headers(
    base: str, session: requests.Session, exporter: InMemorySpanExporter
) -> None:
    instrument_requests(session, propagate_to=["127.0.0.1"])
    with TRACER.start_as_current_span("caller"):
        away = session.get(f"{base}/redirect", params={"to": other_host(base) + "/echo"})
        home = session.get(f"{base}/redirect", params={"to": f"{base}/echo"})
    assert len(away.history) == 1 and len(home.history) == 1
    assert_nothing_sent(away.json())
    # One span per send, redirects included (as the contrib instrumentation does).
    first, second = client_spans(exporter.get_finished_spans())
    assert dict(first.attributes or {})["http.response.status_code"] == 200  # the final hop
    assert_names(home.json(), second)


# --- stacking ------------------------------------------------------------------------------


def test_global_and_per_session_instrumentation_stack_to_one(
    base: str, exporter: InMemorySpanExporter, global_instrumentation: None
) -> None:
    instrument_requests()
    with requests.Session() as session:
        instrument_requests(session)
        instrument_requests(session)
        with TRACER.start_as_current_span("caller"):
            payload = get(session, f"{base}/echo")
    (span,) = client_spans(exporter.get_finished_spans())
    assert_names(payload, span)


def test_with_contrib_instrumentor_inside(
    base: str, session: requests.Session, exporter: InMemorySpanExporter
) -> None:
    from opentelemetry.instrumentation.requests import RequestsInstrumentor

    RequestsInstrumentor().instrument()
    try:
        instrument_requests(session)  # the session's own send runs before the class's
        with TRACER.start_as_current_span("caller"):
            payload = get(session, f"{base}/echo")
    finally:
        RequestsInstrumentor().uninstrument()
    (span,) = client_spans(exporter.get_finished_spans())
    assert span.instrumentation_scope is not None
    assert span.instrumentation_scope.name == "laminar_middleware"  # contrib stood aside
    assert_names(payload, span)


def test_with_contrib_instrumentor_outside(
    base: str, exporter: InMemorySpanExporter, global_instrumentation: None
) -> None:
    from opentelemetry.instrumentation.requests import RequestsInstrumentor

    instrument_requests()
    RequestsInstrumentor().instrument()  # wraps our Session.send
    try:
        with TRACER.start_as_current_span("caller"):
            payload = get(requests, f"{base}/echo")
    finally:
        RequestsInstrumentor().uninstrument()
    (span,) = client_spans(exporter.get_finished_spans())
    assert span.instrumentation_scope is not None
    assert "requests" in span.instrumentation_scope.name  # contrib's: we added no second
    assert_names(payload, span)
    # Contrib's uninstrument put our patch back in place, and it still works.
    exporter.clear()
    with TRACER.start_as_current_span("caller"):
        payload = get(requests, f"{base}/echo")
    (span,) = client_spans(exporter.get_finished_spans())
    assert span.instrumentation_scope is not None
    assert span.instrumentation_scope.name == "laminar_middleware"


def test_uninstrument_under_contrib_leaves_contrib_working(
    base: str, exporter: InMemorySpanExporter, global_instrumentation: None
) -> None:
    from opentelemetry.instrumentation.requests import RequestsInstrumentor

    before = requests.Session.__dict__["send"]
    instrument_requests()
    RequestsInstrumentor().instrument()  # wraps our Session.send
    try:
        uninstrument_requests()  # ours cannot be unhooked from under contrib: it goes inert
        with TRACER.start_as_current_span("caller"):
            payload = get(requests, f"{base}/echo")
        (span,) = client_spans(exporter.get_finished_spans())
        assert span.instrumentation_scope is not None
        assert "requests" in span.instrumentation_scope.name
        assert values(payload, HEADER_NAME) == []
        assert only(payload, "traceparent") is not None
        instrument_requests()  # and comes back to life
        exporter.clear()
        with TRACER.start_as_current_span("caller"):
            assert laminar(get(requests, f"{base}/echo")) is not None
    finally:
        RequestsInstrumentor().uninstrument()
    uninstrument_requests()
    assert requests.Session.__dict__["send"] is before


# --- streaming, status, errors ---------------------------------------------------------------


def test_streamed_response_span_ends_on_close(
    base: str, session: requests.Session, exporter: InMemorySpanExporter
) -> None:
    instrument_requests(session)
    with TRACER.start_as_current_span("caller"):
        with session.get(f"{base}/stream", stream=True, timeout=5) as response:
            assert response.status_code == 200
            assert client_spans(exporter.get_finished_spans()) == []
            first = next(response.iter_lines())
            assert client_spans(exporter.get_finished_spans()) == []
        (span,) = client_spans(exporter.get_finished_spans())
    assert_names(json.loads(first), span)


def test_streamed_response_span_ends_when_the_body_is_read(
    base: str, session: requests.Session, exporter: InMemorySpanExporter
) -> None:
    instrument_requests(session)
    with TRACER.start_as_current_span("caller"):
        response = session.get(f"{base}/stream", stream=True, timeout=5)
        assert client_spans(exporter.get_finished_spans()) == []
        assert response.content.endswith(b"chunk2\n")  # read to the end, not closed
        (span,) = client_spans(exporter.get_finished_spans())
        assert span.end_time is not None
        response.close()
    assert len(client_spans(exporter.get_finished_spans())) == 1  # ended once


def test_unclosed_streamed_response_ends_its_span_when_collected(
    base: str, session: requests.Session, exporter: InMemorySpanExporter
) -> None:
    instrument_requests(session)
    with TRACER.start_as_current_span("caller"):
        response = session.get(f"{base}/stream", stream=True, timeout=5)
        assert client_spans(exporter.get_finished_spans()) == []
        del response
        gc.collect()
    assert len(client_spans(exporter.get_finished_spans())) == 1


def test_exporters_suppressing_instrumentation_get_nothing(
    base: str, exporter: InMemorySpanExporter, global_instrumentation: None
) -> None:
    # The OTLP exporter posts spans with requests inside suppress_instrumentation().
    instrument_requests()
    with TRACER.start_as_current_span("caller"), suppress_instrumentation():
        assert_nothing_sent(get(requests, f"{base}/echo"))
    assert client_spans(exporter.get_finished_spans()) == []


def test_timeout_reraises_the_original(
    base: str, session: requests.Session, exporter: InMemorySpanExporter
) -> None:
    instrument_requests(session)
    with TRACER.start_as_current_span("caller"):
        with pytest.raises(requests.exceptions.ReadTimeout) as caught:
            session.get(f"{base}/sleep?s=0.5", timeout=(10, 0.1))
    assert type(caught.value) is requests.exceptions.ReadTimeout
    (span,) = client_spans(exporter.get_finished_spans())
    assert span.status.status_code is StatusCode.ERROR
    assert dict(span.attributes or {})["error.type"] == "requests.exceptions.ReadTimeout"


# --- uninstrument --------------------------------------------------------------------------


def test_uninstrument_session(
    base: str, session: requests.Session, exporter: InMemorySpanExporter
) -> None:
    instrument_requests(session)
    assert "send" in session.__dict__
    uninstrument_requests(session)
    assert "send" not in session.__dict__
    with TRACER.start_as_current_span("caller"):
        assert_nothing_sent(get(session, f"{base}/echo"))
    assert client_spans(exporter.get_finished_spans()) == []


def test_uninstrument_global(
    base: str, exporter: InMemorySpanExporter, global_instrumentation: None
) -> None:
    original = requests.Session.send
    instrument_requests()
    assert requests.Session.send is not original
    uninstrument_requests()
    assert requests.Session.send is original
    with TRACER.start_as_current_span("caller"):
        assert_nothing_sent(get(requests, f"{base}/echo"))
    assert client_spans(exporter.get_finished_spans()) == []
