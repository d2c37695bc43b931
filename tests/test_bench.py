"""`make bench` runs: the quick mode of benchmarks/run.py completes and writes its JSON.

Timings are not assertions here (they depend on the machine); `make bench` reports them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GROUPS = ("asgi", "wsgi", "httpx", "requests")


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
        assert set(section["variants"]) == {"bare", "laminar", "contrib"}
        assert section["variants"]["bare"]["median_us"] > 0
        for variant in ("laminar", "contrib"):
            assert isinstance(section["variants"][variant]["overhead_us"], float)
        assert isinstance(section["ratio"], float)
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
