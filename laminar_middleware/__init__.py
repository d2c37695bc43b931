"""Connect one trace across Python services with Laminar's `X-Laminar-Span-Context` header.

Importing this package needs only OpenTelemetry: the framework and client adapters are
loaded when first used.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .codec import HEADER_NAME, LaminarSpanContext
from .context import (
    continue_trace,
    deserialize_span_context,
    extract,
    inject,
    serialize_span_context,
)
from .processor import LaminarPathSpanProcessor
from .propagator import LaminarPropagator

if TYPE_CHECKING:  # the lazily loaded names, for type checkers
    from ._auto import instrument, uninstrument
    from .asgi import LaminarASGIMiddleware
    from .fastapi import instrument_fastapi
    from .flask import instrument_flask
    from .httpx import (
        AsyncLaminarTransport,
        LaminarTransport,
        instrument_httpx,
        uninstrument_httpx,
    )
    from .requests import instrument_requests, uninstrument_requests
    from .wsgi import LaminarWSGIMiddleware

__all__ = [
    "HEADER_NAME",
    "AsyncLaminarTransport",
    "LaminarASGIMiddleware",
    "LaminarPathSpanProcessor",
    "LaminarPropagator",
    "LaminarSpanContext",
    "LaminarTransport",
    "LaminarWSGIMiddleware",
    "__version__",
    "continue_trace",
    "deserialize_span_context",
    "extract",
    "inject",
    "instrument",
    "instrument_fastapi",
    "instrument_flask",
    "instrument_httpx",
    "instrument_requests",
    "serialize_span_context",
    "uninstrument",
    "uninstrument_httpx",
    "uninstrument_requests",
]

# Names whose modules import a framework or client: loaded on first access.
_LAZY: dict[str, str] = {
    "LaminarASGIMiddleware": ".asgi",
    "LaminarWSGIMiddleware": ".wsgi",
    "instrument_httpx": ".httpx",
    "LaminarTransport": ".httpx",
    "AsyncLaminarTransport": ".httpx",
    "instrument_fastapi": ".fastapi",
    "instrument_flask": ".flask",
    "uninstrument_httpx": ".httpx",
    "instrument_requests": ".requests",
    "uninstrument_requests": ".requests",
    "instrument": "._auto",
    "uninstrument": "._auto",
}


def __dir__() -> list[str]:
    return sorted(__all__)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'laminar_middleware' has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value
