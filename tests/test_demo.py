"""`laminar-middleware demo`, run as a user runs it: a subprocess with real servers."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from laminar_middleware import LaminarSpanContext
from laminar_middleware.codec import format_uuid

DEMO = [sys.executable, "-m", "laminar_middleware.cli", "demo"]
SPAN_COUNT = 13
SERVICES = {"caller", "service-a", "service-b", "worker", "mailer"}


def run_demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DEMO, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def demo_json() -> dict[str, Any]:
    done = run_demo("--json")
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def find(spans: list[dict[str, Any]], service: str, kind: str, name: str) -> dict[str, Any]:
    found = [s for s in spans if (s["service"], s["kind"], s["name"]) == (service, kind, name)]
    assert len(found) == 1, f"expected one {kind} span {name!r} of {service}, got {found}"
    return found[0]


def test_demo_exits_0_and_reports_no_problems(demo_json: dict[str, Any]) -> None:
    assert demo_json["problems"] == []
    assert len(demo_json["spans"]) == SPAN_COUNT
    assert demo_json["elapsed_s"] < 10


def test_every_span_shares_one_trace_id(demo_json: dict[str, Any]) -> None:
    trace_ids = {s["trace_id"] for s in demo_json["spans"]}
    assert len(trace_ids) == 1
    assert demo_json["trace_ids"] == sorted(trace_ids)
    assert re.fullmatch(r"[0-9a-f]{32}", trace_ids.pop())


def test_every_span_has_a_service_status_duration_and_attributes(
    demo_json: dict[str, Any],
) -> None:
    for span in demo_json["spans"]:
        assert span["service"] in SERVICES
        assert span["status"] == "UNSET"
        assert span["duration_ms"] > 0
        assert isinstance(span["attributes"], dict)
        assert re.fullmatch(r"[0-9a-f]{16}", span["span_id"])


def test_the_expected_spans_with_the_right_parents(demo_json: dict[str, Any]) -> None:
    spans = demo_json["spans"]
    root = find(spans, "caller", "INTERNAL", "ask for a summary")
    caller_client = find(spans, "caller", "CLIENT", "POST")
    a_server = find(spans, "service-a", "SERVER", "POST /summaries")
    a_client = find(spans, "service-a", "CLIENT", "POST")
    b_server = find(spans, "service-b", "SERVER", "POST /documents")
    b_client = find(spans, "service-b", "CLIENT", "GET")
    a_second = find(spans, "service-a", "SERVER", "GET /users/{user_id}")
    publish = find(spans, "service-b", "PRODUCER", "publish summarise")
    run = find(spans, "worker", "CONSUMER", "run summarise")
    model = find(spans, "worker", "INTERNAL", "call the model")
    store = find(spans, "worker", "PRODUCER", "store the email job")
    resume = find(spans, "mailer", "CONSUMER", "email summary (job 1)")
    email = find(spans, "mailer", "INTERNAL", "send the email")

    assert root["parent_span_id"] is None
    assert caller_client["parent_span_id"] == root["span_id"]
    assert a_server["parent_span_id"] == caller_client["span_id"]
    assert a_client["parent_span_id"] == a_server["span_id"]  # httpx, inside A's handler
    assert b_server["parent_span_id"] == a_client["span_id"]  # B continues A's header
    assert b_client["parent_span_id"] == b_server["span_id"]  # requests, inside B's handler
    assert a_second["parent_span_id"] == b_client["span_id"]  # A again, from B's header
    assert publish["parent_span_id"] == b_server["span_id"]  # Celery, inside B's handler
    assert run["parent_span_id"] == publish["span_id"]  # the worker process, from Redis
    assert model["parent_span_id"] == run["span_id"]
    assert store["parent_span_id"] == run["span_id"]
    assert resume["parent_span_id"] == store["span_id"]  # the mailer, from the SQLite row
    assert email["parent_span_id"] == resume["span_id"]
    assert run["attributes"]["messaging.system"] == "celery"

    assert a_client["attributes"]["url.full"].endswith("/documents")
    assert b_client["attributes"]["url.full"].endswith("/users/user-42")
    assert a_second["attributes"]["http.route"] == "/users/{user_id}"


def test_exactly_one_server_span_per_request(demo_json: dict[str, Any]) -> None:
    # FastAPI 0.165 traces requests itself; the middleware must not make that two.
    servers = [s for s in demo_json["spans"] if s["kind"] == "SERVER"]
    assert sorted(s["name"] for s in servers) == [
        "GET /users/{user_id}",
        "POST /documents",
        "POST /summaries",
    ]
    clients = [s for s in demo_json["spans"] if s["kind"] == "CLIENT"]
    assert len(clients) == 3


@pytest.mark.parametrize(
    ("sender", "receiver"),
    [
        (("service-b", "PRODUCER", "publish summarise"), ("worker", "CONSUMER", "run summarise")),
        (
            ("worker", "PRODUCER", "store the email job"),
            ("mailer", "CONSUMER", "email summary (job 1)"),
        ),
    ],
    ids=["through Celery", "through the stored row"],
)
def test_the_queue_hops_continue_the_laminar_path(
    demo_json: dict[str, Any], sender: tuple[str, str, str], receiver: tuple[str, str, str]
) -> None:
    spans = demo_json["spans"]
    producer = find(spans, *sender)
    consumer = find(spans, *receiver)
    attributes = consumer["attributes"]
    assert attributes["lmnr.span.ids_path"][:-1] == producer["attributes"]["lmnr.span.ids_path"]
    assert attributes["lmnr.span.path"] == [*producer["attributes"]["lmnr.span.path"], receiver[2]]
    assert attributes["lmnr.span.ids_path"][-1] == format_uuid(int(consumer["span_id"], 16))
    assert attributes["lmnr.span.path"][0] == "POST /summaries"  # the whole way from service A


def test_each_hop_carried_the_sending_span(demo_json: dict[str, Any]) -> None:
    spans = demo_json["spans"]
    by_id = {s["span_id"]: s for s in spans}
    expected = {
        ("caller", "service-a"): ("caller", "CLIENT"),
        ("service-a", "service-b"): ("service-a", "CLIENT"),
        ("service-b", "service-a"): ("service-b", "CLIENT"),
        ("service-b", "worker"): ("service-b", "PRODUCER"),
        ("worker", "mailer"): ("worker", "PRODUCER"),
    }
    hops = demo_json["hops"]
    assert {(h["from"], h["to"]) for h in hops} == set(expected)
    for hop in hops:
        value = hop["value"]
        assert value.isascii()
        ctx = LaminarSpanContext.parse(value)
        assert ctx is not None, hop
        assert f"{ctx.trace_id:032x}" == demo_json["trace_ids"][0]
        sender = by_id[f"{ctx.span_id:016x}"]
        assert (sender["service"], sender["kind"]) == expected[(hop["from"], hop["to"])]


def test_the_worker_and_redis_are_stopped(demo_json: dict[str, Any]) -> None:
    processes = demo_json["processes"]
    assert set(processes) == {"worker", "redis"}
    for pid in processes.values():
        state = _process_state(pid)
        assert state in {None, "Z"}, (pid, state)  # gone, or ended and not yet reaped


def _process_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def test_no_server_is_left_listening(demo_json: dict[str, Any]) -> None:
    servers = demo_json["servers"]
    assert set(servers) == {"service-a", "service-b"}
    for server in servers.values():
        assert server["host"] == "127.0.0.1"
        with socket.socket() as sock:
            sock.settimeout(2)
            with pytest.raises(ConnectionRefusedError):
                sock.connect((server["host"], server["port"]))


def test_tree_output_prints_the_trace_id_once_and_one_line_per_span() -> None:
    done = run_demo()
    assert done.returncode == 0, done.stderr
    out = done.stdout
    trace_ids = re.findall(r"\b[0-9a-f]{32}\b", out)
    assert len(trace_ids) == 1, out
    assert f"trace {trace_ids[0]}  ({SPAN_COUNT} spans from 5 services, one trace)" in out

    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("service "))
    rows = lines[header + 1 : header + 1 + SPAN_COUNT]
    assert lines[header + 1 + SPAN_COUNT] == ""
    names = [
        "ask for a summary",
        "POST",
        "POST /summaries",
        "POST",
        "POST /documents",
        "GET",
        "GET /users/{user_id}",
        "publish summarise",
        "run summarise",
        "call the model",
        "store the email job",
        "email summary (job 1)",
        "send the email",
    ]
    indents = [0, 1, 2, 3, 4, 5, 6, 5, 6, 7, 7, 8, 9]  # depth in the tree, in print order
    name_column = rows[0].index("ask for a summary")
    for row, name, depth in zip(rows, names, indents, strict=True):
        service = row.split(maxsplit=1)[0]
        assert service in SERVICES
        assert re.search(r"(SERVER|CLIENT|INTERNAL|PRODUCER|CONSUMER)\s+UNSET\s+[\d.]+ ms", row)
        assert row.rstrip().endswith("|")  # the waterfall bar
        # The name follows a tree prefix three characters per level deep.
        start = name_column + 3 * depth
        assert row[start:].startswith(name + " "), (row, name, depth)
    assert "How the context travelled" in out
    assert re.search(r"service-b -> worker +Celery message headers \(Redis\) +continues", out)
    assert re.search(r"worker +-> mailer +SQLite row", out)
    assert re.search(
        r"Stopped service-a on 127\.0\.0\.1:\d+, service-b on 127\.0\.0\.1:\d+,"
        r" the Celery worker and Redis\.",
        out,
    )


class _Collector(BaseHTTPRequestHandler):
    received: list[tuple[str, bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    received: list[tuple[str, bytes]] = []
    handler = type("Handler", (_Collector,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_export_otlp_sends_the_spans_to_the_endpoint_from_the_environment(
    collector: tuple[str, list[tuple[str, bytes]]],
) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    endpoint, received = collector
    done = run_demo("--export", "otlp", env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
    assert done.returncode == 0, done.stderr
    assert len(received) == 1
    path, body = received[0]
    assert path == "/v1/traces"
    request = ExportTraceServiceRequest.FromString(body)
    services = set()
    trace_ids = set()
    count = 0
    for resource_spans in request.resource_spans:
        attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
        services.add(attributes["service.name"])
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                trace_ids.add(span.trace_id.hex())
                count += 1
    assert count == SPAN_COUNT
    assert services == SERVICES
    assert len(trace_ids) == 1
    trace_id = trace_ids.pop()
    assert done.stdout == (f"sent {SPAN_COUNT} spans of trace {trace_id} to {endpoint}/v1/traces\n")


def test_export_otlp_to_nowhere_fails_clearly_and_in_bounded_time() -> None:
    with socket.socket() as sock:  # bound, never listening: held so no one else takes it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        done = run_demo(
            "--export",
            "otlp",
            env={
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
            },
        )
    assert done.returncode == 1
    assert f"demo failed: could not send {SPAN_COUNT} spans to http://127.0.0.1:{port}" in (
        done.stderr
    )
    assert done.stdout == ""


def test_export_otlp_without_the_exporter_says_what_to_install() -> None:
    code = (
        "import sys\n"
        "sys.modules['opentelemetry.exporter.otlp.proto.http.trace_exporter'] = None\n"
        "from laminar_middleware.cli import main\n"
        "sys.exit(main(['demo', '--export', 'otlp']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "demo failed: --export otlp needs the OTLP exporter" in done.stderr
    assert "pip install 'laminar-middleware[otlp]'" in done.stderr
    assert done.stdout == ""


def test_a_failure_inside_the_demo_is_one_clear_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from laminar_middleware import demo

    def broken() -> demo.DemoRun:
        raise OSError("no free port")

    monkeypatch.setattr(demo, "run_once", broken)
    assert demo.run_demo() == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "demo failed: OSError: no free port\n"


def test_a_disconnected_trace_is_reported_and_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from laminar_middleware import demo

    def disconnected() -> demo.DemoRun:
        return demo.DemoRun([], [], {}, 0.1, problems=["the worker's span is missing"])

    monkeypatch.setattr(demo, "run_once", disconnected)
    assert demo.run_demo(as_json=True) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["problems"] == ["the worker's span is missing"]
    assert "demo failed: the trace is not connected:" in err
    assert "the worker's span is missing" in err


def test_check_finds_a_trace_in_fragments() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    from laminar_middleware.demo import check

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    for name in ("a", "b", "c"):  # three unconnected server spans: the problem this package solves
        with tracer.start_as_current_span(name, kind=SpanKind.SERVER):
            pass
    problems = check(exporter.get_finished_spans())
    assert "expected one trace, found 3" in problems
    assert "expected one root span, found 3" in problems
    assert "expected the worker's and the mailer's spans, found []" in problems
