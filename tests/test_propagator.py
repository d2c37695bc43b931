"""LaminarPropagator: alone, in a composite, and selected by OTEL_PROPAGATORS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from laminar_middleware import (
    HEADER_NAME,
    LaminarPropagator,
    LaminarSpanContext,
    serialize_span_context,
)

REMOTE = LaminarSpanContext(0xABC, 0xDEF, ("a",), ("00000000-0000-0000-0000-000000000def",))


def test_fields() -> None:
    assert LaminarPropagator().fields == {HEADER_NAME}


def test_extract_makes_a_remote_parent() -> None:
    context = LaminarPropagator().extract({"x-laminar-span-context": REMOTE.serialize()})
    span_context = trace.get_current_span(context).get_span_context()
    assert span_context.trace_id == 0xABC and span_context.span_id == 0xDEF
    assert span_context.is_remote and span_context.trace_flags.sampled


def test_a_span_any_layer_starts_under_the_extracted_context_continues_the_laminar_path(
    exporter: InMemorySpanExporter,
) -> None:
    # As the contrib Celery consumer (or any contrib consumer) does: extract, then start.
    caller = LaminarSpanContext(
        0xABC,
        0xDEF,
        ("service-a", "publish job"),
        ("00000000-0000-0000-0000-000000000001", "00000000-0000-0000-0000-000000000def"),
        user_id="user-1",
        session_id="session-2",
        metadata={"tenant": "acme"},
    )
    context = LaminarPropagator().extract({HEADER_NAME: caller.serialize()})
    with trace.get_tracer("contrib.consumer").start_as_current_span("run job", context):
        with trace.get_tracer("user").start_as_current_span("step"):
            header = serialize_span_context()
    spans = {s.name: dict(s.attributes or {}) for s in exporter.get_finished_spans()}
    assert spans["run job"]["lmnr.span.path"] == ("service-a", "publish job", "run job")
    assert spans["run job"]["lmnr.span.ids_path"][:2] == caller.span_ids_path
    assert spans["step"]["lmnr.span.path"] == ("service-a", "publish job", "run job", "step")
    for attributes in spans.values():
        assert attributes["lmnr.association.properties.user_id"] == "user-1"
        assert attributes["lmnr.association.properties.session_id"] == "session-2"
        assert attributes["lmnr.association.properties.metadata.tenant"] == "acme"
    carried = LaminarSpanContext.parse(header)
    assert carried is not None and carried.span_path[-1] == "step"
    assert carried.user_id == "user-1"


def test_a_header_written_right_under_the_extracted_context_names_the_caller() -> None:
    context = LaminarPropagator().extract({HEADER_NAME: REMOTE.serialize()})
    carrier: dict[str, str] = {}
    LaminarPropagator().inject(carrier, context)
    assert LaminarSpanContext.parse(carrier[HEADER_NAME]) == REMOTE


def test_extract_ignores_bad_and_ambiguous() -> None:
    propagator = LaminarPropagator()
    for carrier in (
        {},
        {HEADER_NAME: "nope"},
        {
            HEADER_NAME: REMOTE.serialize(),
            "laminar-span-context": LaminarSpanContext(1, 2).serialize(),
        },
    ):
        context = propagator.extract(carrier)
        assert not trace.get_current_span(context).get_span_context().is_valid


def test_trust_restart_and_ignore_give_no_parent() -> None:
    for trust in ("restart", "ignore"):
        context = LaminarPropagator(trust=trust).extract({HEADER_NAME: REMOTE.serialize()})
        assert not trace.get_current_span(context).get_span_context().is_valid


def test_inject_in_a_composite_with_tracecontext() -> None:
    composite = CompositePropagator([TraceContextTextMapPropagator(), LaminarPropagator()])
    carrier: dict[str, str] = {}
    with trace.get_tracer("t").start_as_current_span("s") as span:
        composite.inject(carrier)
    span_id = span.get_span_context().span_id
    assert "traceparent" in carrier
    assert LaminarSpanContext.parse(carrier[HEADER_NAME]).span_id == span_id  # type: ignore[union-attr]


def test_selected_by_otel_propagators_environment_variable() -> None:
    # opentelemetry.propagate reads OTEL_PROPAGATORS once, at import: a fresh process.
    script = textwrap.dedent(
        """
        import json
        from opentelemetry import propagate, trace
        from opentelemetry.sdk.trace import TracerProvider
        trace.set_tracer_provider(TracerProvider())
        names = [type(p).__name__ for p in propagate.get_global_textmap()._propagators]
        carrier = {}
        with trace.get_tracer("t").start_as_current_span("s") as span:
            propagate.inject(carrier)
        ctx = propagate.extract({"X-Laminar-Span-Context": carrier["X-Laminar-Span-Context"]})
        parent = trace.get_current_span(ctx).get_span_context()
        print(json.dumps({"names": names, "keys": sorted(carrier),
                          "same": parent.span_id == span.get_span_context().span_id}))
        """
    )
    env = {**os.environ, "OTEL_PROPAGATORS": "tracecontext,baggage,laminar"}
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    result = json.loads(out.stdout)
    assert result["names"] == [
        "TraceContextTextMapPropagator",
        "W3CBaggagePropagator",
        "LaminarPropagator",
    ]
    assert result["keys"] == [HEADER_NAME, "traceparent"]
    assert result["same"] is True


TRACEPARENT = "00-0000000000000000000000000000abcd-00000000000000ef-01"


def test_propagator_inject_keeps_a_header_the_caller_set() -> None:
    carrier = {"x-laminar-span-context": "mine"}
    with trace.get_tracer("t").start_as_current_span("s"):
        LaminarPropagator().inject(carrier)
    assert carrier == {"x-laminar-span-context": "mine"}


@pytest.mark.parametrize("trust", ["ignore", "restart"])
def test_propagator_trust_also_drops_a_w3c_parent(trust: str) -> None:
    composite = CompositePropagator([TraceContextTextMapPropagator(), LaminarPropagator(trust)])
    carrier = {"traceparent": TRACEPARENT, HEADER_NAME: LaminarSpanContext(5, 6).serialize()}
    context = composite.extract(carrier)
    assert not trace.get_current_span(context).get_span_context().is_valid
    # Under `continue` the same carrier gives the Laminar parent.
    trusted = CompositePropagator([TraceContextTextMapPropagator(), LaminarPropagator()])
    parent = trace.get_current_span(trusted.extract(carrier)).get_span_context()
    assert (parent.trace_id, parent.span_id) == (5, 6)


def test_a_refused_header_is_parsed_and_logged_once_with_laminar_in_the_global_propagator(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry import propagate

    from laminar_middleware import LaminarWSGIMiddleware

    monkeypatch.setattr(
        propagate,
        "_HTTP_TEXT_FORMAT",
        CompositePropagator([TraceContextTextMapPropagator(), LaminarPropagator()]),
    )

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    middleware = LaminarWSGIMiddleware(app)
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/",
        "wsgi.url_scheme": "http",
        "HTTP_X_LAMINAR_SPAN_CONTEXT": '{"trace_id": "not an id"}',
    }
    with caplog.at_level("WARNING", logger="laminar_middleware"):
        body = middleware(environ, lambda status, headers, exc_info=None: None)
        assert list(body) == [b"ok"]
        body.close()  # type: ignore[attr-defined]
    refusals = [r for r in caplog.records if "invalid Laminar span context" in r.getMessage()]
    assert len(refusals) == 1
