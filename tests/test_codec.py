"""The codec on its own: the wire format and its limits (docs/wire-format.md)."""

from __future__ import annotations

import json
import time
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from laminar_middleware import (
    LaminarSpanContext,
)
from laminar_middleware.codec import format_uuid, parse_with_reason

PY_HEADER = (
    '{"trace_id":"390c39af-5d41-4939-4728-c63199e54586","span_id":"00000000-0000-0000-c36e-'
    '4f2938f27b97","is_remote":false,"span_path":["service_a"],"span_ids_path":["00000000-'
    '0000-0000-c36e-4f2938f27b97"],"user_id":null,"session_id":null,"trace_type":null,'
    '"metadata":{},"debug":null}'
)
TRACE = "390c39af-5d41-4939-4728-c63199e54586"
SPAN = "00000000-0000-0000-c36e-4f2938f27b97"
TRACE_INT = 0x390C39AF5D4149394728C63199E54586
SPAN_INT = 0xC36E4F2938F27B97


def header(**fields: Any) -> str:
    data: dict[str, Any] = {"trace_id": TRACE, "span_id": SPAN}
    data.update(fields)
    return json.dumps(data)


def test_spec_python_sample_round_trips_byte_for_byte() -> None:
    parsed = LaminarSpanContext.parse(PY_HEADER)
    assert parsed == LaminarSpanContext(
        TRACE_INT, SPAN_INT, ("service_a",), (SPAN,), None, None, None, {}
    )
    assert parsed.serialize() == PY_HEADER


def test_defaults_equality_and_hash() -> None:
    a = LaminarSpanContext(1, 2)
    assert a.span_path == () and a.span_ids_path == ()
    assert a.user_id is None and a.session_id is None and a.trace_type is None
    assert dict(a.metadata) == {}
    assert isinstance(a.metadata, MappingProxyType)
    b = LaminarSpanContext(1, 2, metadata={"k": [1, 2]})
    c = LaminarSpanContext(1, 2, metadata={"k": (1, 2)})
    assert b == c and hash(b) == hash(c)
    assert len({b, c, a}) == 2
    with pytest.raises(AttributeError):
        a.trace_id = 3  # type: ignore[misc]


def test_format_uuid_pads_span_ids() -> None:
    assert format_uuid(SPAN_INT) == SPAN
    assert format_uuid(TRACE_INT) == TRACE


@pytest.mark.parametrize(
    "spelling",
    [
        SPAN,
        SPAN.upper(),
        SPAN.replace("-", ""),
        "{" + SPAN + "}",
        "urn:uuid:" + SPAN,
        "URN:UUID:" + SPAN.upper(),
    ],
)
def test_uuid_spellings_accepted(spelling: str) -> None:
    parsed = LaminarSpanContext.parse(header(span_id=spelling))
    assert parsed is not None and parsed.span_id == SPAN_INT


def test_both_casings_snake_wins() -> None:
    camel = LaminarSpanContext.parse(
        json.dumps({"traceId": TRACE, "spanId": SPAN, "userId": "camel", "sessionId": "s"})
    )
    assert camel is not None and camel.user_id == "camel" and camel.session_id == "s"
    both = LaminarSpanContext.parse(
        json.dumps({"traceId": TRACE, "spanId": SPAN, "user_id": "snake", "userId": "camel"})
    )
    assert both is not None and both.user_id == "snake"


def test_duplicate_keys_last_wins() -> None:
    text = '{"trace_id":"%s","span_id":"%s","user_id":"a","user_id":"b"}' % (TRACE, SPAN)
    parsed = LaminarSpanContext.parse(text)
    assert parsed is not None and parsed.user_id == "b"


def test_emitted_header_is_ascii_with_escapes() -> None:
    ctx = LaminarSpanContext(1, 2, ("naïve ☃ 名前",), (format_uuid(2),), user_id="José")
    text = ctx.serialize()
    assert text.isascii()
    assert "\\u00ef" in text
    assert LaminarSpanContext.parse(text) == ctx
    assert text.encode("ascii")


def big_metadata() -> dict[str, str]:
    return {f"k{i}": "v" * 200 for i in range(60)}


def test_oversize_output_drops_metadata_then_paths_never_ids() -> None:
    ctx = LaminarSpanContext(1, 2, metadata=big_metadata())
    out = ctx.serialize()
    assert len(out) <= 8192
    assert json.loads(out)["metadata"] == {}
    long_path = tuple("n" * 1000 for _ in range(10))
    ids = tuple(format_uuid(i + 1) for i in range(10))
    ctx = LaminarSpanContext(1, 2, long_path, ids, metadata=big_metadata())
    out = ctx.serialize()
    data = json.loads(out)
    assert len(out) <= 8192
    assert data["span_path"] == [] and data["metadata"] == {}
    assert data["span_id"] == format_uuid(2) and data["trace_id"] == format_uuid(1)
    assert LaminarSpanContext.parse(out) is not None


def test_serialize_drops_fields_it_would_refuse() -> None:
    ctx = LaminarSpanContext(
        1,
        2,
        ("a", "b"),
        ("x",),
        user_id="u" * 2000,
        trace_type="nope",
        metadata={"a": {"b": {"c": 1}}},
    )
    data = json.loads(ctx.serialize())
    assert data["span_path"] == [] and data["span_ids_path"] == []
    assert data["user_id"] is None and data["trace_type"] is None and data["metadata"] == {}


# Each hostile input and what parse must make of it: None, or a context with a field dropped.
REFUSED: list[tuple[str, Any]] = [
    ("none", None),
    ("empty", ""),
    ("whitespace", "   \t "),
    ("empty bytes", b""),
    ("invalid utf-8", b'{"trace_id":"\xff\xfe"}'),
    ("truncated", PY_HEADER[:-5]),
    ("list", "[]"),
    ("null", "null"),
    ("number", "42"),
    ("string", '"hello"'),
    ("1 MB", "{" + " " * 1_000_000 + "}"),
    ("1 MB bytes", b"{" + b"a" * 1_000_000 + b"}"),
    ("over 8 KiB valid", header(user_id="u" * 9000)),
    ("10000-entry path", header(span_path=["a"] * 10000, span_ids_path=[SPAN] * 10000)),
    ("over 8 KiB in utf-8 only", header(user_id="é" * 4000)),
    ("100000 nested brackets", "[" * 100_000 + "]" * 100_000),
    (
        "deep nesting in metadata",
        header(metadata=None)[:-1] + ',"m":' + "[" * 500 + "]" * 500 + "}",
    ),
    ("huge integer", '{"trace_id":' + "9" * 5000 + "}"),
    ("NaN trace id", '{"trace_id":NaN,"span_id":"%s"}' % SPAN),
    ("all-zero trace id", header(trace_id="00000000-0000-0000-0000-000000000000")),
    ("all-zero span id", header(span_id="00000000-0000-0000-0000-000000000000")),
    ("span id upper bits", header(span_id="00000001-0000-0000-c36e-4f2938f27b97")),
    ("trace id missing", json.dumps({"span_id": SPAN})),
    ("span id missing", json.dumps({"trace_id": TRACE})),
    ("trace id as int", json.dumps({"trace_id": 5, "span_id": SPAN})),
    ("trace id short hex", header(trace_id="c36e4f2938f27b97")),
    ("trace id with sign", header(trace_id="+" + TRACE.replace("-", "")[1:])),
    ("trace id with underscores", header(trace_id=TRACE.replace("-", "_"))),
    (
        "trace id misplaced dashes",
        header(trace_id=TRACE.replace("-", "")[:4] + "-" + TRACE.replace("-", "")[4:]),
    ),
    ("NUL bytes", "\x00" * 10),
    ("NUL inside", header(trace_id=TRACE + "\x00")),
    ("not a str", 12345),
    ("lone surrogate", "{\ud800}"),
]


@pytest.mark.parametrize("value", [v for _, v in REFUSED], ids=[n for n, _ in REFUSED])
def test_hostile_inputs_are_refused(value: Any) -> None:
    started = time.perf_counter()
    assert LaminarSpanContext.parse(value) is None
    assert time.perf_counter() - started < 5  # a runaway, not a timing claim


# Inputs where one optional field is bad: the trace still joins without that field.
DROPPED: list[tuple[str, str, str, Any]] = [
    ("path not a list", header(span_path="a", span_ids_path=[SPAN]), "span_path", ()),
    ("path entry not a string", header(span_path=[1], span_ids_path=[SPAN]), "span_path", ()),
    ("300-entry path", header(span_path=["a"] * 300, span_ids_path=["b"] * 300), "span_path", ()),
    (
        "paths of different lengths",
        header(span_path=["a", "b"], span_ids_path=[SPAN]),
        "span_ids_path",
        (),
    ),
    (
        "path entry over 1 KiB",
        header(span_path=["a" * 1025], span_ids_path=[SPAN]),
        "span_path",
        (),
    ),
    ("user id not a string", header(user_id=5), "user_id", None),
    ("user id over 1 KiB", header(user_id="u" * 1025), "user_id", None),
    ("session id object", header(session_id={"a": 1}), "session_id", None),
    ("unknown trace type", header(trace_type="SOMETHING"), "trace_type", None),
    ("trace type list", header(trace_type=["DEFAULT"]), "trace_type", None),
    ("metadata not an object", header(metadata=[1, 2]), "metadata", {}),
    ("metadata five levels", header(metadata={"a": {"b": {"c": {"d": {"e": 1}}}}}), "metadata", {}),
    ("metadata three levels", header(metadata={"a": {"b": {"c": 1}}}), "metadata", {}),
    ("metadata dict in list", header(metadata={"a": [{"b": 1}]}), "metadata", {}),
    ("metadata 65 keys", header(metadata={f"k{i}": i for i in range(65)}), "metadata", {}),
    (
        "metadata 65 keys nested",
        header(metadata={"a": {f"k{i}": i for i in range(64)}}),
        "metadata",
        {},
    ),
    ("metadata long string", header(metadata={"a": "x" * 1025}), "metadata", {}),
    (
        "metadata NaN",
        '{"trace_id":"%s","span_id":"%s","metadata":{"a":NaN}}' % (TRACE, SPAN),
        "metadata",
        {},
    ),
    (
        "metadata Infinity",
        '{"trace_id":"%s","span_id":"%s","metadata":{"a":-Infinity}}' % (TRACE, SPAN),
        "metadata",
        {},
    ),
]


@pytest.mark.parametrize(
    ("value", "field", "expected"),
    [(v, f, e) for _, v, f, e in DROPPED],
    ids=[n for n, *_ in DROPPED],
)
def test_bad_optional_fields_are_dropped_alone(value: str, field: str, expected: Any) -> None:
    parsed = LaminarSpanContext.parse(value)
    assert parsed is not None
    assert parsed.trace_id == TRACE_INT and parsed.span_id == SPAN_INT
    got = getattr(parsed, field)
    assert (dict(got) if field == "metadata" else got) == expected


def test_metadata_two_levels_is_kept() -> None:
    meta = {"a": {"b": [1, 2]}, "c": [[1], [2]], "d": None, "e": 1.5, "f": True}
    parsed = LaminarSpanContext.parse(header(metadata=meta))
    assert parsed is not None
    assert json.loads(parsed.serialize())["metadata"] == meta


def test_reasons_are_given() -> None:
    assert parse_with_reason("")[1] == ""
    assert "JSON" in parse_with_reason("{nope")[1]
    assert "zeros" in parse_with_reason(header(span_id="0" * 32))[1]
    assert "8192" in parse_with_reason("{" + " " * 9000 + "}")[1]


def test_parse_time_is_linear_in_a_worst_case_header() -> None:
    # Many brackets defeat the cheap count and take the scanning path; it must stay fast.
    nasty = '{"a":' + '"' + '\\"' * 3000 + '"' + ',"b":' + "[" * 16 + "]" * 16 + "}"
    started = time.perf_counter()
    for _ in range(100):
        LaminarSpanContext.parse(nasty)
    assert time.perf_counter() - started < 10  # a runaway guard, not a timing claim


# --- properties ---------------------------------------------------------------------------

ids = st.integers(min_value=1, max_value=(1 << 64) - 1)
trace_ids = st.integers(min_value=1, max_value=(1 << 128) - 1)
names = st.text(max_size=40)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.text(max_size=20),
    st.floats(allow_nan=False, allow_infinity=False),
)
metadata_values = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(
        st.text(max_size=8), st.one_of(scalars, st.lists(scalars, max_size=3)), max_size=3
    ),
)


@st.composite
def contexts(draw: st.DrawFn) -> LaminarSpanContext:
    n = draw(st.integers(0, 4))
    path = tuple(draw(names) for _ in range(n))
    id_path = tuple(format_uuid(draw(ids)) for _ in range(n))
    return LaminarSpanContext(
        trace_id=draw(trace_ids),
        span_id=draw(ids),
        span_path=path,
        span_ids_path=id_path,
        user_id=draw(st.none() | names),
        session_id=draw(st.none() | names),
        trace_type=draw(st.sampled_from([None, "DEFAULT", "EVALUATION"])),
        metadata=draw(st.dictionaries(st.text(max_size=10), metadata_values, max_size=5)),
    )


@settings(max_examples=300, deadline=None)
@given(contexts())
def test_round_trip_property(ctx: LaminarSpanContext) -> None:
    text = ctx.serialize()
    assert text.isascii()
    assert LaminarSpanContext.parse(text) == ctx


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(), st.binary()))
def test_parse_never_raises_on_text_or_bytes(value: str | bytes) -> None:
    result = LaminarSpanContext.parse(value)
    assert result is None or isinstance(result, LaminarSpanContext)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "trace_id",
                "span_id",
                "traceId",
                "spanId",
                "span_path",
                "spanPath",
                "span_ids_path",
                "user_id",
                "metadata",
                "trace_type",
                "x",
            ]
        ),
        json_values | st.just(TRACE) | st.just(SPAN),
        max_size=8,
    )
)
def test_parse_never_raises_on_json_objects(data: dict[str, Any]) -> None:
    result = LaminarSpanContext.parse(json.dumps(data))
    if result is not None:
        assert LaminarSpanContext.parse(result.serialize()) == result


def test_unclosed_string_of_escaped_quotes_parses_in_linear_time() -> None:
    # Over 16 brackets take the scanning path; the string never closes.
    nasty = '{"a":' + "[" * 17 + "]" * 17 + ',"b":"' + '\\"' * 4000
    assert len(nasty) < 8192
    started = time.perf_counter()
    for _ in range(20):
        assert LaminarSpanContext.parse(nasty) is None
    # 20 quadratic scans took seconds; linear ones take milliseconds. A runaway guard only.
    assert time.perf_counter() - started < 2


@pytest.mark.parametrize(
    ("trace_id", "span_id"), [(0, 0), (1 << 128, 1), (-1, 5), (1, 1 << 64), (1, 0)]
)
def test_serialize_refuses_ids_no_reader_accepts(trace_id: int, span_id: int) -> None:
    with pytest.raises(ValueError):
        LaminarSpanContext(trace_id, span_id).serialize()
