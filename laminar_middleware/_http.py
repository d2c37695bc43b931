"""HTTP facts both sides share: OpenTelemetry's known methods and the `error.type` of an
exception, so server and client spans describe the same things the same way."""

from __future__ import annotations

from typing import Final

__all__ = ["KNOWN_METHODS", "exception_type"]

# OpenTelemetry's known HTTP methods; anything else is "_OTHER" (a caller must not be able
# to mint span names with made-up methods).
KNOWN_METHODS: Final = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "QUERY", "TRACE"}
)


def exception_type(exc: BaseException) -> str:
    """`error.type` per the semantic conventions: the exception's fully qualified name."""
    cls = type(exc)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"
