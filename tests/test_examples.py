"""The examples in `examples/`: each imports without side effects, and each runs.

The self-contained ones run as subprocesses; the services run under real servers here
(their `main()` binds fixed ports, so it is not called); the clients and the OTLP example
run as subprocesses against a small recording HTTP server.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from support.servers import run_aiohttp, run_uvicorn, run_wsgi, wait_for_spans

from laminar_middleware import HEADER_NAME, LaminarSpanContext

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ALL = sorted(p.name for p in EXAMPLES.glob("*.py"))


def load(name: str) -> ModuleType:
    """Import an example by path, as a module that is not __main__: main() does not run."""
    spec = importlib.util.spec_from_file_location(f"example_{name[:-3]}", EXAMPLES / name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(
    name: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_the_expected_examples_exist() -> None:
    assert set(ALL) >= {
        "database_storage.py",
        "aiohttp_service.py",
        "django_service.py",
        "fastapi_service.py",
        "flask_service.py",
        "httpx_client.py",
        "queue_worker.py",
        "requests_client.py",
        "send_to_laminar.py",
        "send_to_otlp.py",
    }


@pytest.mark.parametrize("name", ALL)
def test_example_starts_with_how_to_run_it(name: str) -> None:
    first = (EXAMPLES / name).read_text().splitlines()[0]
    assert first.startswith("# Run: "), first
    assert f"examples/{name}" in first


# What a reader installs for a module an example imports: an extra of ours, or a package.
INSTALLS = {
    "aiohttp": "aiohttp",
    "django": "django",
    "fastapi": "fastapi",
    "flask": "flask",
    "httpx": "httpx",
    "requests": "requests",
    "uvicorn": "uvicorn",
    "lmnr": "lmnr",
    "opentelemetry.exporter.otlp": "otlp",
}


@pytest.mark.parametrize("name", ALL)
def test_example_says_what_to_install(name: str) -> None:
    text = (EXAMPLES / name).read_text()
    (needs,) = [line for line in text.splitlines() if line.startswith("# Needs: pip install ")]
    imported = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    for module, install in INSTALLS.items():
        if any(m == module or m.startswith(module + ".") for m in imported):
            assert re.search(rf"[\[, ']{install}[\], ']|{install}$", needs), (module, needs)


@pytest.mark.parametrize("name", ALL)
def test_example_imports(name: str) -> None:
    module = load(name)
    assert callable(module.main)


# --- the self-contained ones ------------------------------------------------------------------


def test_queue_worker_runs_and_the_worker_joins_the_trace() -> None:
    done = run_example("queue_worker.py")
    assert done.returncode == 0, done.stderr
    names = re.findall(r'"name": "([^"]+)"', done.stdout)
    assert {"handle request", "summarise"} <= set(names)
    trace_ids = set(re.findall(r'"trace_id": "(0x[0-9a-f]{32})"', done.stdout))
    assert len(trace_ids) == 1


def test_database_storage_runs_and_the_resumed_workflow_joins_the_trace() -> None:
    done = run_example("database_storage.py")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("3 spans in 1 trace")
    assert "resume workflow" in done.stdout


# --- the services, under real servers ---------------------------------------------------------


def test_fastapi_and_flask_services_make_one_trace(exporter: InMemorySpanExporter) -> None:
    service_a = load("fastapi_service.py")
    service_b = load("flask_service.py")
    with run_uvicorn(service_a.app) as url_a, run_wsgi(service_b.app) as url_b:
        service_a.SERVICE_B_URL = url_b
        service_b.SERVICE_A_URL = url_a
        response = httpx.get(f"{url_a}/chain", timeout=10)
        assert response.status_code == 200
        assert response.json() == {"service_b": {"done": True, "service_a": {"hello": "world"}}}
        spans = wait_for_spans(exporter, lambda s: sum(x.kind is SpanKind.SERVER for x in s) >= 3)

        exporter.clear()
        assert httpx.get(f"{url_a}/health", timeout=10).json() == {"status": "ok"}
        health = wait_for_spans(exporter, lambda s: False, timeout=0.3)
    service_b.session.close()

    servers = {s.name: s for s in spans if s.kind is SpanKind.SERVER}
    assert set(servers) == {"GET /chain", "GET /work", "GET /hello"}
    clients = [s for s in spans if s.kind is SpanKind.CLIENT]
    assert len(clients) == 2
    assert len({s.context.trace_id for s in spans}) == 1
    by_id = {s.context.span_id: s for s in spans}

    def parent(span: Any) -> Any:
        return by_id[span.parent.span_id]

    def nearest(span: Any, kind: SpanKind) -> Any:
        # FastAPI's own INTERNAL operation spans may sit between a server and its client span.
        span = parent(span)
        while span.kind is not kind:
            span = parent(span)
        return span

    assert servers["GET /chain"].parent is None
    assert parent(servers["GET /work"]).kind is SpanKind.CLIENT
    assert nearest(parent(servers["GET /work"]), SpanKind.SERVER) is servers["GET /chain"]
    assert parent(servers["GET /hello"]).kind is SpanKind.CLIENT
    assert nearest(parent(servers["GET /hello"]), SpanKind.SERVER) is servers["GET /work"]

    # excluded_paths=["/health"]: no SERVER span for the health check.
    assert [s.name for s in health if s.kind is SpanKind.SERVER] == []


def test_aiohttp_service_continues_the_caller_and_calls_on(
    exporter: InMemorySpanExporter,
) -> None:
    from laminar_middleware.aiohttp import uninstrument_aiohttp

    service_a = load("fastapi_service.py")
    service_c = load("aiohttp_service.py")
    caller = LaminarSpanContext(0xABC, 0xDEF)
    try:
        with run_uvicorn(service_a.app) as url_a, run_aiohttp(service_c.make_app()) as url_c:
            service_c.SERVICE_A_URL = url_a
            headers = {HEADER_NAME: caller.serialize()}
            response = httpx.get(f"{url_c}/work", headers=headers, timeout=10)
            assert response.json() == {"done": True, "service_a": {"hello": "world"}}
            spans = wait_for_spans(
                exporter, lambda s: sum(x.kind is SpanKind.SERVER for x in s) >= 2
            )
    finally:
        uninstrument_aiohttp()
    servers = {s.name: s for s in spans if s.kind is SpanKind.SERVER}
    assert set(servers) == {"GET /work", "GET /hello"}
    work, hello = servers["GET /work"], servers["GET /hello"]
    assert work.parent is not None and work.parent.span_id == caller.span_id
    assert {s.context.trace_id for s in servers.values()} == {caller.trace_id}
    (client,) = [s for s in spans if s.kind is SpanKind.CLIENT]
    assert client.parent is not None and client.parent.span_id == work.context.span_id
    assert hello.parent is not None and hello.parent.span_id == client.context.span_id


def console_spans(text: str) -> list[dict[str, Any]]:
    """The spans `ConsoleSpanExporter` printed: JSON objects one after another."""
    decoder, spans, at = json.JSONDecoder(), [], 0
    while (start := text.find("{", at)) != -1:
        span, at = decoder.raw_decode(text, start)
        spans.append(span)
    return spans


@contextlib.contextmanager
def serving(name: str, out: IO[str], **env: str) -> Iterator[str]:
    """An example that serves on $PORT, run in its own process with its output in `out`,
    once its /health answers; stopped after."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    service = subprocess.Popen(
        [sys.executable, str(EXAMPLES / name)],
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env, "PORT": str(port), "PYTHONUNBUFFERED": "1"},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                assert httpx.get(f"{url}/health", timeout=5).json() == {"status": "ok"}
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or service.poll() is not None:
                    raise
                time.sleep(0.1)
        yield url
    finally:
        service.terminate()
        service.wait(10)


def test_django_service_continues_the_caller_and_calls_on(
    exporter: InMemorySpanExporter, tmp_path: Path
) -> None:
    # As a reader runs it: its own process, its own settings, Django's development server.
    service_a = load("fastapi_service.py")
    caller = LaminarSpanContext(0xABC, 0xDEF)
    output = tmp_path / "stdout.txt"
    with run_uvicorn(service_a.app) as url_a, output.open("w") as out:
        with serving("django_service.py", out, SERVICE_A_URL=url_a) as url:
            headers = {HEADER_NAME: caller.serialize()}
            response = httpx.get(f"{url}/work", headers=headers, timeout=10)
            assert response.json() == {"done": True, "service_a": {"hello": "world"}}
            (hello,) = [
                s
                for s in wait_for_spans(exporter, lambda s: any(x.name == "GET /hello" for x in s))
                if s.name == "GET /hello"
            ]
            deadline = time.monotonic() + 10
            while '"GET work"' not in output.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
    spans = console_spans(output.read_text())
    servers = [s for s in spans if s["kind"] == "SpanKind.SERVER"]
    assert [s["name"] for s in servers] == ["GET work"]  # /health is excluded
    (work,) = servers
    assert work["parent_id"] == f"0x{caller.span_id:016x}"
    assert work["context"]["trace_id"] == f"0x{caller.trace_id:032x}"
    (client,) = [s for s in spans if s["kind"] == "SpanKind.CLIENT"]
    assert client["parent_id"] == work["context"]["span_id"]
    # Service A, in this process, continues the Django service's call.
    assert hello.context.trace_id == caller.trace_id
    assert hello.parent is not None
    assert f"0x{hello.parent.span_id:016x}" == client["context"]["span_id"]


def test_send_to_laminar_does_not_initialize_at_import() -> None:
    # In a fresh process, without a key: importing the example leaves Laminar alone.
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('example', {str(EXAMPLES / 'send_to_laminar.py')!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "from lmnr import Laminar\n"
        "print(Laminar.is_initialized(), module.answer('why?'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LMNR_PROJECT_API_KEY"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("False You asked 'why?'")


def test_send_to_laminar_without_a_key_says_what_to_set() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LMNR_PROJECT_API_KEY"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "send_to_laminar.py")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=EXAMPLES,  # no .env file with a key in reach
    )
    assert done.returncode == 1
    assert "set LMNR_PROJECT_API_KEY" in done.stderr


# --- the clients and the OTLP example, against a recording server -----------------------------


class _Recorder(BaseHTTPRequestHandler):
    requests: list[tuple[str, str, dict[str, str], bytes]] = []

    def _record(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.requests.append((self.command, self.path, dict(self.headers.items()), body))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_GET = do_POST = _record

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[tuple[str, str, dict[str, str], bytes]]]]:
    received: list[tuple[str, str, dict[str, str], bytes]] = []
    handler = type("Handler", (_Recorder,), {"requests": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _laminar_header(headers: dict[str, str]) -> LaminarSpanContext | None:
    values = [v for k, v in headers.items() if k.lower() == HEADER_NAME.lower()]
    assert len(values) <= 1
    return LaminarSpanContext.parse(values[0]) if values else None


@pytest.mark.parametrize(("name", "calls"), [("httpx_client.py", 2), ("requests_client.py", 1)])
def test_client_example_sends_the_laminar_header(
    recorder: tuple[str, list[tuple[str, str, dict[str, str], bytes]]], name: str, calls: int
) -> None:
    url, received = recorder
    done = run_example(name, f"{url}/hello")
    assert done.returncode == 0, done.stderr
    assert len(received) == calls
    printed = re.findall(r'"span_id": "0x([0-9a-f]{16})"', done.stdout)
    for method, path, headers, _ in received:
        assert (method, path) == ("GET", "/hello")
        ctx = _laminar_header(headers)
        assert ctx is not None, headers
        assert f"{ctx.span_id:016x}" in printed  # the CLIENT span the example printed


def test_send_to_otlp_sends_one_trace(
    recorder: tuple[str, list[tuple[str, str, dict[str, str], bytes]]],
) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    url, received = recorder
    done = run_example("send_to_otlp.py", env={"OTEL_EXPORTER_OTLP_ENDPOINT": url})
    assert done.returncode == 0, done.stderr
    assert [(m, p) for m, p, _, _ in received] == [("POST", "/v1/traces")]
    request = ExportTraceServiceRequest.FromString(received[0][3])
    spans = [
        span
        for resource_spans in request.resource_spans
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans
    ]
    assert sorted(s.name for s in spans) == ["consumer", "producer"]
    assert len({s.trace_id for s in spans}) == 1
    assert done.stdout.strip() == f"sent trace {spans[0].trace_id.hex()}"


def test_every_example_is_exercised_by_a_test_here() -> None:
    # A new example must get a run of its own above, not only the import test.
    ran = {
        "queue_worker.py",
        "database_storage.py",
        "aiohttp_service.py",
        "django_service.py",
        "fastapi_service.py",
        "flask_service.py",
        "send_to_laminar.py",
        "httpx_client.py",
        "requests_client.py",
        "send_to_otlp.py",
    }
    assert set(ALL) == ran, json.dumps(sorted(set(ALL) ^ ran))
