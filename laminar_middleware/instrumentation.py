"""`LaminarInstrumentor`: the `laminar` entry of `opentelemetry_instrumentor`, so that
`opentelemetry-instrument` sets the package up with no code change (needs the `auto` extra)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from opentelemetry.instrumentation.instrumentor import (  # type: ignore[attr-defined]
    BaseInstrumentor,
)

from ._auto import instrument, uninstrument

__all__ = ["LaminarInstrumentor"]


class LaminarInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Every Starlette, FastAPI, Flask, Django and aiohttp app gets the inbound middleware,
    every httpx client, requests session and aiohttp session made afterwards the outbound
    hook, every task queue its hooks. Options as `instrument()`."""

    def instrumentation_dependencies(self) -> Collection[str]:
        return ()

    def _instrument(self, **kwargs: Any) -> None:
        instrument(**{k: v for k, v in kwargs.items() if k != "tracer_provider" or v})

    def _uninstrument(self, **kwargs: Any) -> None:
        uninstrument()
