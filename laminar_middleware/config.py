"""Options: the trust policy, propagation targets, excluded paths, and their environment variables.

Everything here is compiled once, when a middleware or hook is built; the per-request calls
are a dictionary lookup or a precompiled match.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from typing import Any, Final, Literal, TypeAlias
from urllib.parse import urlsplit

from ._guard import guard, log_policy_error, logger

__all__ = [
    "ENV_EXCLUDED_PATHS",
    "ENV_PROPAGATE_TO",
    "ENV_TRUST",
    "ExcludedPaths",
    "PropagationTargets",
    "Trust",
    "TrustOption",
    "TrustPolicy",
    "env_trust",
    "is_signed_request",
]

ENV_PROPAGATE_TO: Final = "LAMINAR_PROPAGATE_TO"
ENV_TRUST: Final = "LAMINAR_TRUST"
ENV_EXCLUDED_PATHS: Final = "LAMINAR_EXCLUDED_PATHS"

Trust = Literal["continue", "restart", "ignore"]
TRUST_MODES: Final[frozenset[str]] = frozenset({"continue", "restart", "ignore"})
TrustOption = Trust | Callable[[Any], str]
PropagateToEntry = str | re.Pattern[str]
PropagateToOption: TypeAlias = (
    "str | Iterable[PropagateToEntry] | Callable[[str], bool] | PropagationTargets | None"
)
ExcludedPathsOption = Iterable[str | re.Pattern[str]] | str | None


def env_trust(default: Trust = "continue") -> Trust:
    """LAMINAR_TRUST, or the default (with one log line) when unset or not a mode."""
    raw = os.environ.get(ENV_TRUST, "").strip().lower()
    if not raw:
        return default
    if raw in TRUST_MODES:
        return raw  # type: ignore[return-value]
    logger.warning(
        "%s=%r is not one of continue, restart, ignore; using %r", ENV_TRUST, raw, default
    )
    return default


class TrustPolicy:
    """Decides, per request, what to do with a remote context: continue, restart or ignore."""

    def __init__(self, option: TrustOption | None) -> None:
        if option is None:
            option = env_trust()
        self._callable: Callable[[Any], str] | None = None
        self._fixed: Trust = "continue"
        if callable(option):
            self._callable = option
        elif option in TRUST_MODES:
            self._fixed = option
        else:
            raise ValueError(f"trust must be continue, restart, ignore or a callable: {option!r}")

    @property
    def fixed(self) -> Trust | None:
        """The mode when it does not depend on the request."""
        return None if self._callable else self._fixed

    def decide(self, request: object) -> Trust:
        if self._callable is None:
            return self._fixed
        # A policy that raises or answers nonsense fails safe: the caller is not trusted,
        # but the trace keeps a link to it.
        answer = guard("trust policy", "restart", self._callable, request)
        if answer in TRUST_MODES:
            return answer  # type: ignore[return-value]
        log_policy_error(f"trust policy returned {answer!r}; treating the request as 'restart'")
        return "restart"


class PropagationTargets:
    """The hosts that may receive the header: exact hosts, `.suffixes`, `re:` patterns, `*`.

    Hosts compare case-insensitively and without the port. Matching is on the host only,
    never by substring of the URL.
    """

    def __init__(self, option: PropagateToOption = None) -> None:
        self._everywhere = False
        self._exact: set[str] = set()
        self._suffixes: tuple[str, ...] = ()
        self._patterns: list[re.Pattern[str]] = []
        self._callable: Callable[[str], bool] | None = None
        if isinstance(option, PropagationTargets):
            self.__dict__.update(option.__dict__)
            return
        if option is None:
            option = os.environ.get(ENV_PROPAGATE_TO, "")
            self._load(_split(option), source=ENV_PROPAGATE_TO)
        elif callable(option) and not isinstance(option, re.Pattern):
            self._callable = option
        else:
            if isinstance(option, str):
                entries: list[PropagateToEntry] = list(_split(option))
            elif isinstance(option, re.Pattern):
                entries = [option]
            else:
                entries = list(option)
            self._load(entries, source="propagate_to")
        if not (self._exact or self._suffixes or self._patterns or self._callable):
            self._everywhere = True

    def _load(self, entries: Iterable[PropagateToEntry], source: str) -> None:
        suffixes = []
        for entry in entries:
            if isinstance(entry, re.Pattern):
                # Hosts are case-insensitive, whatever flags the pattern was compiled with.
                self._patterns.append(re.compile(entry.pattern, entry.flags | re.IGNORECASE))
                continue
            raw = entry.strip()
            entry = raw.lower()
            if not entry:
                continue
            if entry == "*":
                self._everywhere = True
            elif entry.startswith("re:"):
                try:
                    self._patterns.append(re.compile(raw[3:], re.IGNORECASE))
                except re.error as exc:
                    logger.warning("%s: ignoring bad regular expression %r: %s", source, entry, exc)
            elif entry.startswith("."):
                suffixes.append(entry)
            else:
                # Hosts compare without the port: `api.internal:8443` means the host.
                host, sep, port = entry.rpartition(":")
                self._exact.add(host if sep and port.isdigit() and "]" not in port else entry)
        self._suffixes = tuple(suffixes)

    @property
    def everywhere(self) -> bool:
        return self._everywhere

    def allows(self, url: str, host: str | None = None) -> bool:
        if self._everywhere:
            return True
        if self._callable is not None:
            return bool(guard("propagate_to callable", False, self._callable, url))
        if host is None:
            host = urlsplit(url).hostname or ""
        host = host.lower().rstrip(".")
        if host in self._exact:
            return True
        if self._suffixes and host.endswith(self._suffixes):
            return True
        return any(pattern.fullmatch(host) for pattern in self._patterns)


class ExcludedPaths:
    """Paths that get no span: exact strings and compiled patterns (matched in full)."""

    def __init__(self, option: ExcludedPathsOption = None, *, from_env: bool = False) -> None:
        if option is None and from_env:
            option = os.environ.get(ENV_EXCLUDED_PATHS, "")
        if isinstance(option, str):
            option = _split(option)
        elif isinstance(option, re.Pattern):
            option = [option]
        self._exact: frozenset[str] = frozenset()
        self._patterns: tuple[re.Pattern[str], ...] = ()
        if option:
            entries = list(option)
            self._exact = frozenset(e for e in entries if isinstance(e, str))
            self._patterns = tuple(e for e in entries if isinstance(e, re.Pattern))

    def __bool__(self) -> bool:
        return bool(self._exact or self._patterns)

    def matches(self, path: str) -> bool:
        return path in self._exact or any(p.fullmatch(path) for p in self._patterns)


def is_signed_request(authorization: str | None, query: str) -> bool:
    """An AWS SigV4 request: an added header would break its signature."""
    if authorization and authorization.lstrip().upper().startswith("AWS4-HMAC-SHA256"):
        return True
    return "x-amz-signature=" in query.lower()


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]
