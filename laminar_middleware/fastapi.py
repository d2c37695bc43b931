"""FastAPI: `instrument_fastapi(app)`, and FastAPI's own request span handed to the middleware.

FastAPI 0.14x and later open a SERVER span in `FastAPI.__call__`, outside every user
middleware, parented by whatever the global OpenTelemetry propagator extracts. Left alone,
that is a second SERVER span per request, in another trace. So for every FastAPI app the
ASGI middleware wraps, the app's telemetry gets a tracer provider that hands out a
non-recording span for SERVER spans and delegates everything else: FastAPI keeps its
metrics, its logs and its operation spans (`fastapi.dependencies`, `fastapi.endpoint`,
`fastapi.serialization`), which become children of the middleware's span, while the
request's one SERVER span is the middleware's, in the caller's trace, with the Laminar
attributes and the trust policy. That was chosen over turning FastAPI's tracing off
(`telemetry["tracing"] = False`), which also silences the operation spans. Apps made with
`telemetry={"tracing": False}` are left as they are. This relies on FastAPI's
`app._telemetry` dict; should it ever miss, the middleware enriches FastAPI's span instead.

How the middleware finds the app: `instrument_fastapi(app)` (and `instrument()`) is handed
it. `app.add_middleware(LaminarASGIMiddleware)` hands the middleware only the next ASGI app
inward, so its constructor, which Starlette calls from `build_middleware_stack` at the first
request, looks up the call stack for that method's `self` (`take_over_the_app_being_built`).
That is the only frame inspection in the package, and only runs when FastAPI is imported.
Should FastAPI still open a recording request span (its stack built some other way, or the
global provider set after the first request), `request_span_seen` switches the app over for
the requests after that one.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, Link, Span, SpanKind, Tracer, TracerProvider
from opentelemetry.util.types import Attributes

from ._guard import contained, logger
from .context import request_provider

__all__ = ["instrument_fastapi"]

_MAX_FRAMES: Final = 32
_TAKING_OVER: Final = contained("taking over FastAPI's request span")


def instrument_fastapi(app: Any, **options: Any) -> None:
    """Put `LaminarASGIMiddleware(**options)` first in `app`'s middleware and hand it
    FastAPI's request span. Calling it twice adds one middleware. An app that has already
    served a request cannot take new middleware (Starlette's rule): a WARNING says so."""
    from fastapi import FastAPI
    from starlette.middleware import Middleware

    from .asgi import LaminarASGIMiddleware

    if not isinstance(app, FastAPI):
        raise TypeError(f"expected a fastapi.FastAPI app, not {app!r}")
    if any(getattr(m, "cls", None) is LaminarASGIMiddleware for m in app.user_middleware):
        return
    if app.middleware_stack is not None:
        logger.warning(
            "laminar_middleware: this FastAPI app has served a request already, so it "
            "cannot take the middleware; call instrument_fastapi(app) before serving"
        )
        return
    take_over(app)
    app.user_middleware.insert(0, Middleware(LaminarASGIMiddleware, **options))


def take_over_the_app_being_built(app: object) -> TracerProvider | None:
    """For a middleware being built: take over the FastAPI app it wraps, or the one whose
    `build_middleware_stack` is building it. Returns FastAPI's own `tracer_provider` setting
    (None: none, or no FastAPI app)."""
    with _TAKING_OVER:
        found = app if _is_fastapi(app) else _app_being_built()
        return take_over(found) if found is not None else None
    return None


def _app_being_built() -> Any | None:
    frame = sys._getframe(2)
    for _ in range(_MAX_FRAMES):
        if frame is None:
            break
        if frame.f_code.co_name == "build_middleware_stack":
            candidate = frame.f_locals.get("self")
            if _is_fastapi(candidate):
                return candidate
        frame = frame.f_back  # type: ignore[assignment]
    return None


def take_over(app: Any) -> TracerProvider | None:
    """Make FastAPI's request span non-recording for this app; returns FastAPI's own
    `tracer_provider` setting (None: the global one)."""
    config: Any = getattr(app, "_telemetry", None)
    if not isinstance(config, dict):
        return None  # another FastAPI: the middleware enriches FastAPI's span instead
    inner = config.get("tracer_provider")
    if isinstance(inner, _NoServerSpanTracerProvider):
        return inner.inner
    # Without a provider FastAPI does not trace at all: nothing to take over (and
    # installing one would switch its telemetry on). If the global provider is set
    # later, `request_span_seen` catches up.
    if config.get("tracing", True) and (
        inner is not None or not _unconfigured(trace.get_tracer_provider())
    ):
        config["tracer_provider"] = _NoServerSpanTracerProvider(inner)
    return inner if isinstance(inner, TracerProvider) else None


def request_span_seen(scope: MutableMapping[str, Any], telemetry: object) -> None:
    """FastAPI opened a recording request span after all: switch the app over for the
    requests that follow (this one keeps FastAPI's span, which the middleware enriches)."""
    span = getattr(telemetry, "span", None)
    if span is None or not span.is_recording():
        return
    app = scope.get("app")
    if _is_fastapi(app):
        take_over(app)


def _is_fastapi(app: object) -> bool:
    fastapi = sys.modules.get("fastapi")
    return (
        fastapi is not None
        and isinstance(app, getattr(fastapi, "FastAPI", ()))
        and isinstance(getattr(app, "_telemetry", None), dict)
    )


def _unconfigured(provider: object) -> bool:
    # The API's placeholder until a real provider is set.
    return type(provider).__name__ == "ProxyTracerProvider"


def _suppressed(kind: SpanKind, context: Context | None) -> bool:
    # FastAPI's request span, and FastAPI's operation spans outside of a request span of
    # ours (an excluded path): they would be roots of traces of their own.
    return (
        kind is SpanKind.SERVER or not trace.get_current_span(context).get_span_context().is_valid
    )


class _NoServerSpanTracer(Tracer):
    """Delegates to a real tracer, except that a SERVER span is a non-recording one (and so
    is any span that would otherwise have no parent).

    With `args` (FastAPI has no tracer provider of its own set), a span under one of our
    server spans goes to that server span's provider when it is not the global one
    (Laminar's SDK): otherwise `fastapi.endpoint` would be exported elsewhere than its
    parent and its children, and the trace would break in Laminar."""

    def __init__(self, tracer: Tracer, args: tuple[Any, ...] | None = None) -> None:
        self._tracer = tracer
        self._args = args
        self._by_provider: dict[int, tuple[TracerProvider, Tracer]] = {}

    def _tracer_for(self, context: Context | None) -> Tracer:
        provider = request_provider(context) if self._args is not None else None
        if provider is None:
            return self._tracer
        cached = self._by_provider.get(id(provider))
        if cached is None or cached[0] is not provider:
            cached = (provider, provider.get_tracer(*(self._args or ())))
            self._by_provider[id(provider)] = cached
        return cached[1]

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> Span:
        if _suppressed(kind, context):
            return INVALID_SPAN
        return self._tracer_for(context).start_span(
            name,
            context,
            kind,
            attributes,
            links,
            start_time,
            record_exception,
            set_status_on_exception,
        )

    @contextmanager
    def start_as_current_span(  # type: ignore[override]
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[Span]:
        if _suppressed(kind, context):
            with trace.use_span(INVALID_SPAN, end_on_exit=False) as span:
                yield span
            return
        with self._tracer_for(context).start_as_current_span(
            name,
            context,
            kind,
            attributes,
            links,
            start_time,
            record_exception,
            set_status_on_exception,
            end_on_exit,
        ) as span:
            yield span


class _NoServerSpanTracerProvider(TracerProvider):
    """FastAPI's tracer provider while this middleware owns the request's SERVER span."""

    def __init__(self, inner: TracerProvider | None) -> None:
        self.inner = inner

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Attributes = None,
    ) -> Tracer:
        args = (instrumenting_module_name, instrumenting_library_version, schema_url, attributes)
        if self.inner is not None:  # the app chose FastAPI's provider: its choice stands
            return _NoServerSpanTracer(self.inner.get_tracer(*args))
        return _NoServerSpanTracer(trace.get_tracer_provider().get_tracer(*args), args)
