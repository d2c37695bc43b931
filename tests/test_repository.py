"""The repository stands alone: nothing in it points outside it, and the architecture
document names every module of the package."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTSIDE = re.compile(r"\.\./shared|S[P]EC[ §]|§ ?[0-9]|\b[Ii]ssues? [0-9]+\b")


def tracked_text_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return [ROOT / name for name in listed if not name.startswith("tests/fixtures/")]


def test_no_tracked_file_points_outside_the_repository() -> None:
    found = []
    for path in tracked_text_files():
        try:
            text = path.read_text()
        except (UnicodeDecodeError, FileNotFoundError):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line) and path.name != "test_repository.py":
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_architecture_document_names_every_module() -> None:
    architecture = (ROOT / "docs" / "architecture.md").read_text()
    modules = sorted(p.name for p in (ROOT / "laminar_middleware").glob("*.py"))
    missing = [m for m in modules if m != "__init__.py" and f"`{m}`" not in architecture]
    assert not missing


def test_the_readme_links_both_documents() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "(docs/architecture.md)" in readme and "(docs/wire-format.md)" in readme
