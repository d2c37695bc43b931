"""Leaks: thousands of requests through both middlewares leave nothing behind.

The same code as `make soak` (tests/soak.py), with 5 000 requests per middleware after a
warm-up of 500: a mix of valid, hostile and missing headers, a W3C parent, streaming
responses, 404s, apps that raise, and Starlette's thread pool. `make soak` runs 100 000.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import soak

from laminar_middleware import _guard

REQUESTS = 5_000
WARMUP = 500
# A leaked span is kilobytes; a leaked context token tens of bytes. 10 000 requests leaking
# even 52 bytes each would pass this bound; the measured growth is about 15 KiB (caches of
# the traceback module and the weak set of the span counter, none of it ours).
MEMORY_BOUND = 512 * 1024


@pytest.mark.timeout(300)
def test_thousands_of_requests_leak_no_spans_tokens_or_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The log budget is ten lines a minute; a slow machine may take more than a minute for
    # the run, and the bound below is for one minute's worth.
    monkeypatch.setattr(_guard, "time", SimpleNamespace(monotonic=lambda: 1000.0))
    report = soak.run(REQUESTS, WARMUP, checkpoints=2)
    total = 2 * (REQUESTS + WARMUP)
    # Every request had exactly one SERVER span, and every started span (server, the
    # handlers' own spans) ended.
    assert report.server_spans_started == report.server_spans_ended == total
    assert report.spans_started == report.spans_ended
    assert report.spans_started > total
    # No span is alive once the requests are over, and no context was left attached.
    assert report.live_spans == 0
    assert report.tokens_after <= report.tokens_before
    assert report.requests_leaving_context == 0
    assert report.context_unchanged
    # Memory after the warm-up stays flat, in both halves.
    assert report.growth < MEMORY_BOUND, report
    assert report.memory_halfway - report.memory_after_warmup < MEMORY_BOUND, report
    # The mix really ran: every shape of request, with the statuses the bare apps give.
    per_shape = REQUESTS // len(soak.SHAPES)
    assert report.statuses["asgi 500"] >= per_shape  # Starlette answers, then re-raises
    assert report.statuses["wsgi 0"] >= per_shape  # the raw WSGI app raised
    assert report.statuses["asgi 404"] >= per_shape and report.statuses["wsgi 404"] >= per_shape
    assert report.statuses["asgi 200"] >= 5 * per_shape
    assert report.statuses["wsgi 200"] >= 5 * per_shape
    # Thousands of bad headers, a handful of log lines.
    assert 0 < report.log_lines <= 10
    assert soak.problems(report, MEMORY_BOUND) == []
