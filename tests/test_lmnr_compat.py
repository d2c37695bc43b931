"""Wire compatibility with Laminar's real SDKs: lmnr from PyPI (in its own process) and the
TypeScript SDK's headers in tests/fixtures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from laminar_middleware import LaminarSpanContext

WORKER = Path(__file__).parent / "support" / "lmnr_worker.py"
# Headers written by the real TypeScript SDK.
FIXTURES = Path(__file__).parent / "fixtures" / "ts-sdk-headers.json"


def ask_lmnr(request: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(WORKER)],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.fixture(scope="module")
def python_sdk_headers() -> list[dict[str, Any]]:
    made: list[dict[str, Any]] = ask_lmnr({"make": True})["made"]
    assert len(made) == 5
    return made


def test_python_sdk_headers_parse_and_reserialize_byte_for_byte(
    python_sdk_headers: list[dict[str, Any]],
) -> None:
    for made in python_sdk_headers:
        parsed = LaminarSpanContext.parse(made["header"])
        assert parsed is not None, made["label"]
        assert parsed.trace_id == made["trace_id"]
        assert parsed.span_id == made["span_id"]
        assert parsed.serialize() == made["header"], made["label"]


def test_python_sdk_header_fields(python_sdk_headers: list[dict[str, Any]]) -> None:
    by_label = {m["label"]: LaminarSpanContext.parse(m["header"]) for m in python_sdk_headers}
    nested = by_label["nested"]
    assert nested is not None
    assert nested.span_path == ("handler", "inner")
    assert nested.user_id == "user-42" and nested.session_id == "sess-7"
    meta = by_label["metadata"]
    assert meta is not None
    assert dict(meta.metadata) == {"tenant": "acme", "tier": 2, "flags": ("a", "b")}


def test_our_headers_are_read_by_the_python_sdk() -> None:
    ours = [
        LaminarSpanContext(0x1234, 0x5678),
        LaminarSpanContext(
            trace_id=0x390C39AF5D4149394728C63199E54586,
            span_id=0xC36E4F2938F27B97,
            span_path=("service_a", "handler"),
            span_ids_path=(
                "00000000-0000-0000-0000-00000000abcd",
                "00000000-0000-0000-c36e-4f2938f27b97",
            ),
            user_id="user-1",
            session_id="session-1",
            trace_type="EVALUATION",
            metadata={"tenant": "acme", "n": 3, "tags": ["x", "y"], "nested": {"k": [1, 2]}},
        ),
        LaminarSpanContext(
            trace_id=7,
            span_id=9,
            span_path=("naïve ☃ 名前",),
            span_ids_path=("00000000-0000-0000-0000-000000000009",),
            user_id="José",
            metadata={"città": "Zürich", "emoji": "🚀"},
        ),
    ]
    headers = [c.serialize() for c in ours]
    for header in headers:
        assert header.isascii()
    read = ask_lmnr({"read": headers})["read"]
    for context, got in zip(ours, read, strict=True):
        assert "error" not in got
        assert got["trace_id"] == context.trace_id
        assert got["span_id"] == context.span_id
        assert tuple(got["span_path"]) == context.span_path
        assert tuple(got["span_ids_path"]) == context.span_ids_path
        assert got["user_id"] == context.user_id
        assert got["session_id"] == context.session_id
        assert got["trace_type"] == context.trace_type
        assert LaminarSpanContext(1, 1, metadata=got["metadata"]).metadata == context.metadata
    # For ASCII content the SDK writes exactly what we wrote.
    assert read[1]["serialized"] == headers[1]


def test_python_sdk_refuses_what_we_never_emit() -> None:
    deep = LaminarSpanContext(1, 2, metadata={"a": {"b": {"c": {"d": 1}}}})
    header = deep.serialize()
    assert json.loads(header)["metadata"] == {}
    (got,) = ask_lmnr({"read": [header]})["read"]
    assert "error" not in got


def load_ts_fixtures() -> list[dict[str, Any]]:
    headers: list[dict[str, Any]] = json.loads(FIXTURES.read_text())["headers"]
    return headers


@pytest.mark.parametrize("fixture", load_ts_fixtures(), ids=lambda f: f["label"])
def test_typescript_sdk_headers_parse_to_the_right_ids(fixture: dict[str, Any]) -> None:
    parsed = LaminarSpanContext.parse(fixture["header"])
    assert parsed is not None
    assert parsed.trace_id == int(fixture["trace_id_hex"], 16)
    assert parsed.span_id == int(fixture["span_id_hex"], 16)
    raw = json.loads(fixture["header"])
    assert list(parsed.span_path) == raw.get("spanPath", [])
    assert parsed.user_id == raw.get("userId")
    assert parsed.session_id == raw.get("sessionId")
    # What we write back is pure ASCII and reads back equal.
    again = parsed.serialize()
    assert again.isascii()
    assert LaminarSpanContext.parse(again) == parsed


def test_spec_typescript_sample() -> None:
    header = (
        '{"spanId":"00000000-0000-0000-0715-1be863d82d13","traceId":"118901d5-dec0-2399-1e58-'
        '75a2ed3a685b","isRemote":false,"spanPath":["serviceAHandler","inner"],"spanIdsPath":'
        '["00000000-0000-0000-f8a6-94f303c397a1","00000000-0000-0000-0715-1be863d82d13"],'
        '"metadata":{},"traceType":"DEFAULT","tracingLevel":"all"}'
    )
    parsed = LaminarSpanContext.parse(header)
    assert parsed is not None
    assert parsed.trace_id == 0x118901D5DEC023991E5875A2ED3A685B
    assert parsed.span_id == 0x07151BE863D82D13
    assert parsed.span_path == ("serviceAHandler", "inner")
    assert parsed.trace_type == "DEFAULT"


def test_continue_trace_under_laminars_sdk_gives_it_the_callers_path() -> None:
    # Laminar's processor computes the worker span's path from the start attributes, and an
    # `@observe` function inside continues it.
    remote = LaminarSpanContext(
        trace_id=0x0123456789ABCDEF0123456789ABCDEF,
        span_id=0x1122334455667788,
        span_path=("caller", "enqueue"),
        span_ids_path=(
            "00000000-0000-0000-0000-000000000001",
            "00000000-0000-0000-1122-334455667788",
        ),
    )
    spans = ask_lmnr({"continue": remote.serialize()})["continued"]
    by_name = {s["name"]: s["attributes"] for s in spans}
    assert by_name["worker"]["lmnr.span.parent_path"] == ["caller", "enqueue"]
    assert by_name["worker"]["lmnr.span.path"] == ["caller", "enqueue", "worker"]
    assert by_name["step"]["lmnr.span.path"] == ["caller", "enqueue", "worker", "step"]
