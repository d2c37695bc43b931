"""`make bench` runs: the quick mode of benchmarks/run.py completes and writes its JSON.

Timings are not assertions here (they depend on the machine); `make bench` reports them.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

ROOT = Path(__file__).resolve().parent.parent
GROUPS = ("asgi", "wsgi", "httpx", "requests", "django", "aiohttp", "aiohttp_client")


@pytest.mark.timeout(240)
def test_quick_benchmark_runs_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=230,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Per-request overhead" in done.stdout

    results = json.loads(out.read_text())
    assert results["meta"]["mode"] == "quick"
    for group in GROUPS:
        section = results[group]
        assert set(section["variants"]) == {"bare", "laminar", "contrib", "floor"}
        assert section["variants"]["bare"]["median_us"] > 0
        for variant in ("laminar", "contrib", "floor"):
            assert isinstance(section["variants"][variant]["overhead_us"], float)
        assert isinstance(section["ratio"], float)
        assert isinstance(section["floor_ratio"], float)
        assert isinstance(section["pass"], bool)
        memory = results["memory"][group]
        assert memory["requests"] > 0
        assert isinstance(memory["growth_kib"], float)
    assert set(results["codec"]) == {
        "parse 300 B",
        "serialize 300 B",
        "parse 4 KiB",
        "serialize 4 KiB",
    }
    for entry in results["codec"].values():
        assert entry["laminar_us"] > 0 and entry["json_us"] > 0
    assert isinstance(results["failed_targets"], list)
    assert "Per-message overhead" in done.stdout
    queues = results["queues"]
    assert set(queues) == {
        "celery publish",
        "celery consume",
        "dramatiq publish",
        "dramatiq consume",
    }
    for group, section in queues.items():
        engine = group.split()[0]
        celery = {"bare", "laminar", "contrib", "floor"}
        expected = celery if engine == "celery" else {"bare", "laminar"}
        assert set(section["variants"]) == expected
        assert section["variants"]["bare"]["median_us"] > 0
        assert isinstance(section["variants"]["laminar"]["overhead_us"], float)
        if engine == "celery":
            assert isinstance(section["ratio"], float) and isinstance(section["passed"], bool)
            assert isinstance(section["floor_ratio"], float)
        else:
            assert section["ratio"] is None and section["passed"] is None


def benchmark_modules(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[Any, Any, Any, InMemorySpanExporter]:
    """benchmarks/run.py, queues.py and frameworks.py, imported as the scripts import each
    other, with every variant's spans going to one in-memory exporter."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import frameworks
        import queues
        import run
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    exporter = InMemorySpanExporter()
    shared = TracerProvider()
    shared.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(run, "_SHARED_PROVIDER", shared)
    return run, queues, frameworks, exporter


# Run in a fresh interpreter, as the benchmarks run: Django's settings are configured once per
# process (the benchmark's project would be every later Django test's), and the aiohttp
# groups make event loops of their own.
_RECORD = """
import json, sys
sys.path.insert(0, {benchmarks!r})
import frameworks, run
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
exporter = InMemorySpanExporter()
run._SHARED_PROVIDER = TracerProvider()
run._SHARED_PROVIDER.add_span_processor(SimpleSpanProcessor(exporter))
name = {group!r} + "_runners"
runners = (getattr(run, name, None) or getattr(frameworks, name))()
recorded = {{}}
for variant, runner in runners.items():
    exporter.clear()
    runner(3)
    recorded[variant] = [
        dict(name=s.name, kind=s.kind.name, scope=s.instrumentation_scope.name,
             trace_id=s.context.trace_id, attributes=sorted(s.attributes or {{}}))
        for s in exporter.get_finished_spans()
    ]
print(json.dumps(recorded))
"""


@functools.cache
def recorded(group: str) -> dict[str, list[dict[str, Any]]]:
    """Per variant of an HTTP group, the spans 3 requests (or calls) recorded."""
    code = _RECORD.format(benchmarks=str(ROOT / "benchmarks"), group=group)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, list[dict[str, Any]]] = json.loads(done.stdout.splitlines()[-1])
    return result


@pytest.mark.parametrize("group", GROUPS)
def test_the_floor_records_the_same_span_as_ours(group: str) -> None:
    """The floor is only a fair bound if it records what we record: same name, kind and
    attribute keys (values differ only in ids)."""
    spans = recorded(group)
    ours = [s for s in spans["laminar"] if s["scope"] == "laminar_middleware"]
    floor = [s for s in spans["floor"] if s["scope"] == "floor"]
    assert len(ours) == len(floor) == 3
    assert {(s["name"], s["kind"]) for s in floor} == {(s["name"], s["kind"]) for s in ours}
    assert floor[0]["attributes"] == ours[0]["attributes"]
    assert "lmnr.span.ids_path" in floor[0]["attributes"]


@pytest.mark.parametrize(
    ("group", "kind"),
    [
        ("celery_publish", "PRODUCER"),
        ("celery_consume", "CONSUMER"),
        ("dramatiq_publish", "PRODUCER"),
        ("dramatiq_consume", "CONSUMER"),
    ],
)
def test_the_queue_benchmarks_measure_real_spans(
    group: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each instrumented variant records one span of the kind it claims per message, in
    the caller's trace, and the bare one records none: the numbers measure the work."""
    run, queues, _, exporter = benchmark_modules(monkeypatch)
    runners = getattr(queues, f"{group}_runners")()
    for variant, runner in runners.items():
        exporter.clear()
        runner(3)
        spans = [s for s in exporter.get_finished_spans() if s.kind.name == kind]
        if variant == "bare":
            assert spans == [], variant
            continue
        assert len(spans) == 3, variant
        for span in spans:
            assert span.context is not None and span.context.trace_id == run.TRACE_ID, variant
        if variant == "laminar":
            assert all("lmnr.span.path" in (s.attributes or {}) for s in spans)


@pytest.mark.parametrize(
    ("group", "kind"), [("celery_publish", "PRODUCER"), ("celery_consume", "CONSUMER")]
)
def test_the_queue_floor_records_the_same_span_as_ours(
    group: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Celery floor is a fair bound only if it records what we record: per message one
    span of the same name, kind and attribute keys, in the caller's trace."""
    run, queues, _, exporter = benchmark_modules(monkeypatch)
    runners = getattr(queues, f"{group}_runners")()
    recorded = {}
    for variant in ("laminar", "floor"):
        exporter.clear()
        runners[variant](3)
        recorded[variant] = [s for s in exporter.get_finished_spans() if s.kind.name == kind]
    ours, floor = recorded["laminar"], recorded["floor"]
    assert len(ours) == len(floor) == 3
    assert {s.name for s in floor} == {s.name for s in ours}
    assert sorted(floor[0].attributes or {}) == sorted(ours[0].attributes or {})
    assert all(s.context is not None and s.context.trace_id == run.TRACE_ID for s in floor)
    assert floor[0].attributes["lmnr.span.path"] == ours[0].attributes["lmnr.span.path"]


@pytest.mark.parametrize(
    ("group", "kind"),
    [("django", "SERVER"), ("aiohttp", "SERVER"), ("aiohttp_client", "CLIENT")],
)
def test_the_framework_benchmarks_measure_real_spans(group: str, kind: str) -> None:
    """Each instrumented variant records one span of its kind per request, in the caller's
    trace and named by the route on the server side; the bare one records none."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import run
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    for variant, spans in recorded(group).items():
        of_kind = [s for s in spans if s["kind"] == kind]
        if variant == "bare":
            assert of_kind == [], variant
            continue
        assert len(of_kind) == 3, variant
        for span in of_kind:
            assert span["trace_id"] == run.TRACE_ID, variant
            if kind == "SERVER":
                assert span["name"].startswith("GET ") and "item" in span["name"], variant
