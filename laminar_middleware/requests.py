"""requests: `instrument_requests` for one `Session` or for all of them.

Sending is wrapped (`Session.send`), adapters are not touched: whatever a session has
mounted (retries, mocks, per-prefix adapters) keeps doing its job. One CLIENT span covers
one `send`, redirects followed inside it included (as the contrib instrumentation does);
each redirect hop re-checks `propagate_to`, so a redirect to another host does not carry the
headers there unless that host may receive them.

With `stream=True` the span ends when the response is closed (`with` block, `close()`), when
its body has been read to the end through `iter_content` (`.content`, `.text`, `.json()`,
`iter_lines`), or, failing both, when the response is garbage-collected.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Final
from urllib.parse import urlsplit

import requests
from opentelemetry.trace import TracerProvider
from requests.structures import CaseInsensitiveDict

from ._client import Call, OutboundHook, OutgoingRequest, finish_or_end
from ._guard import contained
from .config import ClientRequestHook, ClientResponseHook, PropagateToOption, tolerant_options

__all__ = ["instrument_requests", "uninstrument_requests"]

_INJECTED_ATTRIBUTE = "_laminar_middleware_injected"
# (our Session.send, the one it wraps). Checked by identity: the contrib instrumentation
# wraps ours with functools.wraps, which copies attributes, so a marker would mislead.
_patch: tuple[Callable[..., requests.Response], Callable[..., requests.Response]] | None = None

_Send = Callable[..., requests.Response]


@functools.lru_cache(maxsize=256)
def _split(url: str) -> tuple[str | None, int | None, str, str]:
    """Host, port, scheme and query of a URL; most calls go to a few URLs, parsed once."""
    parts = urlsplit(url)
    return parts.hostname, parts.port, parts.scheme, parts.query


def _begin(hook: OutboundHook, request: requests.PreparedRequest) -> Call | None:
    """The boundary before the send: if anything of ours fails, the request goes as it is."""
    with _BEGINNING:
        url = request.url or ""
        host, port, scheme, query = _split(url)
        headers = request.headers
        if headers is None:
            request.headers = headers = CaseInsensitiveDict()
        call = hook.begin(
            OutgoingRequest(
                request,
                request.method or "GET",
                url,
                host,
                port,
                scheme,
                query,
                headers,
                # Lowercased in one pass: each CaseInsensitiveDict lookup lowercases again.
                {name.lower() for name in headers},
                request.__dict__.get(_INJECTED_ATTRIBUTE),
            )
        )
        if call is not None and call.injected:
            # A PreparedRequest sent again (a manual retry) must not keep our stale headers.
            setattr(request, _INJECTED_ATTRIBUTE, call.injected)
        return call
    return None


_BEGINNING: Final = contained("requests request")


def _traced_send(
    hook: OutboundHook,
    session: requests.Session,
    send: _Send,
    request: requests.PreparedRequest,
    kwargs: dict[str, Any],
) -> requests.Response:
    call = _begin(hook, request) if hook.enabled else None
    if call is None:
        return send(request, **kwargs)
    try:
        response = send(request, **kwargs)
    except BaseException as exc:
        call.fail(exc)
        raise
    call.detach()
    call.respond(getattr(response, "status_code", None), response)
    stream = kwargs.get("stream")
    if stream is None:
        stream = getattr(session, "stream", False)
    if stream:
        finish_or_end(call, functools.partial(_end_when_done, response, call))
    else:
        call.end()  # Session.send has read the body already
    return response


def _end_when_done(response: requests.Response, call: Call) -> bool:
    """A streamed response: end the span at close(), at the end of its body, or at GC."""
    if not isinstance(response, requests.Response):
        return False
    cls = type(response)
    ref = weakref.ref(response)  # the wrappers live on the response: no reference cycle
    own_close = response.__dict__.get("close")

    def close() -> None:
        try:
            if own_close is not None:
                own_close()
            else:
                target = ref()
                if target is not None:
                    cls.close(target)
        finally:
            call.end()

    def iter_content(*args: Any, **kwargs: Any) -> Iterator[Any]:
        target = ref()
        if target is None:  # pragma: no cover - the response is calling its own method
            raise ReferenceError("response is gone")
        # Called eagerly, so StreamConsumedError and friends raise where they used to.
        return _until_exhausted(cls.iter_content(target, *args, **kwargs), call)

    response.close = close  # type: ignore[method-assign]
    response.iter_content = iter_content  # type: ignore[method-assign]
    finalizer = weakref.finalize(response, call.end)
    finalizer.atexit = False
    return True


def _until_exhausted(chunks: Iterator[Any], call: Call) -> Iterator[Any]:
    try:
        yield from chunks
    except Exception as exc:
        call.error(exc)
        call.end()
        raise
    call.end()


class _SessionSend:
    """`session.send` for one instrumented session: wraps whatever `send` it had."""

    __slots__ = ("__weakref__", "_previous", "_session", "hook")

    def __init__(
        self, session: requests.Session, previous: _Send | None, hook: OutboundHook
    ) -> None:
        self._session = weakref.ref(session)
        self._previous = previous
        self.hook = hook

    def __call__(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        session = self._session()
        if session is None:  # pragma: no cover - the session is calling its own method
            raise ReferenceError("session is gone")
        # The class's send is looked up per call: class-level patches (ours, contrib's)
        # made later still run beneath this one.
        send = self._previous or functools.partial(type(session).send, session)
        return _traced_send(self.hook, session, send, request, kwargs)


class _Global:
    def __init__(self, hook: OutboundHook) -> None:
        self.hook = hook


_global: _Global | None = None
_lock = threading.Lock()


def _patched_send(original: Callable[..., requests.Response]) -> Callable[..., requests.Response]:
    # updated=(): copying the wrapped function's __dict__ would copy the contrib
    # instrumentation's "applied" marker, and its uninstrument would then unwrap ours.
    @functools.wraps(original, updated=())
    def send(
        self: requests.Session, request: requests.PreparedRequest, **kwargs: Any
    ) -> requests.Response:
        state = _global
        if state is None or not state.hook.enabled:
            return original(self, request, **kwargs)
        return _traced_send(state.hook, self, functools.partial(original, self), request, kwargs)

    return send


@tolerant_options
def instrument_requests(
    session: requests.Session | None = None,
    *,
    tracer_provider: TracerProvider | None = None,
    propagate_to: PropagateToOption = None,
    client_spans: bool = True,
    client_request_hook: ClientRequestHook | None = None,
    client_response_hook: ClientResponseHook | None = None,
) -> None:
    """Carry the Laminar header (and a CLIENT span) on every request `session` sends,
    keeping its mounted adapters. Without a session: every session, and the module-level
    `requests.get(...)` and friends (`requests.Session.send` is patched).

    `client_request_hook(span, request)` and `client_response_hook(span, request, response)`
    are called with the library's own objects once per call that gets our CLIENT span.
    Instrumenting again replaces the options; `uninstrument_requests` undoes it.
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
        if not isinstance(session, requests.Session):
            raise TypeError(f"expected a requests.Session, not {session!r}")
        current = session.__dict__.get("send")
        if isinstance(current, _SessionSend):
            current.hook = hook
        else:
            session.send = _SessionSend(session, current, hook)  # type: ignore[method-assign]
        return
    with _lock:
        previous, _global = _global, _Global(hook)
        if previous is not None:
            previous.hook.enabled = False
        if _patch is None:
            original = requests.Session.__dict__["send"]
            patched = _patched_send(original)
            setattr(requests.Session, "send", patched)  # noqa: B010
            _patch = (patched, original)


def uninstrument_requests(session: requests.Session | None = None) -> None:
    """Undo `instrument_requests(session)`, or the global `instrument_requests()`."""
    global _global, _patch
    if session is not None:
        current = session.__dict__.get("send")
        if isinstance(current, _SessionSend):
            if current._previous is not None:
                session.send = current._previous  # type: ignore[method-assign]
            else:
                del session.send
        return
    with _lock:
        state, _global = _global, None
        if state is not None:
            state.hook.enabled = False
        if _patch is not None and requests.Session.__dict__.get("send") is _patch[0]:
            setattr(requests.Session, "send", _patch[1])  # noqa: B010
            _patch = None
        # Else someone wrapped Session.send over ours: ours stays in their chain, inert
        # without a global state, and is reused by the next instrument_requests().
