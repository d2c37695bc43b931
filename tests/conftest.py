"""Shared test set-up: one global SDK tracer provider with an in-memory exporter, and real
servers (uvicorn, werkzeug) on 127.0.0.1 with ephemeral ports, started and stopped here."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

EXPORTER = InMemorySpanExporter()
PROVIDER = TracerProvider()
PROVIDER.add_span_processor(SimpleSpanProcessor(EXPORTER))
trace.set_tracer_provider(PROVIDER)


@pytest.fixture(autouse=True)
def fresh_log_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets the process's 10 log lines a minute afresh, and its bad settings are
    reported afresh: tests that count log lines must not depend on earlier tests."""
    from laminar_middleware import _guard

    monkeypatch.setattr(_guard, "_bad_input", _guard.RateLimitedLogger(_guard.logger))
    monkeypatch.setattr(_guard, "_internal", _guard.RateLimitedLogger(_guard.logger))
    monkeypatch.setattr(_guard, "_user_code", _guard.RateLimitedLogger(_guard.logger))
    monkeypatch.setattr(_guard, "_reported", set())


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    EXPORTER.clear()
    yield EXPORTER
    EXPORTER.clear()


@pytest.fixture
def provider() -> TracerProvider:
    return PROVIDER


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The W3C trace-context suite's results, ours beside contrib's, when it ran."""
    from support.w3c_suite import summary

    lines = summary()
    if lines:
        terminalreporter.section("W3C trace-context test suite")
        for line in lines:
            terminalreporter.write_line(line)
