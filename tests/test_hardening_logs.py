"""Logs under a flood of bad headers: a bounded number of lines (at most 10 a minute, then one
line saying how many were suppressed), and never a header's content beyond its first 64
characters, at any level from INFO up, from any logger."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from types import SimpleNamespace

import httpx
import pytest
import requests
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support.raw_apps import (
    FLASK_WSGI,
    NAME,
    STARLETTE,
    asgi_scope,
    call_asgi,
    call_wsgi,
    ours,
    wsgi_environ,
)
from support.servers import run_uvicorn, run_wsgi

from laminar_middleware import (
    HEADER_NAME,
    LaminarASGIMiddleware,
    LaminarSpanContext,
    LaminarWSGIMiddleware,
    _guard,
)

OTHER = LaminarSpanContext(0x1111, 0x2222).serialize().encode()
PER_MINUTE = 10


def tail_marker() -> bytes:
    """Unique text placed after a header's first 64 characters: it must never be logged."""
    return b"TAIL-" + uuid.uuid4().hex.encode()


def bad_values(count: int) -> list[tuple[list[tuple[bytes, bytes]], bytes]]:
    """`count` bad header sets of several kinds, each with a fresh tail marker."""
    kinds: list[Callable[[bytes], list[tuple[bytes, bytes]]]] = [
        lambda tail: [(NAME, b"garbage " + b"g" * 80 + tail)],
        lambda tail: [(NAME, b'{"trace_id": "' + b"t" * 80 + tail + b'"}')],
        lambda tail: [(NAME, b'{"trace_id": "x", "pad": "' + b"p" * 80 + tail)],
        lambda tail: [(NAME, b"{" + b"\xff\xfe" * 40 + tail)],
        lambda tail: [(NAME, b"{" + b"a" * 100_000 + tail)],
        lambda tail: [(NAME, b"{\n\x1b[31mFAKE LOG LINE\x1b[0m\r\n" + b"n" * 80 + tail)],
        lambda tail: [(NAME, b'{"trace_id": 1, "x": "' + b"y" * 80 + tail + b'"}'), (NAME, OTHER)],
    ]
    result = []
    for i in range(count):
        tail = tail_marker()
        result.append((kinds[i % len(kinds)](tail), tail))
    return result


def lines_at_info_or_above(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every record from INFO up, as it would be written (message and traceback)."""
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return [formatter.format(r) for r in caplog.records if r.levelno >= logging.INFO]


def package_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name == "laminar_middleware" and r.levelno >= logging.WARNING
    ]


async def test_a_flood_of_bad_headers_logs_ten_lines_without_their_content(
    caplog: pytest.LogCaptureFixture, exporter: InMemorySpanExporter
) -> None:
    caplog.set_level(logging.DEBUG)
    flood = bad_values(2100)
    asgi = LaminarASGIMiddleware(STARLETTE)
    wsgi = LaminarWSGIMiddleware(FLASK_WSGI)
    expected_asgi = await call_asgi(STARLETTE, asgi_scope([]))
    expected_wsgi = call_wsgi(FLASK_WSGI, wsgi_environ([]))
    for headers, _ in flood:
        assert await call_asgi(asgi, asgi_scope(headers)) == expected_asgi
        assert call_wsgi(wsgi, wsgi_environ(headers)) == expected_wsgi
    assert len(ours(exporter)) == 2 * len(flood)

    warnings = package_warnings(caplog)
    assert len(warnings) == PER_MINUTE
    assert all("ignored an invalid Laminar span context" in r.getMessage() for r in warnings)
    text = "\n".join(lines_at_info_or_above(caplog))
    for headers, tail in flood:
        assert tail not in text.encode("utf-8", "backslashreplace")
        for _, value in headers:
            assert value[:100].decode("latin-1") not in text
    # The preview is escaped: a header cannot forge log lines or colour a terminal.
    for record in warnings:
        message = record.getMessage()
        assert "\n" not in message and "\r" not in message and "\x1b" not in message


def test_suppressed_lines_are_counted_when_the_minute_is_over(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr(_guard, "time", SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(_guard, "_bad_input", _guard.RateLimitedLogger(_guard.logger))
    wsgi = LaminarWSGIMiddleware(FLASK_WSGI)
    caplog.set_level(logging.WARNING, logger="laminar_middleware")
    for headers, _ in bad_values(500):
        call_wsgi(wsgi, wsgi_environ(headers))
    # An empty header is no context and no log line.
    call_wsgi(wsgi, wsgi_environ([(NAME, b"")]))
    call_wsgi(wsgi, wsgi_environ([(NAME, b"   ")]))
    assert len(package_warnings(caplog)) == PER_MINUTE

    now[0] += 59.0  # the same minute: still silent
    call_wsgi(wsgi, wsgi_environ([(NAME, b"garbage")]))
    assert len(package_warnings(caplog)) == PER_MINUTE

    now[0] += 2.0  # a new minute: the first line says how many were dropped
    call_wsgi(wsgi, wsgi_environ([(NAME, b"garbage")]))
    warnings = package_warnings(caplog)
    assert len(warnings) == PER_MINUTE + 1
    assert warnings[-1].getMessage().endswith("(491 similar lines suppressed)")


@pytest.mark.timeout(60)
async def test_a_flood_through_real_servers_stays_bounded(
    caplog: pytest.LogCaptureFixture, exporter: InMemorySpanExporter
) -> None:
    caplog.set_level(logging.INFO)
    values = []
    for i in range(150):  # headers an HTTP client will send: printable ASCII
        tail = tail_marker().decode()
        value = [
            "garbage " + "g" * 80 + tail,
            '{"trace_id": "' + "t" * 80 + tail + '"}',
            '{"trace_id": "x", "pad": "' + "p" * 80 + tail,
        ][i % 3]
        values.append((value, tail))

    with run_uvicorn(LaminarASGIMiddleware(STARLETTE)) as url:
        limits = httpx.Limits(max_connections=20)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            responses = await asyncio.gather(
                *(client.get(f"{url}/items/7", headers={HEADER_NAME: v}) for v, _ in values)
            )
        assert {r.status_code for r in responses} == {200}

    with run_wsgi(LaminarWSGIMiddleware(FLASK_WSGI)) as url:
        for value, _ in values:
            response = requests.get(
                f"{url}/items/7", headers={HEADER_NAME: value, "Connection": "close"}, timeout=10
            )
            assert response.status_code == 200

    # Both servers together: one budget of ten lines a minute for the process.
    assert len(package_warnings(caplog)) == PER_MINUTE
    text = "\n".join(lines_at_info_or_above(caplog))
    for value, tail in values:
        assert tail not in text
        assert value not in text


def test_metadata_integers_beyond_64_bits_export_without_error_lines(
    caplog: pytest.LogCaptureFixture, exporter: InMemorySpanExporter
) -> None:
    """JSON integers have no size limit, OTLP's have 64 bits: the OTLP encoder logs an error
    (with the value) for every such attribute. A flood of such headers must not become a
    flood of error lines, so those values are carried as JSON text."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    from laminar_middleware import serialize_span_context

    echoed: list[str | None] = []

    def app(environ: object, start_response: Callable[..., object]) -> list[bytes]:
        echoed.append(serialize_span_context())
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    big = {"big": 1 << 70, "neg": -(1 << 64), "list": [1, 1 << 65], "ok": (1 << 63) - 1}
    value = LaminarSpanContext(0xABC, 0xDEF, metadata=big).serialize().encode()
    caplog.set_level(logging.DEBUG)
    wsgi = LaminarWSGIMiddleware(app)
    for _ in range(50):
        call_wsgi(wsgi, wsgi_environ([(NAME, value)]))
    spans = ours(exporter)
    assert len(spans) == 50
    encode_spans(spans)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    attributes = dict(spans[0].attributes or {})
    prefix = "lmnr.association.properties.metadata."
    assert attributes[prefix + "big"] == str(1 << 70)
    assert attributes[prefix + "list"] == "[1,%d]" % (1 << 65)
    assert attributes[prefix + "ok"] == (1 << 63) - 1  # within 64 bits: as it is
    # The handler's own context carries them on: the lists as lists, the big numbers as
    # their digits (what an OpenTelemetry attribute can hold; Laminar's SDK reads every
    # string as JSON, so it gets the numbers back).
    seen = LaminarSpanContext.parse(echoed[0])
    assert seen is not None
    assert dict(seen.metadata) == {
        "big": str(1 << 70),
        "neg": str(-(1 << 64)),
        "list": (1, 1 << 65),
        "ok": (1 << 63) - 1,
    }
