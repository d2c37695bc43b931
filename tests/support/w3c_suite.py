"""The W3C trace-context test suite, run through this package's middlewares and hooks.

The W3C's own harness (`test/` in the W3C `trace-context` repository) is not on any
registry this project installs from, so its cases are written again here from the
Recommendation, one case per test of that harness and under the same names, run the same
way: the harness POSTs to a test service with the headers of the case and a list of
callback URLs in the body; the service POSTs to each URL; the harness checks the
`traceparent` and `tracestate` the service sent with its callbacks. The harness is a real
server on loopback, the requests to the service go out as written (duplicated lines, odd
names, tabs), through `http.client`, since HTTP clients tidy headers up.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from support.servers import run_uvicorn

T = "12345678901234567890123456789012"
P = "1234567890123456"
TP01 = f"00-{T}-{P}-01"
TP00 = f"00-{T}-{P}-00"

Headers = Sequence[tuple[str, str]]

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_KEY = r"(?:[a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13})"
_VALUE = r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
_MEMBER = re.compile(f"({_KEY})=({_VALUE})")


class Seen(NamedTuple):
    """What one callback from the service carried."""

    trace_id: str
    parent_id: str
    flags: str
    tracestate: dict[str, str]
    tracestate_text: str


class Step(NamedTuple):
    headers: Headers
    expect: str  # what must hold, as a failure message says it
    holds: Callable[[list[Seen]], bool]
    callbacks: int = 1


def _one(holds: Callable[[Seen], bool]) -> Callable[[list[Seen]], bool]:
    return lambda seen: holds(seen[0])


def same_trace(headers: Headers) -> Step:
    return Step(headers, f"trace id {T} kept", _one(lambda s: s.trace_id == T))


def new_trace(headers: Headers, *not_ids: str) -> Step:
    banned = set(not_ids) or {T}
    return Step(
        headers, f"a new trace id (not {sorted(banned)})", _one(lambda s: s.trace_id not in banned)
    )


def members(headers: Headers, **wanted: str) -> Step:
    return Step(
        headers,
        f"trace id kept and tracestate has {wanted}",
        _one(
            lambda s: s.trace_id == T and all(s.tracestate.get(k) == v for k, v in wanted.items())
        ),
    )


def lacks(headers: Headers, *keys: str) -> Step:
    return Step(
        headers,
        f"trace id kept and tracestate lacks {list(keys)}",
        _one(lambda s: s.trace_id == T and not any(k in s.tracestate for k in keys)),
    )


def _with(value: str, name: str = "traceparent") -> list[tuple[str, str]]:
    return [(name, value)]


def _state(*values: str, name: str = "tracestate") -> list[tuple[str, str]]:
    return [("traceparent", TP00), *((name, v) for v in values)]


_ALLOWED_KEY = "".join(map(chr, range(0x61, 0x7B))) + "0123456789_-*/"
_ALLOWED_VALUE = "".join(
    [*map(chr, range(0x20, 0x2C)), *map(chr, range(0x2D, 0x3D)), *map(chr, range(0x3E, 0x7F))]
)
_THIRTY_TWO = [
    ",".join(f"bar{i:02d}={i:02d}" for i in range(start, min(start + 10, 33)))
    for start in (1, 11, 21, 31)
]
_THIRTY_THREE = [*_THIRTY_TWO[:3], _THIRTY_TWO[3] + ",bar33=33"]


def _many(headers: Headers, trace_kept: bool) -> Step:
    def holds(seen: list[Seen]) -> bool:
        trace_ids = {s.trace_id for s in seen}
        ok = len({s.parent_id for s in seen}) == 3
        if trace_kept:
            return ok and trace_ids == {T}
        return ok and "0" * 32 not in trace_ids

    return Step(headers, "three callbacks, three parent ids, the right trace", holds, 3)


CASES: dict[str, list[Step]] = {
    "test_both_traceparent_and_tracestate_missing": [
        Step([], "a valid traceparent", lambda seen: True),
    ],
    "test_traceparent_included_tracestate_missing": [
        Step(
            _with(TP01),
            "same trace, new parent id",
            _one(lambda s: s.trace_id == T and s.parent_id != P),
        ),
    ],
    "test_traceparent_duplicated": [
        new_trace(
            [("traceparent", f"00-{T[:-1]}1-{P}-01"), ("traceparent", TP01)], T[:-1] + "1", T
        ),
    ],
    "test_traceparent_header_name": [
        new_trace(_with(TP01, "trace-parent")),
        new_trace(_with(TP01, "trace.parent")),
    ],
    "test_traceparent_header_name_valid_casing": [
        same_trace(_with(TP01, name)) for name in ("TraceParent", "TrAcEpArEnT", "TRACEPARENT")
    ],
    "test_traceparent_version_0x00": [
        new_trace(_with(TP01 + ".")),
        new_trace(_with(TP01 + "-what-the-future-will-be-like")),
    ],
    "test_traceparent_version_0xcc": [
        same_trace(_with(f"cc-{T}-{P}-01")),
        same_trace(_with(f"cc-{T}-{P}-01-what-the-future-will-be-like")),
        new_trace(_with(f"cc-{T}-{P}-01.what-the-future-will-be-like")),
    ],
    "test_traceparent_version_0xff": [new_trace(_with(f"ff-{T}-{P}-01"))],
    "test_traceparent_version_illegal_characters": [
        new_trace(_with(f".0-{T}-{P}-01")),
        new_trace(_with(f"0.-{T}-{P}-01")),
    ],
    "test_traceparent_version_too_long": [
        new_trace(_with(f"000-{T}-{P}-01")),
        new_trace(_with(f"0000-{T}-{P}-01")),
    ],
    "test_traceparent_version_too_short": [new_trace(_with(f"0-{T}-{P}-01"))],
    "test_traceparent_trace_id_all_zero": [new_trace(_with(f"00-{'0' * 32}-{P}-01"), "0" * 32)],
    "test_traceparent_trace_id_illegal_characters": [
        new_trace(_with(f"00-.{T[1:]}-{P}-01")),
        new_trace(_with(f"00-{T[:-1]}.-{P}-01")),
    ],
    "test_traceparent_trace_id_too_long": [
        new_trace(_with(f"00-{T}3-{P}-01"), T, T[1:] + "3"),
    ],
    "test_traceparent_trace_id_too_short": [new_trace(_with(f"00-{T[:-1]}-{P}-01"))],
    "test_traceparent_parent_id_all_zero": [new_trace(_with(f"00-{T}-{'0' * 16}-01"))],
    "test_traceparent_parent_id_illegal_characters": [
        new_trace(_with(f"00-{T}-.{P[1:]}-01")),
        new_trace(_with(f"00-{T}-{P[:-1]}.-01")),
    ],
    "test_traceparent_parent_id_too_long": [new_trace(_with(f"00-{T}-{P}7-01"))],
    "test_traceparent_parent_id_too_short": [new_trace(_with(f"00-{T}-{P[:-1]}-01"))],
    "test_traceparent_trace_flags_illegal_characters": [
        new_trace(_with(f"00-{T}-{P}-.0")),
        new_trace(_with(f"00-{T}-{P}-0.")),
    ],
    "test_traceparent_trace_flags_too_long": [new_trace(_with(f"00-{T}-{P}-001"))],
    "test_traceparent_trace_flags_too_short": [new_trace(_with(f"00-{T}-{P}-1"))],
    "test_traceparent_ows_handling": [
        same_trace(_with(value))
        for value in (" " + TP01, "\t" + TP01, TP01 + " ", TP01 + "\t", "\t " + TP01 + " \t")
    ],
    "test_tracestate_included_traceparent_missing": [
        Step(
            [("tracestate", "foo=1,bar=2")],
            "the tracestate dropped with no traceparent",
            _one(lambda s: "foo" not in s.tracestate and "bar" not in s.tracestate),
        ),
    ],
    "test_tracestate_included_traceparent_included": [
        members(_state("foo=1,bar=2"), foo="1", bar="2"),
    ],
    "test_tracestate_header_name": [
        lacks(_state("foo=1", name="trace-state"), "foo"),
        lacks(_state("foo=1", name="trace.state"), "foo"),
    ],
    "test_tracestate_header_name_valid_casing": [
        members(_state("foo=1", name=name), foo="1")
        for name in ("TraceState", "TrAcEsTaTe", "TRACESTATE")
    ],
    "test_tracestate_empty_header": [
        Step(
            _state(""),
            "trace id kept, no members",
            _one(lambda s: s.trace_id == T and not s.tracestate),
        ),
        members(_state("foo=1", ""), foo="1"),
        members(_state("", "foo=1"), foo="1"),
    ],
    "test_tracestate_multiple_headers_different_keys": [
        Step(
            _state("foo=1,bar=2", "rojo=1,congo=2", "baz=3"),
            "every member kept, in order",
            _one(
                lambda s: (
                    list(s.tracestate.items())
                    == [("foo", "1"), ("bar", "2"), ("rojo", "1"), ("congo", "2"), ("baz", "3")]
                )
            ),
        ),
    ],
    "test_tracestate_duplicated_keys": [
        lacks(_state(*values), "foo")
        for values in (("foo=1,foo=1",), ("foo=1,foo=2",), ("foo=1", "foo=1"), ("foo=1", "foo=2"))
    ],
    "test_tracestate_all_allowed_characters": [
        members(_state(f"{key}={_ALLOWED_VALUE}"), **{key: _ALLOWED_VALUE})
        for key in (_ALLOWED_KEY, _ALLOWED_KEY + "@a-z0-9_-*/")
    ],
    "test_tracestate_ows_handling": [
        members(_state("foo=1 \t , \t bar=2, \t baz=3"), foo="1", bar="2", baz="3"),
        members(_state("foo=1\t \t,\t \tbar=2,\t \tbaz=3"), foo="1", bar="2", baz="3"),
        *(
            members(_state(v), foo="1")
            for v in (" foo=1", "\tfoo=1", "foo=1 ", "foo=1\t", "\t foo=1 \t")
        ),
    ],
    "test_tracestate_key_illegal_characters": [
        lacks(_state("foo =1"), "foo ", "foo"),
        lacks(_state("FOO=1"), "FOO"),
        lacks(_state("foo.bar=1"), "foo.bar"),
    ],
    "test_tracestate_key_illegal_vendor_format": [
        lacks(_state(f"{bad}=1,bar=2"), "bar")
        for bad in ("foo@", "@foo", "foo@@bar", "foo@bar@baz")
    ],
    "test_tracestate_member_count_limit": [
        Step(
            _state(*_THIRTY_TWO),
            "all 32 members kept",
            _one(lambda s: s.tracestate.get("bar01") == "01" and len(s.tracestate) == 32),
        ),
        lacks(_state(*_THIRTY_THREE), "bar01"),
    ],
    "test_tracestate_key_length_limit": [
        members(_state("foo=1", "z" * 256 + "=1"), foo="1"),
        lacks(_state("foo=1", "z" * 257 + "=1"), "foo"),
        members(_state("foo=1", "t" * 241 + "@" + "v" * 14 + "=1"), foo="1"),
        lacks(_state("foo=1", "t" * 242 + "@v=1"), "foo"),
        lacks(_state("foo=1", "t@" + "v" * 15 + "=1"), "foo"),
    ],
    "test_tracestate_value_illegal_characters": [
        lacks(_state("foo=bar=baz"), "foo"),
        lacks(_state("foo=,bar=3"), "foo", "bar"),
    ],
    "test_multiple_requests_with_valid_traceparent": [_many(_with(TP01), trace_kept=True)],
    "test_multiple_requests_without_traceparent": [_many([], trace_kept=False)],
    "test_multiple_requests_with_illegal_traceparent": [
        _many(_with(f"00-{'0' * 32}-{P}-01"), trace_kept=False)
    ],
}


def read_callback(headers: Headers) -> Seen | str:
    """What the harness makes of a callback's headers, or why they are not valid W3C."""
    parents = [v for k, v in headers if k.lower() == "traceparent"]
    if len(parents) != 1:
        return f"expected one traceparent, got {parents!r}"
    match = _TRACEPARENT.match(parents[0])
    if match is None:
        return f"invalid traceparent sent: {parents[0]!r}"
    text = ",".join(v for k, v in headers if k.lower() == "tracestate")
    state: dict[str, str] = {}
    for member in text.split(","):
        member = member.strip(" \t")
        if not member:
            continue
        found = _MEMBER.fullmatch(member)
        if found is None or found.group(1) in state:
            return f"invalid tracestate sent: {text!r}"
        state[found.group(1)] = found.group(2)
    if len(state) > 32:
        return f"more than 32 tracestate members sent: {text!r}"
    _version, trace_id, parent_id, flags = match.groups()
    return Seen(trace_id, parent_id, flags, state, text)


class Harness:
    """The harness's callback server: records each callback's headers by its token."""

    def __init__(self) -> None:
        self.received: dict[str, list[tuple[str, str]]] = {}
        self._lock = threading.Lock()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        with self._lock:
            self.received[scope["path"].rsplit("/", 1)[1]] = headers
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    @contextmanager
    def serving(self) -> Iterator[str]:
        with run_uvicorn(self, lifespan="off") as base:
            yield base


def run_step(service: str, harness: Harness, base: str, step: Step) -> str | None:
    """One request of a case to the service; None when it holds, else what went wrong."""
    tokens = [uuid.uuid4().hex for _ in range(step.callbacks)]
    body = json.dumps([{"url": f"{base}/callback/{t}", "arguments": []} for t in tokens])
    url = urlsplit(service)
    connection = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
    try:
        connection.putrequest("POST", url.path or "/")
        for name, value in step.headers:
            connection.putheader(name, value)
        connection.putheader("content-type", "application/json")
        connection.putheader("content-length", str(len(body)))
        connection.endheaders(body.encode())
        response = connection.getresponse()
        response.read()
    finally:
        connection.close()
    seen: list[Seen] = []
    for token in tokens:
        headers = harness.received.pop(token, None)
        if headers is None:
            return f"no callback (the service answered {response.status})"
        read = read_callback(headers)
        if isinstance(read, str):
            return read
        seen.append(read)
    if step.holds(seen):
        return None
    return f"expected {step.expect}; sent {step.headers!r}, got {seen!r}"


# name -> failures, per service: what the test session prints at its end.
RESULTS: dict[str, dict[str, list[str]]] = {}


def run_case(service: str, harness: Harness, base: str, name: str) -> list[str]:
    """Every step of one case: the failures, empty when the case passes."""
    failures = []
    for step in CASES[name]:
        failure = run_step(service, harness, base, step)
        if failure is not None:
            failures.append(failure)
    return failures


def summary() -> list[str]:
    """One line per service run: how many cases passed, and which failed."""
    lines = []
    for service, results in RESULTS.items():
        failed = sorted(name for name, failures in results.items() if failures)
        line = f"{service}: {len(results) - len(failed)} of {len(results)} passed"
        lines.append(line + (f"; failed: {', '.join(failed)}" if failed else ""))
    return lines
