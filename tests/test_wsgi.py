"""LaminarWSGIMiddleware with Flask under Werkzeug's threaded server, called over sockets."""

from __future__ import annotations

import gc
import http.client
import random
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from flask import Blueprint, Flask, Response, abort, stream_with_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from support.servers import hang_up_while_werkzeug_drains, run_wsgi, wait_for_spans

from laminar_middleware import HEADER_NAME, LaminarSpanContext, LaminarWSGIMiddleware
from laminar_middleware.codec import format_uuid
from laminar_middleware.flask import instrument_flask

SCOPE = "laminar_middleware"


def make_remote(**fields: Any) -> LaminarSpanContext:
    trace_id = random.getrandbits(128) | 1
    span_id = random.getrandbits(64) | 1
    values: dict[str, Any] = {
        "span_path": ("service_a",),
        "span_ids_path": (format_uuid(span_id),),
        "user_id": "user-7",
        "session_id": "session-9",
        "metadata": {"tenant": "acme"},
    }
    values.update(fields)
    return LaminarSpanContext(trace_id, span_id, **values)


def ours(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    return [s for s in spans if s.kind is SpanKind.SERVER and s.instrumentation_scope.name == SCOPE]


def wait_ours(
    exporter: InMemorySpanExporter, count: int, timeout: float = 5.0
) -> list[ReadableSpan]:
    return ours(wait_for_spans(exporter, lambda spans: len(ours(spans)) >= count, timeout))


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def current_trace_id() -> str:
    return f"{trace.get_current_span().get_span_context().trace_id:032x}"


STREAM_MARKS: list[int] = []


def build_flask(**config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(config)

    @app.get("/items/<int:item_id>")
    def get_item(item_id: int) -> dict[str, Any]:
        with trace.get_tracer("handler").start_as_current_span("handler work"):
            time.sleep(0.001)
            return {"item_id": item_id, "trace_id": current_trace_id()}

    @app.get("/boom")
    def boom() -> str:
        raise ValueError("the view failed")

    @app.get("/unavailable")
    def unavailable() -> str:
        abort(503)

    @app.get("/health")
    def health() -> str:
        return "ok"

    @app.get("/stream")
    def stream() -> Response:
        def chunks() -> Iterator[str]:
            for i in range(3):
                time.sleep(0.1)
                with trace.get_tracer("handler").start_as_current_span(f"chunk {i}"):
                    STREAM_MARKS.append(time.time_ns())
                yield f"chunk {i}\n"

        return Response(stream_with_context(chunks()), mimetype="text/plain")

    shop = Blueprint("shop", __name__, url_prefix="/shops/<shop>")

    @shop.get("/orders/<order_id>")
    def order(shop: str, order_id: str) -> str:
        return f"{shop}/{order_id}"

    app.register_blueprint(shop)
    return app


@pytest.fixture(scope="module")
def flask_url() -> Iterator[str]:
    app = build_flask()
    app.wsgi_app = LaminarWSGIMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    with run_wsgi(app) as url:
        yield url


def test_server_span_is_the_child_of_the_laminar_header(
    exporter: InMemorySpanExporter, flask_url: str
) -> None:
    remote = make_remote()
    r = requests.get(
        f"{flask_url}/items/5", headers={HEADER_NAME: remote.serialize(), "User-Agent": "ua/2"}
    )
    assert r.json() == {"item_id": 5, "trace_id": f"{remote.trace_id:032x}"}
    (span,) = wait_ours(exporter, 1)
    assert span.context.trace_id == remote.trace_id
    assert span.parent is not None and span.parent.span_id == remote.span_id
    assert span.name == "GET /items/<int:item_id>"
    a = attrs(span)
    assert a["http.request.method"] == "GET"
    assert a["url.path"] == "/items/5"
    assert a["url.scheme"] == "http"
    assert a["http.route"] == "/items/<int:item_id>"
    assert a["http.response.status_code"] == 200
    assert a["server.address"] == "127.0.0.1"
    assert a["server.port"] == urlsplit(flask_url).port
    assert a["client.address"] == "127.0.0.1"
    assert a["user_agent.original"] == "ua/2"
    assert a["lmnr.span.path"] == ("service_a", "GET /items/<int:item_id>")
    assert a["lmnr.span.ids_path"] == (*remote.span_ids_path, format_uuid(span.context.span_id))
    assert "lmnr.span.parent_path" not in a  # for Laminar's SDK only
    assert a["lmnr.association.properties.user_id"] == "user-7"
    assert a["lmnr.association.properties.session_id"] == "session-9"
    assert a["lmnr.association.properties.metadata.tenant"] == "acme"
    spans = list(exporter.get_finished_spans())
    (work,) = [s for s in spans if s.name == "handler work"]
    assert work.parent is not None and work.parent.span_id == span.context.span_id


def test_route_names_with_plain_wrapping(exporter: InMemorySpanExporter, flask_url: str) -> None:
    expected = {
        "/items/1": "GET /items/<int:item_id>",
        "/shops/s1/orders/o2": "GET /shops/<shop>/orders/<order_id>",
        "/nothing/here": "GET",
    }
    for path in expected:
        requests.get(flask_url + path)
    spans = wait_ours(exporter, 3)
    assert {attrs(s)["url.path"]: s.name for s in spans} == expected
    missing = next(s for s in spans if s.name == "GET")
    assert attrs(missing)["http.response.status_code"] == 404
    assert missing.status.status_code is StatusCode.UNSET


def test_streaming_response_ends_after_the_last_chunk(
    exporter: InMemorySpanExporter, flask_url: str
) -> None:
    STREAM_MARKS.clear()
    remote = make_remote()
    with requests.get(
        f"{flask_url}/stream", headers={HEADER_NAME: remote.serialize()}, stream=True
    ) as r:
        body = b"".join(r.iter_content(None))
    assert body == b"chunk 0\nchunk 1\nchunk 2\n"
    (span,) = wait_ours(exporter, 1)
    assert span.name == "GET /stream"
    assert span.end_time is not None and span.start_time is not None
    assert len(STREAM_MARKS) == 3 and span.end_time > STREAM_MARKS[-1]
    assert span.end_time - span.start_time >= 300_000_000
    # Spans made while the generator runs (on the server's iteration) are children.
    chunks = [s for s in exporter.get_finished_spans() if s.name.startswith("chunk ")]
    assert len(chunks) == 3
    assert all(c.parent is not None and c.parent.span_id == span.context.span_id for c in chunks)


def test_error_response_is_an_error_span(exporter: InMemorySpanExporter, flask_url: str) -> None:
    bare = build_flask()
    with run_wsgi(bare) as bare_url:
        expected = requests.get(f"{bare_url}/boom")
    r = requests.get(f"{flask_url}/boom")
    assert r.status_code == expected.status_code == 500
    assert r.content == expected.content
    assert requests.get(f"{flask_url}/unavailable").status_code == 503
    spans = {attrs(s)["url.path"]: s for s in wait_ours(exporter, 2)}
    for path, code in (("/boom", "500"), ("/unavailable", "503")):
        span = spans[path]
        assert span.status.status_code is StatusCode.ERROR
        assert attrs(span)["error.type"] == code


def test_flask_helper_records_the_exception_flask_turned_into_a_500(
    exporter: InMemorySpanExporter,
) -> None:
    app = build_flask()
    instrument_flask(app)
    instrument_flask(app)  # twice: still one middleware
    assert isinstance(app.wsgi_app, LaminarWSGIMiddleware)
    assert not isinstance(app.wsgi_app.app, LaminarWSGIMiddleware)
    with run_wsgi(app) as url:
        assert requests.get(f"{url}/boom").status_code == 500
        (span,) = wait_ours(exporter, 1)
    assert span.name == "GET /boom"
    assert span.status.status_code is StatusCode.ERROR
    assert attrs(span)["error.type"] == "ValueError"
    (event,) = [e for e in span.events if e.name == "exception"]
    assert (event.attributes or {})["exception.message"] == "the view failed"


def test_flask_helper_names_the_span_before_the_view_runs(exporter: InMemorySpanExporter) -> None:
    names: list[str] = []
    app = Flask(__name__)

    @app.get("/early/<x>")
    def early(x: str) -> str:
        names.append(getattr(trace.get_current_span(), "name", ""))
        return x

    instrument_flask(app)
    with run_wsgi(app) as url:
        assert requests.get(f"{url}/early/1").text == "1"
        (span,) = wait_ours(exporter, 1)
    assert names == ["GET /early/<x>"] and span.name == "GET /early/<x>"


def test_exception_escaping_flask_is_recorded_and_reraised(exporter: InMemorySpanExporter) -> None:
    app = build_flask(PROPAGATE_EXCEPTIONS=True)
    app.wsgi_app = LaminarWSGIMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    bare = build_flask(PROPAGATE_EXCEPTIONS=True)
    with run_wsgi(bare) as bare_url:
        expected = requests.get(f"{bare_url}/boom")
    with run_wsgi(app) as url:
        r = requests.get(f"{url}/boom")
        (span,) = wait_ours(exporter, 1)
    # Werkzeug's server answers 500 for the escaped exception, as it does without us.
    assert r.status_code == expected.status_code == 500
    assert span.status.status_code is StatusCode.ERROR
    assert attrs(span)["error.type"] == "ValueError"
    assert [e for e in span.events if e.name == "exception"]


def test_excluded_paths_get_no_span(exporter: InMemorySpanExporter) -> None:
    app = build_flask()
    app.wsgi_app = LaminarWSGIMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, excluded_paths=["/health", re.compile(r"/shops/.*")]
    )
    with run_wsgi(app) as url:
        assert requests.get(f"{url}/health").text == "ok"
        assert requests.get(f"{url}/shops/a/orders/b").text == "a/b"
        assert requests.get(f"{url}/items/1").ok
        wait_ours(exporter, 1)
        time.sleep(0.1)
    assert [attrs(s)["url.path"] for s in ours(list(exporter.get_finished_spans()))] == ["/items/1"]


def test_excluded_paths_from_the_environment(
    exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAMINAR_EXCLUDED_PATHS", "/health, /ready")
    app = build_flask()
    app.wsgi_app = LaminarWSGIMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    with run_wsgi(app) as url:
        assert requests.get(f"{url}/health").text == "ok"
        assert requests.get(f"{url}/items/1").ok
        wait_ours(exporter, 1)
        time.sleep(0.1)
    assert [attrs(s)["url.path"] for s in ours(list(exporter.get_finished_spans()))] == ["/items/1"]


def serve(trust: Any) -> Any:
    app = build_flask()
    app.wsgi_app = LaminarWSGIMiddleware(app.wsgi_app, trust=trust)  # type: ignore[method-assign]
    return run_wsgi(app)


def test_trust_restart_links_and_drops_association(exporter: InMemorySpanExporter) -> None:
    remote = make_remote()
    with serve("restart") as url:
        requests.get(f"{url}/items/1", headers={HEADER_NAME: remote.serialize()})
        (span,) = wait_ours(exporter, 1)
    assert span.parent is None and span.context.trace_id != remote.trace_id
    assert span.links[0].context.span_id == remote.span_id
    assert not [k for k in attrs(span) if k.startswith("lmnr.association.")]
    assert attrs(span)["lmnr.span.path"] == ("GET /items/<int:item_id>",)


def test_trust_ignore(exporter: InMemorySpanExporter) -> None:
    remote = make_remote()
    with serve("ignore") as url:
        requests.get(f"{url}/items/1", headers={HEADER_NAME: remote.serialize()})
        (span,) = wait_ours(exporter, 1)
    assert span.parent is None and not span.links
    assert not [k for k in attrs(span) if k.startswith("lmnr.association.")]


def test_trust_callable_gets_the_environ(exporter: InMemorySpanExporter) -> None:
    def policy(environ: dict[str, Any]) -> str:
        return "continue" if environ.get("HTTP_X_INTERNAL") == "yes" else "ignore"

    trusted, untrusted = make_remote(), make_remote()
    with serve(policy) as url:
        requests.get(
            f"{url}/items/1", headers={HEADER_NAME: trusted.serialize(), "X-Internal": "yes"}
        )
        requests.get(f"{url}/items/2", headers={HEADER_NAME: untrusted.serialize()})
        spans = {attrs(s)["url.path"]: s for s in wait_ours(exporter, 2)}
    assert spans["/items/1"].context.trace_id == trusted.trace_id
    assert spans["/items/2"].parent is None


def test_w3c_fallback(exporter: InMemorySpanExporter, flask_url: str) -> None:
    trace_id, span_id = random.getrandbits(128) | 1, random.getrandbits(64) | 1
    r = requests.get(
        f"{flask_url}/items/2",
        headers={"traceparent": f"00-{trace_id:032x}-{span_id:016x}-01", HEADER_NAME: ""},
    )
    assert r.json()["trace_id"] == f"{trace_id:032x}"
    (span,) = wait_ours(exporter, 1)
    assert span.parent is not None and span.parent.span_id == span_id
    assert "lmnr.span.parent_path" not in attrs(span)


def test_repeated_header_lines_joined_by_the_server_are_no_context(
    exporter: InMemorySpanExporter, flask_url: str
) -> None:
    remote = make_remote()
    parts = urlsplit(flask_url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port)
    try:
        connection.putrequest("GET", "/items/3")
        connection.putheader(HEADER_NAME, remote.serialize())
        connection.putheader(HEADER_NAME, remote.serialize())
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 200
        response.read()
    finally:
        connection.close()
    (span,) = wait_ours(exporter, 1)
    assert span.parent is None


def test_concurrent_requests_keep_their_own_parents(
    exporter: InMemorySpanExporter, flask_url: str
) -> None:
    remotes = [make_remote() for _ in range(200)]

    def call(index: int) -> dict[str, Any]:
        response = requests.get(
            f"{flask_url}/items/{index}",
            headers={HEADER_NAME: remotes[index].serialize()},
            timeout=30,
        )
        result: dict[str, Any] = response.json()
        return result

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(call, range(200)))
    for remote, result in zip(remotes, results, strict=True):
        assert result["trace_id"] == f"{remote.trace_id:032x}"
    spans = wait_for_spans(exporter, lambda s: len(ours(s)) >= 200, 20.0)
    by_path = {attrs(s)["url.path"]: s for s in ours(spans)}
    assert len(by_path) == 200
    for i, remote in enumerate(remotes):
        span = by_path[f"/items/{i}"]
        assert span.context.trace_id == remote.trace_id
        assert span.parent is not None and span.parent.span_id == remote.span_id
    # Each handler span is the child of its own request's server span.
    server_by_trace = {s.context.trace_id: s.context.span_id for s in by_path.values()}
    work = [s for s in spans if s.name == "handler work"]
    assert len(work) == 200
    for s in work:
        assert s.parent is not None
        assert s.parent.span_id == server_by_trace[s.context.trace_id]


class SlowToClose:
    """A body whose `close()` is slow: the client has every byte before the span can end."""

    def __iter__(self) -> Iterator[bytes]:
        return iter([b"ok"])

    def close(self) -> None:
        time.sleep(1.5)  # longer than the server's 0.5 s shutdown poll


def test_the_test_server_stops_only_after_the_last_span_has_ended(
    exporter: InMemorySpanExporter,
) -> None:
    """The harness itself: a span ending after the client has its response must be in the
    exporter when `run_wsgi` returns, or it would land in the next test's exporter."""

    def app(environ: Any, start_response: Any) -> SlowToClose:
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return SlowToClose()

    with run_wsgi(LaminarWSGIMiddleware(app)) as url:
        response = requests.get(f"{url}/slow", headers={"Connection": "close"}, timeout=10)
        assert response.text == "ok"
        assert ours(list(exporter.get_finished_spans())) == []  # the body is still closing
    assert len(ours(list(exporter.get_finished_spans()))) == 1


def test_a_response_dropped_unclosed_ends_its_span_without_the_collector(
    exporter: InMemorySpanExporter,
) -> None:
    """No reference cycle through our response wrapper: the span ends the moment the server
    lets go of it, not at some later collection (and not inside one)."""
    from werkzeug.test import EnvironBuilder

    app = LaminarWSGIMiddleware(build_flask().wsgi_app)
    environ = EnvironBuilder(path="/items/9").get_environ()
    gc.disable()
    try:
        body = app(environ, lambda status, headers, exc_info=None: None)
        b"".join(body)
        assert ours(list(exporter.get_finished_spans())) == []
        del body
        ended = ours(list(exporter.get_finished_spans()))
    finally:
        gc.enable()
    assert len(ended) == 1


def test_the_span_ends_when_the_server_drops_the_response_unclosed(
    exporter: InMemorySpanExporter,
) -> None:
    # Werkzeug skips close() when the client resets the connection after its response.
    app = build_flask()
    app.wsgi_app = LaminarWSGIMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    received = hang_up_while_werkzeug_drains(app, "/items/9")
    assert received.startswith(b"HTTP/1.1 200")
    spans = wait_for_spans(exporter, lambda spans: bool(ours(spans)))
    (span,) = ours(spans)
    assert span.name == "GET /items/<int:item_id>"
    assert span.attributes is not None
    assert span.attributes["http.response.status_code"] == 200
