"""`LaminarMiddleware` for Django, under WSGI and ASGI servers alike.

Put it first in `MIDDLEWARE`:

    MIDDLEWARE = ["laminar_middleware.django.LaminarMiddleware", ...]

Its options come from `settings.LAMINAR_MIDDLEWARE` (a dict of the WSGI middleware's
keyword options), then the environment, as for every middleware here. Django hands every
request the same `request.META` (a WSGI environ, also under ASGI), so the headers are read
as the WSGI middleware reads them. The span is named `METHOD route` once Django has resolved
the URL (`process_view`: `resolver_match.route`, with `include()` prefixes), records the
exception of a view that Django turned into a 500 (`process_exception`), is current while
a streaming response's chunks are made, and ends when the server closes the response (after
the last chunk of a streaming one), or when it drops the response unclosed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Final

from ._guard import contained, log_bad_setting
from ._server import InboundRequest, InboundTracer
from ._server_request import ServerRequest
from .config import INBOUND_OPTIONS
from .wsgi import _GETTER, _environ_key, _server_address, _wire_bytes

__all__ = ["LaminarMiddleware", "add_to_handler"]

MIDDLEWARE_PATH: Final = "laminar_middleware.django.LaminarMiddleware"

# Where the per-request object waits for process_view, process_exception and close().
_REQUEST_ATTRIBUTE: Final = "_laminar_request"


class LaminarMiddleware:
    """Opens a SERVER span per Django request, continuing the caller's Laminar context
    (`X-Laminar-Span-Context`), else the W3C one. Sync and async capable."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any], **options: Any) -> None:
        """Django passes `get_response` only: the options are `settings.LAMINAR_MIDDLEWARE`.
        `instrument()` passes its own."""
        from asgiref.sync import iscoroutinefunction, markcoroutinefunction

        self.get_response = get_response
        self._async = iscoroutinefunction(get_response)
        if self._async:
            markcoroutinefunction(self)
        if not options:
            from django.conf import settings

            options = getattr(settings, "LAMINAR_MIDDLEWARE", None)  # type: ignore[assignment]
        self._server = _configured(options)
        self._environ_keys = tuple(
            dict.fromkeys(_environ_key(n) for n in self._server.header_names)
        )

    def __call__(self, request: Any) -> Any:
        if self._async:
            return self._acall(request)
        with _STARTING:
            server_request = self._start(request)
        if server_request is None:
            return self.get_response(request)
        tokens = server_request.attach()
        try:
            response = self.get_response(request)
        except BaseException as exc:
            _finish(server_request, exc)
            raise
        finally:
            server_request.detach(tokens)
        _respond(server_request, response)
        return response

    async def _acall(self, request: Any) -> Any:
        with _STARTING:
            server_request = self._start(request)
        if server_request is None:
            return await self.get_response(request)
        tokens = server_request.attach()
        try:
            response = await self.get_response(request)
        except BaseException as exc:
            _finish(server_request, exc)
            raise
        finally:
            server_request.detach(tokens)
        _respond(server_request, response)
        return response

    def process_view(self, request: Any, view: Any, args: Any, kwargs: Any) -> None:
        # Django has resolved the URL: name the span now, so the view's spans see the route.
        with _ROUTED:
            server_request = getattr(request, _REQUEST_ATTRIBUTE, None)
            if isinstance(server_request, ServerRequest):
                server_request.set_route(_route_of(request))

    def process_exception(self, request: Any, exception: Exception) -> None:
        # Django turns the view's exception into a 500 itself: record it, it never reaches us.
        with _FAILED:
            server_request = getattr(request, _REQUEST_ATTRIBUTE, None)
            if isinstance(server_request, ServerRequest):
                server_request.fail(exception)

    def _start(self, request: Any) -> ServerRequest | None:
        server = self._server
        path = str(request.path)
        if server.excluded(path):
            return None
        meta = request.META
        traceparent = meta.get("HTTP_TRACEPARENT")
        tracestate = meta.get("HTTP_TRACESTATE")
        host = meta.get("HTTP_HOST")
        server_request = server.start(
            InboundRequest(
                meta.get("REQUEST_METHOD", "GET"),
                path,
                request.scheme or "http",
                [_wire_bytes(meta[k]) for k in self._environ_keys if k in meta],
                () if traceparent is None else (traceparent,),
                () if tracestate is None else (tracestate,),
                meta,
                _GETTER,
                request,
                host,
                None if host else _server_address(meta),
                meta.get("REMOTE_ADDR"),
                meta.get("HTTP_USER_AGENT"),
                lambda: _route_of(request),
            )
        )
        setattr(request, _REQUEST_ATTRIBUTE, server_request)
        return server_request


def _configured(options: object) -> InboundTracer:
    """The tracer for these options: unknown names and a non-dict are logged and ignored."""
    if options is not None and not isinstance(options, dict):
        log_bad_setting("settings.LAMINAR_MIDDLEWARE", options, "a dict of options", "none")
        options = None
    known: dict[str, Any] = {}
    for name, value in (options or {}).items():
        if name in INBOUND_OPTIONS:
            known[name] = value
        else:
            accepted = ", ".join(INBOUND_OPTIONS)
            log_bad_setting(f"settings.LAMINAR_MIDDLEWARE[{name!r}]", value, accepted, "nothing")
    with _CONFIGURING:
        return InboundTracer(**known)
    return InboundTracer()


def _route_of(request: Any) -> str | None:
    route = getattr(getattr(request, "resolver_match", None), "route", None)
    return route if isinstance(route, str) and route else None


def _respond(server_request: ServerRequest, response: Any) -> None:
    """The status now; the end when the server closes the response (after the last chunk),
    or when the response is dropped unclosed: Werkzeug's server skips `close()` when the
    client hangs up first."""
    with _RESPONDING:
        headers = (
            [(str(k), str(v)) for k, v in response.items()]
            if server_request.wants_response_headers
            else None
        )
        server_request.response_started(int(response.status_code), headers)
        if (
            getattr(response, "streaming", False)
            and getattr(response, "file_to_stream", None) is None
        ):
            _stream_inside(server_request, response)
        # Django's own list of what close() runs: no cycle through the response, so it is
        # freed (and the span ended) the moment the server lets it go.
        response._resource_closers.append(_EndWithResponse(server_request))
        return
    _end(server_request)  # the response could not be hooked: end the span now


def _stream_inside(server_request: ServerRequest, response: Any) -> None:
    """A streaming response's chunks are made with the span current, as the view's code is
    (the server iterates them after the middleware returned), and so is a sync body's own
    close. The parts are taken before
    Django maps them to bytes: no reference back to the response, which must stay free of
    cycles. A file streamed by the server's file wrapper is left alone."""
    parts = response._iterator
    if response.is_async:
        response.streaming_content = _async_parts(parts, server_request)
        return
    # Django closes the view's generator (its `finally` runs when the client went away):
    # with the span current, as its body ran. In Django's own list, whether or not the
    # server ever iterated the response.
    close = getattr(parts, "close", None)
    closers = response._resource_closers
    if close is not None and close in closers:
        closers[closers.index(close)] = _CloseInside(close, server_request)
    response.streaming_content = _parts(parts, server_request)


def _parts(parts: Iterator[Any], server_request: ServerRequest) -> Iterator[Any]:
    while True:
        # Current while each part is made only: not while the server writes it.
        tokens = server_request.attach()
        try:
            part = next(parts)
        except StopIteration:
            return
        except BaseException as exc:
            with _FAILED:
                server_request.fail(exc)
            raise
        finally:
            server_request.detach(tokens)
        yield part


class _CloseInside:
    """The view's own closer, called with the span current."""

    __slots__ = ("_close", "_request")

    def __init__(self, close: Callable[[], Any], server_request: ServerRequest) -> None:
        self._close = close
        self._request = server_request

    def __call__(self) -> None:
        tokens = self._request.attach()
        try:
            self._close()
        finally:
            self._request.detach(tokens)


async def _async_parts(
    parts: AsyncIterator[Any], server_request: ServerRequest
) -> AsyncIterator[Any]:
    while True:
        tokens = server_request.attach()
        try:
            part = await anext(parts)
        except StopAsyncIteration:
            return
        except BaseException as exc:
            with _FAILED:
                server_request.fail(exc)
            raise
        finally:
            server_request.detach(tokens)
        yield part


class _EndWithResponse:
    """Ends the span when called by the response's `close()`, or when collected with it:
    with no cycle through the response, the moment the server lets go of it."""

    __slots__ = ("_request",)

    def __init__(self, server_request: ServerRequest) -> None:
        self._request = server_request

    def __call__(self) -> None:
        _end(self._request)

    def __del__(self) -> None:
        if not self._request.ended:
            _end(self._request)

    def __reduce__(self) -> tuple[type[_Inert], tuple[()]]:
        # Django's cache middleware pickles the response: a cached copy has no span to end.
        return _Inert, ()


class _Inert:
    """What a pickled response's copy of `_EndWithResponse` becomes: a closer that does
    nothing."""

    __slots__ = ()

    def __call__(self) -> None:
        pass


def _finish(server_request: ServerRequest, exc: BaseException) -> None:
    with _FAILED:
        server_request.fail(exc)
    _end(server_request)


def _end(server_request: ServerRequest) -> None:
    with _ENDING:
        server_request.end()


_CONFIGURING: Final = contained("LaminarMiddleware (Django): settings.LAMINAR_MIDDLEWARE")
_STARTING: Final = contained("LaminarMiddleware (Django): starting the server span")
_ROUTED: Final = contained("LaminarMiddleware (Django): process_view")
_FAILED: Final = contained("LaminarMiddleware (Django): recording the view's exception")
_RESPONDING: Final = contained("LaminarMiddleware (Django): the response")
_ENDING: Final = contained("LaminarMiddleware (Django): ending the server span")


def add_to_handler(handler: Any, is_async: bool, options: dict[str, Any]) -> None:
    """Put the middleware outermost in a Django handler that has just loaded its middleware
    (`instrument()`, for a project whose `MIDDLEWARE` does not name it)."""
    from django.conf import settings

    if MIDDLEWARE_PATH in (getattr(settings, "MIDDLEWARE", None) or ()):
        return
    middleware = LaminarMiddleware(handler._middleware_chain, **options)
    # The same hook lists Django builds in load_middleware: outermost view hook first,
    # outermost exception hook last.
    handler._view_middleware.insert(0, middleware.process_view)
    handler._exception_middleware.append(middleware.process_exception)
    handler._middleware_chain = middleware
