"""The W3C trace-context test suite in full through the ASGI and the WSGI middleware, with
the httpx and requests hooks making the callbacks: every case passes. The contrib ASGI and
WSGI middlewares (with the contrib httpx instrumentation making the callbacks) run the same
cases beside them, and both results are printed at the end of the test session."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import requests
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from support.servers import run_uvicorn, run_wsgi
from support.w3c_suite import CASES, RESULTS, Harness, run_case

from laminar_middleware import LaminarASGIMiddleware, LaminarWSGIMiddleware
from laminar_middleware.httpx import instrument_httpx
from laminar_middleware.requests import instrument_requests


def asgi_service(instrumented: bool) -> Any:
    """The test service as a raw ASGI app: POSTs each callback with httpx (instrumented by
    this package, or else by contrib)."""

    clients: list[httpx.AsyncClient] = []  # one, made on the server's event loop

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if not clients:
            clients.append(httpx.AsyncClient(timeout=10))
            if instrumented:
                instrument_httpx(clients[0])
            else:
                HTTPXClientInstrumentor.instrument_client(clients[0])
        for call in json.loads(body or b"[]"):
            await clients[0].post(call["url"], json=call["arguments"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


def wsgi_service(instrumented: bool) -> Any:
    """The test service as a plain WSGI app: POSTs each callback with requests, instrumented
    by this package; for contrib, with httpx, since contrib instruments requests only
    process-wide."""
    session = requests.Session()
    client = httpx.Client(timeout=10)
    if instrumented:
        instrument_requests(session)
    else:
        HTTPXClientInstrumentor.instrument_client(client)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        for call in json.loads(environ["wsgi.input"].read(length) or b"[]"):
            if instrumented:
                session.post(call["url"], json=call["arguments"], timeout=10)
            else:
                client.post(call["url"], json=call["arguments"])
        start_response("200 OK", [("content-type", "text/plain")])
        return [b"ok"]

    return app


def contrib_asgi() -> Any:
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    return OpenTelemetryMiddleware(asgi_service(instrumented=False))


def contrib_wsgi() -> Any:
    from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware

    return OpenTelemetryMiddleware(wsgi_service(instrumented=False))


@pytest.fixture(scope="module")
def harness() -> Iterator[tuple[Harness, str]]:
    harness = Harness()
    with harness.serving() as base:
        yield harness, base


@pytest.fixture(scope="module", params=["ASGI", "WSGI"])
def service(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    if request.param == "ASGI":
        with run_uvicorn(LaminarASGIMiddleware(asgi_service(True)), lifespan="off") as base:
            yield f"laminar-middleware {request.param}", f"{base}/test"
    else:
        with run_wsgi(LaminarWSGIMiddleware(wsgi_service(True))) as base:
            yield f"laminar-middleware {request.param}", f"{base}/test"


@pytest.mark.parametrize("case", list(CASES))
def test_w3c_case_passes(case: str, service: tuple[str, str], harness: tuple[Harness, str]) -> None:
    name, url = service
    failures = run_case(url, harness[0], harness[1], case)
    RESULTS.setdefault(name, {})[case] = failures
    assert failures == []


@pytest.mark.parametrize(
    ("name", "serve", "make"),
    [
        ("contrib ASGI", run_uvicorn, contrib_asgi),
        ("contrib WSGI", run_wsgi, contrib_wsgi),
    ],
)
def test_contrib_runs_the_same_cases(
    name: str, serve: Any, make: Callable[[], Any], harness: tuple[Harness, str]
) -> None:
    """For information beside ours, printed at the end (which cases contrib fails depends
    on the OpenTelemetry release installed); asserted: every case reached the service and
    got its callbacks, so what is printed is the propagator's answer, not a broken run."""
    with serve(make()) as base:
        results = {case: run_case(f"{base}/test", harness[0], harness[1], case) for case in CASES}
    RESULTS[name] = results
    unanswered = [f for failures in results.values() for f in failures if "no callback" in f]
    assert unanswered == []
    assert results["test_traceparent_included_tracestate_missing"] == []
