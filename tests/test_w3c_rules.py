"""The strict W3C rules on their own: which `traceparent` and `tracestate` values are read,
which are dropped, how a long `tracestate` is cut on the way in and out, and that no input
makes the parsers raise. (The whole W3C suite through the middlewares: test_w3c_suite.py.)"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from laminar_middleware._w3c import (
    StrictTraceContext,
    parse_traceparent,
    parse_tracestate,
    sampled_parent,
)
from laminar_middleware.propagator import global_propagator_without_laminar

T, P = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"


@pytest.mark.parametrize(
    ("value", "read"),
    [
        (f"00-{T}-{P}-01", True),
        (f" \t00-{T}-{P}-00\t ", True),
        (f"00-{T}-{P}-01".encode(), True),
        (f"cc-{T}-{P}-01-future", True),
        (f"00-{T}-{P}-01-future", False),  # version 00 has exactly four fields
        (f"ff-{T}-{P}-01", False),
        (f"00-{T.upper()}-{P}-01", False),
        (f"00-{'0' * 32}-{P}-01", False),
        (f"00-{T}-{'0' * 16}-01", False),
        (f"00-{T}-{P}-01,00-{T}-{P}-01", False),  # two lines a server joined
        (f"cc-{T}-{P}-01-x,00-{T}-{P}-01", False),
        ("", False),
        (None, False),
        (12, False),
    ],
)
def test_traceparent(value: object, read: bool) -> None:
    parsed = parse_traceparent(value)
    assert (parsed is not None) == read
    if parsed is not None:
        assert (parsed.trace_id, parsed.span_id) == (int(T, 16), int(P, 16))


def members(state: TraceState | None) -> list[tuple[str, str]] | None:
    return None if state is None else list(state.items())


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (None, None),
        ([], None),
        (["a=1, ,b=2", "", "c@vendor=3"], [("a", "1"), ("b", "2"), ("c@vendor", "3")]),
        ([b"a=1"], [("a", "1")]),
        (["a=1,a=2"], []),  # duplicated key: all dropped
        (["a=1", "a=1"], []),
        (["A=1,b=2"], []),  # key grammar
        (["a@=1,b=2"], []),
        (["a=,b=2"], []),  # empty value
        (["a=x=y"], []),
        ([",".join(f"k{i}=v" for i in range(33))], []),  # over 32 members
        ([object()], []),
    ],
)
def test_tracestate(values: list[object] | None, expected: list[tuple[str, str]] | None) -> None:
    assert members(parse_tracestate(values)) == expected


def test_a_long_tracestate_is_cut_long_members_first_then_from_the_right() -> None:
    long = "long=" + "x" * 200
    short = [f"k{i:02d}=" + "v" * 20 for i in range(24)]  # 24 characters each
    state = parse_tracestate([",".join([short[0], long, *short[1:]])])
    kept = [f"{k}={v}" for k, v in members(state) or []]
    assert long not in kept  # the long one went first
    assert kept == short[: len(kept)]  # then the rightmost
    assert len(",".join(kept)) <= 512 < len(",".join([*kept, short[len(kept)]]))


def test_the_tracestate_written_is_cut_to_512_characters() -> None:
    entries = [(f"k{i:02d}", "v" * 30) for i in range(32)]
    context = SpanContext(
        int(T, 16), int(P, 16), False, TraceFlags(1), trace_state=TraceState(entries)
    )
    carrier: dict[str, str] = {}
    StrictTraceContext().inject(carrier, trace.set_span_in_context(NonRecordingSpan(context)))
    assert carrier["traceparent"] == f"00-{T}-{P}-01"
    assert len(carrier["tracestate"]) <= 512
    assert carrier["tracestate"].startswith("k00=")


def test_the_extracted_context_is_dropped_for_two_traceparent_lines() -> None:
    two = {"traceparent": [f"00-{T}-{P}-01", f"00-{T}-{P}-01"]}
    context = StrictTraceContext().extract(two, getter=_ListGetter())
    assert not trace.get_current_span(context).get_span_context().is_valid


def test_a_blank_traceparent_line_beside_a_valid_one_adds_nothing() -> None:
    lines = {"traceparent": [f"00-{T}-{P}-00", " \t", ""]}
    context = StrictTraceContext().extract(lines, getter=_ListGetter())
    span_context = trace.get_current_span(context).get_span_context()
    assert (span_context.trace_id, span_context.span_id) == (int(T, 16), int(P, 16))
    assert sampled_parent(int(T, 16), int(P, 16), lines["traceparent"])[0].sampled is False


def test_the_w3c_propagator_used_is_the_strict_one() -> None:
    textmap = global_propagator_without_laminar()
    inner = getattr(textmap, "_propagators", [textmap])
    assert any(type(p) is StrictTraceContext for p in inner)
    assert not any(type(p) is TraceContextTextMapPropagator for p in inner)


def test_sampled_parent_reads_only_a_traceparent_naming_the_same_span() -> None:
    tid, sid = int(T, 16), int(P, 16)
    assert sampled_parent(tid, sid, [f"00-{T}-{P}-00"])[0].sampled is False
    assert sampled_parent(tid, sid + 1, [f"00-{T}-{P}-00"])[0].sampled is True
    assert sampled_parent(tid, sid, None)[0].sampled is True
    flags, state = sampled_parent(tid, sid, [f"00-{T}-{P}-01"], lambda: ["v=1"])
    assert flags.sampled and members(state) == [("v", "1")]


@given(st.text(max_size=300) | st.binary(max_size=300))
def test_no_traceparent_makes_the_parser_raise(value: str | bytes) -> None:
    parse_traceparent(value)


@given(st.lists(st.text(max_size=200) | st.binary(max_size=200), max_size=5))
def test_no_tracestate_makes_the_parser_raise(values: list[str | bytes]) -> None:
    state = parse_tracestate(values)
    assert state is None or len(state) <= 32


class _ListGetter:
    def get(self, carrier: dict[str, list[str]], key: str) -> list[str] | None:
        return carrier.get(key)

    def keys(self, carrier: dict[str, list[str]]) -> list[str]:
        return list(carrier)
