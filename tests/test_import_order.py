"""Import in any order, under any `OTEL_PROPAGATORS`: every public import works as the first
statement of a fresh interpreter, after nothing or after OpenTelemetry's propagate module,
FastAPI or Flask (the propagator entry point must not form a cycle with
`opentelemetry.propagate`)."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import laminar_middleware

RUNNER = Path(__file__).parent / "support" / "import_matrix.py"

PUBLIC_SUBMODULES = sorted(
    info.name
    for info in pkgutil.iter_modules(laminar_middleware.__path__)
    if not info.name.startswith("_")
)
STATEMENTS = [
    "import laminar_middleware",
    *(f"from laminar_middleware import {name}" for name in laminar_middleware.__all__),
    *(f"import laminar_middleware.{name}" for name in PUBLIC_SUBMODULES),
]


def test_the_matrix_covers_every_public_name_and_module() -> None:
    assert len(laminar_middleware.__all__) >= 20
    assert {"asgi", "wsgi", "flask", "httpx", "requests", "propagator"} <= set(PUBLIC_SUBMODULES)


@pytest.mark.parametrize("propagators", [None, "laminar", "tracecontext,baggage,laminar"])
@pytest.mark.parametrize("prelude", ["-", "opentelemetry.propagate", "fastapi", "flask"])
def test_every_public_import_works_first(propagators: str | None, prelude: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LAMINAR_"))}
    if propagators is not None:
        env["OTEL_PROPAGATORS"] = propagators
    result = subprocess.run(
        [sys.executable, str(RUNNER), prelude, *STATEMENTS],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    errors = {s: e for s, e in json.loads(result.stdout).items() if e}
    assert set(json.loads(result.stdout)) == set(STATEMENTS)
    assert not errors, "\n\n".join(f"{s}:\n{e}" for s, e in errors.items())
