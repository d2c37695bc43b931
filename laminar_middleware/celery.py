"""Celery: `instrument_celery(app=None, **options)` carries the trace through task messages.

It connects receivers to Celery's signals, in the process that publishes and in each worker
process (the prefork pool's children inherit them, as do solo and thread pools):

- `before_task_publish` / `after_task_publish`: the PRODUCER span `publish <task>` and the
  message headers naming it (see `_queue`). Celery copies the running task's headers into a
  retried task's message, so a value found there is replaced: each try is the child of the
  publish made by the try before it, and a chain's next task the child of the publish made
  by the task before it (Celery sends it while that task's span is current).
- `task_prerun` / `task_postrun`: the CONSUMER span `run <task>`, current while the task
  body runs; `task_failure` marks it ERROR, but not for `Retry`, `Ignore` or `Reject`,
  which are how a task asks Celery for something, not failures.

A periodic task sent by Celery beat is published outside any span: it starts a trace of its
own. Beside the contrib Celery instrumentation there is one PRODUCER and one CONSUMER span per
task: its spans get Laminar's attributes and header instead of a second span. That needs our
receivers to run after contrib's, so they move behind contrib's when they find themselves
before them (the first message after contrib is instrumented later than us is left to
contrib alone).

Celery's publish signal does not say which app sends a message: with `app` given, a message
counts as that app's when the app registers the task's name, or when the app is the current
one (a `send_task` by a name the app does not know).
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Iterable
from typing import Any, Final

from opentelemetry.trace import Span, TracerProvider

from ._guard import contained, log_bad_setting
from ._queue import ConsumerRun, IncomingMessage, OutgoingMessage, QueueTracer, retry_count
from .codec import HEADER_NAME, HEADER_NAME_ALIAS
from .config import TrustOption, tolerant_options
from .propagator import global_propagator_without_laminar, propagator_fields

__all__ = ["instrument_celery", "uninstrument_celery"]

_RUN_ATTRIBUTE: Final = "_laminar_middleware_run"
# Publishes whose after_task_publish never came (the broker refused the message) are ended
# when this many are pending, oldest first: a bound, not a leak.
_MAX_PENDING: Final = 1024


class _State:
    """Which apps are instrumented (None: all) and with what, and the publishes in flight."""

    def __init__(self) -> None:
        self.everywhere: QueueTracer | None = None
        self.apps: weakref.WeakKeyDictionary[Any, QueueTracer] = weakref.WeakKeyDictionary()
        self.pending: dict[str, Span] = {}
        self.lock = threading.Lock()

    def connected(self) -> bool:
        return self.everywhere is not None or len(self.apps) > 0

    def for_app(self, app: Any) -> QueueTracer | None:
        return self.apps.get(app, self.everywhere) if app is not None else self.everywhere

    def for_name(self, name: str) -> QueueTracer | None:
        if self.everywhere is not None:
            return self.everywhere
        from celery import current_app

        # The current app when it knows the task, else an app that does, else the current
        # app (a send_task by a name no app registers).
        current = current_app._get_current_object()
        apps = self.apps
        tracer = apps.get(current)
        if tracer is not None and name in current._tasks:
            return tracer
        for app, other in list(apps.items()):
            if name in app._tasks:
                return other
        return tracer


_state = _State()


@tolerant_options
def instrument_celery(
    app: Any = None,
    *,
    tracer_provider: TracerProvider | None = None,
    trust: TrustOption | None = None,
) -> None:
    """Trace Celery tasks across publish and run: one app, or every app when None.

    Options: `tracer_provider` (the global one when None) and `trust` (consumer side:
    `"continue"`, `"restart"`, `"ignore"` or a callable given the message headers; default
    `LAMINAR_TRUST`, else `"continue"`). Calling it again replaces the options.
    """
    with contained("instrument_celery"):
        from celery import Celery

        if app is not None and not isinstance(app, Celery):
            log_bad_setting("instrument_celery(app)", app, "a celery.Celery app", "no change")
            return
        tracer = QueueTracer("celery", tracer_provider=tracer_provider, trust=trust)
        if app is None:
            _state.everywhere = tracer
        else:
            _state.apps[app] = tracer
        _connect()


def uninstrument_celery(app: Any = None) -> None:
    """Undo `instrument_celery` for one app, or for every app when None."""
    with contained("uninstrument_celery"):
        if app is None:
            _state.everywhere = None
            _state.apps.clear()
        else:
            _state.apps.pop(app, None)
        if not _state.connected():
            _disconnect()


def _receivers() -> Iterable[tuple[Any, Any]]:
    from celery import signals

    return (
        (signals.before_task_publish, _before_publish),
        (signals.after_task_publish, _after_publish),
        (signals.task_prerun, _prerun),
        (signals.task_postrun, _postrun),
        (signals.task_failure, _failure),
    )


def _connect() -> None:
    for signal, receiver in _receivers():
        signal.connect(receiver, weak=False, dispatch_uid=_uid(receiver))


def _disconnect() -> None:
    for signal, receiver in _receivers():
        signal.disconnect(receiver, dispatch_uid=_uid(receiver))


def _uid(receiver: Any) -> str:
    return f"laminar_middleware.celery.{receiver.__name__}"


def _contrib_runs_after(signal: Any, receiver: Any) -> bool:
    """True when the contrib Celery instrumentation's receiver on `signal` comes after ours
    in this send; ours then moves behind it for the next sends."""
    if "opentelemetry.instrumentation.celery" not in sys.modules:
        return False
    uid = _uid(receiver)
    receivers = signal.receivers
    last = receivers[-1:]
    if not last or last[0][0][0] == uid:
        return False  # ours is last (where it moves to): nothing runs after it
    ours = contrib = -1
    for index, (key, target) in enumerate(list(receivers)):
        if key[0] == uid:
            ours = index
        elif type(getattr(target, "__self__", None)).__name__ == "CeleryInstrumentor":
            contrib = index
    if ours < 0 or contrib < ours:
        return False
    signal.disconnect(receiver, dispatch_uid=uid)
    signal.connect(receiver, weak=False, dispatch_uid=uid)
    return True


def _before_publish(
    signal: Any = None,
    sender: Any = None,
    headers: Any = None,
    routing_key: Any = None,
    **_: Any,
) -> None:
    with _PUBLISHING:
        if not isinstance(headers, dict) or _contrib_runs_after(signal, _before_publish):
            return
        name = str(sender)
        tracer = _state.for_name(name)
        if tracer is None:
            return
        task_id = headers.get("id")
        message = OutgoingMessage(name, routing_key or None, _text(task_id), headers)
        span = tracer.publish(message)
        if span is not None:
            if isinstance(task_id, str):
                _remember(task_id, span)
            else:
                span.end()  # no id to find it by after the publish (task protocol 1)


def _remember(task_id: str, span: Span) -> None:
    with _state.lock:
        pending = _state.pending
        stale = pending.pop(task_id, None)
        pending[task_id] = span
        if len(pending) > _MAX_PENDING:
            stale = pending.pop(next(iter(pending)))
    if stale is not None:
        stale.end()


def _after_publish(headers: Any = None, **_: Any) -> None:
    with _PUBLISHED:
        task_id = headers.get("id") if isinstance(headers, dict) else None
        with _state.lock:
            span = _state.pending.pop(task_id, None) if isinstance(task_id, str) else None
        if span is not None:
            span.end()


def _prerun(signal: Any = None, task_id: Any = None, task: Any = None, **_: Any) -> None:
    with _STARTING:
        if task is None or _contrib_runs_after(signal, _prerun):
            return
        tracer = _state.for_app(getattr(task, "app", None))
        if tracer is None:
            return
        request = task.request
        delivery = getattr(request, "delivery_info", None) or {}
        message = IncomingMessage(
            str(task.name),
            _text(delivery.get("routing_key")),
            _text(task_id),
            _headers_of(request),
            {"celery.retries": retry_count(getattr(request, "retries", 0))},
        )
        run = tracer.consume(message)
        run.attach()
        setattr(request, _RUN_ATTRIBUTE, run)


def _headers_of(request: Any) -> dict[str, Any]:
    """The message headers as the worker sees them: Celery keeps them in `request.headers`
    and also as attributes of the request, which win (they are the message's own)."""
    found = getattr(request, "headers", None)
    headers: dict[str, Any] = dict(found) if isinstance(found, dict) else {}
    fields = propagator_fields(global_propagator_without_laminar())
    names = (HEADER_NAME, HEADER_NAME_ALIAS, *fields)
    for name in names:
        value = getattr(request, name, None)
        if isinstance(value, str):
            headers[name] = value
    return headers


def _run_of(task: Any) -> ConsumerRun | None:
    run = getattr(getattr(task, "request", None), _RUN_ATTRIBUTE, None)
    return run if isinstance(run, ConsumerRun) else None


def _failure(sender: Any = None, exception: Any = None, **_: Any) -> None:
    with _FAILING:
        from celery.exceptions import Ignore, Reject, Retry

        run = _run_of(sender)
        # Retry, Ignore and Reject are how a task asks Celery for something: not failures.
        asked = isinstance(exception, (Retry, Ignore, Reject))
        if run is not None and isinstance(exception, BaseException) and not asked:
            run.fail(exception)


def _postrun(task: Any = None, **_: Any) -> None:
    with _ENDING:
        run = _run_of(task)
        if run is not None:
            delattr(task.request, _RUN_ATTRIBUTE)
            run.end()


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


_PUBLISHING: Final = contained("Celery before_task_publish")
_PUBLISHED: Final = contained("Celery after_task_publish")
_STARTING: Final = contained("Celery task_prerun")
_FAILING: Final = contained("Celery task_failure")
_ENDING: Final = contained("Celery task_postrun")
