"""Dramatiq: `LaminarMiddleware(**options)` carries the trace through messages.

Add it to a broker with `instrument_dramatiq(broker)` (the global broker when None), which
puts it first in the broker's middleware list: Dramatiq calls the `before_*` hooks in that
order and the `after_*` hooks in reverse, so the CONSUMER span is current for every other
middleware's work on the message, the `Retries` middleware's re-enqueue included. That
makes each retry the child of the publish made by the failed try.

- `before_enqueue` / `after_enqueue`: the PRODUCER span `publish <actor>` and the message's
  headers naming it, kept in `message.options["laminar_middleware.headers"]`, never in its
  arguments (see `_queue`). A delayed message enqueued again when it is due is published
  outside any span: its headers stay as they were.
- `before_process_message` / `after_process_message` / `after_skip_message`: the CONSUMER
  span `run <actor>`, ERROR when the actor raised (not for `dramatiq.Retry`, an actor's
  request to be retried).

Call it where the broker is defined, so that both the processes that send and the worker
processes (which import that module) have it.
"""

from __future__ import annotations

import threading
from typing import Any, Final

import dramatiq
from dramatiq.broker import Broker
from dramatiq.middleware import Middleware
from opentelemetry.trace import Span, TracerProvider

from ._guard import contained
from ._queue import ConsumerRun, IncomingMessage, OutgoingMessage, QueueTracer, retry_count
from .config import TrustOption, tolerant_options

__all__ = ["OPTIONS_KEY", "LaminarMiddleware", "instrument_dramatiq"]

# Where in a message's options its trace headers travel.
OPTIONS_KEY: Final = "laminar_middleware.headers"
# Spans of messages whose `after_*` hook never came are ended past this many: a bound.
_MAX_PENDING: Final = 1024


class LaminarMiddleware(Middleware):
    """Options: `tracer_provider` (the global one when None) and `trust` (worker side:
    `"continue"`, `"restart"`, `"ignore"` or a callable given the message's headers;
    default `LAMINAR_TRUST`, else `"continue"`)."""

    @tolerant_options
    def __init__(
        self, *, tracer_provider: TracerProvider | None = None, trust: TrustOption | None = None
    ) -> None:
        self._tracer = QueueTracer("dramatiq", tracer_provider=tracer_provider, trust=trust)
        self._lock = threading.Lock()
        self._publishing: dict[Any, Span] = {}
        # By thread and message: a retry keeps the message's id, and another worker thread
        # may start it before this one's after-hooks have run.
        self._running: dict[Any, ConsumerRun] = {}

    def before_enqueue(self, broker: Broker, message: Any, delay: Any) -> None:
        with _PUBLISHING:
            options = message.options
            found = options.get(OPTIONS_KEY)
            headers: dict[str, Any] = dict(found) if isinstance(found, dict) else {}
            outgoing = OutgoingMessage(
                str(message.actor_name), str(message.queue_name), str(message.message_id), headers
            )
            span = self._tracer.publish(outgoing)
            if headers:
                options[OPTIONS_KEY] = headers
            if span is not None:
                stale = _keep(self._lock, self._publishing, _key(message), span)
                if stale is not None:
                    stale.end()

    def after_enqueue(self, broker: Broker, message: Any, delay: Any) -> None:
        with _PUBLISHED:
            with self._lock:
                span = self._publishing.pop(_key(message), None)
            if span is not None:
                span.end()

    def before_process_message(self, broker: Broker, message: Any) -> None:
        with _STARTING:
            found = message.options.get(OPTIONS_KEY)
            retries = message.options.get("retries", 0)
            incoming = IncomingMessage(
                str(message.actor_name),
                str(message.queue_name),
                str(message.message_id),
                found if isinstance(found, dict) else {},
                {"dramatiq.retries": retry_count(retries)},
            )
            run = self._tracer.consume(incoming)
            run.attach()
            stale = _keep(self._lock, self._running, _key(message), run)
            if stale is not None:
                stale.abandon()

    def after_process_message(
        self, broker: Broker, message: Any, *, result: Any = None, exception: Any = None
    ) -> None:
        with _ENDING:
            with self._lock:
                run = self._running.pop(_key(message), None)
            if run is None:
                return
            try:
                if isinstance(exception, Exception) and not isinstance(exception, dramatiq.Retry):
                    run.fail(exception)
            finally:
                run.end()

    def after_skip_message(self, broker: Broker, message: Any) -> None:
        self.after_process_message(broker, message)


def _key(message: Any) -> tuple[int, str]:
    # The hooks of one message's enqueue, and of one run, come in one thread.
    return threading.get_ident(), str(message.message_id)


def _keep(lock: threading.Lock, pending: dict[Any, Any], key: Any, value: Any) -> Any:
    """Keep `value`; returns what it displaced, or the oldest entry past the bound."""
    with lock:
        stale = pending.pop(key, None)
        pending[key] = value
        if len(pending) > _MAX_PENDING:
            stale = pending.pop(next(iter(pending)))
    return stale


@tolerant_options
def instrument_dramatiq(
    broker: Broker | None = None,
    *,
    tracer_provider: TracerProvider | None = None,
    trust: TrustOption | None = None,
) -> LaminarMiddleware | None:
    """Add `LaminarMiddleware` first to `broker` (the global broker when None), once; returns
    the broker's `LaminarMiddleware`."""
    with contained("instrument_dramatiq"):
        if broker is None:
            broker = dramatiq.get_broker()
        for present in broker.middleware:
            if isinstance(present, LaminarMiddleware):
                return present
        middleware = LaminarMiddleware(tracer_provider=tracer_provider, trust=trust)
        first = type(broker.middleware[0]) if broker.middleware else None
        broker.add_middleware(middleware, before=first)
        return middleware
    return None


_PUBLISHING: Final = contained("Dramatiq before_enqueue")
_PUBLISHED: Final = contained("Dramatiq after_enqueue")
_STARTING: Final = contained("Dramatiq before_process_message")
_ENDING: Final = contained("Dramatiq after_process_message")
