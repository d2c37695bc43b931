"""Real servers for the tests, on 127.0.0.1 with ephemeral ports: uvicorn and Werkzeug's
threaded server, each in a thread, started and stopped by a context manager; and a bounded
wait for spans that end on server threads."""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


def wait_for_spans(
    exporter: InMemorySpanExporter,
    predicate: Callable[[list[ReadableSpan]], bool],
    timeout: float = 5.0,
) -> list[ReadableSpan]:
    """Spans end on server threads after the client has its response: wait, bounded."""
    deadline = time.monotonic() + timeout
    while True:
        spans = list(exporter.get_finished_spans())
        if predicate(spans) or time.monotonic() > deadline:
            return spans
        time.sleep(0.01)


def _bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def run_uvicorn(app: Any, **config: Any) -> Iterator[str]:
    """Serve an ASGI app with real uvicorn in a thread; yields its base URL."""
    import uvicorn

    sock = _bound_socket()
    port = sock.getsockname()[1]
    # uvicorn closes a connection idle for 5 s; a client starved of CPU for that long sends
    # its next request as the server closes it and gets a ReadError (seen under load).
    config.setdefault("timeout_keep_alive", 120)
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan=config.pop("lifespan", "auto"), **config)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


class _InFlight:
    """Counts the WSGI responses not closed yet. A server span ends when its response is
    closed, which is after the client already has the bytes, and werkzeug's request threads
    are daemons that `server_close()` does not join: without waiting here, the last span of a
    test could land in the exporter after the next test has cleared it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.open = 0
        self.idle = threading.Condition()

    def __call__(self, environ: Any, start_response: Any) -> Any:
        with self.idle:
            self.open += 1
        try:
            return _ClosingBody(self.app(environ, start_response), self._closed)
        except BaseException:
            self._closed()
            raise

    def _closed(self) -> None:
        with self.idle:
            self.open -= 1
            self.idle.notify_all()

    def wait_idle(self, timeout: float) -> None:
        with self.idle:
            self.idle.wait_for(lambda: self.open == 0, timeout)


class _ClosingBody:
    """The app's response body, with a call once its `close()` has run (a class, not a
    generator: a server may close a body it never iterated)."""

    def __init__(self, body: Any, closed: Callable[[], None]) -> None:
        self.body = body
        self.closed = closed

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.body)

    def close(self) -> None:
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            self.closed()


@contextmanager
def run_wsgi(app: Any) -> Iterator[str]:
    """Serve a WSGI app with werkzeug's threaded server in a thread; yields its base URL.
    On exit, waits (bounded) until every response has been closed."""
    from werkzeug.serving import make_server

    in_flight = _InFlight(app)
    server = make_server("127.0.0.1", 0, in_flight, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
        in_flight.wait_idle(10)


@contextmanager
def run_aiohttp(app: Any, backlog: int = 128) -> Iterator[str]:
    """Serve an aiohttp application with its own runner, on a loop in a thread; yields its
    base URL. Stopping waits for the runner's cleanup, bounded."""
    import asyncio

    from aiohttp import web

    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    sock = _bound_socket()
    port = sock.getsockname()[1]
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.SockSite(runner, sock, backlog=backlog).start())
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    if not started.wait(10):
        raise RuntimeError("aiohttp did not start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        sock.close()


class _Watched:
    """An app's response passed through, telling whether the server closed it and when the
    server let it go."""

    def __init__(self, inner: Any, closed: threading.Event, released: threading.Event) -> None:
        self.inner, self.closed, self.released = inner, closed, released

    def __iter__(self) -> Any:
        return iter(self.inner)

    def close(self) -> None:
        self.closed.set()
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()

    def __del__(self) -> None:
        self.released.set()


def hang_up_while_werkzeug_drains(app: Any, path: str) -> bytes:
    """One GET served by Werkzeug's server, from a client that reads the whole response and
    then resets the connection while the server drains the socket: Werkzeug's drain raises
    and the response's `close()` is never called (checked: the test would prove nothing
    otherwise). Returns the response as received, once the server has let it go."""
    from werkzeug.serving import make_server

    started, go = threading.Event(), threading.Event()
    closed, released = threading.Event(), threading.Event()

    def gated(environ: Any, start_response: Any) -> Any:
        started.set()
        go.wait(5)
        return _Watched(app(environ, start_response), closed, released)

    server = make_server("127.0.0.1", 0, gated, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=5) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            if not started.wait(5):
                raise RuntimeError("the request never reached the app")
            # Bytes the server has not read: its drain after the response finds them, then
            # waits for more and gets the reset.
            sock.sendall(b"unread")
            go.set()
            received = _read_response(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if not released.wait(5):
            raise RuntimeError("the server kept the response")
        if closed.is_set():
            raise AssertionError("the server closed the response: not the path under test")
        return received
    finally:
        go.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


def _read_response(sock: socket.socket) -> bytes:
    received = b""
    while b"\r\n\r\n" not in received:
        received += _recv(sock)
    head, _, body = received.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    if length is None:  # chunked: up to the last, empty chunk
        while not body.endswith(b"0\r\n\r\n"):
            body += _recv(sock)
    else:
        while len(body) < int(length.group(1)):
            body += _recv(sock)
    return head + b"\r\n\r\n" + body


def _recv(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    if not chunk:
        raise RuntimeError("the server closed the connection mid-response")
    return chunk
