"""The `laminar-middleware` command: decode and encode headers by hand, and run the demo."""

from __future__ import annotations

import argparse
import io
import json
import re
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from .codec import (
    HEADER_NAME,
    HEADER_NAME_ALIAS,
    LaminarSpanContext,
    format_uuid,
    parse_with_reason,
)

__all__ = ["main"]


def _describe(ctx: LaminarSpanContext) -> dict[str, Any]:
    return {
        "trace_id": format_uuid(ctx.trace_id),
        "trace_id_hex": f"{ctx.trace_id:032x}",
        "span_id": format_uuid(ctx.span_id),
        "span_id_hex": f"{ctx.span_id:016x}",
        "span_path": list(ctx.span_path),
        "span_ids_path": list(ctx.span_ids_path),
        "user_id": ctx.user_id,
        "session_id": ctx.session_id,
        "trace_type": ctx.trace_type,
        "metadata": json.loads(json.dumps(dict(ctx.metadata), default=_plain)),
    }


def _plain(value: Any) -> Any:
    return dict(value) if hasattr(value, "items") else list(value)


# A value pasted with its header name in front, as curl -v, logs and proxies show it.
_NAMED = re.compile(
    rf"\s*(?:{re.escape(HEADER_NAME)}|{re.escape(HEADER_NAME_ALIAS)})\s*:", re.IGNORECASE
)


def _read_stdin() -> str | bytes:
    """All of stdin; as bytes when it is not UTF-8, so the codec can say so."""
    if sys.stdin.isatty():
        print("reading the header value from stdin (end with Ctrl-D)", file=sys.stderr)
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:
        return sys.stdin.read()
    data: bytes = stream.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data


def _decode(args: argparse.Namespace) -> int:
    value = args.value if args.value is not None else _read_stdin()
    if isinstance(value, str):
        named = _NAMED.match(value)
        if named:
            value = value[named.end() :]
    ctx, reason = parse_with_reason(value)
    if ctx is None:
        print(f"invalid: {reason or 'empty value'}", file=sys.stderr)
        return 1
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")  # names may not fit the terminal
    described = _describe(ctx)
    if args.json:
        print(json.dumps(described, indent=2, ensure_ascii=False))
    else:
        width = max(len(k) for k in described)
        for key, val in described.items():
            shown = val if isinstance(val, str) else json.dumps(val, ensure_ascii=False)
            print(f"{key:<{width}}  {shown}")
    return 0


def _parse_id(text: str, bits: int) -> int:
    digits = text.strip().lower().replace("-", "")
    if digits.startswith("0x"):
        digits = digits[2:]
    if not re.fullmatch(r"[0-9a-f]{1,32}", digits):
        raise ValueError(f"{text!r} is not a hex id or UUID")
    value = int(digits, 16)
    if not 0 < value < 1 << bits:
        raise ValueError(f"{text!r} is not a non-zero {bits}-bit id")
    return value


def _encode(args: argparse.Namespace) -> int:
    import random

    try:
        trace_id = _parse_id(args.trace_id, 128) if args.trace_id else random.getrandbits(128) or 1
        span_id = _parse_id(args.span_id, 64) if args.span_id else random.getrandbits(64) or 1
        metadata = json.loads(args.metadata) if args.metadata else {}
    except ValueError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    if not isinstance(metadata, dict):
        print("invalid: --metadata must be a JSON object", file=sys.stderr)
        return 1
    path = tuple(args.path.split("/")) if args.path else ()
    ids = tuple(
        format_uuid(span_id if i == len(path) - 1 else random.getrandbits(64) or 1)
        for i in range(len(path))
    )
    ctx = LaminarSpanContext(
        trace_id=trace_id,
        span_id=span_id,
        span_path=path,
        span_ids_path=ids,
        user_id=args.user_id,
        session_id=args.session_id,
        trace_type=args.trace_type,
        metadata=metadata,
    )
    value = ctx.serialize()
    if LaminarSpanContext.parse(value) != ctx:
        print("warning: some fields were over the limits and were left out", file=sys.stderr)
    if args.curl:
        print(f"-H {shlex.quote(f'{HEADER_NAME}: {value}')}")
    else:
        print(value)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(as_json=args.json, export=args.export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="laminar-middleware",
        description="Laminar span-context propagation: decode, encode, demo.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    decode = sub.add_parser("decode", help="explain an X-Laminar-Span-Context value")
    decode.add_argument(
        "value",
        nargs="?",
        help="the header value, optionally after 'X-Laminar-Span-Context:' (stdin if absent)",
    )
    decode.add_argument("--json", action="store_true", help="print JSON")
    decode.set_defaults(func=_decode)

    encode = sub.add_parser("encode", help="make a header value, e.g. for curl")
    encode.add_argument("--trace-id", help="32 hex digits or a UUID (random if absent)")
    encode.add_argument("--span-id", help="16 hex digits or a padded UUID (random if absent)")
    encode.add_argument("--path", help="span path, names separated by '/'")
    encode.add_argument("--user-id")
    encode.add_argument("--session-id")
    encode.add_argument("--trace-type", choices=["DEFAULT", "EVALUATION"])
    encode.add_argument("--metadata", help="a JSON object")
    encode.add_argument("--curl", action="store_true", help="print as a curl -H argument")
    encode.set_defaults(func=_encode)

    demo = sub.add_parser(
        "demo",
        help="run services and show one connected trace",
        description=(
            "Start a FastAPI service (uvicorn) and a Flask service (werkzeug) on 127.0.0.1,"
            " send one request through both and through a SQLite job queue to a worker,"
            " and print the one trace it makes. Needs no account and no network."
        ),
    )
    demo.add_argument("--json", action="store_true", help="print the spans as JSON")
    demo.add_argument(
        "--export", choices=["otlp"], help="send the spans to OTEL_EXPORTER_OTLP_* instead"
    )
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
