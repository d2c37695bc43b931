"""`LaminarWSGIMiddleware`: the inbound middleware for Flask and any WSGI app.

Flask: `app.wsgi_app = LaminarWSGIMiddleware(app.wsgi_app, **options)`. The span is named by
the route with plain wrapping: when the app calls `start_response`, Flask has matched the
URL and Werkzeug keeps the request (with its `url_rule`) in `environ["werkzeug.request"]`.

The span is current while the app runs and while each chunk of the response is produced
(a streaming generator's spans are its children), and it ends when the server calls the
response iterable's `close()`, as WSGI servers do: after the last chunk (or, for a server
that drops the response unclosed, when the response is freed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import TracerProvider

from ._guard import contained
from ._server import InboundRequest, InboundTracer
from ._server_request import ServerRequest
from .config import (
    ExcludedPaths,
    ExcludedPathsOption,
    ServerRequestHook,
    ServerResponseHook,
    TrustOption,
    TrustPolicy,
    tolerant_options,
)

__all__ = ["REQUEST_ENVIRON_KEY", "LaminarWSGIMiddleware"]

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

# Where the middleware leaves its per-request object, for framework helpers (flask.py).
REQUEST_ENVIRON_KEY: Final = "laminar_middleware.request"


def _environ_key(header: str) -> str:
    return "HTTP_" + header.upper().replace("-", "_")


class _EnvironGetter(Getter[Environ]):
    """Reads request headers from a WSGI environ for the global OpenTelemetry propagator."""

    def get(self, carrier: Environ, key: str) -> list[str] | None:
        value = carrier.get(_environ_key(key))
        return None if value is None else [value]

    def keys(self, carrier: Environ) -> list[str]:
        return [k[5:].lower().replace("_", "-") for k in carrier if k.startswith("HTTP_")]


_GETTER: Final = _EnvironGetter()


def _wire_bytes(value: Any) -> Any:
    # PEP 3333 strings are the header's bytes decoded as latin-1: give the codec the bytes,
    # so UTF-8 in the header decodes as UTF-8.
    if isinstance(value, str):
        try:
            return value.encode("latin-1")
        except UnicodeEncodeError:
            return value
    return value


def _utf8_path(path: str) -> str:
    # PEP 3333 paths are latin-1-decoded bytes; URLs are UTF-8 (as Werkzeug reads them).
    try:
        return path.encode("latin-1").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return path


def _server_address(environ: Environ) -> tuple[str, int | None] | None:
    name = environ.get("SERVER_NAME")
    if not name:
        return None
    port = str(environ.get("SERVER_PORT", ""))
    return str(name), int(port) if port.isdigit() else None


def _route_of(environ: Environ) -> str | None:
    """The matched URL rule of a Werkzeug/Flask request, once routing has happened."""
    rule = getattr(environ.get("werkzeug.request"), "url_rule", None)
    template = getattr(rule, "rule", None)
    return template if isinstance(template, str) and template else None


class LaminarWSGIMiddleware:
    """Opens a SERVER span per request, continuing the caller's Laminar context
    (`X-Laminar-Span-Context`), else the W3C one.

    Options: `tracer_provider`, `excluded_paths` (exact paths and compiled patterns matched
    in full against `SCRIPT_NAME + PATH_INFO`: no span, no context read; default
    `LAMINAR_EXCLUDED_PATHS`, comma-separated exact paths), `trust`
    (`"continue"`, `"restart"`, `"ignore"` or a callable on the WSGI environ; default
    `LAMINAR_TRUST`, else `"continue"`), `header_names`, and the hooks
    `server_request_hook(span, environ)` and `server_response_hook(span, status,
    headers)` (the status an int, the headers as WSGI gives them: string pairs).
    """

    @tolerant_options
    def __init__(
        self,
        app: WSGIApp,
        *,
        tracer_provider: TracerProvider | None = None,
        excluded_paths: ExcludedPathsOption | ExcludedPaths = None,
        trust: TrustOption | TrustPolicy | None = None,
        header_names: Iterable[str] | None = None,
        server_request_hook: ServerRequestHook | None = None,
        server_response_hook: ServerResponseHook | None = None,
    ) -> None:
        self.app = app
        self._server = InboundTracer(
            tracer_provider=tracer_provider,
            excluded_paths=excluded_paths,
            trust=trust,
            header_names=header_names,
            server_request_hook=server_request_hook,
            server_response_hook=server_response_hook,
        )
        self._environ_keys: tuple[str, ...] = tuple(
            dict.fromkeys(_environ_key(n) for n in self._server.header_names)
        )

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        request: ServerRequest | None = None
        with _STARTING:
            request = self._start(environ)
        if request is None:
            return self.app(environ, start_response)

        def start_response_wrapper(status: str, headers: Any, *args: Any) -> Any:
            with _RESPONDING:
                request.response_started(status.split(" ", 1)[0], headers)
            return start_response(status, headers, *args)

        tokens = request.attach()
        try:
            iterable = self.app(environ, start_response_wrapper)
        except BaseException as exc:
            _fail(request, exc)
            request.detach(tokens)
            _end(request)
            raise
        request.detach(tokens)
        if hasattr(iterable, "__len__"):
            return _SizedResponseIterable(iterable, request)
        return _ResponseIterable(iterable, request)

    def _start(self, environ: Environ) -> ServerRequest | None:
        server = self._server
        path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        if not path.isascii():
            path = _utf8_path(path)
        if server.excluded(path):
            return None
        values = [_wire_bytes(environ[k]) for k in self._environ_keys if k in environ]
        traceparent = environ.get("HTTP_TRACEPARENT")
        tracestate = environ.get("HTTP_TRACESTATE")
        host = environ.get("HTTP_HOST")
        request = server.start(
            InboundRequest(
                environ.get("REQUEST_METHOD", "GET"),
                path,
                environ.get("wsgi.url_scheme", "http"),
                values,
                () if traceparent is None else (traceparent,),
                () if tracestate is None else (tracestate,),
                environ,
                _GETTER,
                environ,
                host,
                None if host else _server_address(environ),
                environ.get("REMOTE_ADDR"),
                environ.get("HTTP_USER_AGENT"),
                lambda: _route_of(environ),
            )
        )
        try:
            environ[REQUEST_ENVIRON_KEY] = request
        except BaseException:
            request.end()  # a read-only environ: the app runs without us
            raise
        return request


# The entry points where the server or the app calls into this middleware's work. Each
# step is contained on its own, so a failure in one (recording the exception) does not
# skip another (ending the span). `attach` / `detach` cannot fail (see ServerRequest).
_STARTING: Final = contained("LaminarWSGIMiddleware: starting the server span")
_RESPONDING: Final = contained("LaminarWSGIMiddleware: start_response")
_FAILING: Final = contained("LaminarWSGIMiddleware: recording the app's exception")
_ENDING: Final = contained("LaminarWSGIMiddleware: ending the server span")


def _fail(request: ServerRequest, exc: BaseException) -> None:
    with _FAILING:
        request.fail(exc)


def _end(request: ServerRequest) -> None:
    with _ENDING:
        request.end()


class _ResponseIterable:
    """The app's response, with the span current while each chunk is made and ended by
    `close()`."""

    __slots__ = ("_iterable", "_iterator", "_request")

    def __init__(self, iterable: Iterable[bytes], request: ServerRequest):
        self._iterable = iterable
        self._iterator: Iterator[bytes] | None = None
        self._request = request

    def __iter__(self) -> Iterator[bytes]:
        iterable = self._iterable
        if isinstance(iterable, (list, tuple)):
            return iter(iterable)  # runs no code while iterated: nothing to make current
        return self

    def __next__(self) -> bytes:
        # The span is current during each step only (the first one also runs the
        # response's __iter__), and detached before the chunk is handed to the server:
        # no context leaks into the server's own code.
        request = self._request
        tokens = request.attach()
        try:
            iterator = self._iterator
            if iterator is None:
                iterator = self._iterator = iter(self._iterable)
            return next(iterator)
        except StopIteration:
            raise
        except BaseException as exc:
            _fail(request, exc)
            raise
        finally:
            request.detach(tokens)

    def close(self) -> None:
        request = self._request
        try:
            close = getattr(self._iterable, "close", None)
            if close is not None:
                tokens = request.attach()
                try:
                    close()
                except BaseException as exc:
                    _fail(request, exc)
                    raise
                finally:
                    request.detach(tokens)
        finally:
            with _ENDING:
                request.end()

    def __del__(self) -> None:
        # Werkzeug's server skips close() when the client hangs up first: end with the
        # response rather than never. Nothing here makes a cycle, so that is the moment the
        # server lets go of it, in the server's thread; a cycle of the app's own would defer
        # it to a collection, as contrib's generator-based end is deferred.
        if not self._request.ended:
            _end(self._request)


class _SizedResponseIterable(_ResponseIterable):
    """The same, for a sized response: servers compute Content-Length from `len()` (and
    some call `len()` whenever `__len__` exists, so only sized responses have it)."""

    __slots__ = ()

    def __len__(self) -> int:
        return len(self._iterable)  # type: ignore[arg-type]
