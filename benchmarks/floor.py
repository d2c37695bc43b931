"""The "floor" variants of the benchmarks: what the OpenTelemetry SDK alone charges for the
span this package must record, with nothing of this package in the way.

Each floor does the least any implementation of the inbound and outbound rules could do
per request: one SDK span with the same name, kind and attributes as this package's span
(the HTTP semantic-convention attributes and Laminar's two path attributes), made current while
the app or the inner send runs, and ended. Outbound it also writes the Laminar header
and the W3C headers, as the package promises. It skips everything else this package does: the
inbound header is not parsed (the parent context is made once, up front), there is no trust
policy, no exclusion list, no fail-open guards, no route naming for early readers, no
streaming support, no de-duplication. So the floor is not a usable middleware: it is the
bound below which no middleware doing this job on this SDK can go, reported beside the
targets so a reader sees how much of a ratio is the SDK's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags, Tracer

from laminar_middleware.codec import LaminarSpanContext, format_uuid

SERVER_ATTRIBUTES = {
    "http.request.method": "GET",
    "url.path": "/items/42",
    "url.scheme": "http",
    "server.address": "service-b.internal",
    "server.port": 8000,
    "client.address": "10.0.0.1",
    "user_agent.original": "bench/1.0",
}


def remote_parent(remote: LaminarSpanContext) -> otel_context.Context:
    span_context = SpanContext(
        remote.trace_id, remote.span_id, is_remote=True, trace_flags=TraceFlags(1)
    )
    return trace.set_span_in_context(NonRecordingSpan(span_context), otel_context.Context())


def _server_span(tracer: Tracer, remote: LaminarSpanContext, parent: Any) -> Any:
    # Without Laminar's SDK (as here) the caller's paths are not start attributes.
    return tracer.start_span("GET", parent, SpanKind.SERVER, dict(SERVER_ATTRIBUTES))


def _response_attributes(
    span: Any, remote: LaminarSpanContext, status: int, route: str
) -> dict[str, Any]:
    name = f"GET {route}"
    span.update_name(name)
    return {
        "http.response.status_code": status,
        "http.route": route,
        "lmnr.span.path": (*remote.span_path, name),
        "lmnr.span.ids_path": (
            *remote.span_ids_path,
            format_uuid(span.get_span_context().span_id),
        ),
    }


def floor_wsgi(app: Any, tracer: Tracer, remote: LaminarSpanContext) -> Callable[..., Any]:
    parent = remote_parent(remote)

    def middleware(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        span = _server_span(tracer, remote, parent)
        seen: list[str] = []

        def capture(status: str, headers: Any, *args: Any) -> Any:
            # The route while Flask still has the request (it clears it when done).
            seen.extend([status, getattr(environ["werkzeug.request"].url_rule, "rule", "")])
            return start_response(status, headers, *args)

        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            body = app(environ, capture)
            chunks = list(body)
            close = getattr(body, "close", None)
            if close is not None:
                close()
        finally:
            otel_context.detach(token)
        span.set_attributes(_response_attributes(span, remote, int(seen[0][:3]), seen[1]))
        span.end()
        return chunks

    return middleware


class FloorASGI:
    def __init__(self, app: Any, tracer: Tracer, remote: LaminarSpanContext) -> None:
        self.app = app
        self.tracer = tracer
        self.remote = remote
        self.parent = remote_parent(remote)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        span = _server_span(self.tracer, self.remote, self.parent)
        seen: list[int] = []

        async def capture(message: Any) -> None:
            if message["type"] == "http.response.start":
                seen.append(message["status"])
            await send(message)

        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            await self.app(scope, receive, capture)
        finally:
            otel_context.detach(token)
        route = getattr(scope.get("route"), "path_format", "")
        span.set_attributes(_response_attributes(span, self.remote, seen[0], route))
        span.end()


def name_in_headers(
    span: Any, ctx: Any, parent_attributes: Any, path: Any, headers: Any, textmap: Any
) -> otel_context.Context:
    """A just-started outbound span's ids path, and the Laminar and W3C headers naming it;
    returns the context with the span current."""
    span_context = span.get_span_context()
    ids = (*parent_attributes["lmnr.span.ids_path"], format_uuid(span_context.span_id))
    span.set_attribute("lmnr.span.ids_path", ids)
    headers["X-Laminar-Span-Context"] = LaminarSpanContext(
        span_context.trace_id, span_context.span_id, path, ids
    ).serialize()
    inner = trace.set_span_in_context(span, ctx)
    textmap.inject(headers, inner)
    return inner


class FloorOutbound:
    """The client side: a CLIENT span, the Laminar header and the W3C headers."""

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer
        self.textmap = propagate.get_global_textmap()

    def begin(
        self, method: str, url: str, host: str, port: int, headers: Any
    ) -> tuple[Any, object]:
        ctx = otel_context.get_current()
        parent = trace.get_current_span(ctx)
        parent_attributes: Any = parent.attributes  # type: ignore[attr-defined]
        path = (*parent_attributes["lmnr.span.path"], method)
        span = self.tracer.start_span(
            method,
            ctx,
            SpanKind.CLIENT,
            {
                "http.request.method": method,
                "url.full": url,
                "server.address": host,
                "server.port": port,
                "lmnr.span.path": path,
            },
        )
        inner = name_in_headers(span, ctx, parent_attributes, path, headers, self.textmap)
        return span, otel_context.attach(inner)

    @staticmethod
    def end(span: Any, token: object, status: int | None) -> None:
        otel_context.detach(token)  # type: ignore[arg-type]
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        span.end()


def floor_send(
    send: Callable[..., Any], floor: FloorOutbound, host: str, port: int
) -> Callable[..., Any]:
    """A requests `Session.send` (or an httpx transport's `handle_request`) with the floor."""

    def traced(request: Any, *args: Any, **kwargs: Any) -> Any:
        span, token = floor.begin(request.method, str(request.url), host, port, request.headers)
        status = None
        try:
            response = send(request, *args, **kwargs)
            status = response.status_code
            return response
        finally:
            floor.end(span, token, status)

    return traced


class FloorDjango:
    """A Django middleware (first in MIDDLEWARE): the route is Django's resolved pattern."""

    tracer: Tracer
    remote: LaminarSpanContext

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        self.parent = remote_parent(self.remote)

    def __call__(self, request: Any) -> Any:
        span = _server_span(self.tracer, self.remote, self.parent)
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            response = self.get_response(request)
        finally:
            otel_context.detach(token)
        route = getattr(request.resolver_match, "route", "")
        span.set_attributes(_response_attributes(span, self.remote, response.status_code, route))
        span.end()
        return response


def floor_aiohttp(tracer: Tracer, remote: LaminarSpanContext) -> Any:
    """An aiohttp middleware: the route is the matched resource's canonical form."""
    from aiohttp import web

    parent = remote_parent(remote)

    @web.middleware
    async def middleware(request: Any, handler: Any) -> Any:
        span = _server_span(tracer, remote, parent)
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            response = await handler(request)
        finally:
            otel_context.detach(token)
        route = request.match_info.route.resource.canonical
        span.set_attributes(_response_attributes(span, remote, response.status, route))
        span.end()
        return response

    return middleware


def floor_trace_config(floor: FloorOutbound) -> Any:
    """An aiohttp client `TraceConfig` with the floor's CLIENT span around each request."""
    import aiohttp

    config = aiohttp.TraceConfig()

    async def start(session: Any, trace_context: Any, params: Any) -> None:
        url = params.url
        trace_context.floor = floor.begin(
            params.method, str(url), url.host, url.port, params.headers
        )

    async def end(session: Any, trace_context: Any, params: Any) -> None:
        floor.end(*trace_context.floor, params.response.status)

    config.on_request_start.append(start)
    config.on_request_end.append(end)
    return config


class FloorCelery:
    """Celery's signals with the floor's spans: a PRODUCER span and the Laminar and W3C
    headers around each publish, a CONSUMER span (its parent built once, the header not
    parsed) current while each task runs; the attributes are ours."""

    def __init__(self, tracer: Tracer, remote: LaminarSpanContext) -> None:
        self.tracer = tracer
        self.remote = remote
        self.parent = remote_parent(remote)
        self.textmap = propagate.get_global_textmap()
        self.pending: dict[str, Any] = {}
        self.running: dict[str, tuple[Any, object]] = {}

    def _receivers(self) -> list[tuple[Any, Callable[..., None]]]:
        from celery import signals

        return [
            (signals.before_task_publish, self.before_publish),
            (signals.after_task_publish, self.after_publish),
            (signals.task_prerun, self.prerun),
            (signals.task_postrun, self.postrun),
        ]

    def connect(self) -> None:
        for signal, receiver in self._receivers():
            signal.connect(receiver, weak=False, dispatch_uid=f"floor.{receiver.__name__}")

    def disconnect(self) -> None:
        for signal, receiver in self._receivers():
            signal.disconnect(receiver, dispatch_uid=f"floor.{receiver.__name__}")

    def before_publish(
        self, sender: Any = None, headers: Any = None, routing_key: Any = None, **_: Any
    ) -> None:
        ctx = otel_context.get_current()
        parent_attributes: Any = trace.get_current_span(ctx).attributes  # type: ignore[attr-defined]
        name = f"publish {sender}"
        path = (*parent_attributes["lmnr.span.path"], name)
        span = self.tracer.start_span(
            name,
            ctx,
            SpanKind.PRODUCER,
            {
                "messaging.system": "celery",
                "messaging.operation.type": "send",
                "messaging.destination.name": routing_key,
                "messaging.message.id": headers["id"],
                "lmnr.span.path": path,
            },
        )
        name_in_headers(span, ctx, parent_attributes, path, headers, self.textmap)
        self.pending[headers["id"]] = span

    def after_publish(self, headers: Any = None, **_: Any) -> None:
        self.pending.pop(headers["id"]).end()

    def prerun(self, task_id: Any = None, task: Any = None, **_: Any) -> None:
        name = f"run {task.name}"
        request = task.request
        span = self.tracer.start_span(
            name,
            self.parent,
            SpanKind.CONSUMER,
            {
                "messaging.system": "celery",
                "messaging.operation.type": "process",
                "messaging.destination.name": request.delivery_info["routing_key"],
                "messaging.message.id": task_id,
                "celery.retries": request.retries,
                "lmnr.span.path": (*self.remote.span_path, name),
            },
        )
        ids = (*self.remote.span_ids_path, format_uuid(span.get_span_context().span_id))
        span.set_attribute("lmnr.span.ids_path", ids)
        self.running[task_id] = (span, otel_context.attach(trace.set_span_in_context(span)))

    def postrun(self, task_id: Any = None, **_: Any) -> None:
        span, token = self.running.pop(task_id)
        otel_context.detach(token)  # type: ignore[arg-type]
        span.end()
