"""The `laminar-middleware` command: decode and encode (the demo has tests of its own)."""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys

import pytest

from laminar_middleware import HEADER_NAME, LaminarSpanContext
from laminar_middleware.cli import main

# Real headers written by the Python SDK and the TypeScript SDK.
PYTHON_HEADER = (
    '{"trace_id":"390c39af-5d41-4939-4728-c63199e54586",'
    '"span_id":"00000000-0000-0000-c36e-4f2938f27b97","is_remote":false,'
    '"span_path":["service_a"],"span_ids_path":["00000000-0000-0000-c36e-4f2938f27b97"],'
    '"user_id":null,"session_id":null,"trace_type":null,"metadata":{},"debug":null}'
)
TS_HEADER = (
    '{"spanId":"00000000-0000-0000-0715-1be863d82d13",'
    '"traceId":"118901d5-dec0-2399-1e58-75a2ed3a685b","isRemote":false,'
    '"spanPath":["serviceAHandler","inner"],'
    '"spanIdsPath":["00000000-0000-0000-f8a6-94f303c397a1","00000000-0000-0000-0715-1be863d82d13"],'
    '"metadata":{},"traceType":"DEFAULT","tracingLevel":"all"}'
)
FULL_HEADER = (
    '{"trace_id":"4bf92f35-77b3-4da6-a3ce-929d0e0e4736",'
    '"span_id":"00000000-0000-0000-00f0-67aa0ba902b7","is_remote":false,'
    '"span_path":["handler"],"span_ids_path":["00000000-0000-0000-00f0-67aa0ba902b7"],'
    '"user_id":"user-42","session_id":"sess-7","trace_type":"EVALUATION",'
    '"metadata":{"tenant":"acme","tier":2},"debug":null}'
)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def fields(out: str) -> dict[str, str]:
    """The plain `decode` output as {field: shown value}."""
    result = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        result[key] = value.strip()
    return result


# --- decode -----------------------------------------------------------------------------------


def test_decode_python_header_shows_ids_in_uuid_and_hex_form(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run(capsys, "decode", PYTHON_HEADER)
    assert (code, err) == (0, "")
    shown = fields(out)
    assert shown["trace_id"] == "390c39af-5d41-4939-4728-c63199e54586"
    assert shown["trace_id_hex"] == "390c39af5d4149394728c63199e54586"
    assert shown["span_id"] == "00000000-0000-0000-c36e-4f2938f27b97"
    assert shown["span_id_hex"] == "c36e4f2938f27b97"
    assert json.loads(shown["span_path"]) == ["service_a"]
    assert json.loads(shown["span_ids_path"]) == ["00000000-0000-0000-c36e-4f2938f27b97"]
    assert shown["user_id"] == "null"
    assert shown["session_id"] == "null"
    assert json.loads(shown["metadata"]) == {}


def test_decode_typescript_camel_case_header(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "decode", TS_HEADER)
    assert code == 0
    shown = fields(out)
    assert shown["trace_id"] == "118901d5-dec0-2399-1e58-75a2ed3a685b"
    assert shown["trace_id_hex"] == "118901d5dec023991e5875a2ed3a685b"
    assert shown["span_id_hex"] == "07151be863d82d13"
    assert json.loads(shown["span_path"]) == ["serviceAHandler", "inner"]
    assert shown["trace_type"] == "DEFAULT"


def test_decode_shows_user_session_and_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "decode", FULL_HEADER)
    assert code == 0
    shown = fields(out)
    assert shown["user_id"] == "user-42"
    assert shown["session_id"] == "sess-7"
    assert shown["trace_type"] == "EVALUATION"
    assert json.loads(shown["metadata"]) == {"tenant": "acme", "tier": 2}


def test_decode_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "decode", "--json", FULL_HEADER)
    assert code == 0
    assert json.loads(out) == {
        "trace_id": "4bf92f35-77b3-4da6-a3ce-929d0e0e4736",
        "trace_id_hex": "4bf92f3577b34da6a3ce929d0e0e4736",
        "span_id": "00000000-0000-0000-00f0-67aa0ba902b7",
        "span_id_hex": "00f067aa0ba902b7",
        "span_path": ["handler"],
        "span_ids_path": ["00000000-0000-0000-00f0-67aa0ba902b7"],
        "user_id": "user-42",
        "session_id": "sess-7",
        "trace_type": "EVALUATION",
        "metadata": {"tenant": "acme", "tier": 2},
    }


def test_decode_accepts_the_value_with_its_header_name_in_front(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for prefix in (f"{HEADER_NAME}: ", "x-laminar-span-context:", "laminar-span-context: "):
        code, out, _ = run(capsys, "decode", prefix + PYTHON_HEADER)
        assert code == 0, prefix
        assert fields(out)["span_id_hex"] == "c36e4f2938f27b97"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("hello", "not a JSON object"),
        ("[1, 2]", "not a JSON object"),
        ("{not json", "not valid JSON"),
        ('{"span_id":"00000000-0000-0000-c36e-4f2938f27b97"}', "trace id missing or not a UUID"),
        ('{"trace_id":"390c39af5d4149394728c63199e54586"}', "span id missing or not a UUID"),
        (
            '{"trace_id":"00000000-0000-0000-0000-000000000000",'
            '"span_id":"00000000-0000-0000-c36e-4f2938f27b97"}',
            "trace id is all zeros",
        ),
        (
            '{"trace_id":"390c39af5d4149394728c63199e54586",'
            '"span_id":"00000000-0000-0000-0000-000000000000"}',
            "span id is all zeros",
        ),
        (
            '{"trace_id":"390c39af5d4149394728c63199e54586",'
            '"span_id":"390c39af5d4149394728c63199e54586"}',
            "span id has its upper 64 bits set",
        ),
        ('{"a":' + "x" * 9000 + "}", "longer than 8192 bytes"),
        ("[" * 20 + "]" * 20, "not a JSON object"),
        ('{"a":' + "[" * 20 + "]" * 20 + "}", "JSON nested deeper than 16 levels"),
        ("", "empty value"),
        ("   ", "empty value"),
    ],
)
def test_decode_invalid_says_why_and_exits_1(
    capsys: pytest.CaptureFixture[str], value: str, reason: str
) -> None:
    code, out, err = run(capsys, "decode", value)
    assert code == 1
    assert out == ""
    assert err == f"invalid: {reason}\n"


def test_decode_reads_stdin_when_no_value(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(PYTHON_HEADER + "\n"))
    code, out, _ = run(capsys, "decode")
    assert code == 0
    assert fields(out)["trace_id_hex"] == "390c39af5d4149394728c63199e54586"


def test_decode_from_stdin_of_the_real_command() -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "laminar_middleware.cli", "decode"],
        input=TS_HEADER,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert "118901d5dec023991e5875a2ed3a685b" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "laminar_middleware.cli", "decode"],
        input='{"trace_id": 1}',
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1
    assert bad.stderr == "invalid: trace id missing or not a UUID\n"
    assert bad.stdout == ""


# --- encode -----------------------------------------------------------------------------------


def test_encode_then_decode_round_trip(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys,
        "encode",
        "--trace-id",
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "--span-id",
        "00f067aa0ba902b7",
        "--path",
        "checkout/charge",
        "--user-id",
        "user-42",
        "--session-id",
        "sess-7",
        "--trace-type",
        "DEFAULT",
        "--metadata",
        '{"tenant": "acme", "flags": ["a", "b"]}',
    )
    assert (code, err) == (0, "")
    value = out.strip()
    ctx = LaminarSpanContext.parse(value)
    assert ctx is not None
    assert ctx.trace_id == 0x4BF92F3577B34DA6A3CE929D0E0E4736
    assert ctx.span_id == 0x00F067AA0BA902B7
    assert ctx.span_path == ("checkout", "charge")
    assert ctx.span_ids_path[-1] == "00000000-0000-0000-00f0-67aa0ba902b7"
    assert (ctx.user_id, ctx.session_id, ctx.trace_type) == ("user-42", "sess-7", "DEFAULT")
    assert ctx.serialize() == value  # the package's own form, byte for byte

    code, out, _ = run(capsys, "decode", "--json", value)
    assert code == 0
    decoded = json.loads(out)
    assert decoded["trace_id_hex"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert decoded["span_id_hex"] == "00f067aa0ba902b7"
    assert decoded["span_path"] == ["checkout", "charge"]
    assert decoded["metadata"] == {"tenant": "acme", "flags": ["a", "b"]}


def test_encode_accepts_uuid_ids(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys,
        "encode",
        "--trace-id",
        "390c39af-5d41-4939-4728-c63199e54586",
        "--span-id",
        "00000000-0000-0000-c36e-4f2938f27b97",
        "--path",
        "service_a",
    )
    assert code == 0
    assert out.strip() == PYTHON_HEADER


def test_encode_without_ids_makes_random_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    values = set()
    for _ in range(3):
        code, out, _ = run(capsys, "encode")
        assert code == 0
        assert LaminarSpanContext.parse(out.strip()) is not None
        values.add(out)
    assert len(values) == 3


def test_encode_curl_is_one_shell_word_after_dash_h(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "encode", "--user-id", 'o\'brien "quoted"', "--curl")
    assert code == 0
    words = shlex.split(out)
    assert len(words) == 2
    assert words[0] == "-H"
    name, _, value = words[1].partition(": ")
    assert name == HEADER_NAME
    ctx = LaminarSpanContext.parse(value)
    assert ctx is not None
    assert ctx.user_id == 'o\'brien "quoted"'


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["--trace-id", "zz"], "invalid: 'zz' is not a hex id or UUID"),
        (["--trace-id", "0"], "invalid: '0' is not a non-zero 128-bit id"),
        (["--span-id", "1" + "0" * 16], "is not a non-zero 64-bit id"),
        (["--metadata", "{oops"], "invalid: Expecting property name"),
        (["--metadata", "[1]"], "invalid: --metadata must be a JSON object"),
    ],
)
def test_encode_invalid_input_says_why_and_exits_1(
    capsys: pytest.CaptureFixture[str], argv: list[str], reason: str
) -> None:
    code, out, err = run(capsys, "encode", *argv)
    assert code == 1
    assert out == ""
    assert reason in err


def test_decode_stdin_that_is_not_utf8_says_so() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "laminar_middleware.cli", "decode"],
        input=b'{"trace_id": "\xff"}',
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr == b"invalid: not valid UTF-8\n"


def test_decode_non_ascii_names_on_an_ascii_terminal() -> None:
    header = LaminarSpanContext(1, 2, span_path=("résumé",), span_ids_path=(f"{2:032x}",))
    done = subprocess.run(
        [sys.executable, "-m", "laminar_middleware.cli", "decode", header.serialize()],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONIOENCODING": "ascii"},
    )
    assert done.returncode == 0, done.stderr
    assert '["r\\xe9sum\\xe9"]' in done.stdout
