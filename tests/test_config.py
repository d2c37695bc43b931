"""Options the shared layer compiles once: the `propagate_to` allow-list and excluded
paths."""

from __future__ import annotations

import re

from laminar_middleware.config import ExcludedPaths, PropagationTargets


def test_propagation_targets_accept_one_compiled_pattern_case_insensitively() -> None:
    targets = PropagationTargets(re.compile(r"API\.internal"))
    assert targets.allows("http://API.internal/x")
    assert targets.allows("http://api.internal/x")
    assert not targets.allows("http://other.internal/x")


def test_propagation_targets_compare_hosts_without_the_port() -> None:
    targets = PropagationTargets("api.internal:8443")
    assert targets.allows("https://api.internal:8443/x")
    assert targets.allows("https://api.internal/x")
    assert not targets.allows("https://evil.example/x")


def test_excluded_paths_accept_one_compiled_pattern() -> None:
    excluded = ExcludedPaths(re.compile(r"/health(/.*)?"))
    assert excluded.matches("/health") and excluded.matches("/health/db")
    assert not excluded.matches("/healthy")
