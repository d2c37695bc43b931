"""httpx: a transport wrapper (sync and async) and `instrument_httpx` for one client or all.

The wrappers translate httpx's request and response into `_client.OutboundHook` calls and
nothing more. They work around any inner transport (the client's default, a proxy
transport, `httpx.MockTransport`, a user's own). The CLIENT span ends when the response is
closed: after the body was read for `client.get(...)`, when the `client.stream(...)`
block exits for a streamed download.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from types import TracebackType
from typing import Any, Final

import httpx
from opentelemetry.trace import TracerProvider

from ._client import EXTENSION_KEY, Call, OutboundHook, OutgoingRequest, finish_or_end
from ._guard import contained
from .config import ClientRequestHook, ClientResponseHook, PropagateToOption, tolerant_options

__all__ = ["AsyncLaminarTransport", "LaminarTransport", "instrument_httpx", "uninstrument_httpx"]


def _begin(hook: OutboundHook, request: httpx.Request) -> Call | None:
    """The boundary before the send: if anything of ours fails, the request goes as it is."""
    with _BEGINNING:
        url = request.url
        query = url.query
        extensions = request.extensions
        headers = request.headers
        call = hook.begin(
            OutgoingRequest(
                request,
                request.method,
                str(url),
                url.host,
                url.port,
                url.scheme,
                query.decode("ascii", "replace") if query else "",
                headers,
                headers.keys(),  # lowercased in one pass: Headers.__contains__ scans per call
                extensions.get(EXTENSION_KEY),
            )
        )
        if call is not None and call.injected:
            # Request copies its extensions; redirect requests copy them again, so the next
            # hop can tell the headers we added from the caller's.
            extensions[EXTENSION_KEY] = call.injected
        return call
    return None


_BEGINNING: Final = contained("httpx request")


class _TracedStream(httpx.SyncByteStream):
    """A response body that ends the call's span when closed."""

    __slots__ = ("_call", "_inner")

    def __init__(self, inner: httpx.SyncByteStream, call: Call) -> None:
        self._inner = inner
        self._call = call

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._inner
        except Exception as exc:
            self._call.error(exc)
            raise

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._call.end()


class _AsyncTracedStream(httpx.AsyncByteStream):
    __slots__ = ("_call", "_inner")

    def __init__(self, inner: httpx.AsyncByteStream, call: Call) -> None:
        self._inner = inner
        self._call = call

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        except Exception as exc:
            self._call.error(exc)
            raise

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._call.end()


def _responded(call: Call, response: httpx.Response, stream_type: type[Any]) -> httpx.Response:
    call.detach()
    call.respond(response.status_code, response)
    if response.is_closed:
        # Read and closed already (`httpx.Response(content=...)` from a mock or caching
        # transport): no close() of its stream will come, so the call ends now.
        call.end()
        return response

    def wrap() -> bool:
        response.stream = stream_type(response.stream, call)
        return True

    finish_or_end(call, wrap)
    return response


class LaminarTransport(httpx.BaseTransport):
    """Wraps any sync httpx transport: `httpx.Client(transport=LaminarTransport(inner))`.

    Options as for `instrument_httpx`. Attributes the wrapper does not have are looked up
    on the inner transport.
    """

    @tolerant_options
    def __init__(
        self,
        inner: httpx.BaseTransport,
        *,
        tracer_provider: TracerProvider | None = None,
        propagate_to: PropagateToOption = None,
        client_spans: bool = True,
        client_request_hook: ClientRequestHook | None = None,
        client_response_hook: ClientResponseHook | None = None,
    ) -> None:
        self._inner = inner
        self._hook = OutboundHook(
            tracer_provider=tracer_provider,
            propagate_to=propagate_to,
            client_spans=client_spans,
            client_request_hook=client_request_hook,
            client_response_hook=client_response_hook,
        )
        self._owned = False  # made by instrument_httpx, so uninstrument_httpx removes it

    @classmethod
    def _instrumented(cls, inner: httpx.BaseTransport, hook: OutboundHook) -> LaminarTransport:
        wrapper = cls.__new__(cls)
        wrapper._inner = inner
        wrapper._hook = hook
        wrapper._owned = True
        return wrapper

    @property
    def inner(self) -> httpx.BaseTransport:
        return self._inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        hook = self._hook
        call = _begin(hook, request) if hook.enabled else None
        if call is None:
            return self._inner.handle_request(request)
        try:
            response = self._inner.handle_request(request)
        except BaseException as exc:
            call.fail(exc)
            raise
        return _responded(call, response, _TracedStream)

    def close(self) -> None:
        self._inner.close()

    def __enter__(self) -> LaminarTransport:
        self._inner.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        self._inner.__exit__(exc_type, exc_value, traceback)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_inner", "_hook", "_owned"):
            raise AttributeError(name)
        return getattr(self._inner, name)


class AsyncLaminarTransport(httpx.AsyncBaseTransport):
    """Wraps any async httpx transport:
    `httpx.AsyncClient(transport=AsyncLaminarTransport(inner))`."""

    @tolerant_options
    def __init__(
        self,
        inner: httpx.AsyncBaseTransport,
        *,
        tracer_provider: TracerProvider | None = None,
        propagate_to: PropagateToOption = None,
        client_spans: bool = True,
        client_request_hook: ClientRequestHook | None = None,
        client_response_hook: ClientResponseHook | None = None,
    ) -> None:
        self._inner = inner
        self._hook = OutboundHook(
            tracer_provider=tracer_provider,
            propagate_to=propagate_to,
            client_spans=client_spans,
            client_request_hook=client_request_hook,
            client_response_hook=client_response_hook,
        )
        self._owned = False

    @classmethod
    def _instrumented(
        cls, inner: httpx.AsyncBaseTransport, hook: OutboundHook
    ) -> AsyncLaminarTransport:
        wrapper = cls.__new__(cls)
        wrapper._inner = inner
        wrapper._hook = hook
        wrapper._owned = True
        return wrapper

    @property
    def inner(self) -> httpx.AsyncBaseTransport:
        return self._inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        hook = self._hook
        call = _begin(hook, request) if hook.enabled else None
        if call is None:
            return await self._inner.handle_async_request(request)
        try:
            response = await self._inner.handle_async_request(request)
        except BaseException as exc:
            call.fail(exc)
            raise
        return _responded(call, response, _AsyncTracedStream)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> AsyncLaminarTransport:
        await self._inner.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self._inner.__aexit__(exc_type, exc_value, traceback)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_inner", "_hook", "_owned"):
            raise AttributeError(name)
        return getattr(self._inner, name)


def _wrap(transport: Any, hook: OutboundHook, is_async: bool) -> Any:
    if isinstance(transport, (LaminarTransport, AsyncLaminarTransport)) and transport._owned:
        transport = transport._inner  # instrumenting again replaces our own earlier wrapper
    if is_async:
        return AsyncLaminarTransport._instrumented(transport, hook)
    return LaminarTransport._instrumented(transport, hook)


def _rehook(transport: Any, old: OutboundHook, new: OutboundHook, is_async: bool) -> Any:
    if isinstance(transport, (LaminarTransport, AsyncLaminarTransport)) and (
        transport._owned and transport._hook is old
    ):
        return _wrap(transport, new, is_async)
    return transport


def _unwrap(transport: Any, hook: OutboundHook | None) -> Any:
    while (
        isinstance(transport, (LaminarTransport, AsyncLaminarTransport))
        and transport._owned
        and (hook is None or transport._hook is hook)
    ):
        transport = transport._inner
    return transport


def _apply(client: httpx.Client | httpx.AsyncClient, change: Callable[[Any], Any]) -> None:
    client._transport = change(client._transport)
    mounts = client._mounts
    for pattern, transport in list(mounts.items()):
        if transport is not None:
            mounts[pattern] = change(transport)


def _instrument_client(client: httpx.Client | httpx.AsyncClient, hook: OutboundHook) -> None:
    is_async = isinstance(client, httpx.AsyncClient)
    _apply(client, functools.partial(_wrap, hook=hook, is_async=is_async))


class _Global:
    """State of `instrument_httpx()` without a client."""

    def __init__(self, hook: OutboundHook) -> None:
        self.hook = hook
        self.clients: weakref.WeakSet[httpx.Client | httpx.AsyncClient] = weakref.WeakSet()


_global: _Global | None = None
_INSTRUMENTING_NEW_CLIENT: Final = contained("instrument_httpx (new client)")
_lock = threading.Lock()
# class -> (our __init__, the one it wraps). Checked by identity: a wrapper someone put
# over ours (functools.wraps copies attributes) must not be mistaken for ours.
_patches: dict[type, tuple[Callable[..., None], Callable[..., None]]] = {}


def _patched_init(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original, updated=())
    def __init__(self: httpx.Client | httpx.AsyncClient, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        state = _global
        if state is not None and state.hook.enabled:
            with _INSTRUMENTING_NEW_CLIENT:
                _instrument_new_client(self, state)

    return __init__


def _instrument_new_client(client: httpx.Client | httpx.AsyncClient, state: _Global) -> None:
    _instrument_client(client, state.hook)
    state.clients.add(client)


@tolerant_options
def instrument_httpx(
    client: httpx.Client | httpx.AsyncClient | None = None,
    *,
    tracer_provider: TracerProvider | None = None,
    propagate_to: PropagateToOption = None,
    client_spans: bool = True,
    client_request_hook: ClientRequestHook | None = None,
    client_response_hook: ClientResponseHook | None = None,
) -> None:
    """Carry the Laminar header (and a CLIENT span) on every request of `client`, an
    `httpx.Client` or `httpx.AsyncClient`: its transport and its mounted transports are
    wrapped. Without a client, every client created from now on is instrumented.

    `client_request_hook(span, request)` and `client_response_hook(span, request, response)`
    are called with the library's own objects once per call that gets our CLIENT span.
    Instrumenting again replaces the options; `uninstrument_httpx` undoes it.
    """
    global _global
    hook = OutboundHook(
        tracer_provider=tracer_provider,
        propagate_to=propagate_to,
        client_spans=client_spans,
        client_request_hook=client_request_hook,
        client_response_hook=client_response_hook,
    )
    if client is not None:
        if not isinstance(client, (httpx.Client, httpx.AsyncClient)):
            raise TypeError(f"expected an httpx.Client or httpx.AsyncClient, not {client!r}")
        _instrument_client(client, hook)
        return
    with _lock:
        state = _Global(hook)
        previous, _global = _global, state
        if previous is not None:
            # Clients instrumented by the previous global call take the new options.
            for instrumented in list(previous.clients):
                is_async = isinstance(instrumented, httpx.AsyncClient)
                rehook = functools.partial(_rehook, old=previous.hook, new=hook, is_async=is_async)
                _apply(instrumented, rehook)
                state.clients.add(instrumented)
            previous.hook.enabled = False
        for cls in (httpx.Client, httpx.AsyncClient):
            if cls not in _patches:
                original = cls.__dict__["__init__"]
                patched = _patched_init(original)
                setattr(cls, "__init__", patched)  # noqa: B010
                _patches[cls] = (patched, original)


def uninstrument_httpx(client: httpx.Client | httpx.AsyncClient | None = None) -> None:
    """Undo `instrument_httpx(client)`: the client's transports are restored.

    Without a client: clients created from now on are left alone, and the clients the
    global instrumentation wrapped get their transports back.
    """
    global _global
    if client is not None:
        _apply(client, functools.partial(_unwrap, hook=None))
        return
    with _lock:
        state, _global = _global, None
        for cls, (patched, original) in list(_patches.items()):
            if cls.__dict__.get("__init__") is patched:
                setattr(cls, "__init__", original)  # noqa: B010
                del _patches[cls]
            # Else someone wrapped __init__ over ours: ours stays in their chain, inert
            # without a global state, and is reused by the next instrument_httpx().
        if state is None:
            return
        state.hook.enabled = False
        for instrumented in list(state.clients):
            _apply(instrumented, functools.partial(_unwrap, hook=state.hook))
