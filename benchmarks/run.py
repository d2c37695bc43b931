"""Benchmarks of laminar-middleware against the OpenTelemetry contrib instrumentations.

One command: `make bench` (or `python benchmarks/run.py [--quick] [--out PATH]`). Everything
runs in this process, with no network (the aiohttp client alone goes over 127.0.0.1):

- ASGI: a minimal Starlette app called through a raw ASGI loop: bare, with
  `LaminarASGIMiddleware`, with contrib's `OpenTelemetryMiddleware`.
- WSGI: a minimal Flask app called through raw WSGI calls (the response iterable consumed
  and closed): bare, with `LaminarWSGIMiddleware`, with contrib's WSGI middleware.
- httpx (a client on `httpx.MockTransport`) and requests (a session whose adapter returns a
  canned response): bare, with `instrument_httpx` / `instrument_requests`, with the contrib
  instrumentors. The calls are made inside a span, as in a request handler.
- Django, aiohttp server and aiohttp client (`frameworks.py`): the same comparison against
  contrib's Django, aiohttp-server and aiohttp-client instrumentations.
- Codec: `LaminarSpanContext.parse` against `json.loads`, `serialize` against `json.dumps`,
  on a typical 300-byte header and on a 4 KiB one.
- Queues (`queues.py`): publishing and consuming one Celery and one Dramatiq message on
  the engines' in-memory transports, against contrib's Celery instrumentation.
- Memory: many requests through each of this package's middlewares and hooks, under
  `tracemalloc`; the growth of traced memory must be flat.

Every request carries both a valid `X-Laminar-Span-Context` and a valid `traceparent` (the
same request for every variant: each middleware continues the header it knows). Variants are
measured interleaved, round by round, and reported as medians. The overhead of a variant is
the median over rounds of (variant - bare), per request.

Each variant gets its own SDK `TracerProvider`, built the same way (one `SimpleSpanProcessor`
around an exporter that does nothing): this package adds its path span processor to the
provider it uses, and a provider shared with contrib would charge that processor to contrib
too. `--shared-provider` uses one provider for everything instead.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from laminar_middleware import LaminarSpanContext, continue_trace
from laminar_middleware.codec import format_uuid

sys.path.insert(0, str(Path(__file__).resolve().parent))
from floor import FloorASGI, FloorOutbound, floor_send, floor_wsgi

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results.json"

# -- what every variant shares ---------------------------------------------------------------

TRACE_ID = 0x390C39AF5D4149394728C63199E54586
SPAN_ID = 0xC36E4F2938F27B97
# The Python SDK's header for a root span `service_a`: 279 bytes.
REMOTE = LaminarSpanContext(TRACE_ID, SPAN_ID, ("service_a",), (format_uuid(SPAN_ID),))
LAMINAR_HEADER = REMOTE.serialize()
TRACEPARENT = f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01"


class NullExporter(SpanExporter):
    """Exports nothing: the cost measured is the instrumentation's, not an exporter's."""

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def make_provider() -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(NullExporter()))
    return provider


_SHARED_PROVIDER: TracerProvider | None = None


def provider() -> TracerProvider:
    """A fresh provider per variant, or the one shared provider with --shared-provider."""
    return _SHARED_PROVIDER if _SHARED_PROVIDER is not None else make_provider()


# -- the measuring engine --------------------------------------------------------------------

# A runner does `n` requests and returns the nanoseconds they took.
Runner = Callable[[int], int]


@dataclass
class Settings:
    rounds: int
    block_seconds: float  # the time one variant's block of calls should take in a round
    memory_requests: int  # through each middleware (ASGI, WSGI)
    memory_calls: int  # through each client hook (httpx, requests)


def calls_per_block(runners: dict[str, Runner], seconds: float) -> int:
    """How many calls make a block of about `seconds` for the slowest variant."""
    slowest = 0.0
    for run in runners.values():
        run(20)  # warm-up: first calls build caches (routes, tracers, middleware stacks)
        slowest = max(slowest, run(50) / 50)
    return max(20, int(seconds * 1e9 / slowest))


def interleave(runners: dict[str, Runner], rounds: int, n: int) -> dict[str, list[float]]:
    """Per-call microseconds of every variant in every round; the order rotates per round."""
    names = list(runners)
    per_call: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            per_call[name].append(runners[name](n) / n / 1000)
    return per_call


def compare(
    group: str,
    runners: dict[str, Runner],
    settings: Settings,
    target: float,
) -> dict[str, Any]:
    """Bare, ours ("laminar") and contrib's: per-request times, overheads and their ratio."""
    print(f"  {group}: calibrating...", end="", flush=True)
    n = calls_per_block(runners, settings.block_seconds)
    print(f" {settings.rounds} rounds x {n} requests per variant", flush=True)
    rounds = interleave(runners, settings.rounds, n)
    overheads = {
        name: [t - bare for t, bare in zip(times, rounds["bare"], strict=True)]
        for name, times in rounds.items()
    }
    variants: dict[str, Any] = {}
    for name, times in rounds.items():
        entry: dict[str, Any] = {"median_us": statistics.median(times)}
        if name != "bare":
            entry["overhead_us"] = statistics.median(overheads[name])
        entry["rounds_us"] = [round(t, 3) for t in times]
        variants[name] = entry
    ours = variants["laminar"]["overhead_us"]
    contrib = variants["contrib"]["overhead_us"]
    ratio = ours / contrib if contrib > 0 else float("inf")
    # The spread of the ratio from round to round: how far to trust pass or fail.
    per_round = sorted(
        o / c if c > 0 else float("inf")
        for o, c in zip(overheads["laminar"], overheads["contrib"], strict=True)
    )
    quartiles = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
    # The SDK's own share: the floor (floor.py) is the least any implementation pays.
    floor = variants["floor"]["overhead_us"]
    return {
        "requests_per_round": n,
        "rounds": settings.rounds,
        "variants": variants,
        "ratio": ratio,
        "ratio_per_round_q1_q3": [quartiles[0], quartiles[2]],
        "floor_ratio": floor / contrib if contrib > 0 else float("inf"),
        "target": target,
        "pass": ratio <= target,
    }


# -- ASGI: Starlette -------------------------------------------------------------------------


def asgi_runners() -> dict[str, Runner]:
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from laminar_middleware import LaminarASGIMiddleware

    async def item(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    def make_app() -> Starlette:
        return Starlette(routes=[Route("/items/{item_id:int}", item)])

    bare = make_app()
    ours = make_app()
    ours.add_middleware(LaminarASGIMiddleware, tracer_provider=provider())
    contrib = make_app()
    contrib.add_middleware(OpenTelemetryMiddleware, tracer_provider=provider())
    floor = make_app()
    floor.add_middleware(FloorASGI, tracer=provider().get_tracer("floor"), remote=REMOTE)

    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/items/42",
        "raw_path": b"/items/42",
        "root_path": "",
        "query_string": b"q=1",
        "headers": [
            (b"host", b"service-b.internal:8000"),
            (b"user-agent", b"bench/1.0"),
            (b"accept", b"*/*"),
            (b"traceparent", TRACEPARENT.encode()),
            (b"x-laminar-span-context", LAMINAR_HEADER.encode()),
        ],
        "client": ("10.0.0.1", 51234),
        "server": ("10.0.0.2", 8000),
    }
    request_message = {"type": "http.request", "body": b"", "more_body": False}

    async def receive() -> dict[str, Any]:
        return request_message

    async def send(message: dict[str, Any]) -> None:
        pass

    async def many(app: Any, n: int) -> int:
        started = time.perf_counter_ns()
        for _ in range(n):
            await app(dict(scope), receive, send)  # a fresh scope: apps write into it
        return time.perf_counter_ns() - started

    loop = asyncio.new_event_loop()

    def runner(app: Any) -> Runner:
        return lambda n: loop.run_until_complete(many(app, n))

    return {
        "bare": runner(bare),
        "laminar": runner(ours),
        "contrib": runner(contrib),
        "floor": runner(floor),
    }


# -- WSGI: Flask -----------------------------------------------------------------------------

WSGI_ENVIRON: dict[str, Any] = {
    "REQUEST_METHOD": "GET",
    "SCRIPT_NAME": "",
    "PATH_INFO": "/items/42",
    "QUERY_STRING": "q=1",
    "SERVER_NAME": "service-b.internal",
    "SERVER_PORT": "8000",
    "SERVER_PROTOCOL": "HTTP/1.1",
    "REMOTE_ADDR": "10.0.0.1",
    "REMOTE_PORT": "51234",
    "HTTP_HOST": "service-b.internal:8000",
    "HTTP_USER_AGENT": "bench/1.0",
    "HTTP_ACCEPT": "*/*",
    "HTTP_TRACEPARENT": TRACEPARENT,
    "HTTP_X_LAMINAR_SPAN_CONTEXT": LAMINAR_HEADER,
    "wsgi.version": (1, 0),
    "wsgi.url_scheme": "http",
    "wsgi.input": io.BytesIO(b""),
    "wsgi.errors": sys.stderr,
    "wsgi.multithread": False,
    "wsgi.multiprocess": False,
    "wsgi.run_once": False,
}


def _start_response(status: str, headers: Any, exc_info: Any = None) -> Callable[..., Any]:
    return lambda data: None


def wsgi_runner(app: Any) -> Runner:
    """`n` requests as a WSGI server makes them: a fresh environ, the body consumed, closed."""

    def run(n: int) -> int:
        started = time.perf_counter_ns()
        for _ in range(n):
            body = app(dict(WSGI_ENVIRON), _start_response)
            for _chunk in body:
                pass
            close = getattr(body, "close", None)
            if close is not None:
                close()
        return time.perf_counter_ns() - started

    return run


def wsgi_runners() -> dict[str, Runner]:
    from flask import Flask
    from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware

    from laminar_middleware import LaminarWSGIMiddleware

    def make_app() -> Flask:
        app = Flask("bench")

        @app.get("/items/<int:item_id>")
        def item(item_id: int) -> str:
            return "ok"

        return app

    bare = make_app()
    ours = make_app()
    ours.wsgi_app = LaminarWSGIMiddleware(ours.wsgi_app, tracer_provider=provider())  # type: ignore[method-assign]
    contrib = make_app()
    contrib.wsgi_app = OpenTelemetryMiddleware(contrib.wsgi_app, tracer_provider=provider())  # type: ignore[method-assign]
    floor = make_app()
    floor.wsgi_app = floor_wsgi(floor.wsgi_app, provider().get_tracer("floor"), REMOTE)  # type: ignore[method-assign]

    return {
        "bare": wsgi_runner(bare),
        "laminar": wsgi_runner(ours),
        "contrib": wsgi_runner(contrib),
        "floor": wsgi_runner(floor),
    }


# -- outbound: httpx and requests ------------------------------------------------------------

HOST, PORT = "service-c.internal", 8000
URL = f"http://{HOST}:{PORT}/items/42?q=1"
_PARENT_PROVIDER = make_provider()


def in_a_span(call: Callable[[], Any]) -> Runner:
    """`n` calls inside a span, as a request handler makes them (the same for every
    variant): a span continuing a Laminar context, so it has a Laminar path."""

    def run(n: int) -> int:
        with continue_trace(LAMINAR_HEADER, "handler", tracer_provider=_PARENT_PROVIDER):
            started = time.perf_counter_ns()
            for _ in range(n):
                call()
            return time.perf_counter_ns() - started

    return run


def httpx_runners() -> dict[str, Runner]:
    import httpx
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    from laminar_middleware import instrument_httpx

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"ok")

    def make_client() -> httpx.Client:
        return httpx.Client(transport=httpx.MockTransport(handler))

    bare = make_client()
    ours = make_client()
    instrument_httpx(ours, tracer_provider=provider())
    contrib = make_client()
    HTTPXClientInstrumentor.instrument_client(contrib, tracer_provider=provider())
    inner = httpx.MockTransport(handler)
    floor_transport = httpx.MockTransport(handler)
    floor_transport.handle_request = floor_send(  # type: ignore[method-assign]
        inner.handle_request, FloorOutbound(provider().get_tracer("floor")), HOST, PORT
    )
    floor = httpx.Client(transport=floor_transport)
    return {
        "bare": in_a_span(lambda: bare.get(URL)),
        "laminar": in_a_span(lambda: ours.get(URL)),
        "contrib": in_a_span(lambda: contrib.get(URL)),
        "floor": in_a_span(lambda: floor.get(URL)),
    }


def requests_runners() -> dict[str, Runner]:
    import requests
    from opentelemetry.instrumentation.requests import RequestsInstrumentor
    from requests.adapters import BaseAdapter
    from requests.structures import CaseInsensitiveDict

    from laminar_middleware import instrument_requests

    class CannedAdapter(BaseAdapter):
        """Answers every request with `200 ok`, without a socket."""

        def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
            response = requests.Response()
            response.status_code = 200
            response.reason = "OK"
            response.headers = CaseInsensitiveDict({"Content-Type": "text/plain"})
            response._content = b"ok"
            response.encoding = "utf-8"
            response.url = request.url or ""
            response.request = request
            response.connection = self
            return response

        def close(self) -> None:
            pass

    def make_session() -> requests.Session:
        session = requests.Session()
        session.mount("http://", CannedAdapter())
        return session

    bare = make_session()
    ours = make_session()
    instrument_requests(ours, tracer_provider=provider())
    # Contrib instruments `Session.send` for every session; its instrumented function is
    # bound to one session instead (what its `uninstrument_session` undoes), so that the
    # other variants run without it.
    contrib = make_session()
    instrumentor = RequestsInstrumentor()
    instrumentor.instrument(tracer_provider=provider())
    contrib_send = requests.Session.send
    instrumentor.uninstrument()
    contrib.send = types.MethodType(contrib_send, contrib)  # type: ignore[method-assign]
    floor = make_session()
    floor.send = floor_send(  # type: ignore[method-assign]
        floor.send, FloorOutbound(provider().get_tracer("floor")), HOST, PORT
    )
    return {
        "bare": in_a_span(lambda: bare.get(URL)),
        "laminar": in_a_span(lambda: ours.get(URL)),
        "contrib": in_a_span(lambda: contrib.get(URL)),
        "floor": in_a_span(lambda: floor.get(URL)),
    }


# -- codec -----------------------------------------------------------------------------------


def header_4k() -> str:
    """A large header, about half path and half metadata: 24 levels of spans, a user and a
    session, and a couple of dozen metadata entries of the kinds people attach."""
    depth = 24
    names = tuple(f"agent.step_{i:02d}.call_tool" for i in range(depth))
    ids = tuple(format_uuid(0x5EED0000 + i) for i in range(depth))
    metadata: dict[str, Any] = {
        "tenant": "acme-corporation",
        "region": "eu-west-1",
        "release": "2024.11.3+build.5521",
        "feature_flags": ["new-checkout", "fast-pricing", "beta-search"],
        "attempt": 2,
        "priority": 0.75,
        "dry_run": False,
        "request": {"source": "mobile-app", "locale": "de-DE", "ab_bucket": 17},
        "query": "compare the shipping options for order 58213 and pick the cheapest " * 3,
    }
    text = ""
    for i in range(64):
        context = LaminarSpanContext(
            TRACE_ID,
            SPAN_ID,
            names,
            ids,
            user_id="user-7f3c2a9e-5b1d-4c8a-9e6f-2d4b8a1c3e5f",
            session_id="session-0b9d8c7a-6e5f-4d3c-2b1a-0f9e8d7c6b5a",
            trace_type="DEFAULT",
            metadata=metadata,
        )
        bigger = context.serialize()
        if len(bigger) > 4096:
            return text
        text = bigger
        metadata[f"note_{i}"] = (
            f"annotation {i}: the tool call returned 3 results in time; "
            "the cheapest carrier was picked and the order was updated"
        )
    raise AssertionError("the 4 KiB header did not grow")  # pragma: no cover


def timed(func: Callable[[Any], Any], arg: Any) -> Runner:
    def run(n: int) -> int:
        started = time.perf_counter_ns()
        for _ in range(n):
            func(arg)
        return time.perf_counter_ns() - started

    return run


def codec_results(settings: Settings) -> dict[str, Any]:
    results: dict[str, Any] = {}
    parse = LaminarSpanContext.parse
    loads = json.loads
    dumps = json.dumps
    for label, text in (("300 B", LAMINAR_HEADER), ("4 KiB", header_4k())):
        context = parse(text)
        data = loads(text)
        assert context is not None and context.serialize() == text
        for operation, ours, baseline in (
            ("parse", timed(parse, text), timed(loads, text)),
            ("serialize", timed(LaminarSpanContext.serialize, context), timed(dumps, data)),
        ):
            runners = {"laminar": ours, "json": baseline}
            n = calls_per_block(runners, settings.block_seconds / 4)
            rounds = interleave(runners, settings.rounds, n)
            ours_us = statistics.median(rounds["laminar"])
            json_us = statistics.median(rounds["json"])
            ratio = ours_us / json_us
            results[f"{operation} {label}"] = {
                "bytes": len(text),
                "laminar_us": ours_us,
                "json_us": json_us,
                "baseline": "json.loads" if operation == "parse" else "json.dumps",
                "ratio": ratio,
                "target": 3.0,
                "pass": ratio <= 3.0,
            }
    return results


# -- memory ----------------------------------------------------------------------------------

MEMORY_LIMIT_BYTES_PER_REQUEST = 1.0  # a leak keeps a span or a context: hundreds of bytes


def memory_results(groups: dict[str, dict[str, Runner]], settings: Settings) -> dict[str, Any]:
    """Growth of traced memory over many requests through each of our variants.

    `tracemalloc` makes every request 3-4 times slower; the client hooks, whose calls cost
    more, get fewer calls (settings.memory_calls) so the run stays within a few minutes.
    """
    results: dict[str, Any] = {}
    for group, runners in groups.items():
        requests = settings.memory_requests if group in SERVERS else settings.memory_calls
        warm_up = min(1000, requests // 5)
        run = runners["laminar"]
        tracemalloc.start()
        # Traced warm-up: what the first requests leave in caches (regex templates, free
        # lists, lazily built stacks) is not growth.
        run(warm_up)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(requests // warm_up):
            run(warm_up)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        growth = after - before
        per_request = growth / requests
        results[group] = {
            "requests": requests,
            "growth_kib": growth / 1024,
            "bytes_per_request": per_request,
            "limit_bytes_per_request": MEMORY_LIMIT_BYTES_PER_REQUEST,
            "pass": per_request <= MEMORY_LIMIT_BYTES_PER_REQUEST,
        }
        print(f"  {group}: {growth / 1024:+.1f} KiB over {requests} requests", flush=True)
    return results


# -- report ----------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    found: dict[str, str] = {"python": platform.python_version()}
    for name in (
        "laminar-middleware",
        "opentelemetry-sdk",
        "opentelemetry-instrumentation-asgi",
        "opentelemetry-instrumentation-wsgi",
        "opentelemetry-instrumentation-httpx",
        "opentelemetry-instrumentation-requests",
        "opentelemetry-instrumentation-celery",
        "opentelemetry-instrumentation-django",
        "opentelemetry-instrumentation-aiohttp-server",
        "opentelemetry-instrumentation-aiohttp-client",
        "starlette",
        "flask",
        "django",
        "aiohttp",
        "httpx",
        "requests",
        "celery",
        "dramatiq",
    ):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def table(results: dict[str, Any]) -> str:
    lines = [
        "",
        "Per-request overhead (variant - bare), median over rounds, microseconds",
        f"{'':14} {'bare':>9} {'laminar':>9} {'contrib':>9} {'ratio':>7} {'(q1-q3)':>11} "
        f"{'target':>7}  result  {'floor':>7} {'floor ratio':>11}",
    ]
    for group in TARGETS:
        r = results[group]
        v = r["variants"]
        q1, q3 = r["ratio_per_round_q1_q3"]
        lines.append(
            f"{group:14} {v['bare']['median_us']:9.1f} {v['laminar']['overhead_us']:9.1f} "
            f"{v['contrib']['overhead_us']:9.1f} {r['ratio']:7.2f} {f'{q1:.2f}-{q3:.2f}':>11} "
            f"{r['target']:7.2f}  {'pass' if r['pass'] else 'FAIL'}    "
            f"{v['floor']['overhead_us']:7.1f} {r['floor_ratio']:11.2f}"
        )
    lines += [
        "floor: the SDK alone, the span and attributes we promise and nothing else",
        "(benchmarks/floor.py); floor ratio = floor / contrib, the lowest ratio reachable.",
        "",
        "Codec, median per call, microseconds",
        f"{'':16} {'bytes':>6} {'laminar':>9} {'json':>9} {'ratio':>7} {'target':>7}  result",
    ]
    for name, r in results["codec"].items():
        lines.append(
            f"{name:16} {r['bytes']:6d} {r['laminar_us']:9.2f} {r['json_us']:9.2f} "
            f"{r['ratio']:7.2f} {r['target']:7.2f}  {'pass' if r['pass'] else 'FAIL'}"
        )
    memory = results["memory"]
    lines += [
        "",
        "Memory: growth of traced memory (tracemalloc), this package's variants",
        f"{'':14} {'requests':>9} {'KiB':>9} {'B/request':>10} {'limit':>7}  result",
    ]
    for group in TARGETS:
        r = memory[group]
        lines.append(
            f"{group:14} {r['requests']:9d} {r['growth_kib']:+9.1f} "
            f"{r['bytes_per_request']:+10.3f} {r['limit_bytes_per_request']:7.1f}  "
            f"{'pass' if r['pass'] else 'FAIL'}"
        )
    return "\n".join(lines)


def failed_targets(results: dict[str, Any]) -> list[str]:
    failed = [g for g in TARGETS if not results[g]["pass"]]
    failed += [g for g, r in results["queues"].items() if r["passed"] is False]
    failed += [f"codec {name}" for name, r in results["codec"].items() if not r["pass"]]
    failed += [f"memory {g}" for g in TARGETS if not results["memory"][g]["pass"]]
    return failed


# The HTTP groups and their targets (ours / contrib's overhead).
TARGETS = {
    "asgi": 0.5,
    "wsgi": 0.5,
    "httpx": 0.7,
    "requests": 0.7,
    "django": 0.5,
    "aiohttp": 0.5,
    "aiohttp_client": 0.7,
}
# Groups whose runner serves a request in-process: the memory check gives them more requests.
SERVERS = ("asgi", "wsgi", "django", "aiohttp")


def http_groups() -> dict[str, dict[str, Runner]]:
    from frameworks import aiohttp_client_runners, aiohttp_runners, django_runners

    return {
        "asgi": asgi_runners(),
        "wsgi": wsgi_runners(),
        "httpx": httpx_runners(),
        "requests": requests_runners(),
        "django": django_runners(),
        "aiohttp": aiohttp_runners(),
        "aiohttp_client": aiohttp_client_runners(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    global _SHARED_PROVIDER
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write JSON")
    parser.add_argument(
        "--shared-provider",
        action="store_true",
        help="one TracerProvider for every variant instead of one per variant",
    )
    args = parser.parse_args(argv)
    if args.quick:
        settings = Settings(rounds=9, block_seconds=0.01, memory_requests=5_000, memory_calls=1_000)
    else:
        # Many short rounds rather than a few long ones: a burst of other work on the
        # machine then spoils a few rounds, which the medians leave out.
        settings = Settings(
            rounds=41, block_seconds=0.05, memory_requests=100_000, memory_calls=10_000
        )
    if args.shared_provider:
        _SHARED_PROVIDER = make_provider()

    started = time.perf_counter()
    print(f"laminar-middleware benchmarks ({'quick' if args.quick else 'full'} run)", flush=True)
    groups = http_groups()
    results: dict[str, Any] = {
        "meta": {
            "mode": "quick" if args.quick else "full",
            "provider": "shared" if args.shared_provider else "one per variant",
            "versions": versions(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        }
    }
    print("Per-request time, interleaved rounds:", flush=True)
    for group, runners in groups.items():
        results[group] = compare(group, runners, settings, TARGETS[group])
    from queues import QUEUE_GROUPS, compare_queue, queue_table

    print(f"Per-message time, interleaved rounds: ({time.perf_counter() - started:.0f} s so far)")
    results["queues"] = {
        group: compare_queue(group, build(), settings) for group, build in QUEUE_GROUPS.items()
    }
    print(f"Codec: ({time.perf_counter() - started:.0f} s so far)", flush=True)
    results["codec"] = codec_results(settings)
    print(f"Memory: ({time.perf_counter() - started:.0f} s so far)", flush=True)
    results["memory"] = memory_results(groups, settings)
    failed = failed_targets(results)
    results["failed_targets"] = failed
    results["seconds"] = round(time.perf_counter() - started, 1)

    print(table(results))
    print("\n".join(queue_table(results["queues"])))
    print()
    print("All targets met." if not failed else f"Targets missed: {', '.join(failed)}")
    print(f"{results['seconds']} s; results written to {args.out}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    # queues.py and frameworks.py import this script as `run`: let them find this module
    # rather than a second copy (whose --shared-provider would be unset).
    sys.modules["run"] = sys.modules[__name__]
    sys.exit(main())
