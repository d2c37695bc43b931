"""The shared outbound layer (`_client.py`) and the propagator filter, on their own."""

from __future__ import annotations

from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from support.outbound import (
    TRACER,
)

from laminar_middleware import LaminarPropagator
from laminar_middleware._client import _method_info, redact_url
from laminar_middleware._w3c import StrictTraceContext
from laminar_middleware.propagator import _without_laminar

# --- the shared layer on its own ---------------------------------------------------------


def test_redact_url_removes_credentials_and_signatures() -> None:
    assert redact_url("http://user:pw@h:1/p?q=1") == "http://REDACTED:REDACTED@h:1/p?q=1"
    assert redact_url("https://h/p?a=1&Signature=s3cr3t&sig=x#f") == (
        "https://h/p?a=1&Signature=REDACTED&sig=REDACTED#f"
    )
    assert redact_url("http://h/p?X-Goog-Signature=abc") == "http://h/p?X-Goog-Signature=REDACTED"
    # An @ in the path is not userinfo.
    assert redact_url("http://h/users/@me") == "http://h/users/@me"


def test_method_names_follow_the_conventions() -> None:
    assert _method_info("GET") == ("GET", {"http.request.method": "GET"})
    name, attributes = _method_info("get")
    assert name == "GET" and attributes["http.request.method_original"] == "get"
    name, attributes = _method_info("PURGE")
    assert name == "HTTP" and attributes["http.request.method"] == "_OTHER"


def test_global_propagator_without_laminar() -> None:
    tracecontext = TraceContextTextMapPropagator()
    assert _without_laminar(LaminarPropagator()) is None
    # OpenTelemetry's W3C propagator is swapped for the strict one; a subclass is kept.
    assert type(_without_laminar(tracecontext)) is StrictTraceContext
    mine = type("Mine", (TraceContextTextMapPropagator,), {})()
    assert _without_laminar(mine) is mine
    baggage = W3CBaggagePropagator()
    plain = _without_laminar(CompositePropagator([tracecontext, baggage]))
    inner = getattr(plain, "_propagators", None)
    assert inner is not None and [type(p) for p in inner] == [StrictTraceContext, type(baggage)]
    filtered = _without_laminar(CompositePropagator([tracecontext, LaminarPropagator()]))
    assert isinstance(filtered, CompositePropagator)
    carrier: dict[str, str] = {}
    with TRACER.start_as_current_span("s"):
        filtered.inject(carrier)
    assert list(carrier) == ["traceparent"]
