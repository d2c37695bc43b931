"""aiohttp's client side: `instrument_aiohttp(session=None, **options)`.

A `TraceConfig` on the session, whose signals translate aiohttp's shapes into
`_client.OutboundHook` calls: the CLIENT span starts at `on_request_start` and ends at
`on_request_end` (the response's headers have arrived; aiohttp has no signal for the end of
its body), and a redirect to a host that may not receive our headers loses them.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, Final

import aiohttp
from multidict import CIMultiDict
from opentelemetry.trace import TracerProvider
from yarl import URL

from ._client import Call, OutboundHook, OutgoingRequest
from ._guard import contained
from .codec import HEADER_NAME
from .config import ClientRequestHook, ClientResponseHook, PropagateToOption, tolerant_options

__all__ = ["instrument_aiohttp", "uninstrument_aiohttp"]


def _outgoing(method: str, url: URL, headers: CIMultiDict[str], native: object) -> OutgoingRequest:
    # Keyed by the headers: the one object every trace config of this call is handed, so
    # two configs of ours (global and per session) give one span.
    return OutgoingRequest(
        headers,
        method,
        str(url),
        url.host,
        url.port,
        url.scheme,
        url.raw_query_string,
        headers,
        headers,  # case-insensitive already
        None,
        native,
    )


class _LaminarTraceConfig(aiohttp.TraceConfig):
    """aiohttp's request signals, wired to one `OutboundHook`. Each call's `ctx` (aiohttp
    makes one per call and config) holds the call between the signals."""

    def __init__(self, hook: OutboundHook) -> None:
        super().__init__()
        self.hook = hook
        self.on_request_start.append(self._start)
        self.on_request_redirect.append(self._redirect)
        self.on_request_end.append(self._end)
        self.on_request_exception.append(self._exception)
        self.freeze()  # as a session does with the configs it is built with

    async def _start(
        self, session: object, ctx: SimpleNamespace, params: aiohttp.TraceRequestStartParams
    ) -> None:
        hook = self.hook
        if not hook.enabled:
            return
        with _BEGINNING:
            headers = params.headers
            had_header = HEADER_NAME in headers
            call = hook.begin(_outgoing(params.method, params.url, headers, params))
            ctx.laminar_call = call
            if call is not None:
                ctx.laminar_added = call.injected
            elif not had_header and HEADER_NAME in headers:
                # Beside another instrumentation's span: the Laminar header naming it is ours.
                ctx.laminar_added = {HEADER_NAME: headers[HEADER_NAME]}

    async def _redirect(
        self, session: object, ctx: SimpleNamespace, params: aiohttp.TraceRequestRedirectParams
    ) -> None:
        with _REDIRECTING:
            added = getattr(ctx, "laminar_added", None)
            location = params.response.headers.get("Location") or params.response.headers.get("URI")
            if added and location:
                # aiohttp signals with the URL it is leaving; it goes on to the Location.
                target = params.url.join(URL(location))
                request = _outgoing(params.method, target, params.headers, params)
                self.hook.redirect_hop(added, request)

    async def _end(
        self, session: object, ctx: SimpleNamespace, params: aiohttp.TraceRequestEndParams
    ) -> None:
        call: Call | None = getattr(ctx, "laminar_call", None)
        if call is not None:
            call.detach()
            call.respond(params.response.status, params.response)
            call.end()

    async def _exception(
        self, session: object, ctx: SimpleNamespace, params: aiohttp.TraceRequestExceptionParams
    ) -> None:
        call: Call | None = getattr(ctx, "laminar_call", None)
        if call is not None:
            call.fail(params.exception)


_BEGINNING: Final = contained("aiohttp client request")
_REDIRECTING: Final = contained("aiohttp client redirect")


def _add(session: aiohttp.ClientSession, hook: OutboundHook) -> None:
    configs = session.trace_configs
    for index, config in enumerate(configs):
        if isinstance(config, _LaminarTraceConfig):
            configs[index] = _LaminarTraceConfig(hook)  # instrumenting again: the new options
            return
    configs.append(_LaminarTraceConfig(hook))


def _remove(session: aiohttp.ClientSession, hook: OutboundHook | None) -> None:
    configs = session.trace_configs
    configs[:] = [
        c
        for c in configs
        if not (isinstance(c, _LaminarTraceConfig) and (hook is None or c.hook is hook))
    ]


class _Global:
    """State of `instrument_aiohttp()` without a session."""

    def __init__(self, hook: OutboundHook) -> None:
        self.hook = hook
        self.sessions: weakref.WeakSet[aiohttp.ClientSession] = weakref.WeakSet()


_global: _Global | None = None
_lock = threading.Lock()
_INSTRUMENTING_NEW_SESSION: Final = contained("instrument_aiohttp (new session)")
# (our __init__, the one it wraps), to undo it; checked by identity.
_patch: tuple[Callable[..., None], Callable[..., None]] | None = None


def _patched_init(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original, updated=())
    def __init__(self: aiohttp.ClientSession, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        state = _global
        if state is not None and state.hook.enabled:
            with _INSTRUMENTING_NEW_SESSION:
                _add(self, state.hook)
                state.sessions.add(self)

    return __init__


@tolerant_options
def instrument_aiohttp(
    session: aiohttp.ClientSession | None = None,
    *,
    tracer_provider: TracerProvider | None = None,
    propagate_to: PropagateToOption = None,
    client_spans: bool = True,
    client_request_hook: ClientRequestHook | None = None,
    client_response_hook: ClientResponseHook | None = None,
) -> None:
    """Carry the Laminar header (and a CLIENT span) on every request of `session`; without
    a session, on every `aiohttp.ClientSession` made from now on.

    `client_request_hook(span, params)` gets aiohttp's `TraceRequestStartParams`, and
    `client_response_hook(span, params, response)` those and the `ClientResponse`, once per
    call that gets our CLIENT span. Instrumenting again replaces the options;
    `uninstrument_aiohttp` undoes it.
    """
    global _global, _patch
    hook = OutboundHook(
        tracer_provider=tracer_provider,
        propagate_to=propagate_to,
        client_spans=client_spans,
        client_request_hook=client_request_hook,
        client_response_hook=client_response_hook,
    )
    if session is not None:
        if not isinstance(session, aiohttp.ClientSession):
            raise TypeError(f"expected an aiohttp.ClientSession, not {session!r}")
        _add(session, hook)
        return
    with _lock:
        state = _Global(hook)
        previous, _global = _global, state
        if previous is not None:
            for instrumented in list(previous.sessions):
                _add(instrumented, hook)
                state.sessions.add(instrumented)
            previous.hook.enabled = False
        if _patch is None:
            original = aiohttp.ClientSession.__dict__["__init__"]
            patched = _patched_init(original)
            setattr(aiohttp.ClientSession, "__init__", patched)  # noqa: B010
            _patch = (patched, original)


def uninstrument_aiohttp(session: aiohttp.ClientSession | None = None) -> None:
    """Undo `instrument_aiohttp(session)`. Without a session: sessions made from now on are
    left alone, and those the global instrumentation reached lose its trace config."""
    global _global, _patch
    if session is not None:
        _remove(session, None)
        return
    with _lock:
        state, _global = _global, None
        if _patch is not None:
            patched, original = _patch
            if aiohttp.ClientSession.__dict__.get("__init__") is patched:
                setattr(aiohttp.ClientSession, "__init__", original)  # noqa: B010
                _patch = None
            # Else someone wrapped __init__ over ours: ours stays in their chain, inert
            # without a global state, and is reused by the next instrument_aiohttp().
        if state is None:
            return
        state.hook.enabled = False
        for instrumented in list(state.sessions):
            _remove(instrumented, state.hook)
