"""`instrument()` / `uninstrument()`: the middleware in every app, the hook in every client.

Patches constructors, never anything at import time: every Starlette, FastAPI and Flask app
built after `instrument()` carries the inbound middleware, and every httpx client and requests
session the outbound hook. `uninstrument()` restores what it patched; apps and clients built
in between keep their middleware and hooks.
"""

from __future__ import annotations

import functools
import importlib
import threading
from collections.abc import Callable
from typing import Any

from ._guard import guard, internal_error, logger
from .config import ExcludedPaths, PropagationTargets, TrustPolicy

__all__ = ["instrument", "is_instrumented", "uninstrument"]

_lock = threading.Lock()
# (class, attribute name, original function) for everything patched, to undo it.
_patched: list[tuple[type, str, Callable[..., Any]]] = []
_clients_instrumented: list[str] = []

_INBOUND_OPTIONS = ("tracer_provider", "excluded_paths", "trust")
_OUTBOUND_OPTIONS = ("tracer_provider", "propagate_to", "client_spans")


def is_instrumented() -> bool:
    return bool(_patched or _clients_instrumented)


def instrument(**options: Any) -> None:
    """Carry the Laminar header in and out of every app and client made from now on.

    Options are those of the middlewares and hooks (`tracer_provider`, `excluded_paths`,
    `trust`, `propagate_to`, `client_spans`); unset ones come from `LAMINAR_TRUST`,
    `LAMINAR_EXCLUDED_PATHS` and `LAMINAR_PROPAGATE_TO`. A bad value is logged once and the
    default used: this never stops the application from starting.
    """
    unknown = set(options) - set(_INBOUND_OPTIONS) - set(_OUTBOUND_OPTIONS)
    if unknown:
        logger.warning(
            "laminar_middleware.instrument: ignoring unknown options %s", sorted(unknown)
        )
    inbound = _inbound_options(options)
    outbound = _outbound_options(options)
    with _lock:
        if is_instrumented():
            return
        _patch_init("starlette.applications", "Starlette", _add_asgi_middleware, inbound)
        _patch_init("fastapi.applications", "FastAPI", _add_asgi_middleware, inbound)
        _patch_init("flask.app", "Flask", _wrap_wsgi_app, inbound)
        for library, module in (("httpx", ".httpx"), ("requests", ".requests")):
            if _importable(library):
                hook = importlib.import_module(module, __package__)
                if guard(
                    f"instrument {library}", False, _call, hook, f"instrument_{library}", outbound
                ):
                    _clients_instrumented.append(module)


def uninstrument() -> None:
    """Undo `instrument()`: new apps and clients carry nothing."""
    with _lock:
        while _patched:
            cls, name, original = _patched.pop()
            setattr(cls, name, original)
        while _clients_instrumented:
            module = _clients_instrumented.pop()
            hook = importlib.import_module(module, __package__)
            library = module.lstrip(".")
            guard(f"uninstrument {library}", None, getattr(hook, f"uninstrument_{library}"))


def _call(hook: Any, name: str, options: dict[str, Any]) -> bool:
    getattr(hook, name)(**options)
    return True


def _inbound_options(options: dict[str, Any]) -> dict[str, Any]:
    chosen = {k: options[k] for k in _INBOUND_OPTIONS if k in options}
    # Validate once, here, so a bad environment value logs at start-up rather than per app.
    if "trust" not in chosen:
        chosen["trust"] = guard("LAMINAR_TRUST", None, lambda: TrustPolicy(None).fixed)
    if "excluded_paths" not in chosen:
        excluded = ExcludedPaths(None, from_env=True)
        if excluded:
            chosen["excluded_paths"] = excluded
    return chosen


def _outbound_options(options: dict[str, Any]) -> dict[str, Any]:
    chosen = {k: options[k] for k in _OUTBOUND_OPTIONS if k in options}
    if "propagate_to" not in chosen:
        chosen["propagate_to"] = guard("LAMINAR_PROPAGATE_TO", None, PropagationTargets)
    return chosen


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _patch_init(
    module_name: str,
    class_name: str,
    after_init: Callable[[Any, dict[str, Any]], None],
    options: dict[str, Any],
) -> None:
    if not _importable(module_name):
        return
    cls = getattr(importlib.import_module(module_name), class_name)
    # Patch the class that defines __init__: contrib instrumentors replace the public name
    # with a subclass, which calls this one.
    original = cls.__dict__["__init__"]

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        try:
            after_init(self, options)
        except Exception:
            internal_error(f"instrumenting {class_name}")

    cls.__init__ = __init__
    _patched.append((cls, "__init__", original))


def _add_asgi_middleware(app: Any, options: dict[str, Any]) -> None:
    from .asgi import LaminarASGIMiddleware

    if any(getattr(m, "cls", None) is LaminarASGIMiddleware for m in app.user_middleware):
        return
    app.add_middleware(LaminarASGIMiddleware, **options)


def _wrap_wsgi_app(app: Any, options: dict[str, Any]) -> None:
    # instrument_flask, not plain wrapping: the span is named by its route before the
    # handler runs, so the Laminar path that spans and calls inside it copy is complete.
    from .flask import instrument_flask

    instrument_flask(app, **options)
