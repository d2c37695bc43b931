"""Runs each public import as the first statement of a fresh interpreter.

Usage: `python import_matrix.py PRELUDE STATEMENT...`. The process imports PRELUDE (a
module name, or `-` for nothing), then forks one child per statement, so each child is an
interpreter that has imported only the prelude before the statement, as a user's program
would. Each child then asks OpenTelemetry for the global propagator, which loads the
`OTEL_PROPAGATORS` entry points. Prints one JSON object: statement -> error text or "".
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback


def _child(statement: str, write_fd: int) -> None:
    try:
        exec(statement, {})
        from opentelemetry.propagate import get_global_textmap

        textmap = get_global_textmap()
        wanted = "laminar" in os.environ.get("OTEL_PROPAGATORS", "")
        names = {type(p).__name__ for p in getattr(textmap, "_propagators", [textmap])}
        if wanted and "LaminarPropagator" not in names:
            raise AssertionError(f"LaminarPropagator missing from the global propagator: {names}")
        message = ""
    except BaseException:
        message = traceback.format_exc()
    os.write(write_fd, message.encode())
    os._exit(0)


def _run(statement: str) -> str:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(statement, write_fd)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    text = b"".join(chunks).decode()
    if status != 0 and not text:
        text = f"child exited with status {status}"
    return text


def main() -> None:
    prelude, statements = sys.argv[1], sys.argv[2:]
    if prelude != "-":
        importlib.import_module(prelude)
    print(json.dumps({statement: _run(statement) for statement in statements}))


if __name__ == "__main__":
    main()
