"""The wire format of Laminar's span context: a JSON string <-> `LaminarSpanContext`.

Pure: no OpenTelemetry, no I/O, no imports from the rest of the package. Parsing follows
OpenTelemetry's `TraceContextTextMapPropagator` in spirit: strict about the ids, silent
about everything else. A bad required field refuses the whole header; a bad optional field
is dropped on its own so the trace still joins. Nothing here raises on input.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from math import isfinite
from types import MappingProxyType
from typing import Any, Final

__all__ = [
    "HEADER_NAME",
    "HEADER_NAMES_LOWER",
    "HEADER_NAME_ALIAS",
    "MAX_HEADER_BYTES",
    "MAX_METADATA_KEYS",
    "MAX_PATH_ENTRIES",
    "MAX_STRING_BYTES",
    "TRACE_TYPES",
    "LaminarSpanContext",
    "format_uuid",
    "parse_with_reason",
    "thaw",
    "trusted_context",
]

HEADER_NAME: Final = "X-Laminar-Span-Context"
# Some Laminar integrations send the header under this name.
HEADER_NAME_ALIAS: Final = "laminar-span-context"
# Both names as they compare: header names are case-insensitive.
HEADER_NAMES_LOWER: Final = (HEADER_NAME.lower(), HEADER_NAME_ALIAS)

MAX_HEADER_BYTES: Final = 8 * 1024
MAX_PATH_ENTRIES: Final = 256
MAX_STRING_BYTES: Final = 1024
MAX_METADATA_KEYS: Final = 64
MAX_NESTING: Final = 16
TRACE_TYPES: Final = frozenset({"DEFAULT", "EVALUATION"})

_EMPTY_METADATA: Final[Mapping[str, Any]] = MappingProxyType({})

# uuid.UUID() also accepts signs, underscores and stray dashes (it calls int(x, 16)), so the
# accepted spellings are spelled out: 32 hex digits or 8-4-4-4-12, optionally in braces or
# behind urn:uuid:, any letter case.
_UUID_RE: Final = re.compile(
    r"(?:urn:uuid:)?(\{)?"
    r"([0-9a-fA-F]{8})(-?)([0-9a-fA-F]{4})\3([0-9a-fA-F]{4})\3([0-9a-fA-F]{4})\3([0-9a-fA-F]{12})"
    r"(?(1)\})",
    re.IGNORECASE,
)
# The spelling both SDKs write, checked first: one match without groups, then int().
_CANONICAL_UUID_RE: Final = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
# An unclosed string ends at the end of the text: without `\\?\Z` a string of escaped
# quotes that never closes makes the scan quadratic.
_STRUCTURE_RE: Final = re.compile(r'"(?:[^"\\]|\\.)*(?:"|\\?\Z)|[\[\]{}]', re.DOTALL)
_SCALARS: Final = (str, int, float, bool)


class _Invalid:
    """Stands in for NaN and Infinity, which JSON does not have; fails every type check."""


_INVALID: Final = _Invalid()
# Made once: json.loads with keyword arguments builds a new decoder on every call.
_DECODER: Final = json.JSONDecoder(parse_constant=lambda _: _INVALID)
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"))


def format_uuid(value: int) -> str:
    """An OpenTelemetry id as Laminar writes it: a lowercase hyphenated UUID."""
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _parse_uuid(value: object) -> int | None:
    if not isinstance(value, str) or len(value) > 45:
        return None
    if len(value) == 36 and _CANONICAL_UUID_RE.fullmatch(value) is not None:
        return int(value.replace("-", ""), 16)
    match = _UUID_RE.fullmatch(value)
    if match is None:
        return None
    return int("".join(match.group(2, 4, 5, 6, 7)), 16)


def _utf8_len(value: str) -> int:
    # ASCII strings (nearly all of them) need no encoding to be measured.
    return len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))


# A string of at most this many characters is within MAX_STRING_BYTES whatever it holds.
_SHORT_CHARS: Final = MAX_STRING_BYTES // 4


def _short_string(value: object) -> bool:
    return isinstance(value, str) and (
        len(value) <= _SHORT_CHARS or _utf8_len(value) <= MAX_STRING_BYTES
    )


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """What json.dumps can write: the frozen mappings and tuples back as dicts and lists."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


def _scalar_ok(value: object) -> bool:
    if isinstance(value, str):
        return len(value) <= _SHORT_CHARS or _utf8_len(value) <= MAX_STRING_BYTES
    if value is None or isinstance(value, int):  # bool is an int
        return True
    return isinstance(value, float) and isfinite(value)


def _list_ok(value: list[Any] | tuple[Any, ...], nested_ok: bool) -> bool:
    """A metadata list both SDKs accept: scalars or, one level down (`nested_ok`), lists of
    scalars."""
    for item in value:
        if isinstance(item, (list, tuple)):
            if not nested_ok or not _list_ok(item, False):
                return False
        elif not _scalar_ok(item):
            return False
    return True


def _frozen_list(value: list[Any] | tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple([tuple(item) if isinstance(item, list) else item for item in value])


def _checked_metadata(metadata: Mapping[str, Any], parsed: bool) -> Mapping[str, Any] | None:
    """Metadata both SDKs accept (two levels at most, dicts only at the first, at most
    MAX_METADATA_KEYS keys in all, strings within MAX_STRING_BYTES), or None: the caller
    drops it whole. Checked and converted in one pass:

    - `parsed`: a dict fresh from json, which is ours to change: frozen in place (lists
      become tuples, dicts read-only mappings) and returned read-only.
    - otherwise a context's metadata, for json: a dict copy whose inner mappings are dicts.
    """
    keys = len(metadata)
    if keys > MAX_METADATA_KEYS:
        return None
    result: dict[str, Any] = metadata if parsed else {}  # type: ignore[assignment]
    for key, value in metadata.items():
        if not isinstance(key, str) or (
            len(key) > _SHORT_CHARS and _utf8_len(key) > MAX_STRING_BYTES
        ):
            return None
        if isinstance(value, str):  # the usual case first
            if len(value) > _SHORT_CHARS and _utf8_len(value) > MAX_STRING_BYTES:
                return None
        elif isinstance(value, (list, tuple)):
            if not _list_ok(value, True):
                return None
            if parsed:
                value = _frozen_list(value)
        elif isinstance(value, Mapping):
            keys += len(value)
            if keys > MAX_METADATA_KEYS:
                return None
            for inner_key, inner in value.items():
                if not isinstance(inner_key, str) or (
                    len(inner_key) > _SHORT_CHARS and _utf8_len(inner_key) > MAX_STRING_BYTES
                ):
                    return None
                if isinstance(inner, (list, tuple)):
                    if not _list_ok(inner, False):
                        return None
                    if parsed:  # a dict from json; an existing key: safe while iterating
                        value[inner_key] = tuple(inner)  # type: ignore[index]
                elif not _scalar_ok(inner):
                    return None
            value = MappingProxyType(value) if parsed else dict(value)
        elif not _scalar_ok(value):
            return None
        result[key] = value  # parsed: an existing key, so safe while iterating
    return MappingProxyType(result) if parsed else result


def _path_ok(path: object) -> bool:
    if not isinstance(path, (list, tuple)) or len(path) > MAX_PATH_ENTRIES:
        return False
    for entry in path:  # _short_string, inlined: this runs for every entry of every header
        if not isinstance(entry, str) or (
            len(entry) > _SHORT_CHARS and _utf8_len(entry) > MAX_STRING_BYTES
        ):
            return False
    return True


def _too_deep(text: str) -> bool:
    # A cheap count first: a header with few brackets cannot be deeply nested.
    if text.count("[") + text.count("{") <= MAX_NESTING:
        return False
    depth = 0
    for match in _STRUCTURE_RE.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > MAX_NESTING:
                return True
        elif token in "]}":
            depth -= 1
    return False


def _trace_type(value: object) -> str | None:
    return value if isinstance(value, str) and value in TRACE_TYPES else None


@dataclass(frozen=True)
class LaminarSpanContext:
    """A span context as Laminar's SDKs carry it between services.

    `trace_id` and `span_id` are OpenTelemetry's integer ids. Equal contexts compare and
    hash equal; `metadata` is a read-only mapping (lists inside it become tuples).
    """

    trace_id: int
    span_id: int
    span_path: tuple[str, ...] = ()
    span_ids_path: tuple[str, ...] = ()
    user_id: str | None = None
    session_id: str | None = None
    trace_type: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=lambda: _EMPTY_METADATA)

    def __post_init__(self) -> None:
        if not isinstance(self.span_path, tuple):
            object.__setattr__(self, "span_path", tuple(self.span_path))
        if not isinstance(self.span_ids_path, tuple):
            object.__setattr__(self, "span_ids_path", tuple(self.span_ids_path))
        if not isinstance(self.metadata, MappingProxyType):
            frozen = _freeze(self.metadata) if self.metadata else _EMPTY_METADATA
            object.__setattr__(self, "metadata", frozen)

    def __hash__(self) -> int:
        return hash(
            (
                self.trace_id,
                self.span_id,
                self.span_path,
                self.span_ids_path,
                self.user_id,
                self.session_id,
                self.trace_type,
                len(self.metadata),
            )
        )

    @property
    def is_valid(self) -> bool:
        return (
            isinstance(self.trace_id, int)
            and isinstance(self.span_id, int)
            and 0 < self.trace_id < 1 << 128
            and 0 < self.span_id < 1 << 64
        )

    @classmethod
    def parse(cls, value: str | bytes | bytearray | None) -> LaminarSpanContext | None:
        """The context in a header value, or None for anything that is not a valid one."""
        try:
            return _parse(value)[0]
        except Exception:  # the promise is "never raises": a bug here is a refusal
            return None

    def serialize(self) -> str:
        """The header value: the Python SDK's JSON byte for byte, escaped to pure ASCII.

        Fields this package would refuse are left out (metadata first, then the paths) so
        that every SDK, and this package, reads the result back.
        """
        if not self.is_valid:
            raise ValueError(
                "a LaminarSpanContext needs a non-zero 128-bit trace id and 64-bit span id"
            )
        span_path: tuple[str, ...] | list[str] = self.span_path
        span_ids_path: tuple[str, ...] | list[str] = self.span_ids_path
        if len(span_path) != len(span_ids_path) or not (
            _path_ok(span_path) and _path_ok(span_ids_path)
        ):
            span_path = span_ids_path = ()
        metadata = (
            _checked_metadata(self.metadata, parsed=False)
            if self.metadata and isinstance(self.metadata, Mapping)
            else None
        )
        data = {
            "trace_id": format_uuid(self.trace_id),
            "span_id": format_uuid(self.span_id),
            "is_remote": False,
            "span_path": span_path,
            "span_ids_path": span_ids_path,
            "user_id": self.user_id if _short_string(self.user_id) else None,
            "session_id": self.session_id if _short_string(self.session_id) else None,
            "trace_type": _trace_type(self.trace_type),
            "metadata": {} if metadata is None else metadata,
            "debug": None,
        }
        text = _ENCODER.encode(data)
        if len(text) > MAX_HEADER_BYTES and data["metadata"]:
            data["metadata"] = {}
            text = _ENCODER.encode(data)
        if len(text) > MAX_HEADER_BYTES:
            data["span_path"] = data["span_ids_path"] = ()
            text = _ENCODER.encode(data)
        return text


def _checked_context(
    trace_id: int,
    span_id: int,
    span_path: tuple[str, ...],
    span_ids_path: tuple[str, ...],
    user_id: str | None,
    session_id: str | None,
    trace_type: str | None,
    metadata: Mapping[str, Any],
) -> LaminarSpanContext:
    """A `LaminarSpanContext` from values the parser has already checked and frozen.

    The same object the dataclass constructor makes, without its per-field frozen
    `__setattr__` and `__post_init__`, which cost more than the rest of a parse.
    """
    context = object.__new__(LaminarSpanContext)
    fields = context.__dict__
    fields["trace_id"] = trace_id
    fields["span_id"] = span_id
    fields["span_path"] = span_path
    fields["span_ids_path"] = span_ids_path
    fields["user_id"] = user_id
    fields["session_id"] = session_id
    fields["trace_type"] = trace_type
    fields["metadata"] = metadata
    return context


def trusted_context(
    trace_id: int, span_id: int, span_path: tuple[str, ...], span_ids_path: tuple[str, ...]
) -> LaminarSpanContext:
    """A context with ids and paths only, from values this package made itself (span ids,
    attribute tuples): built without the dataclass's checks. `serialize` still checks."""
    return _checked_context(
        trace_id, span_id, span_path, span_ids_path, None, None, None, _EMPTY_METADATA
    )


def parse_with_reason(
    value: str | bytes | bytearray | None,
) -> tuple[LaminarSpanContext | None, str]:
    """Parse a header value; with None, say why it was refused ('' when it was empty)."""
    try:
        return _parse(value)
    except Exception as exc:  # the promise is "never raises": a bug here is a refusal
        return None, f"unexpected error while parsing: {type(exc).__name__}"


def _parse(value: str | bytes | bytearray | None) -> tuple[LaminarSpanContext | None, str]:
    if value is None:
        return None, ""
    if isinstance(value, (bytes, bytearray)):
        if len(value) > MAX_HEADER_BYTES:
            return None, f"longer than {MAX_HEADER_BYTES} bytes"
        try:
            text = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None, "not valid UTF-8"
    elif isinstance(value, str):
        if len(value) > MAX_HEADER_BYTES or (
            not value.isascii() and _utf8_len(value) > MAX_HEADER_BYTES
        ):
            return None, f"longer than {MAX_HEADER_BYTES} bytes"
        text = value
    else:
        return None, f"not a string but {type(value).__name__}"
    text = text.strip()
    if not text:
        return None, ""
    if text[0] != "{":
        return None, "not a JSON object"
    # _too_deep's own quick count, inlined: a header with few brackets cannot be deep.
    if text.count("[") + text.count("{") > MAX_NESTING and _too_deep(text):
        return None, f"JSON nested deeper than {MAX_NESTING} levels"
    try:
        data = _DECODER.decode(text)
    except (ValueError, RecursionError):
        return None, "not valid JSON"
    if not isinstance(data, dict):
        return None, "not a JSON object"

    # Both SDKs read both casings; snake_case wins when it has a value.
    get = data.get
    found = get("trace_id")
    trace_id = _parse_uuid(get("traceId") if found is None else found)
    if trace_id is None:
        return None, "trace id missing or not a UUID"
    if trace_id == 0:
        return None, "trace id is all zeros"
    found = get("span_id")
    span_id = _parse_uuid(get("spanId") if found is None else found)
    if span_id is None:
        return None, "span id missing or not a UUID"
    if span_id == 0:
        return None, "span id is all zeros"
    if span_id >> 64:
        return None, "span id has its upper 64 bits set"

    span_path: Any = get("span_path")
    if span_path is None:
        span_path = get("spanPath")
    span_ids_path: Any = get("span_ids_path")
    if span_ids_path is None:
        span_ids_path = get("spanIdsPath")
    if (
        span_path
        and _path_ok(span_path)
        and _path_ok(span_ids_path)
        and len(span_path) == len(span_ids_path)
    ):
        paths: tuple[tuple[str, ...], tuple[str, ...]] = (tuple(span_path), tuple(span_ids_path))
    else:
        paths = ((), ())

    user_id = get("user_id")
    if user_id is None:
        user_id = get("userId")
    if user_id is not None and not _short_string(user_id):
        user_id = None
    session_id = get("session_id")
    if session_id is None:
        session_id = get("sessionId")
    if session_id is not None and not _short_string(session_id):
        session_id = None
    trace_type = get("trace_type")
    if trace_type is None:
        trace_type = get("traceType")
    if trace_type is not None:
        trace_type = _trace_type(trace_type)
    metadata = get("metadata")
    if metadata and isinstance(metadata, dict):
        metadata = _checked_metadata(metadata, parsed=True) or _EMPTY_METADATA
    else:
        metadata = _EMPTY_METADATA
    return (
        _checked_context(
            trace_id, span_id, paths[0], paths[1], user_id, session_id, trace_type, metadata
        ),
        "",
    )
