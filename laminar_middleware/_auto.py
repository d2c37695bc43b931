"""`instrument()` / `uninstrument()`: the middleware in every app, the hook in every client.

Patches classes, never anything at import time. What every instance uses is patched, so an
app built before `instrument()` is covered too while it has not served a request:
Starlette and FastAPI build their middleware stack at the first request
(`build_middleware_stack`, where the middleware is put first), Flask apps are wrapped when
built and, if built earlier, at their first request. requests sessions go through the
class's `send`, so every session is covered; httpx fixes a client's transport when the
client is built, so only clients built afterwards are (aiohttp sessions likewise). Django
handlers get the middleware outermost when they load their middleware (Django builds a
handler when it starts serving); aiohttp applications get it first when they freeze their
middleware list, before they serve.
Celery is covered through its signals, for every app, RQ through its queue, job and worker
classes, and Dramatiq brokers (the global one, and every one built afterwards) get
`LaminarMiddleware` first.
`uninstrument()` restores what it patched; apps and clients instrumented in between keep
their middleware and hooks.
"""

from __future__ import annotations

import functools
import importlib
import threading
from collections.abc import Callable
from typing import Any, Final

from ._guard import contained, log_bad_setting, logger
from .config import (
    INBOUND_OPTIONS,
    OUTBOUND_OPTIONS,
    ExcludedPaths,
    PropagationTargets,
    TrustPolicy,
)

__all__ = ["instrument", "is_instrumented", "uninstrument"]

_lock = threading.Lock()
# Inside the framework's own build or __init__: a failure of ours leaves the app as it is.
_INSTRUMENTING_ASGI: Final = contained("instrumenting a Starlette or FastAPI app")
_INSTRUMENTING_FLASK: Final = contained("instrumenting a Flask app")
_INSTRUMENTING_DJANGO: Final = contained("instrumenting a Django handler")
_INSTRUMENTING_AIOHTTP: Final = contained("instrumenting an aiohttp application")
# (class, attribute name, original function) for everything patched, to undo it.
_patched: list[tuple[type, str, Callable[..., Any]]] = []
_clients_instrumented: list[str] = []
_active_options: dict[str, Any] | None = None


def is_instrumented() -> bool:
    return bool(_patched or _clients_instrumented)


def instrument(**options: Any) -> None:
    """Carry the Laminar header in and out of every app and client from now on.

    Options are those of the middlewares and hooks (`tracer_provider`, `excluded_paths`,
    `trust`, `header_names`, `propagate_to`, `client_spans` and the four hooks,
    `server_request_hook`, `server_response_hook`, `client_request_hook`,
    `client_response_hook`); unset ones come from
    `LAMINAR_TRUST`, `LAMINAR_EXCLUDED_PATHS` and `LAMINAR_PROPAGATE_TO`. A bad value is
    logged once and the safe default used: this never stops the application from starting.
    A second call keeps the first call's options (`uninstrument()` first to change them).
    """
    global _active_options
    known = (*INBOUND_OPTIONS, *OUTBOUND_OPTIONS)
    for name in [k for k in options if k not in known]:
        accepted = ", ".join(sorted(set(known)))
        log_bad_setting(f"instrument({name})", options.pop(name), accepted, "nothing: ignored")
    with _lock:
        if _active_options is not None:
            if options != _active_options:
                logger.warning(
                    "laminar_middleware.instrument() was called again with other options; "
                    "the first call's options stay (call uninstrument() first to change them)"
                )
            return
        _active_options = dict(options)
        inbound = _inbound_options(options)
        outbound = _outbound_options(options)
        _patch(
            "starlette.applications", "Starlette", "build_middleware_stack", _first(inbound, False)
        )
        _patch("fastapi.applications", "FastAPI", "build_middleware_stack", _first(inbound, True))
        _patch("flask.app", "Flask", "__init__", _after_flask_init(inbound))
        _patch("flask.app", "Flask", "__call__", _before_flask_call(inbound))
        _patch("django.core.handlers.base", "BaseHandler", "load_middleware", _django(inbound))
        _patch("aiohttp.web_app", "Application", "pre_freeze", _aiohttp_app(inbound))
        queue: dict[str, Any] = {
            k: inbound[k] for k in ("tracer_provider", "trust") if k in inbound
        }
        for library, module, chosen in (
            ("httpx", ".httpx", outbound),
            ("requests", ".requests", outbound),
            ("aiohttp", ".aiohttp", outbound),
            ("celery", ".celery", queue),
            ("rq", ".rq", queue),
        ):
            if _importable(library):
                with contained(f"instrument {library}"):
                    hook = importlib.import_module(module, __package__)
                    getattr(hook, f"instrument_{library}")(**chosen)
                    _clients_instrumented.append(module)
        if _importable("dramatiq"):
            with contained("instrument dramatiq"):
                _instrument_dramatiq(queue)


def uninstrument() -> None:
    """Undo `instrument()`: apps and clients not yet instrumented carry nothing."""
    global _active_options
    with _lock:
        _active_options = None
        while _patched:
            cls, name, original = _patched.pop()
            setattr(cls, name, original)
        while _clients_instrumented:
            module = _clients_instrumented.pop()
            library = module.lstrip(".")
            with contained(f"uninstrument {library}"):
                hook = importlib.import_module(module, __package__)
                getattr(hook, f"uninstrument_{library}")()


def _instrument_dramatiq(options: dict[str, Any]) -> None:
    # The global broker if there is one (asking Dramatiq for it would make one), and every
    # broker built from now on, when its base class has set up its middleware list.
    from dramatiq import broker

    from .dramatiq import instrument_dramatiq

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            instrument_dramatiq(self, **options)

        return __init__

    _patch("dramatiq.broker", "Broker", "__init__", make)
    if broker.global_broker is not None:
        instrument_dramatiq(broker.global_broker, **options)


def _inbound_options(options: dict[str, Any]) -> dict[str, Any]:
    chosen: dict[str, Any] = {k: options[k] for k in INBOUND_OPTIONS if k in options}
    # Read the environment once, here, rather than once per app.
    if "trust" not in chosen:
        chosen["trust"] = TrustPolicy(None)
    if "excluded_paths" not in chosen:
        excluded = ExcludedPaths(None, from_env=True)
        if excluded:
            chosen["excluded_paths"] = excluded
    return chosen


def _outbound_options(options: dict[str, Any]) -> dict[str, Any]:
    chosen: dict[str, Any] = {k: options[k] for k in OUTBOUND_OPTIONS if k in options}
    if "propagate_to" not in chosen:
        chosen["propagate_to"] = PropagationTargets(None)
    return chosen


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _patch(
    module_name: str,
    class_name: str,
    attribute: str,
    make: Callable[[Callable[..., Any]], Callable[..., Any]],
) -> None:
    if not _importable(module_name):
        return
    cls = getattr(importlib.import_module(module_name), class_name)
    # Patch the class that defines the method: contrib instrumentors replace the public
    # name with a subclass, which calls this one.
    patch_method(cls, attribute, make, _patched)


def patch_method(
    cls: type,
    attribute: str,
    make: Callable[[Callable[..., Any]], Callable[..., Any]],
    patched: list[tuple[type, str, Callable[..., Any]]],
) -> None:
    """Replace `cls.attribute` by `make(original)`, noting in `patched` what undoes it."""
    original = cls.__dict__[attribute]
    setattr(cls, attribute, functools.wraps(original)(make(original)))
    patched.append((cls, attribute, original))


def _first(
    options: dict[str, Any], fastapi: bool
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def build_middleware_stack(self: Any) -> Any:
            with _INSTRUMENTING_ASGI:
                if fastapi:
                    from .fastapi import instrument_fastapi

                    instrument_fastapi(self, **options)
                else:
                    _add_asgi_middleware(self, options)
            return original(self)

        return build_middleware_stack

    return make


def _add_asgi_middleware(app: Any, options: dict[str, Any]) -> None:
    from starlette.middleware import Middleware

    from .asgi import LaminarASGIMiddleware

    if any(getattr(m, "cls", None) is LaminarASGIMiddleware for m in app.user_middleware):
        return
    app.user_middleware.insert(0, Middleware(LaminarASGIMiddleware, **options))


def _after_flask_init(
    options: dict[str, Any],
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    # Wrapped when built, so a wrapper the app adds later (ProxyFix) runs outside ours.
    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            _instrument_flask(self, options)

        return __init__

    return make


def _before_flask_call(
    options: dict[str, Any],
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    # An app built before instrument() is wrapped at its first request.
    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def __call__(self: Any, environ: Any, start_response: Any) -> Any:
            if "laminar_middleware" not in getattr(self, "extensions", {"laminar_middleware": 0}):
                _instrument_flask(self, options)
            return original(self, environ, start_response)

        return __call__

    return make


def _django(options: dict[str, Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def load_middleware(self: Any, is_async: bool = False) -> None:
            original(self, is_async)
            with _INSTRUMENTING_DJANGO:
                from .django import add_to_handler

                add_to_handler(self, is_async, options)

        return load_middleware

    return make


def _aiohttp_app(options: dict[str, Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    # Every application freezes its middleware list before it serves (a sub-application
    # when it is added): the last moment to add ours, also to an app built earlier.
    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def pre_freeze(self: Any) -> None:
            if not self.pre_frozen:
                with _INSTRUMENTING_AIOHTTP:
                    from ._aiohttp_server import add_to_app

                    add_to_app(self, options)
            original(self)

        return pre_freeze

    return make


def _instrument_flask(app: Any, options: dict[str, Any]) -> None:
    # instrument_flask, not plain wrapping: the span is named by its route before the
    # handler runs, so the Laminar path that spans and calls inside it copy is complete.
    from .flask import instrument_flask

    with _INSTRUMENTING_FLASK:
        instrument_flask(app, **options)
