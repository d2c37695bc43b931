"""Whatever arrives, the response is the bare app's, byte for byte, and nothing escapes.

Raw ASGI and raw WSGI calls (no server in between, so the headers are exactly as written
here) through a Starlette app, a Flask app and a Django project, each called bare and
through the middleware; and raw bytes over a socket to an aiohttp application bare and with
the middleware (aiohttp is neither ASGI nor WSGI, and its own parser refuses some of these).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from support.raw_apps import (
    ALIAS,
    FLASK_WSGI,
    NAME,
    STARLETTE,
    asgi_scope,
    call_asgi,
    call_wsgi,
    ours,
    wsgi_environ,
)
from support.servers import run_aiohttp, wait_for_spans

from laminar_middleware import (
    LaminarASGIMiddleware,
    LaminarSpanContext,
    LaminarWSGIMiddleware,
    _guard,
)
from laminar_middleware.codec import format_uuid

REMOTE = LaminarSpanContext(
    0x4BF92F3577B34DA6A3CE929D0E0E4736,
    0x00F067AA0BA902B7,
    ("service_a",),
    (format_uuid(0x00F067AA0BA902B7),),
    user_id="u-1",
)
VALID = REMOTE.serialize().encode()
OTHER = LaminarSpanContext(0x1111, 0x2222).serialize().encode()
TRACE = format_uuid(REMOTE.trace_id)
SPAN = format_uuid(REMOTE.span_id)


def obj(**fields: Any) -> bytes:
    return json.dumps({"trace_id": TRACE, "span_id": SPAN, **fields}).encode()


def camel(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"n": value}
    return value


def nested_list(depth: int) -> Any:
    value: Any = ["a"]
    for _ in range(depth - 1):
        value = [value]
    return value


def padded(size: int) -> bytes:
    """A valid context padded to exactly `size` bytes with an unknown key."""
    base = obj(pad="")
    return obj(pad="p" * (size - len(base)))


def raw_metadata_value(literal: bytes) -> bytes:
    """A valid context whose metadata holds one value written as this JSON literal."""
    return obj(metadata={"v": "@@"}).replace(b'"@@"', literal)


def dup_keys(first: str, last: str) -> bytes:
    return ('{"trace_id":"%s","span_id":"%s","trace_id":"%s"}' % (first, SPAN, last)).encode()


W3C_PARENT = (0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331)
TRACEPARENT = b"00-%032x-%016x-01" % W3C_PARENT


@dataclass(frozen=True)
class Case:
    label: str
    headers: Sequence[tuple[bytes, bytes]]
    asgi_continues: bool = False
    # A WSGI server joins repeated lines with ",": such a value is no context.
    wsgi_continues: bool | None = None
    # The (trace id, span id) of the parent when the request continues a remote context.
    parent: tuple[int, int] = (REMOTE.trace_id, REMOTE.span_id)

    @property
    def wsgi(self) -> bool:
        return self.asgi_continues if self.wsgi_continues is None else self.wsgi_continues


CASES = [
    Case("garbage", [(NAME, b"garbage")]),
    Case("truncated JSON", [(NAME, VALID[:40])]),
    Case("JSON array", [(NAME, b"[]")]),
    Case("JSON string", [(NAME, b'"hello"')]),
    Case("huge number", [(NAME, b"1e999999")]),
    Case("deep nesting", [(NAME, b"[" * 8000)]),
    Case("deep objects", [(NAME, b'{"trace_id":' + b'{"a":' * 2000 + b"1" + b"}" * 2000 + b"}")]),
    Case("10 KiB", [(NAME, obj(metadata={"pad": "x" * 10240}))]),
    Case("invalid UTF-8", [(NAME, b'{"trace_id":"\xff\xfe\xfd","span_id":"\xc3\x28"}')]),
    Case("binary", [(NAME, bytes(range(256)))]),
    Case("NUL", [(NAME, VALID[:20] + b"\x00" + VALID[20:])]),
    Case("zero trace id", [(NAME, obj(trace_id=format_uuid(0)))]),
    Case("zero span id", [(NAME, obj(span_id=format_uuid(0)))]),
    Case("span id over 64 bits", [(NAME, obj(span_id=format_uuid(1 << 64 | 5)))]),
    Case("ids of the wrong type", [(NAME, obj(trace_id=12345, span_id=[1]))]),
    Case("empty", [(NAME, b"")]),
    Case("whitespace", [(NAME, b"   \t ")]),
    Case("two different lines", [(NAME, VALID), (NAME, OTHER)]),
    Case("both names, different values", [(NAME, VALID), (ALIAS, OTHER)]),
    Case("two equal lines", [(NAME, VALID), (NAME, VALID)], True, wsgi_continues=False),
    Case("both names, same value", [(NAME, VALID), (ALIAS, VALID)], True),
    Case("upper-case name", [(b"X-Laminar-Span-Context", VALID)], True),
    Case("NaN in metadata", [(NAME, obj(metadata={"x": float("nan")}))], True),
    Case("metadata three levels deep", [(NAME, obj(metadata={"a": {"b": {"c": 1}}}))], True),
    Case("paths of the wrong type", [(NAME, obj(span_path=[1, 2], span_ids_path="x"))], True),
    Case("non-ASCII names", [(NAME, obj(span_path=["ñandú ✓"], span_ids_path=[SPAN]))], True),
    Case("unknown keys and trace type", [(NAME, obj(trace_type="WHAT", extra={"k": 1}))], True),
    Case("many junk headers", [(f"x-junk-{i}".encode(), b"v" * 100) for i in range(200)]),
    Case("bad traceparent too", [(NAME, b"{nope"), (b"traceparent", b"00-zz-zz-01")]),
    # -- garbage
    Case("empty object", [(NAME, b"{}")]),
    Case("JSON null", [(NAME, b"null")]),
    Case("JSON number", [(NAME, b"12345")]),
    Case("single-quoted pseudo-JSON", [(NAME, VALID.replace(b'"', b"'"))]),
    Case("valid then trailing garbage", [(NAME, VALID + b"xyz")]),
    Case("two objects back to back", [(NAME, VALID + VALID)]),
    Case("byte-order mark first", [(NAME, b"\xef\xbb\xbf" + VALID)]),
    Case("unbalanced closers", [(NAME, b"}" * 5000)]),
    Case("surrounding whitespace", [(NAME, b"  \t" + VALID + b" \t ")], True),
    Case("CR LF inside the JSON", [(NAME, VALID.replace(b",", b",\r\n", 1))], True),
    # -- truncated
    Case("one brace", [(NAME, b"{")]),
    Case("truncated near the end", [(NAME, VALID[:-30])]),
    Case("unterminated string", [(NAME, b'{"trace_id":"' + TRACE.encode())]),
    Case("truncated UTF-8 sequence", [(NAME, obj(user_id="ñ").replace(b"\\u00f1", b"\xc3"))]),
    # -- nesting
    Case("metadata nested 20 deep", [(NAME, obj(metadata=nested(20)))]),
    Case("metadata nested 15 deep", [(NAME, obj(metadata=nested(15)))], True),
    Case("brackets inside a string", [(NAME, obj(user_id="[{" * 2500))], True),
    Case("deep arrays in a path", [(NAME, obj(span_path=nested_list(40)))]),
    # -- size
    Case("1 MB of garbage", [(NAME, b"{" + b"a" * 1_000_000)]),
    Case("1 MB valid-looking", [(NAME, obj(metadata={"pad": "x" * 1_000_000}))]),
    Case("one byte over 8 KiB", [(NAME, padded(8 * 1024 + 1))]),
    Case("exactly 8 KiB", [(NAME, padded(8 * 1024))], True),
    Case("1 MB in an unrelated header", [(b"x-big", b"z" * 1_000_000), (NAME, VALID)], True),
    # -- invalid UTF-8 and NUL bytes (raw ASGI carries any bytes)
    Case("overlong UTF-8", [(NAME, b'{"trace_id":"\xc0\xaf"}')]),
    Case("UTF-8-encoded surrogate", [(NAME, obj(user_id="@").replace(b"@", b"\xed\xa0\x80"))]),
    Case("latin-1 byte in a valid context", [(NAME, obj(user_id="@").replace(b"@", b"\xe9"))]),
    Case("invalid UTF-8 in a header name", [(NAME + b"\xff", VALID)]),
    Case("NUL only", [(NAME, b"\x00")]),
    Case("NUL after a valid value", [(NAME, VALID + b"\x00")]),
    Case("NUL in the header name", [(b"x-laminar\x00-span-context", VALID)]),
    Case("escaped NUL in user id", [(NAME, obj(user_id="a\u0000b"))], True),
    Case("header name with a trailing space", [(NAME + b" ", VALID)]),
    # -- duplicates and both names
    Case("three lines, one different", [(NAME, VALID), (NAME, VALID), (NAME, OTHER)]),
    Case("an empty line beside a valid one", [(NAME, b""), (NAME, VALID)]),
    Case("alias name only", [(ALIAS, VALID)], True),
    Case("alias name in mixed case", [(b"Laminar-Span-Context", VALID)], True),
    Case("both names, alias first", [(ALIAS, OTHER), (NAME, VALID)]),
    Case("duplicate JSON keys, last valid", [(NAME, dup_keys("nope", TRACE))], True),
    Case("duplicate JSON keys, last invalid", [(NAME, dup_keys(TRACE, "nope"))]),
    # -- valid-looking contexts with zero ids
    Case("both ids zero", [(NAME, obj(trace_id=format_uuid(0), span_id=format_uuid(0)))]),
    Case("zero ids in camelCase", [(NAME, camel(traceId=format_uuid(0), spanId=format_uuid(0)))]),
    Case("zero trace id as 32 hex digits", [(NAME, obj(trace_id="0" * 32))]),
    Case("zero span id in braces", [(NAME, obj(span_id="{%s}" % format_uuid(0)))]),
    Case("snake zero beats camel valid", [(NAME, obj(trace_id=format_uuid(0), traceId=TRACE))]),
    Case("camelCase valid", [(NAME, camel(traceId=TRACE, spanId=SPAN))], True),
    Case(
        "ids in upper case, braces and urn",
        [(NAME, obj(trace_id="urn:uuid:" + TRACE.upper(), span_id="{%s}" % SPAN))],
        True,
    ),
    Case("ids with inner whitespace", [(NAME, obj(trace_id=" " + TRACE))]),
    # -- numbers beyond 64 bits
    Case("trace id as a 200-bit number", [(NAME, obj(trace_id=1 << 200))]),
    Case("span id as a number", [(NAME, obj(span_id=REMOTE.span_id))]),
    Case("trace id of 33 hex digits", [(NAME, obj(trace_id="1" * 33))]),
    Case("span id of exactly 2**64", [(NAME, obj(span_id=format_uuid(1 << 64)))]),
    Case(
        "metadata integers beyond 64 bits",
        [(NAME, obj(metadata={"big": 1 << 70, "neg": -(1 << 64), "list": [1 << 65]}))],
        True,
    ),
    Case(
        "metadata float overflow",
        [(NAME, raw_metadata_value(b"1e400"))],
        True,
    ),
    Case(
        "metadata integer of 4000 digits",
        [(NAME, raw_metadata_value(b"9" * 4000))],
        True,
    ),
    # -- huge metadata
    Case("65 metadata keys", [(NAME, obj(metadata={f"k{i}": i for i in range(65)}))], True),
    Case("metadata string over 1 KiB", [(NAME, obj(metadata={"s": "x" * 1025}))], True),
    Case("metadata key over 1 KiB", [(NAME, obj(metadata={"k" * 1025: 1}))], True),
    Case("metadata that is a list", [(NAME, obj(metadata=[1, 2, 3]))], True),
    Case(
        "metadata of 64 keys near 8 KiB",
        [(NAME, obj(metadata={f"k{i:02}": "v" * 100 for i in range(64)}))],
        True,
    ),
    # -- paths
    Case(
        "paths of 10 000 entries",
        [(NAME, obj(span_path=["a"] * 10_000, span_ids_path=[SPAN] * 10_000))],
    ),
    Case(
        "paths of 257 entries",
        [(NAME, obj(span_path=["a"] * 257, span_ids_path=["b"] * 257))],
        True,
    ),
    Case(
        "paths of different lengths",
        [(NAME, obj(span_path=["a", "b"], span_ids_path=[SPAN]))],
        True,
    ),
    Case(
        "path entry over 1 KiB", [(NAME, obj(span_path=["a" * 1025], span_ids_path=[SPAN]))], True
    ),
    Case(
        "user and session ids of the wrong type",
        [(NAME, obj(user_id={"a": 1}, session_id=7))],
        True,
    ),
    Case("user id over 1 KiB", [(NAME, obj(user_id="u" * 1025))], True),
    # -- the W3C fallback
    Case(
        "valid Laminar and valid traceparent", [(NAME, VALID), (b"traceparent", TRACEPARENT)], True
    ),
    Case(
        "invalid Laminar, valid traceparent",
        [(NAME, b"garbage"), (b"traceparent", TRACEPARENT)],
        True,
        parent=W3C_PARENT,
    ),
    Case(
        "ambiguous Laminar, valid traceparent",
        [(NAME, VALID), (NAME, OTHER), (b"traceparent", TRACEPARENT)],
        True,
        parent=W3C_PARENT,
    ),
    Case("zero-id traceparent", [(b"traceparent", b"00-" + b"0" * 32 + b"-" + b"0" * 16 + b"-01")]),
    Case(
        "invalid UTF-8 in Host and User-Agent",
        [(b"host", b"\xff\xfe:99999999999"), (b"user-agent", b"\xc3(" * 500), (NAME, VALID)],
        True,
    ),
    Case(
        "1000 junk headers and a valid one",
        [*((b"x-junk", b"%d" % i) for i in range(1000)), (NAME, VALID)],
        True,
    ),
]


def check_span(
    span: ReadableSpan,
    continues: bool,
    parent: tuple[int, int] = (REMOTE.trace_id, REMOTE.span_id),
) -> None:
    assert span.end_time is not None
    if continues:
        assert span.parent is not None
        assert (span.context.trace_id, span.parent.span_id) == parent
    else:
        assert span.parent is None


# -- the table --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
async def test_hostile_headers_asgi(case: Case, exporter: InMemorySpanExporter) -> None:
    wrapped = LaminarASGIMiddleware(STARLETTE)
    expected = await call_asgi(STARLETTE, asgi_scope(case.headers))
    exporter.clear()
    before = trace.get_current_span()
    got = await call_asgi(wrapped, asgi_scope(case.headers))
    assert trace.get_current_span() is before
    assert got == expected
    assert expected[0]["status"] == 200
    (span,) = ours(exporter)
    check_span(span, case.asgi_continues, case.parent)
    assert span.name == "GET /items/{item_id}"


def flask_apps() -> tuple[Any, Any, str]:
    return FLASK_WSGI, LaminarWSGIMiddleware(FLASK_WSGI), "GET /items/<item_id>"


def django_apps() -> tuple[Any, Any, str]:
    from support.django_project import OURS, wsgi_app

    return wsgi_app([]), wsgi_app([OURS]), "GET items/<item_id>"


@pytest.mark.parametrize("apps", [flask_apps, django_apps], ids=["flask", "django"])
@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_hostile_headers_wsgi(case: Case, apps: Any, exporter: InMemorySpanExporter) -> None:
    bare, wrapped, name = apps()
    expected = call_wsgi(bare, wsgi_environ(case.headers))
    exporter.clear()
    before = trace.get_current_span()
    got = call_wsgi(wrapped, wsgi_environ(case.headers))
    assert trace.get_current_span() is before
    assert got == expected
    assert expected[0] == "200 OK"
    (span,) = ours(exporter)
    check_span(span, case.wsgi, case.parent)
    assert span.name == name


def aiohttp_app(wrapped: bool) -> Any:
    from aiohttp import web

    from laminar_middleware.aiohttp import middleware

    async def item(request: web.Request) -> web.Response:
        return web.json_response({"item": request.match_info["item_id"]}, headers={"x-app": "1"})

    app = web.Application(middlewares=[middleware()] if wrapped else [])
    app.router.add_get("/items/{item_id}", item)
    return app


@pytest.fixture(scope="module")
def aiohttp_servers() -> Iterator[tuple[str, str]]:
    with run_aiohttp(aiohttp_app(False)) as bare, run_aiohttp(aiohttp_app(True)) as wrapped:
        yield bare, wrapped


def raw_get(url: str, headers: Sequence[tuple[bytes, bytes]]) -> tuple[bytes, bytes]:
    """The headers exactly as written (aiohttp is neither ASGI nor WSGI: only a socket
    reaches it); the response without its Date line."""
    address = urlsplit(url)
    lines = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    request = b"GET /items/7 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    received = b""
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        # Refused while still sending: its answer may have arrived all the same.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request + lines + b"\r\n")
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:  # refused mid-request: what arrived before the reset
            received += b"\r\n\r\n(reset)"
    head, _, body = received.partition(b"\r\n\r\n")
    kept = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"date:")]
    return b"\r\n".join(kept), body


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_hostile_headers_aiohttp(
    case: Case, aiohttp_servers: tuple[str, str], exporter: InMemorySpanExporter
) -> None:
    bare, wrapped = aiohttp_servers
    expected = raw_get(bare, case.headers)
    exporter.clear()
    got = raw_get(wrapped, case.headers)
    assert got == expected
    if not expected[0].startswith(b"HTTP/1.1 200"):
        # aiohttp's own parser refused the request: the middleware never ran.
        assert ours(exporter) == []
        return
    wait_for_spans(exporter, lambda spans: bool(ours(exporter)))
    (span,) = ours(exporter)
    check_span(span, case.asgi_continues, case.parent)
    assert span.name == "GET /items/{item_id}"


def test_bad_headers_are_logged_rate_limited_and_never_in_full(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_guard, "_bad_input", _guard.RateLimitedLogger(_guard.logger))
    secret = b'{"trace_id":"' + b"s" * 500 + b'"}'
    wrapped = LaminarWSGIMiddleware(FLASK_WSGI)
    with caplog.at_level(logging.WARNING, logger="laminar_middleware"):
        for _ in range(15):
            call_wsgi(wrapped, wsgi_environ([(NAME, secret)]))
        call_wsgi(wrapped, wsgi_environ([(NAME, b"")]))  # empty: no log line
    lines = [r.getMessage() for r in caplog.records if r.name == "laminar_middleware"]
    assert len(lines) == 10
    assert all("s" * 100 not in line for line in lines)


# -- strange scopes, strange apps -------------------------------------------------------------


async def plain_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"a", b"b")]})
    await send({"type": "http.response.body", "body": b"plain"})


STRANGE_SCOPES: list[dict[str, Any]] = [
    {"type": "http"},
    {"type": "http", "method": "GET"},
    {"type": "http", "method": "GET", "path": "/", "headers": None},
    {"type": "http", "method": "GET", "path": "/", "headers": [(b"a", b"b", b"c")]},
    {"type": "http", "method": "GET", "path": "/", "headers": [("host", "str")]},
    {"type": "http", "method": 7, "path": "/", "client": "weird", "server": 5},
    {"type": "http", "method": "GET\x00", "path": "/\udcff", "scheme": None},
    {"type": "http", "method": "GET", "path": "/", "headers": [(NAME, VALID)], "client": []},
    {"type": "unknown-extension"},
]


@pytest.mark.parametrize("scope", STRANGE_SCOPES, ids=[str(i) for i in range(len(STRANGE_SCOPES))])
async def test_strange_scopes_pass_through(
    scope: dict[str, Any], exporter: InMemorySpanExporter
) -> None:
    expected = await call_asgi(plain_app, dict(scope))
    exporter.clear()
    got = await call_asgi(LaminarASGIMiddleware(plain_app), dict(scope))
    assert got == expected
    assert len(ours(exporter)) <= 1
    assert all(s.end_time is not None for s in ours(exporter))


class Failure(Exception):
    pass


FAILURE = Failure("the app failed")


async def raising_app(scope: Any, receive: Any, send: Any) -> None:
    raise FAILURE


async def test_app_exception_escapes_unchanged(exporter: InMemorySpanExporter) -> None:
    with pytest.raises(Failure) as raised:
        await call_asgi(LaminarASGIMiddleware(raising_app), asgi_scope([(NAME, VALID)]))
    assert raised.value is FAILURE
    (span,) = ours(exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert dict(span.attributes or {})["error.type"] == "test_inbound_hostile.Failure"


def test_wsgi_app_exception_escapes_unchanged(exporter: InMemorySpanExporter) -> None:
    def app(environ: Any, start_response: Any) -> Any:
        raise FAILURE

    with pytest.raises(Failure) as raised:
        call_wsgi(LaminarWSGIMiddleware(app), wsgi_environ([(NAME, VALID)]))
    assert raised.value is FAILURE
    (span,) = ours(exporter)
    assert span.status.status_code is StatusCode.ERROR


def test_wsgi_generator_failing_midway_ends_the_span_once(exporter: InMemorySpanExporter) -> None:
    def app(environ: Any, start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"first"
        raise FAILURE

    with pytest.raises(Failure):
        call_wsgi(LaminarWSGIMiddleware(app), wsgi_environ([]))
    (span,) = ours(exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert dict(span.attributes or {})["http.response.status_code"] == 200


async def test_disconnect_while_sending_ends_the_span_once(exporter: InMemorySpanExporter) -> None:
    async def send(message: Any) -> None:
        if message["type"] == "http.response.body":
            raise OSError("client went away")

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    with pytest.raises(OSError):
        await LaminarASGIMiddleware(plain_app)(asgi_scope([]), receive, send)
    (span,) = ours(exporter)
    assert span.end_time is not None


async def test_app_without_a_response_is_marked_incomplete(exporter: InMemorySpanExporter) -> None:
    async def silent_app(scope: Any, receive: Any, send: Any) -> None:
        return None

    assert await call_asgi(LaminarASGIMiddleware(silent_app), asgi_scope([])) == []
    (span,) = ours(exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert dict(span.attributes or {})["error.type"] == "incomplete_response"


async def test_raising_trust_policy_fails_safe(exporter: InMemorySpanExporter) -> None:
    def policy(scope: Any) -> str:
        raise RuntimeError("policy bug")

    expected = await call_asgi(STARLETTE, asgi_scope([(NAME, VALID)]))
    exporter.clear()
    got = await call_asgi(
        LaminarASGIMiddleware(STARLETTE, trust=policy), asgi_scope([(NAME, VALID)])
    )
    assert got == expected
    (span,) = ours(exporter)
    assert span.parent is None and span.links[0].context.span_id == REMOTE.span_id


# -- failures inside OpenTelemetry ------------------------------------------------------------


class RaisingProcessor(SpanProcessor):
    def __init__(self, on_start: bool, on_end: bool) -> None:
        self.raise_on_start = on_start
        self.raise_on_end = on_end

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        if self.raise_on_start:
            raise RuntimeError("processor on_start failed")

    def on_end(self, span: ReadableSpan) -> None:
        if self.raise_on_end:
            raise RuntimeError("processor on_end failed")


@pytest.mark.parametrize("where", ["on_start", "on_end"])
async def test_raising_span_processor_changes_no_response(
    where: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_guard, "_internal", _guard.RateLimitedLogger(_guard.logger))
    provider = TracerProvider()
    exported = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    provider.add_span_processor(RaisingProcessor(where == "on_start", where == "on_end"))
    asgi = LaminarASGIMiddleware(STARLETTE, tracer_provider=provider)
    wsgi = LaminarWSGIMiddleware(FLASK_WSGI, tracer_provider=provider)
    with caplog.at_level(logging.WARNING, logger="laminar_middleware"):
        for _ in range(3):
            scope = asgi_scope([(NAME, VALID)])
            assert await call_asgi(asgi, scope) == await call_asgi(STARLETTE, asgi_scope([]))
            environ = wsgi_environ([(NAME, VALID)])
            assert call_wsgi(wsgi, environ) == call_wsgi(FLASK_WSGI, wsgi_environ([]))
    assert any("internal error" in r.getMessage() for r in caplog.records)
    if where == "on_end":
        # The span was started and ended (the exporter's processor ran first).
        assert len(exported.get_finished_spans()) == 6


def test_wsgi_response_is_sized_exactly_when_the_apps_is() -> None:
    def sized(environ: Any, start_response: Any) -> Any:
        start_response("200 OK", [])
        return [b"one chunk"]

    def unsized(environ: Any, start_response: Any) -> Any:
        start_response("200 OK", [])
        return iter([b"one chunk"])

    for app in (sized, unsized):
        inner = app(wsgi_environ([]), lambda *a: None)
        result = LaminarWSGIMiddleware(app)(wsgi_environ([]), lambda *a: None)
        # Servers (wsgiref, waitress) call len() whenever __len__ exists.
        assert hasattr(result, "__len__") == hasattr(inner, "__len__")
        if hasattr(inner, "__len__"):
            assert len(result) == len(inner) == 1  # type: ignore[arg-type]
        assert list(result) == [b"one chunk"]
        result.close()  # type: ignore[attr-defined]


def test_random_bytes_never_change_the_response(exporter: InMemorySpanExporter) -> None:
    rng = random.Random(1234)
    wrapped = LaminarWSGIMiddleware(FLASK_WSGI)
    expected = call_wsgi(FLASK_WSGI, wsgi_environ([]))
    for _ in range(200):
        value = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))
        if rng.random() < 0.5:
            value = b"{" + value
        assert call_wsgi(wrapped, wsgi_environ([(NAME, value)])) == expected
    assert len(ours(exporter)) == 200


async def test_custom_header_names_replace_the_default(exporter: InMemorySpanExporter) -> None:
    wrapped = LaminarASGIMiddleware(STARLETTE, header_names=["X-Trace-Context"])
    await call_asgi(wrapped, asgi_scope([(b"x-trace-context", VALID)]))
    await call_asgi(wrapped, asgi_scope([(NAME, VALID)]))
    continued, ignored = ours(exporter)
    check_span(continued, True)
    check_span(ignored, False)
