"""Several tracer providers: with Laminar's SDK initialized after the app set its own global
provider, every span this package creates or controls for a request (its SERVER span,
FastAPI's operation spans, its CLIENT spans) goes to the provider of the request's server
span, so no span exported to Laminar names a parent that went elsewhere; one WARNING per
process explains the split. The real `lmnr`, in a process of its own."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from laminar_middleware import LaminarSpanContext
from laminar_middleware.codec import format_uuid

SCRIPT = Path(__file__).parent / "support" / "lmnr_providers.py"


def test_a_requests_spans_stay_with_its_server_spans_provider() -> None:
    span_id = random.getrandbits(64) | 1
    caller = LaminarSpanContext(
        random.getrandbits(128) | 1,
        span_id,
        span_path=("caller",),
        span_ids_path=(format_uuid(span_id),),
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LAMINAR_"))}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), caller.serialize()],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["answers"] == ['"leaf"', '"leaf"']  # FastAPI answers JSON
    laminar = seen["laminar"]
    names = sorted(s["name"] for s in laminar)
    assert names.count("GET /a/{item}") == 2 and names.count("fastapi.endpoint") == 2
    assert [s["kind"] for s in laminar].count("CLIENT") == 2
    # Every parent named in Laminar's export is in it (or is the caller).
    ids = {s["span_id"] for s in laminar} | {caller.span_id}
    assert all(s["parent_id"] in ids for s in laminar), laminar
    assert {s["trace_id"] for s in laminar} == {caller.trace_id}
    # The client span sits under FastAPI's endpoint span, and its Laminar path continues
    # the caller's through it (Laminar's SDK records the server span as `GET` there: it
    # computes a path when a span starts, before the route is matched).
    by_id = {s["span_id"]: s for s in laminar}
    for client in (s for s in laminar if s["kind"] == "CLIENT"):
        assert by_id[client["parent_id"]]["name"] == "fastapi.endpoint"
        assert client["path"] == ["caller", "GET", "fastapi.endpoint", "GET"]
    # Nothing of the request went to the app's own global provider.
    assert not [s for s in seen["global"] if s["trace_id"] == caller.trace_id]
    warnings = [line for line in result.stderr.splitlines() if "tracer provider of its own" in line]
    assert len(warnings) == 1, result.stderr
