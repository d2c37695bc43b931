"""No tracer provider set: one WARNING per process on the first request or call, pointing
to the README's set-up section, and the Laminar header still travels downstream. A fresh
interpreter, since the suite's own process has a provider."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from laminar_middleware import LaminarSpanContext

APP = Path(__file__).parent / "support" / "no_provider_app.py"


def test_no_provider_warns_once_and_the_header_still_travels() -> None:
    caller = LaminarSpanContext(
        random.getrandbits(128) | 1, random.getrandbits(64) | 1, span_path=("caller",)
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LAMINAR_"))}
    result = subprocess.run(
        [sys.executable, str(APP), caller.serialize()],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    echoed = [LaminarSpanContext.parse(value) for value in json.loads(result.stdout)]
    assert all(e is not None and e.trace_id == caller.trace_id for e in echoed), echoed
    warnings = [line for line in result.stderr.splitlines() if "tracer provider" in line]
    assert len(warnings) == 1, result.stderr
    assert warnings[0].startswith("WARNING laminar_middleware")
    assert "README" in warnings[0] and "header is still read and sent" in warnings[0]
