"""Failure containment: the one place where this package swallows its own errors.

Every entry point from the outside world (a middleware called by the server, a wrapped
`send` or `start_response`, a transport called by a client, a span processor called by the
SDK, a propagator, a public helper) runs this package's work inside `with contained("what"):`,
so a bug of ours, a strange scope or an exporter that raises becomes a rate-limited log line
instead of a changed response. The code below an entry point does not guard itself: one
boundary, no guard inside a guard.
"""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType
from typing import Final

__all__ = [
    "RateLimitedLogger",
    "contained",
    "internal_error",
    "log_bad_header",
    "log_bad_setting",
    "log_policy_error",
    "logger",
    "preview",
]

logger: Final = logging.getLogger("laminar_middleware")

PREVIEW_CHARS: Final = 64


ExcInfo = bool | tuple[type[BaseException], BaseException, TracebackType | None]


class RateLimitedLogger:
    """WARNING lines, at most `per_minute` of them, the next one saying how many were dropped."""

    def __init__(self, log: logging.Logger, per_minute: int = 10) -> None:
        self._log = log
        self._per_minute = per_minute
        self._lock = threading.Lock()
        self._window_start = 0.0
        self._emitted = 0
        self._suppressed = 0

    def warning(self, message: str, *args: object, exc_info: ExcInfo = False) -> None:
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
# The user's own hooks: a separate budget, so a hook raising on every request cannot hide
# this package's own errors.
_user_code = RateLimitedLogger(logger)


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


def internal_error(where: str, exc_info: ExcInfo = True) -> None:
    """Log an exception of ours (the one being handled, unless given), rate-limited."""
    _internal.warning("laminar_middleware: internal error in %s, ignored", where, exc_info=exc_info)


class contained:
    """`with contained("what"):` - an `Exception` raised in the block is logged (rate-limited)
    and swallowed; cancellation and exit (`BaseException`) pass. Stateless, so one instance
    per place can be made once and entered again and again on the hot path.

    `theirs=True` marks a block that runs the user's own code (a hook): its failure is
    logged as theirs, not as an internal error of this package."""

    __slots__ = ("theirs", "what")

    def __init__(self, what: str, *, theirs: bool = False) -> None:
        self.what = what
        self.theirs = theirs

    # A builtin, so entering runs no Python frame: these blocks sit on every request.
    __enter__ = staticmethod(tuple)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if kind is None or value is None or not issubclass(kind, Exception):
            return False
        if self.theirs:
            _user_code.warning(
                "laminar_middleware: %s raised; ignored, the request goes on",
                self.what,
                exc_info=(kind, value, traceback),
            )
        else:
            internal_error(self.what, (kind, value, traceback))
        return True
