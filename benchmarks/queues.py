"""Queue benchmarks: publishing and consuming one task message, in-process, per engine.

`run.py` runs these beside the HTTP groups (`make bench`), and `instructions.py` counts
their instructions. Each engine runs on its own in-memory transport, with no broker process:

- Celery (`memory://`): publish is `task.apply_async()` inside a span; consume is the
  function a worker runs for each message (`celery.app.trace.build_tracer`), given the
  request a worker builds from a message that carries both a Laminar header and a
  `traceparent` (each variant continues the header it knows). Bare, with
  `instrument_celery(app)`, with contrib's `CeleryInstrumentor`, and the floor (`floor.py`:
  the SDK's span and headers alone).
- Dramatiq (`StubBroker`): publish is `actor.send()` inside a span; consume is what
  Dramatiq's worker thread does for a message (the `process_message` hooks around the
  actor's function). Bare and with `LaminarMiddleware`; contrib has no Dramatiq
  instrumentation, so there is no ratio.

RQ is left out: it has no in-memory transport (every call is a Redis round trip), and
contrib has no RQ instrumentation to compare with.

Celery's signals are global: contrib's receivers would run in every variant. So each
variant turns its instrumentation on before its block of calls and off after it, outside
the timed part, and builds the worker's function after that (Celery's tracer reads the
signal receivers when it is built).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from run import (
    LAMINAR_HEADER,
    REMOTE,
    TRACEPARENT,
    Runner,
    Settings,
    calls_per_block,
    in_a_span,
    interleave,
    provider,
)

from laminar_middleware.codec import HEADER_NAME

QUEUE = "bench"


# -- Celery ----------------------------------------------------------------------------------


def _celery_app(name: str) -> Any:
    from celery import Celery

    app = Celery(name, broker="memory://", set_as_current=False)
    app.conf.update(task_default_queue=QUEUE, broker_connection_retry_on_startup=True)

    @app.task(name="bench.add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    return app


def _celery_layers(app: Any) -> dict[str, Callable[[], AbstractContextManager[None]]]:
    """What each variant turns on around its block: nothing, ours, contrib's, the floor's."""
    from floor import FloorCelery
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    from laminar_middleware.celery import instrument_celery, uninstrument_celery

    ours_provider, contrib_provider = provider(), provider()
    floor_receivers = FloorCelery(provider().get_tracer("floor"), REMOTE)

    @contextmanager
    def ours() -> Iterator[None]:
        instrument_celery(app, tracer_provider=ours_provider)
        try:
            yield
        finally:
            uninstrument_celery(app)

    @contextmanager
    def contrib() -> Iterator[None]:
        instrumentor = CeleryInstrumentor()
        instrumentor.instrument(tracer_provider=contrib_provider)
        try:
            yield
        finally:
            instrumentor.uninstrument()

    @contextmanager
    def floor() -> Iterator[None]:
        floor_receivers.connect()
        try:
            yield
        finally:
            floor_receivers.disconnect()

    return {"bare": nullcontext, "laminar": ours, "contrib": contrib, "floor": floor}


def celery_publish_runners() -> dict[str, Runner]:
    app = _celery_app("bench-publish")
    task = app.tasks["bench.add"]

    def runner(layer: Callable[[], AbstractContextManager[None]]) -> Runner:
        publish = in_a_span(lambda: task.apply_async((1, 2)))

        def run(n: int) -> int:
            with layer():
                elapsed = publish(n)
            with app.connection_for_write() as connection:
                connection.default_channel.queue_purge(QUEUE)  # keep the queue empty
            return elapsed

        return run

    return {name: runner(layer) for name, layer in _celery_layers(app).items()}


def _celery_request(task_id: str) -> dict[str, Any]:
    """The request a worker builds from a task message (protocol 2) sent by a caller."""
    return {
        "id": task_id,
        "task": "bench.add",
        "root_id": task_id,
        "parent_id": None,
        "retries": 0,
        "delivery_info": {"exchange": "", "routing_key": QUEUE, "priority": 0},
        "headers": None,
        HEADER_NAME: LAMINAR_HEADER,
        "traceparent": TRACEPARENT,
        "hostname": "bench@localhost",
        "is_eager": False,
    }


def celery_consume_runners() -> dict[str, Runner]:
    from celery.app.trace import build_tracer

    app = _celery_app("bench-consume")
    task = app.tasks["bench.add"]
    request = _celery_request("7d1a3e0c-5b8f-4f0e-9a44-0c2b6f1d9e21")

    def runner(layer: Callable[[], AbstractContextManager[None]]) -> Runner:
        def run(n: int) -> int:
            with layer():
                execute = build_tracer(task.name, task, app=app, eager=False)
                started = time.perf_counter_ns()
                for _ in range(n):
                    execute(request["id"], (1, 2), {}, request)
                return time.perf_counter_ns() - started

        return run

    return {name: runner(layer) for name, layer in _celery_layers(app).items()}


# -- Dramatiq --------------------------------------------------------------------------------


def _dramatiq_broker(instrumented: bool) -> tuple[Any, Any]:
    import dramatiq
    from dramatiq.brokers.stub import StubBroker

    from laminar_middleware.dramatiq import LaminarMiddleware

    broker = StubBroker()
    if instrumented:
        broker.add_middleware(LaminarMiddleware(tracer_provider=provider()), before=None)
    broker.emit_after("process_boot")

    @dramatiq.actor(broker=broker, queue_name=QUEUE, actor_name="add")
    def add(x: int, y: int) -> int:
        return x + y

    return broker, add


def dramatiq_publish_runners() -> dict[str, Runner]:
    def runner(instrumented: bool) -> Runner:
        broker, add = _dramatiq_broker(instrumented)
        publish = in_a_span(lambda: add.send(1, 2))

        def run(n: int) -> int:
            elapsed = publish(n)
            broker.flush_all()
            return elapsed

        return run

    return {"bare": runner(False), "laminar": runner(True)}


def dramatiq_consume_runners() -> dict[str, Runner]:
    from dramatiq import Message
    from dramatiq.broker import MessageProxy

    def runner(instrumented: bool) -> Runner:
        broker, add = _dramatiq_broker(instrumented)
        options = {"laminar_middleware.headers": {HEADER_NAME: LAMINAR_HEADER}}
        message = MessageProxy(Message(QUEUE, "add", (1, 2), {}, options))

        def run(n: int) -> int:
            # What dramatiq.worker._WorkerThread.process_message does around the actor.
            started = time.perf_counter_ns()
            for _ in range(n):
                broker.emit_before("process_message", message)
                result = add.fn(*message.args, **message.kwargs)
                broker.emit_after("process_message", message, result=result)
            return time.perf_counter_ns() - started

        return run

    return {"bare": runner(False), "laminar": runner(True)}


QUEUE_GROUPS: dict[str, Callable[[], dict[str, Runner]]] = {
    "celery publish": celery_publish_runners,
    "celery consume": celery_consume_runners,
    "dramatiq publish": dramatiq_publish_runners,
    "dramatiq consume": dramatiq_consume_runners,
}

TARGET = 0.7  # ours / contrib's overhead, where contrib has an instrumentation


def compare_queue(group: str, runners: dict[str, Runner], settings: Settings) -> dict[str, Any]:
    """Bare, ours and (Celery) contrib's per-message times, overheads and their ratio."""
    print(f"  {group}: calibrating...", end="", flush=True)
    n = calls_per_block(runners, settings.block_seconds)
    print(f" {settings.rounds} rounds x {n} messages per variant", flush=True)
    rounds = interleave(runners, settings.rounds, n)
    variants: dict[str, Any] = {}
    for name, times in rounds.items():
        entry: dict[str, Any] = {"median_us": statistics.median(times)}
        if name != "bare":
            overheads = [t - b for t, b in zip(times, rounds["bare"], strict=True)]
            entry["overhead_us"] = statistics.median(overheads)
        entry["rounds_us"] = [round(t, 3) for t in times]
        variants[name] = entry
    result: dict[str, Any] = {"messages_per_round": n, "rounds": settings.rounds}
    result["variants"] = variants
    if "contrib" in variants:
        ours, contrib = variants["laminar"]["overhead_us"], variants["contrib"]["overhead_us"]
        ratio = ours / contrib if contrib > 0 else float("inf")
        result.update(ratio=ratio, target=TARGET, passed=ratio <= TARGET)
        floor = variants["floor"]["overhead_us"]
        result["floor_ratio"] = floor / contrib if contrib > 0 else float("inf")
    else:
        result.update(ratio=None, target=None, passed=None, floor_ratio=None)
    return result


def queue_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "Per-message overhead (variant - bare), median over rounds, microseconds",
        f"{'':17} {'bare':>9} {'laminar':>9} {'contrib':>9} {'ratio':>7} {'target':>7}  result"
        f"  {'floor':>7} {'floor ratio':>11}",
    ]
    for group, r in results.items():
        v = r["variants"]
        contrib = f"{v['contrib']['overhead_us']:9.1f}" if "contrib" in v else f"{'-':>9}"
        ratio = f"{r['ratio']:7.2f}" if r["ratio"] is not None else f"{'-':>7}"
        target = f"{r['target']:7.2f}" if r["target"] is not None else f"{'-':>7}"
        verdict = {True: "pass", False: "FAIL", None: "-"}[r["passed"]]
        floor = f"{v['floor']['overhead_us']:7.1f}" if "floor" in v else f"{'-':>7}"
        floor_ratio = f"{r['floor_ratio']:11.2f}" if r["floor_ratio"] is not None else f"{'-':>11}"
        lines.append(
            f"{group:17} {v['bare']['median_us']:9.1f} {v['laminar']['overhead_us']:9.1f} "
            f"{contrib} {ratio} {target}  {verdict:6}  {floor} {floor_ratio}"
        )
    lines.append("contrib has no Dramatiq instrumentation: its rows have no ratio.")
    lines.append("floor: the SDK alone, the span, attributes and headers we promise (floor.py).")
    return lines
