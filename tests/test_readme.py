"""The README, tested as written: every shell command and Python block in it runs here the
way a reader would run it (fresh interpreters, subprocesses, real servers). Each block is
preceded by a `readme-test:` marker that says how; a block without one fails the suite."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent
HARNESS = Path(__file__).parent / "support" / "readme_block.py"

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
MARKER = re.compile(r"<!-- readme-test: (.*?) -->\n$")


def blocks() -> list[tuple[str, str, str]]:
    """(marker, language, code) for every fenced block; marker '' when there is none."""
    found = []
    for match in FENCE.finditer(README):
        before = README[: match.start()]
        marker = MARKER.search(before[-300:])
        found.append((marker.group(1) if marker else "", match.group(1), match.group(2)))
    return found


def marked(kind: str) -> list[tuple[str, str]]:
    return [(m, code) for m, lang, code in blocks() if m.split(" ")[0] == kind]


def test_every_command_and_code_block_is_run_or_says_why_not() -> None:
    kinds = {"make", "zero-code-app", "zero-code", "python", "otlp", "shell", "needs-account"}
    runnable = [(m, code) for m, lang, code in blocks() if lang in ("sh", "python")]
    assert len(runnable) >= 12
    for marker, code in runnable:
        assert marker.split(" ")[0] in kinds, f"no readme-test marker before:\n{code}"
    for marker, _ in marked("needs-account"):
        assert "(" in marker, "a block not run says why"


def env_without_otel() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LAMINAR_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


PYTHON_BLOCKS = marked("python")


@pytest.mark.parametrize(
    ("marker", "code"), PYTHON_BLOCKS, ids=[c.splitlines()[0][:40] for _, c in PYTHON_BLOCKS]
)
def test_python_block_runs_as_written(marker: str, code: str, tmp_path: Path) -> None:
    given = marker.partition("given=")[2] or "-"
    block = tmp_path / "block.py"
    block.write_text(code)
    result = subprocess.run(
        [sys.executable, str(HARNESS), str(block), given],
        env=env_without_otel(),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    spans = seen["spans"]
    caller_trace, caller_span = seen["caller"]
    if "status" in seen:  # it built an app: served, and the request joined the caller
        assert seen["status"] == 404  # the bare app's answer to "/"
        (server,) = [s for s in spans if s["kind"] == "SERVER"]
        assert (server["trace_id"], server["parent_id"]) == (caller_trace, caller_span) or (
            server["links"] == [caller_span]
        )
    if "sent" in seen:  # it built clients: each call carried its CLIENT span's header
        from laminar_middleware import LaminarSpanContext

        clients = {s["span_id"] for s in spans if s["kind"] == "CLIENT"}
        for value in seen["sent"].values():
            parsed = LaminarSpanContext.parse(value)
            assert parsed is not None and parsed.span_id in clients
    if given == "queue":  # the worker's span continued the producer's trace
        (worker,) = [s for s in spans if s["name"] == "summarise"]
        assert worker["trace_id"] == seen["producer_trace_id"]
    if given in ("celery", "rq", "dramatiq"):  # the task ran under its publish, in the handler
        assert seen[given] is True
        (handler,) = [s for s in spans if s["name"] == "request handler"]
        (publish,) = [s for s in spans if s["kind"] == "PRODUCER"]
        (run,) = [s for s in spans if s["kind"] == "CONSUMER"]
        task = "builtins.print" if given == "rq" else "readme.summarise"
        assert publish["name"] == f"publish {task}"
        assert publish["parent_id"] == handler["span_id"]
        assert (run["name"], run["parent_id"]) == (f"run {task}", publish["span_id"])


def test_make_block_names_real_targets() -> None:
    ((_, code),) = marked("make")
    targets = [line.split()[1] for line in code.splitlines() if line.startswith("make ")]
    assert targets == ["demo", "test"]
    # `make test` is this suite and `make demo` runs in test_demo.py; here, that both exist.
    result = subprocess.run(["make", "-n", *targets], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_shell_block_runs_as_written(tmp_path: Path) -> None:
    for _, code in marked("shell"):
        for line in code.splitlines():
            command = line.split("  #")[0].strip()
            result = subprocess.run(
                ["bash", "-c", f"set -o pipefail; {command}"],
                env=env_without_otel(),
                capture_output=True,
                text=True,
                timeout=120,
                cwd=tmp_path,
            )
            assert result.returncode == 0, (command, result.stderr)
            assert result.stdout.strip(), command


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def console_spans(text: str) -> list[dict[str, Any]]:
    decoder, spans, at = json.JSONDecoder(), [], text.find("{")
    while at != -1:
        span, end = decoder.raw_decode(text, at)
        spans.append(span)
        at = text.find("{", end)
    return spans


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtual environment with only what the quick start's install line brings."""
    venv = tmp_path_factory.mktemp("quickstart") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    ((_, commands),) = marked("zero-code")
    (install,) = [shlex.split(line) for line in commands.splitlines() if line.startswith("pip ")]
    # The install line as printed, from this checkout rather than from PyPI.
    words = [f"{ROOT}[auto]" if w == "laminar-middleware[auto]" else w for w in install[2:]]
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", *words],
        check=True,
        timeout=600,
        capture_output=True,
    )
    return venv


def test_zero_code_quick_start_works_as_printed(fresh_venv: Path, tmp_path: Path) -> None:
    ((_, app_code),) = marked("zero-code-app")
    ((_, commands),) = marked("zero-code")
    (tmp_path / "app.py").write_text(app_code)
    env = env_without_otel()
    env["PATH"] = f"{fresh_venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    ports = {"8000": str(free_port()), "8001": str(free_port())}
    processes: list[tuple[subprocess.Popen[str], Path, Path]] = []
    answer = ""
    try:
        for line in commands.splitlines():
            words = shlex.split(line)
            words = [re.sub(r"800[01]", lambda m: ports[m.group(0)], w) for w in words]
            if words[:2] == ["pip", "install"]:
                continue  # done by the fresh_venv fixture
            elif words[0] == "export":
                env.update(word.split("=", 1) for word in words[1:])  # type: ignore[misc]
            elif "opentelemetry-instrument" in words:
                command, extra = list(words), {}
                while re.match(r"[A-Z_][A-Z0-9_]*=", command[0]):  # VAR=value command
                    name, _, value = command.pop(0).partition("=")
                    extra[name] = value
                out, err = tmp_path / f"{len(processes)}.out", tmp_path / f"{len(processes)}.err"
                process = subprocess.Popen(
                    command,
                    env={**env, **extra},
                    cwd=tmp_path,
                    stdout=out.open("w"),
                    stderr=err.open("w"),
                    text=True,
                )
                processes.append((process, out, err))
                port = command[command.index("--port") + 1]
                wait_until_listening(int(port), process)
            else:
                assert words[0] == "curl"
                answer = subprocess.run(
                    words, env=env, capture_output=True, text=True, timeout=30, check=True
                ).stdout
    finally:
        for process, _, _ in processes:  # Ctrl+C, as a reader stops them: spans flush
            process.send_signal(signal.SIGINT)
        for process, _, _ in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
    assert json.loads(answer) == {"downstream": {"hello": "world"}}
    (_, b_out, b_err), (_, a_out, a_err) = processes
    for err in (a_err, b_err):
        assert "Failed to auto initialize" not in err.read_text(), err.read_text()
        assert "Traceback" not in err.read_text(), err.read_text()
    a_spans, b_spans = console_spans(a_out.read_text()), console_spans(b_out.read_text())
    assert a_spans and b_spans, (a_out.read_text(), a_err.read_text()[-2000:])
    assert len({s["context"]["trace_id"] for s in a_spans + b_spans}) == 1
    (a_client,) = [s for s in a_spans if s["kind"] == "SpanKind.CLIENT"]
    (b_server,) = [s for s in b_spans if s["kind"] == "SpanKind.SERVER"]
    assert b_server["name"] == "GET /hello"
    assert b_server["parent_id"] == a_client["context"]["span_id"]


def wait_until_listening(port: int, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, "the service exited"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")


class _Receiver(BaseHTTPRequestHandler):
    seen: list[tuple[str, str, str]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.seen.append(
            (self.path, self.headers.get("Authorization", ""), self.headers["Content-Type"])
        )
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def otlp_receiver() -> Iterator[tuple[str, list[tuple[str, str, str]]]]:
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    _Receiver.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", _Receiver.seen
    server.shutdown()


def test_sending_to_laminar_block_sends_the_bearer_token(
    otlp_receiver: tuple[str, list[tuple[str, str, str]]], tmp_path: Path, fresh_venv: Path
) -> None:
    """After the quick start's install line only: the `auto` extra brings the exporter."""
    url, seen = otlp_receiver
    ((_, exports),) = marked("otlp")
    script = "\n".join(line.replace("https://api.lmnr.ai", url) for line in exports.splitlines())
    program = (
        "from opentelemetry import trace\n"
        "with trace.get_tracer('readme').start_as_current_span('to laminar'): pass\n"
    )
    env = {**env_without_otel(), "LMNR_PROJECT_API_KEY": "lmnr-test-key"}
    env["PATH"] = f"{fresh_venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    env.update(OTEL_METRICS_EXPORTER="none", OTEL_LOGS_EXPORTER="none")
    result = subprocess.run(
        ["bash", "-c", f"{script}\nopentelemetry-instrument python -c {shlex.quote(program)}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "Failed to auto initialize" not in result.stderr
    assert seen == [("/v1/traces", "Bearer lmnr-test-key", "application/x-protobuf")]
