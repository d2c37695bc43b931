"""Real Celery worker and beat processes for the queue tests, started and stopped here."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from support.workers import stop

ROOT = Path(__file__).resolve().parents[2]


def broker_url(socket_path: str) -> str:
    return f"redis+socket://{socket_path}"


@contextmanager
def celery_process(
    command: list[str],
    broker: str,
    spans: Path,
    layers: str = "ours",
    launcher: tuple[str, ...] = (),
    **env: str,
) -> Iterator[subprocess.Popen[bytes]]:
    """`celery -A support.celery_app COMMAND...`, its output in `spans` with the suffix
    `.log`; stopped (warm, then killed) on exit. With `layers` empty the app sets up no
    tracing of its own (a `launcher` such as `opentelemetry-instrument` does)."""
    environment = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "tests"),
        "PYTHONUNBUFFERED": "1",
        "LAMINAR_TEST_BROKER": broker,
        "LAMINAR_TEST_SPANS": str(spans) if layers else "",
        "LAMINAR_TEST_LAYERS": layers,
        **env,
    }
    log = open(spans.with_suffix(".log"), "wb")  # noqa: SIM115 - closed below
    celery = (
        [str(Path(sys.executable).parent / "celery")]
        if launcher
        else [sys.executable, "-m", "celery"]
    )
    process = subprocess.Popen(
        [*launcher, *celery, "-A", "support.celery_app", *command],
        cwd=ROOT,
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield process
    finally:
        stop(process)
        log.close()


def worker_command(pool: str, queue: str = "laminar-tests") -> list[str]:
    """A worker on one queue: each test's own worker must not share a queue with another's."""
    concurrency = "1" if pool == "solo" else "2"
    return [
        "worker",
        f"--queues={queue}",
        f"--pool={pool}",
        f"--concurrency={concurrency}",
        "--without-heartbeat",
        "--without-mingle",
        "--without-gossip",
        "--loglevel=WARNING",
    ]
