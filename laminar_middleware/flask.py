"""A Flask helper: the WSGI middleware plus what only Flask's signals can tell it.

Plain wrapping (`app.wsgi_app = LaminarWSGIMiddleware(app.wsgi_app)`) already names the span
by the route. `instrument_flask(app)` does that wrapping and also

- names the span as soon as Flask has matched the route (`request_started`), so calls the
  view makes already carry the final name in their Laminar path;
- records the exception of a request that Flask turned into a 500 response itself
  (`got_request_exception`): without it the middleware sees only the 500.
"""

from __future__ import annotations

from typing import Any, Final

from ._guard import contained
from ._server_request import ServerRequest
from .wsgi import REQUEST_ENVIRON_KEY, LaminarWSGIMiddleware, _route_of

__all__ = ["instrument_flask"]


def instrument_flask(app: Any, **options: Any) -> LaminarWSGIMiddleware:
    """Wrap `app.wsgi_app` in `LaminarWSGIMiddleware(**options)` and connect Flask's
    signals for this app. Returns the middleware. Calling it twice wraps once."""
    from flask import Flask, got_request_exception, request_started

    if not isinstance(app, Flask):
        raise TypeError(f"expected a flask.Flask app, not {app!r}")
    # Recorded in the app's extensions: a wrapper added over ours (ProxyFix) hides it.
    done = app.extensions.get("laminar_middleware")
    if isinstance(done, LaminarWSGIMiddleware):
        return done
    current = app.wsgi_app
    middleware = current if isinstance(current, LaminarWSGIMiddleware) else None
    if middleware is None:
        middleware = LaminarWSGIMiddleware(current, **options)
        app.wsgi_app = middleware  # type: ignore[method-assign]
    app.extensions["laminar_middleware"] = middleware
    request_started.connect(_request_started, app, weak=False)
    got_request_exception.connect(_got_request_exception, app, weak=False)
    return middleware


def _current() -> ServerRequest | None:
    from flask import request

    value = request.environ.get(REQUEST_ENVIRON_KEY)
    return value if isinstance(value, ServerRequest) else None


def _request_started(sender: Any, **extra: Any) -> None:
    # Flask has routed: name the span now, so the view's own spans see `GET /route`.
    with _ROUTED:
        current = _current()
        if current is not None:
            from flask import request

            current.set_route(_route_of(request.environ))


def _got_request_exception(sender: Any, exception: BaseException, **extra: Any) -> None:
    # Flask turned the exception into a 500 itself: record it, since it never reaches us.
    with _FAILED:
        current = _current()
        if current is not None:
            current.fail(exception)


_ROUTED: Final = contained("Flask request_started")
_FAILED: Final = contained("Flask got_request_exception")
