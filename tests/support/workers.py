"""What the queue tests share about the worker processes they start: a caller's context in
a trace of the test's own (a worker's span file outlives one test), and a bounded stop."""

from __future__ import annotations

import random
import subprocess

from laminar_middleware import LaminarSpanContext
from laminar_middleware.codec import format_uuid


def random_caller() -> LaminarSpanContext:
    span_id = random.getrandbits(63) + 1
    return LaminarSpanContext(
        trace_id=random.getrandbits(127) + 1,
        span_id=span_id,
        span_path=("caller",),
        span_ids_path=(format_uuid(span_id),),
        user_id="user-7",
        session_id="session-9",
        metadata={"tenant": "acme"},
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    """A warm shutdown (SIGTERM), then a kill: bounded either way."""
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
