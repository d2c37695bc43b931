"""Zero-code set-up: `opentelemetry-instrument` in front of two unmodified
services (tests/support/zero_code_apps.py) propagates the Laminar header through FastAPI,
Flask, httpx and requests, beside the contrib instrumentors or FastAPI's own tracing, with
exactly one SERVER span per request and one CLIENT span per call."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from laminar_middleware import HEADER_NAME, LaminarSpanContext
from laminar_middleware.codec import format_uuid

SUPPORT = Path(__file__).parent / "support"
BIN = Path(sys.executable).parent
CALLER = LaminarSpanContext(
    trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736,
    span_id=0x00F067AA0BA902B7,
    span_path=("caller",),
    span_ids_path=(format_uuid(0x00F067AA0BA902B7),),
    user_id="user-7",
)
CONTRIB = "fastapi,starlette,flask,httpx,httpx2,requests,threading"


def free_ports(count: int) -> list[int]:
    """Ports free now, all different: each stays bound until every one is chosen."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"service on {port} exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"service on {port} did not start")


def console_spans(text: str) -> list[dict[str, Any]]:
    """The spans ConsoleSpanExporter wrote: JSON objects one after another."""
    decoder = json.JSONDecoder()
    spans, index = [], 0
    while (start := text.find("{", index)) >= 0:
        try:
            obj, index = decoder.raw_decode(text, start)
        except ValueError:
            index = start + 1
            continue
        if isinstance(obj, dict) and "context" in obj:
            spans.append(obj)
    return spans


class Services:
    def __init__(self, a_port: int, b_port: int, tmp: Path) -> None:
        self.a_url = f"http://127.0.0.1:{a_port}"
        self.b_url = f"http://127.0.0.1:{b_port}"
        self.tmp = tmp
        self.spans: dict[str, list[dict[str, Any]]] = {}
        self.stderr: dict[str, str] = {}

    def collect(self) -> None:
        for name in ("a", "b"):
            self.spans[name] = console_spans((self.tmp / f"{name}.out").read_text())
            self.stderr[name] = (self.tmp / f"{name}.err").read_text()

    def wait_for(self, **kinds: tuple[int, int]) -> None:
        """Waits (bounded) until the services have written at least this many spans of each
        kind, e.g. `SERVER=(2, 1)` for A and B. Neither service flushes its batch processor
        when it is stopped, and a server span ends after the client has its response, so the
        test must not stop them before their spans are out."""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            self.collect()
            if all(
                len(by_kind(self.spans["a"], kind)) >= a
                and len(by_kind(self.spans["b"], kind)) >= b
                for kind, (a, b) in kinds.items()
            ):
                return
            time.sleep(0.05)


@contextmanager
def services(tmp: Path, **env: str) -> Iterator[Services]:
    a_port, b_port = free_ports(2)
    running = Services(a_port, b_port, tmp)
    base = {
        **os.environ,
        "OTEL_PROPAGATORS": "tracecontext,baggage,laminar",
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_BSP_SCHEDULE_DELAY": "20",
        "A_URL": running.a_url,
        "B_URL": running.b_url,
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    commands = {
        "a": [
            str(BIN / "uvicorn"),
            "zero_code_apps:a_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(a_port),
        ],
        "b": [str(BIN / "flask"), "--app", "zero_code_apps:b_app", "run", "--port", str(b_port)],
    }
    processes = {}
    try:
        for name, command in commands.items():
            processes[name] = subprocess.Popen(
                [str(BIN / "opentelemetry-instrument"), *command],
                cwd=SUPPORT,
                env={**base, "OTEL_SERVICE_NAME": f"service-{name}"},
                stdout=(tmp / f"{name}.out").open("wb"),
                stderr=(tmp / f"{name}.err").open("wb"),
            )
        wait_listening(a_port, processes["a"])
        wait_listening(b_port, processes["b"])
        yield running
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        running.collect()


def by_kind(spans: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [s for s in spans if s["kind"] == f"SpanKind.{kind}"]


def hex_id(value: int, width: int) -> str:
    return f"0x{value:0{width}x}"


def call_chain(tmp: Path, **env: str) -> Services:
    with services(tmp, **env) as running:
        answer = httpx.get(
            f"{running.a_url}/a", headers={HEADER_NAME: CALLER.serialize()}, timeout=20
        )
        assert answer.json() == {"b": {"leaf": {"leaf": "ok"}}}
        running.wait_for(SERVER=(2, 1), CLIENT=(1, 1))
    return running


def assert_one_connected_trace(running: Services) -> None:
    a, b = running.spans["a"], running.spans["b"]
    trace_id = hex_id(CALLER.trace_id, 32)
    assert {s["context"]["trace_id"] for s in a + b} == {trace_id}
    a_servers, b_servers = by_kind(a, "SERVER"), by_kind(b, "SERVER")
    # Exactly one SERVER span per request: A's /a and /leaf, B's /b.
    assert sorted(s["name"] for s in a_servers) == ["GET /a", "GET /leaf"]
    assert [s["name"] for s in b_servers] == ["GET /b"]
    # Exactly one CLIENT span per outgoing call.
    (a_client,), (b_client,) = by_kind(a, "CLIENT"), by_kind(b, "CLIENT")
    a_server = next(s for s in a_servers if s["name"] == "GET /a")
    leaf = next(s for s in a_servers if s["name"] == "GET /leaf")
    ids = {s["context"]["span_id"]: s for s in a + b}

    def ancestor_of(span: dict[str, Any], ancestor: dict[str, Any]) -> bool:
        while span["parent_id"] in ids:
            span = ids[span["parent_id"]]
            if span is ancestor:
                return True
        return False

    # caller -> A server -> A client -> B server -> B client -> A /leaf server
    assert a_server["parent_id"] == hex_id(CALLER.span_id, 16)
    assert ancestor_of(a_client, a_server)
    assert b_servers[0]["parent_id"] == a_client["context"]["span_id"]
    assert ancestor_of(b_client, b_servers[0])
    assert leaf["parent_id"] == b_client["context"]["span_id"]
    # Laminar's attributes on the one server span, whoever opened it.
    attributes = a_server["attributes"]
    assert attributes["lmnr.span.path"] == ["caller", "GET /a"]
    assert attributes["lmnr.association.properties.user_id"] == "user-7"


def test_with_the_contrib_instrumentors_loaded(tmp_path: Path) -> None:
    running = call_chain(tmp_path)
    assert_one_connected_trace(running)
    # The contrib layers were really there: their spans are in the output.
    scopes = json.dumps(running.spans)
    assert "http send" in scopes  # the contrib ASGI middleware's INTERNAL send spans


def test_with_fastapis_own_tracing_and_no_contrib(tmp_path: Path) -> None:
    running = call_chain(tmp_path, OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=CONTRIB)
    assert_one_connected_trace(running)
    assert "http send" not in json.dumps(running.spans)


def test_trust_ignore_from_the_environment(tmp_path: Path) -> None:
    running = call_chain(
        tmp_path, OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=CONTRIB, LAMINAR_TRUST="ignore"
    )
    a_server = next(s for s in by_kind(running.spans["a"], "SERVER") if s["name"] == "GET /a")
    assert a_server["parent_id"] is None
    assert a_server["context"]["trace_id"] != hex_id(CALLER.trace_id, 32)
    assert "lmnr.association.properties.user_id" not in a_server["attributes"]


def test_propagate_to_from_the_environment(tmp_path: Path) -> None:
    # Only `localhost` may receive headers: the call to 127.0.0.1 carries none, so B starts
    # a trace of its own, and A's client span is still there.
    running = call_chain(
        tmp_path, OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=CONTRIB, LAMINAR_PROPAGATE_TO="localhost"
    )
    (a_client,) = by_kind(running.spans["a"], "CLIENT")
    (b_server,) = by_kind(running.spans["b"], "SERVER")
    assert a_client["context"]["trace_id"] == hex_id(CALLER.trace_id, 32)
    assert b_server["parent_id"] is None
    assert b_server["context"]["trace_id"] != hex_id(CALLER.trace_id, 32)


def test_excluded_paths_from_the_environment(tmp_path: Path) -> None:
    with services(
        tmp_path,
        OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=CONTRIB,
        LAMINAR_EXCLUDED_PATHS="/health,/metrics",
    ) as running:
        assert httpx.get(f"{running.a_url}/health", timeout=20).json() == {"status": "ok"}
        assert httpx.get(f"{running.a_url}/leaf", timeout=20).is_success
        running.wait_for(SERVER=(1, 0))
    names = [s["name"] for s in by_kind(running.spans["a"], "SERVER")]
    assert names == ["GET /leaf"]


@pytest.mark.parametrize(
    ("variable", "value"),
    [("LAMINAR_TRUST", "sometimes"), ("LAMINAR_PROPAGATE_TO", "re:(unclosed")],
)
def test_bad_values_start_the_app_fail_closed_and_are_reported_once(
    tmp_path: Path, variable: str, value: str
) -> None:
    running = call_chain(
        tmp_path, OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=CONTRIB, **{variable: value}
    )
    for service in ("a", "b"):  # one line per process, however many components read it
        lines = [line for line in running.stderr[service].splitlines() if variable in line]
        assert len(lines) == 1, running.stderr[service]
        assert "ERROR" in lines[0] or "bad setting" in lines[0]
    a, b = running.spans["a"], running.spans["b"]
    caller_trace = hex_id(CALLER.trace_id, 32)
    (a_server,) = [s for s in by_kind(a, "SERVER") if s["name"] == "GET /a"]
    (b_server,) = by_kind(b, "SERVER")
    if variable == "LAMINAR_TRUST":
        # A bad trust mode means restart: a new trace, linked to the caller's span.
        assert caller_trace not in {s["context"]["trace_id"] for s in a + b}
        assert [link["context"]["span_id"] for link in a_server["links"]] == [
            hex_id(CALLER.span_id, 16)
        ]
    else:
        # No usable entry left: no host gets the headers, so B starts a trace of its own.
        assert a_server["context"]["trace_id"] == caller_trace
        assert b_server["context"]["trace_id"] != caller_trace
        assert b_server["parent_id"] is None


def test_django_and_aiohttp_with_no_code_of_ours(tmp_path: Path) -> None:
    from importlib.metadata import entry_points

    contrib = [e.name for e in entry_points(group="opentelemetry_instrumentor")]
    env = {
        **os.environ,
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        # This package alone: the contrib instrumentors would open the spans themselves.
        "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": ",".join(n for n in contrib if n != "laminar"),
        "PYTHONPATH": str(Path(__file__).parent / "support"),
    }
    result = subprocess.run(
        [str(BIN / "opentelemetry-instrument"), sys.executable, "-m", "zero_code_django_aiohttp"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    spans = json.loads(result.stdout.strip().splitlines()[-1])
    by_id = {s["span_id"]: s for s in spans}
    (caller,) = [s for s in spans if s["name"] == "caller"]
    servers = {s["name"]: s for s in spans if s["kind"] == "SERVER"}
    assert set(servers) == {"GET items/<int:item_id>", "GET /items/{item_id}"}
    for server in servers.values():
        client = by_id[server["parent_id"]]
        assert client["kind"] == "CLIENT"
        assert client["parent_id"] == caller["span_id"]
    assert {s["trace_id"] for s in spans} == {caller["trace_id"]}
