"""Instructions per request, counted by valgrind: the same comparison as run.py, but
repeatable on a shared, noisy machine.

`make bench-instructions` (or `python benchmarks/instructions.py [--calls N]`) runs each
variant of each group (bare, laminar, contrib, floor; the same apps, clients and providers
as run.py) in a fresh interpreter under `valgrind --tool=callgrind`, twice: once with only
a warm-up and once with N more calls. The difference divided by N is what one call costs,
in CPU instructions, whatever else the machine is doing; the overhead of a variant is its
count minus bare's. Instructions are not time (a cache miss costs more than an add), but
for the same Python code on the same interpreter they track it closely, and the ratio
ours/contrib comes out the same run after run.

Needs valgrind (Debian: `apt-get install valgrind`); without it, says so and exits 2.
Takes a few minutes: the interpreter runs about 50 times slower under callgrind.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from run import TARGETS

HERE = Path(__file__).resolve().parent
VARIANTS = ("bare", "laminar", "contrib", "floor")
GROUPS = tuple(TARGETS)
# The queue groups (queues.py): contrib has no Dramatiq instrumentation (nor a floor to
# compare with contrib).
QUEUE_VARIANTS = {
    "celery_publish": ("bare", "laminar", "contrib", "floor"),
    "celery_consume": ("bare", "laminar", "contrib", "floor"),
    "dramatiq_publish": ("bare", "laminar"),
    "dramatiq_consume": ("bare", "laminar"),
}
QUEUE_TARGET = 0.7
WARM_UP = 100
_COLLECTED = re.compile(r"Collected : (\d+)")

# Run inside valgrind: build the group's runners as run.py does, warm up, make `calls` more.
_CHILD = """
import sys
sys.path.insert(0, {here!r})
import frameworks, queues, run
name = {group!r} + "_runners"
builder = next(getattr(m, name) for m in (run, frameworks, queues) if hasattr(m, name))
runner = builder()[{variant!r}]
runner({warm_up})
if {calls}:
    runner({calls})
"""


def instructions(group: str, variant: str, calls: int) -> int:
    code = _CHILD.format(here=str(HERE), group=group, variant=variant, warm_up=WARM_UP, calls=calls)
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    done = subprocess.run(
        [*command, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
    )
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{group}/{variant} failed under valgrind:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def per_call(group: str, variant: str, calls: int) -> float:
    return (instructions(group, variant, calls) - instructions(group, variant, 0)) / calls


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="calls counted per variant")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: nothing measured", file=sys.stderr)
        return 2

    jobs = [(g, v) for g in GROUPS for v in VARIANTS]
    jobs += [(g, v) for g, variants in QUEUE_VARIANTS.items() for v in variants]
    with ThreadPoolExecutor(max_workers=2) as pool:  # each job is one valgrind process
        measured = pool.map(lambda job: per_call(*job, args.calls), jobs)
        counts = dict(zip(jobs, measured, strict=True))

    print("Instructions per call, overhead over bare, thousands (valgrind callgrind)")
    print(
        f"{'':14} {'bare':>8} {'laminar':>8} {'contrib':>8} {'floor':>8} "
        f"{'ratio':>6} {'target':>6}  result  {'floor ratio':>11}"
    )
    results: dict[str, dict[str, float | bool]] = {}
    for group in GROUPS:
        bare = counts[(group, "bare")]
        ours, contrib, floor = (counts[(group, v)] - bare for v in VARIANTS[1:])
        ratio, floor_ratio = ours / contrib, floor / contrib
        passed = ratio <= TARGETS[group]
        results[group] = {
            "bare": bare,
            "laminar_overhead": ours,
            "contrib_overhead": contrib,
            "floor_overhead": floor,
            "ratio": ratio,
            "floor_ratio": floor_ratio,
            "target": TARGETS[group],
            "pass": passed,
        }
        print(
            f"{group:14} {bare / 1e3:8.0f} {ours / 1e3:8.0f} {contrib / 1e3:8.0f} "
            f"{floor / 1e3:8.0f} {ratio:6.2f} {TARGETS[group]:6.2f}  "
            f"{'pass' if passed else 'FAIL':6}  {floor_ratio:11.2f}"
        )
    queue_results = queue_table(counts)
    if args.out is not None:
        everything = {"calls": args.calls, "groups": results, "queues": queue_results}
        args.out.write_text(json.dumps(everything, indent=2) + "\n")
    return 0


def queue_table(counts: dict[tuple[str, str], float]) -> dict[str, dict[str, Any]]:
    print("\nInstructions per message, overhead over bare, thousands (valgrind callgrind)")
    print(
        f"{'':17} {'bare':>8} {'laminar':>8} {'contrib':>8} {'ratio':>6} {'target':>6}  result"
        f"  {'floor':>8} {'floor ratio':>11}"
    )
    results: dict[str, dict[str, Any]] = {}
    for group, variants in QUEUE_VARIANTS.items():
        bare = counts[(group, "bare")]
        ours = counts[(group, "laminar")] - bare
        entry: dict[str, Any] = {"bare": bare, "laminar_overhead": ours}
        line = f"{group.replace('_', ' '):17} {bare / 1e3:8.0f} {ours / 1e3:8.0f} "
        if "contrib" in variants:
            contrib = counts[(group, "contrib")] - bare
            ratio = ours / contrib
            passed = ratio <= QUEUE_TARGET
            floor = counts[(group, "floor")] - bare
            entry.update(contrib_overhead=contrib, ratio=ratio, target=QUEUE_TARGET, passed=passed)
            entry.update(floor_overhead=floor, floor_ratio=floor / contrib)
            verdict = "pass" if passed else "FAIL"
            line += f"{contrib / 1e3:8.0f} {ratio:6.2f} {QUEUE_TARGET:6.2f}  {verdict:6}  "
            line += f"{floor / 1e3:8.0f} {floor / contrib:11.2f}"
        else:
            line += f"{'-':>8} {'-':>6} {'-':>6}  -"
        results[group] = entry
        print(line)
    return results


if __name__ == "__main__":
    sys.exit(main())
