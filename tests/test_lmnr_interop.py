"""Laminar SDK interop: with `lmnr` initialized, the middlewares' spans go
through Laminar's pipeline and `@observe` spans nest under the request's server span; without
it, plain OpenTelemetry spans do the same. Each mode runs in its own process
(tests/support/lmnr_interop.py) because `lmnr` keeps process-wide state."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from laminar_middleware.codec import format_uuid

SUPPORT = Path(__file__).parent / "support"


def run_mode(mode: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(SUPPORT / "lmnr_interop.py"), mode],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def read_with_lmnr(headers: list[str]) -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, str(SUPPORT / "lmnr_worker.py")],
        input=json.dumps({"read": headers}),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    read: list[dict[str, Any]] = json.loads(done.stdout)["read"]
    return read


@pytest.fixture(scope="module", params=["lmnr", "plain"])
def run(request: pytest.FixtureRequest) -> dict[str, Any]:
    result = run_mode(request.param)
    result["mode"] = request.param
    return result


def spans_under(run: dict[str, Any], server_name: str) -> dict[str, dict[str, Any]]:
    """The server span named `server_name` and the handler spans below it, by name."""
    spans = run["spans"]
    (server,) = [s for s in spans if s["kind"] == "SERVER" and s["name"] == server_name]
    by_id = {s["span_id"]: s for s in spans}
    found = {"server": server}
    for span in spans:
        ancestor = span
        while ancestor["parent_id"] in by_id and ancestor is not server:
            ancestor = by_id[ancestor["parent_id"]]
        if ancestor is server and span is not server:
            key = span["name"] if span["kind"] != "CLIENT" else "client"
            found[key] = span
    return found


@pytest.mark.parametrize("server_name", ["GET /items/{item_id}", "GET /items/<int:item_id>"])
def test_handler_spans_are_children_of_the_server_span_in_the_callers_trace(
    run: dict[str, Any], server_name: str
) -> None:
    caller = run["caller"]
    found = spans_under(run, server_name)
    server, handle, call_llm = found["server"], found["handle"], found["call_llm"]
    assert server["parent_id"] == caller["span_id"]
    operation = found.get("fastapi.endpoint")
    if operation is not None:
        # FastAPI's own tracing puts its operation span between the server span and the
        # handler (plain mode: FastAPI traces through the global provider).
        assert operation["parent_id"] == server["span_id"]
        assert handle["parent_id"] == operation["span_id"]
    else:
        assert handle["parent_id"] == server["span_id"]
    assert call_llm["parent_id"] == handle["span_id"]
    assert found["client"]["parent_id"] == call_llm["span_id"]
    for span in found.values():
        assert span["trace_id"] == caller["trace_id"]
    if run["mode"] == "lmnr":
        # Laminar's own spans, and ours beside them, went through Laminar's exporter.
        assert handle["scope"] == "lmnr.tracer"
        assert server["scope"] == found["client"]["scope"] == "laminar_middleware"


@pytest.mark.parametrize("server_name", ["GET /items/{item_id}", "GET /items/<int:item_id>"])
def test_the_callers_paths_are_start_attributes_only_for_laminars_sdk(
    run: dict[str, Any], server_name: str
) -> None:
    # Laminar's span processor computes a span's paths from these when it starts; without
    # the SDK nothing reads them, so they are not written.
    server = spans_under(run, server_name)["server"]["attributes"]
    if run["mode"] == "lmnr":
        assert server["lmnr.span.parent_path"] == ["caller"]
        assert server["lmnr.span.parent_ids_path"] == [format_uuid(run["caller"]["span_id"])]
    else:
        assert "lmnr.span.parent_path" not in server
        assert "lmnr.span.parent_ids_path" not in server


@pytest.mark.parametrize("server_name", ["GET /items/{item_id}", "GET /items/<int:item_id>"])
def test_paths_extend_the_callers_path_and_carry_the_association(
    run: dict[str, Any], server_name: str
) -> None:
    caller = run["caller"]
    found = spans_under(run, server_name)
    server, handle = found["server"], found["handle"]
    caller_id = format_uuid(caller["span_id"])
    assert server["attributes"]["lmnr.span.path"] == ["caller", server_name]
    assert server["attributes"]["lmnr.span.ids_path"] == [
        caller_id,
        format_uuid(server["span_id"]),
    ]
    path = handle["attributes"]["lmnr.span.path"]
    ids = handle["attributes"]["lmnr.span.ids_path"]
    assert path[0] == "caller" and path[-1] == "handle"
    if run["mode"] == "plain":
        # The server span is named by its route before its children copy its path.
        # (Laminar's SDK records a span's path when the span starts: with it, `GET`.)
        assert path[1] == server_name
    assert ids[0] == caller_id and ids[-1] == format_uuid(handle["span_id"])
    assert format_uuid(server["span_id"]) in ids
    for span in found.values():
        assert span["attributes"]["lmnr.association.properties.user_id"] == "user-7"
        assert span["attributes"]["lmnr.association.properties.session_id"] == "session-9"


def test_outbound_headers_inside_observe_are_read_by_the_sdk(run: dict[str, Any]) -> None:
    received = {r["path"]: r["header"] for r in run["received"]}
    for label, server_name in (
        ("fastapi", "GET /items/{item_id}"),
        ("flask", "GET /items/<int:item_id>"),
    ):
        found = spans_under(run, server_name)
        call_llm, client = found["call_llm"], found["client"]
        with_span, bare = read_with_lmnr([received[f"/{label}"], received[f"/{label}-bare"]])
        # client_spans=False: the header names the observe span, with its full path.
        assert bare["span_id"] == call_llm["span_id"]
        assert bare["trace_id"] == run["caller"]["trace_id"]
        assert bare["span_path"] == call_llm["attributes"]["lmnr.span.path"]
        assert bare["span_ids_path"] == call_llm["attributes"]["lmnr.span.ids_path"]
        assert bare["user_id"] == "user-7" and bare["session_id"] == "session-9"
        # The default: the header names our CLIENT span, a child of the observe span.
        assert with_span["span_id"] == client["span_id"]
        assert with_span["span_path"][:-1] == call_llm["attributes"]["lmnr.span.path"]
        if run["mode"] == "plain":
            assert with_span["span_path"][1] == server_name


@pytest.mark.parametrize("label", ["foreign-parent", "w3c-parent"])
def test_under_a_parent_without_paths_the_header_carries_the_client_spans_own(
    run: dict[str, Any], label: str
) -> None:
    # With Laminar's SDK, its processor gives our client span a path of its own ("GET");
    # the header must say the same, as Laminar.serialize_span_context() would for it.
    received = {r["path"]: r["header"] for r in run["received"]}
    (read,) = read_with_lmnr([received[f"/{label}"]])
    (client,) = [s for s in run["spans"] if s["span_id"] == read["span_id"]]
    assert client["kind"] == "CLIENT"
    assert read["trace_id"] == client["trace_id"]
    if label == "w3c-parent":
        assert read["trace_id"] == run["w3c_trace_id"]
    attributes = client["attributes"]
    assert read["span_path"] == attributes.get("lmnr.span.path", [])
    assert read["span_ids_path"] == attributes.get("lmnr.span.ids_path", [])
    if run["mode"] == "lmnr":
        assert read["span_path"] == ["GET"]
        assert read["span_ids_path"] == [format_uuid(client["span_id"])]


_PUBLISH_UNDER_LAMINARS_SESSION = """
import json
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from lmnr import Laminar
from lmnr.opentelemetry_lib.tracing import init_tracing
init_tracing(exporter=InMemorySpanExporter(), disable_batch=True, instruments=set(),
             set_global_tracer_provider=False)
Laminar.initialize(project_api_key="offline-test", instruments=set())
from laminar_middleware._queue import OutgoingMessage, QueueTracer
headers = {}
with Laminar.start_as_current_span("handler", user_id="u1", session_id="s1"):
    # A span of another provider: it carries nothing, Laminar's context does.
    with TracerProvider().get_tracer("plain").start_as_current_span("plain"):
        span = QueueTracer("celery").publish(OutgoingMessage("t", "q", "id-1", headers))
        span.end()
print(json.dumps({"header": headers.get("X-Laminar-Span-Context"),
                  "span": {k: v for k, v in span.attributes.items() if "association" in k}}))
"""


def test_a_publish_header_carries_the_session_laminars_sdk_gave_its_span() -> None:
    # Laminar's span processor puts the user and session of its own context on the span at
    # start; the header must carry what the span carries.
    done = subprocess.run(
        [sys.executable, "-c", _PUBLISH_UNDER_LAMINARS_SESSION],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["span"]["lmnr.association.properties.user_id"] == "u1"
    header = json.loads(result["header"])
    assert header["user_id"] == "u1" and header["session_id"] == "s1"
