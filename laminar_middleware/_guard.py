"""Failure containment: the one place where this package swallows its own errors.

Everything the package does on behalf of a request goes through `guard` (or, where a
`with` block or an `await` is in the way, catches and calls `internal_error`), so a bug of
ours, a strange scope or an exporter that raises becomes a rate-limited log line instead of
a changed response.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Final, TypeVar

__all__ = [
    "RateLimitedLogger",
    "guard",
    "internal_error",
    "log_bad_header",
    "log_bad_setting",
    "log_policy_error",
    "logger",
    "preview",
]

T = TypeVar("T")

logger: Final = logging.getLogger("laminar_middleware")

PREVIEW_CHARS: Final = 64


class RateLimitedLogger:
    """WARNING lines, at most `per_minute` of them, the next one saying how many were dropped."""

    def __init__(self, log: logging.Logger, per_minute: int = 10) -> None:
        self._log = log
        self._per_minute = per_minute
        self._lock = threading.Lock()
        self._window_start = 0.0
        self._emitted = 0
        self._suppressed = 0

    def warning(self, message: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._window_start >= 60.0:
                self._window_start = now
                self._emitted = 0
            if self._emitted >= self._per_minute:
                self._suppressed += 1
                return
            self._emitted += 1
            suppressed, self._suppressed = self._suppressed, 0
        if suppressed:
            message += " (%d similar lines suppressed)"
            args = (*args, suppressed)
        self._log.warning(message, *args, exc_info=exc_info)


_bad_input = RateLimitedLogger(logger)
_internal = RateLimitedLogger(logger)


def preview(value: object) -> str:
    """At most the first 64 characters of an untrusted value, escaped for a log line."""
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value[:PREVIEW_CHARS]).decode("utf-8", "backslashreplace")
    else:
        text = str(value)[:PREVIEW_CHARS]
    return ascii(text)


def log_bad_header(reason: str, value: object) -> None:
    _bad_input.warning("ignored an invalid Laminar span context (%s): %s", reason, preview(value))


_reported: set[tuple[str, str]] = set()
_reported_lock = threading.Lock()


def log_bad_setting(what: str, value: object, accepted: str, using: str) -> None:
    """A bad option or environment variable: one ERROR line per process per distinct
    mistake, however many components read it, then the caller uses its safe default."""
    # Not a string: its repr, escaped and cut the same way, without the quotes ascii() adds.
    shown = preview(value) if isinstance(value, str) else ascii(repr(value)[:PREVIEW_CHARS])[1:-1]
    with _reported_lock:
        if (what, shown) in _reported:
            return
        _reported.add((what, shown))
    logger.error(
        "laminar_middleware: bad setting %s=%s (accepted: %s); using %s",
        what,
        shown,
        accepted,
        using,
    )


def log_policy_error(message: str) -> None:
    """A user-supplied callable answered nonsense: rate-limited, as it may happen per request."""
    _internal.warning("laminar_middleware: %s", message)


def internal_error(where: str) -> None:
    """Log the exception being handled; call from an `except Exception` block."""
    _internal.warning("laminar_middleware: internal error in %s, ignored", where, exc_info=True)


def guard(where: str, default: T, func: Callable[..., T], *args: object) -> T:
    """`func(*args)`, or `default` (and a log line) when it raises."""
    try:
        return func(*args)
    except Exception:
        internal_error(where)
        return default
