"""Runs Laminar's real Python SDK (lmnr) offline in its own process, for compatibility tests.

Reads one JSON request on stdin, writes one JSON answer on stdout:
- {"make": true}: headers that `Laminar.serialize_span_context()` writes for some spans;
- {"read": [header, ...]}: what `Laminar.deserialize_span_context` makes of each header;
- {"continue": header}: the spans Laminar's exporter got from `continue_trace(header)` with
  an `@observe` function called inside.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from lmnr import Laminar, observe
from lmnr.opentelemetry_lib.tracing import init_tracing
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


def make_headers() -> list[dict[str, Any]]:
    made: list[dict[str, Any]] = []

    def record(label: str) -> None:
        span = Laminar.get_current_span()
        assert span is not None
        ctx = span.get_span_context()
        made.append(
            {
                "label": label,
                "header": Laminar.serialize_span_context(),
                "trace_id": ctx.trace_id,
                "span_id": ctx.span_id,
            }
        )

    with Laminar.start_as_current_span("service_a"):
        record("root")

    @observe(name="inner")
    def inner() -> None:
        record("nested")

    @observe(name="leaf", metadata={"tenant": "acme", "tier": 2, "flags": ["a", "b"]})
    def leaf() -> None:
        record("metadata")

    with Laminar.start_as_current_span("handler", user_id="user-42", session_id="sess-7"):
        inner()
        record("user and session")
        leaf()

    @observe(name="naive-ascii_name with spaces")
    def spaced() -> None:
        record("spaces")

    spaced()
    return made


def read_headers(headers: list[str]) -> list[dict[str, Any] | None]:
    out: list[dict[str, Any] | None] = []
    for header in headers:
        try:
            ctx = Laminar.deserialize_span_context(header)
        except Exception as exc:  # the SDK raises on what it refuses
            out.append({"error": type(exc).__name__})
            continue
        out.append(
            {
                "trace_id": ctx.trace_id.int,
                "span_id": ctx.span_id.int,
                "span_path": ctx.span_path,
                "span_ids_path": ctx.span_ids_path,
                "user_id": ctx.user_id,
                "session_id": ctx.session_id,
                "trace_type": None if ctx.trace_type is None else ctx.trace_type.value,
                "metadata": ctx.metadata,
                "serialized": str(ctx),
            }
        )
    return out


def continue_header(header: str, exporter: InMemorySpanExporter) -> list[dict[str, Any]]:
    from laminar_middleware import continue_trace

    @observe(name="step")
    def step() -> None:
        pass

    with continue_trace(header, "worker"):
        step()
    return [
        {"name": s.name, "attributes": {k: _plain(v) for k, v in (s.attributes or {}).items()}}
        for s in exporter.get_finished_spans()
    ]


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def main() -> None:
    request = json.load(sys.stdin)
    exporter = InMemorySpanExporter()
    init_tracing(
        exporter=exporter,
        disable_batch=True,
        instruments=set(),
        set_global_tracer_provider=False,
    )
    Laminar.initialize(project_api_key="offline-test", instruments=set())
    answer: dict[str, Any] = {}
    if request.get("make"):
        answer["made"] = make_headers()
    if "read" in request:
        answer["read"] = read_headers(request["read"])
    if "continue" in request:
        answer["continued"] = continue_header(request["continue"], exporter)
    sys.stdout.write(json.dumps(answer))


if __name__ == "__main__":
    main()
