"""RQ: `instrument_rq(**options)` carries the trace through jobs, for every queue and worker
of the process.

It patches RQ's classes (never at import time):

- `Queue.enqueue_job` (behind `enqueue`, `enqueue_call`, `enqueue_at`...): the PRODUCER span
  `publish <function>` and the job's headers naming it, kept in the job's metadata under
  `job.meta["laminar_middleware.headers"]`, never in its arguments (see `_queue`).
- `Worker.perform_job`: the CONSUMER span `run <function>`, current while the job runs and
  while RQ records its outcome, so a retry RQ enqueues then (`Job.retry`, also patched, with
  a new PRODUCER span) is its child: each try nests under the try before it. A job that
  raises ends ERROR with the exception recorded.

RQ's default worker runs each job in a forked work horse that leaves with `os._exit()`, which
skips every exit handler: there, the tracer provider is flushed after each job, or a batch
span processor's spans would be lost. Call `instrument_rq()` in the worker process before it
forks (in the module given to `rq worker -c`, or the script that starts the worker), and in
the processes that enqueue.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.trace import Span, TracerProvider

from ._auto import patch_method
from ._guard import contained
from ._queue import ConsumerRun, IncomingMessage, OutgoingMessage, QueueTracer, retry_count
from .config import TrustOption, tolerant_options

__all__ = ["META_KEY", "instrument_rq", "uninstrument_rq"]

# Where in a job's metadata its trace headers travel.
META_KEY: Final = "laminar_middleware.headers"
_RUN_ATTRIBUTE: Final = "_laminar_middleware_run"
_FLUSH_MILLIS: Final = 5000

_lock = threading.Lock()
_tracer: QueueTracer | None = None
_patched: list[tuple[type, str, Callable[..., Any]]] = []


@tolerant_options
def instrument_rq(
    *, tracer_provider: TracerProvider | None = None, trust: TrustOption | None = None
) -> None:
    """Trace RQ jobs across enqueue and run. Options: `tracer_provider` (the global one when
    None) and `trust` (worker side: `"continue"`, `"restart"`, `"ignore"` or a callable given
    the job's headers; default `LAMINAR_TRUST`, else `"continue"`). Calling it again
    replaces the options."""
    global _tracer
    with contained("instrument_rq"):
        from rq.job import Job
        from rq.queue import Queue
        from rq.worker import BaseWorker

        with _lock:
            _tracer = QueueTracer("rq", tracer_provider=tracer_provider, trust=trust)
            if _patched:
                return
            patch_method(Queue, "enqueue_job", _enqueue_job, _patched)
            patch_method(Job, "retry", _retry, _patched)
            patch_method(Job, "perform", _perform, _patched)
            patch_method(BaseWorker, "perform_job", _perform_job, _patched)


def uninstrument_rq() -> None:
    """Undo `instrument_rq`."""
    global _tracer
    with _lock:
        _tracer = None
        while _patched:
            cls, name, original = _patched.pop()
            setattr(cls, name, original)


def _publish(job: Any, queue: Any) -> Span | None:
    tracer = _tracer
    if tracer is None:
        return None
    found = job.meta.get(META_KEY)
    headers: dict[str, Any] = dict(found) if isinstance(found, dict) else {}
    message = OutgoingMessage(str(job.func_name), str(queue.name), str(job.id), headers)
    span = tracer.publish(message)
    if headers:
        job.meta[META_KEY] = headers
    return span


def _enqueue_job(original: Callable[..., Any]) -> Callable[..., Any]:
    def enqueue_job(self: Any, job: Any, *args: Any, **kwargs: Any) -> Any:
        span: Span | None = None
        with _PUBLISHING:
            span = _publish(job, self)
        try:
            return original(self, job, *args, **kwargs)
        finally:
            if span is not None:
                span.end()

    return enqueue_job


def _retry(original: Callable[..., Any]) -> Callable[..., Any]:
    # Called by the worker while the failed try's span is current: the retry's publish is
    # its child, and the headers copied with the job are replaced.
    def retry(self: Any, queue: Any, *args: Any, **kwargs: Any) -> Any:
        span: Span | None = None
        with _PUBLISHING:
            span = _publish(self, queue)
        try:
            return original(self, queue, *args, **kwargs)
        finally:
            if span is not None:
                span.end()

    return retry


def _perform_job(original: Callable[..., Any]) -> Callable[..., Any]:
    def perform_job(self: Any, job: Any, queue: Any, *args: Any, **kwargs: Any) -> Any:
        run: ConsumerRun | None = None
        with _STARTING:
            run = _start(job, queue)
        try:
            return original(self, job, queue, *args, **kwargs)
        finally:
            if run is not None:
                with _ENDING:
                    run.end()
                if getattr(self, "_is_horse", False):
                    # The work horse leaves with os._exit(): no exit handler flushes.
                    with _FLUSHING:
                        provider = run.provider or trace.get_tracer_provider()
                        flush = getattr(provider, "force_flush", None)
                        if flush is not None:
                            flush(_FLUSH_MILLIS)

    return perform_job


def _start(job: Any, queue: Any) -> ConsumerRun | None:
    tracer = _tracer
    if tracer is None:
        return None
    found = job.meta.get(META_KEY)
    headers = found if isinstance(found, dict) else {}
    retries_left = getattr(job, "retries_left", None)
    attributes = {} if retries_left is None else {"rq.retries_left": retry_count(retries_left)}
    message = IncomingMessage(str(job.func_name), str(queue.name), str(job.id), headers, attributes)
    run = tracer.consume(message)
    run.attach()
    setattr(job, _RUN_ATTRIBUTE, run)
    return run


def _perform(original: Callable[..., Any]) -> Callable[..., Any]:
    # RQ catches the job's exception itself (and retries or fails the job): record it here.
    def perform(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(self, *args, **kwargs)
        except BaseException as exc:
            with _FAILING:
                run = getattr(self, _RUN_ATTRIBUTE, None)
                if isinstance(run, ConsumerRun) and isinstance(exc, Exception):
                    run.fail(exc)
            raise

    return perform


_PUBLISHING: Final = contained("RQ: publishing a job")
_STARTING: Final = contained("RQ: starting a job's span")
_FAILING: Final = contained("RQ: recording a job's exception")
_ENDING: Final = contained("RQ: ending a job's span")
_FLUSHING: Final = contained("RQ: flushing the work horse's spans")
