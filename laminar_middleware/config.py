"""Options: the trust policy, propagation targets, excluded paths, and their environment variables.

Everything here is compiled once, when a middleware or hook is built; the per-request calls
are a dictionary lookup or a precompiled match. Nothing here raises on a bad setting: a
middleware is often built while the app serves its first request (Starlette builds its
stack then), where a raise would turn every request into a 500. A bad setting is one
ERROR line, then the safe default; security settings fail closed.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
from collections.abc import Callable, Iterable
from typing import Any, Final, Literal, TypeAlias, TypeVar, cast
from urllib.parse import urlsplit

from opentelemetry.trace import Span

from ._guard import contained, log_bad_setting, log_policy_error

__all__ = [
    "ENV_EXCLUDED_PATHS",
    "ENV_PROPAGATE_TO",
    "ENV_TRUST",
    "INBOUND_OPTIONS",
    "OUTBOUND_OPTIONS",
    "ClientRequestHook",
    "ClientResponseHook",
    "ExcludedPaths",
    "PropagationTargets",
    "ServerRequestHook",
    "ServerResponseHook",
    "Trust",
    "TrustOption",
    "TrustPolicy",
    "checked_flag",
    "checked_header_names",
    "checked_hook",
    "checked_provider",
    "env_trust",
    "is_signed_request",
    "tolerant_options",
]

ENV_PROPAGATE_TO: Final = "LAMINAR_PROPAGATE_TO"
ENV_TRUST: Final = "LAMINAR_TRUST"
ENV_EXCLUDED_PATHS: Final = "LAMINAR_EXCLUDED_PATHS"

INBOUND_OPTIONS: Final = (
    "tracer_provider",
    "excluded_paths",
    "trust",
    "header_names",
    "server_request_hook",
    "server_response_hook",
)
OUTBOUND_OPTIONS: Final = (
    "tracer_provider",
    "propagate_to",
    "client_spans",
    "client_request_hook",
    "client_response_hook",
)

Trust = Literal["continue", "restart", "ignore"]
TRUST_MODES: Final[frozenset[str]] = frozenset({"continue", "restart", "ignore"})
TrustOption = Trust | Callable[[Any], str]
PropagateToEntry = str | re.Pattern[str]
PropagateToOption: TypeAlias = (
    "str | Iterable[PropagateToEntry] | Callable[[str], bool] | PropagationTargets | None"
)
ExcludedPathsOption = Iterable[str | re.Pattern[str]] | str | None

# The hooks, with the contrib instrumentations' names and arguments. Server: the span and
# the framework's request (ASGI scope, WSGI environ); then the status and the response
# headers as the protocol gives them. Client: the span and the library's own request
# (`httpx.Request`, `requests.PreparedRequest`), then that and its response.
ServerRequestHook = Callable[[Span, Any], None]
ServerResponseHook = Callable[[Span, int, Any], None]
ClientRequestHook = Callable[[Span, Any], None]
ClientResponseHook = Callable[[Span, Any, Any], None]
HookT = TypeVar("HookT", bound=Callable[..., None])


# A user's callable that raises is contained where it is called: it fails closed.
_TRUST_CALLABLE: Final = contained("trust policy")
_PROPAGATE_TO_CALLABLE: Final = contained("propagate_to callable")
_TRUST_ACCEPTED: Final = "'continue', 'restart', 'ignore' or a callable"
_PROPAGATE_TO_ACCEPTED: Final = (
    "hosts, '.suffix'es, 're:' patterns, compiled patterns, '*', or a callable on the URL"
)


def env_trust() -> Trust:
    """LAMINAR_TRUST: `continue` when unset; a value that is not a mode fails closed."""
    raw = os.environ.get(ENV_TRUST, "").strip().lower()
    if not raw:
        return "continue"
    if raw in TRUST_MODES:
        return raw  # type: ignore[return-value]
    log_bad_setting(ENV_TRUST, raw, "continue, restart or ignore", "'restart'")
    return "restart"


class TrustPolicy:
    """Decides, per request, what to do with a remote context: continue, restart or ignore."""

    def __init__(self, option: TrustOption | None) -> None:
        if option is None:
            option = env_trust()
        self._callable: Callable[[Any], str] | None = None
        self._fixed: Trust = "continue"
        if callable(option):
            self._callable = option
        elif isinstance(option, str) and option in TRUST_MODES:
            self._fixed = option
        else:
            # Fail closed: a caller is trusted only when the setting says so clearly.
            log_bad_setting("trust", option, _TRUST_ACCEPTED, "'restart'")
            self._fixed = "restart"

    @property
    def fixed(self) -> Trust | None:
        """The mode when it does not depend on the request."""
        return None if self._callable else self._fixed

    def decide(self, request: object) -> Trust:
        if self._callable is None:
            return self._fixed
        # A policy that raises or answers nonsense fails safe: the caller is not trusted,
        # but the trace keeps a link to it.
        answer: object = "restart"
        with _TRUST_CALLABLE:
            answer = self._callable(request)
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
        source = "propagate_to"
        entries: list[object]
        if option is None:
            source = ENV_PROPAGATE_TO
            entries = list(_split(os.environ.get(ENV_PROPAGATE_TO, "")))
        elif isinstance(option, str):
            entries = list(_split(option))
        elif isinstance(option, re.Pattern):
            entries = [option]
        elif callable(option):
            self._callable = option
            return
        else:
            try:
                entries = list(option)
            except TypeError:
                log_bad_setting(source, option, _PROPAGATE_TO_ACCEPTED, "no host gets the headers")
                return
        given = [e for e in entries if not (isinstance(e, str) and not e.strip())]
        # Nothing given: every host, as in Laminar's SDKs. Entries given but none usable:
        # no host (fail closed), each bad entry logged by _load.
        self._everywhere = not given
        self._load(given, source)

    def _load(self, entries: Iterable[object], source: str) -> None:
        suffixes = []
        for entry in entries:
            if isinstance(entry, re.Pattern) and isinstance(entry.pattern, str):
                # Hosts are case-insensitive, whatever flags the pattern was compiled with.
                self._patterns.append(re.compile(entry.pattern, entry.flags | re.IGNORECASE))
                continue
            if not isinstance(entry, str):
                log_bad_setting(f"{source} entry", entry, _PROPAGATE_TO_ACCEPTED, _SKIPPED)
                continue
            raw = entry.strip()
            entry = raw.lower()
            if entry == "*":
                self._everywhere = True
            elif entry.startswith("re:"):
                try:
                    self._patterns.append(re.compile(raw[3:], re.IGNORECASE))
                except re.error as exc:
                    accepted = f"a regular expression that compiles ({exc})"
                    log_bad_setting(f"{source} entry", raw, accepted, _SKIPPED)
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
            allowed = False
            with _PROPAGATE_TO_CALLABLE:
                allowed = bool(self._callable(url))
            return allowed
        if host is None:
            host = urlsplit(url).hostname or ""
        host = host.lower().rstrip(".")
        if host in self._exact:
            return True
        if self._suffixes and host.endswith(self._suffixes):
            return True
        return any(pattern.fullmatch(host) for pattern in self._patterns)


_SKIPPED: Final = "nothing for this entry (with no usable entry left, no host gets the headers)"


class ExcludedPaths:
    """Paths that get no span: exact strings and compiled patterns (matched in full)."""

    def __init__(self, option: ExcludedPathsOption = None, *, from_env: bool = False) -> None:
        if option is None and from_env:
            option = os.environ.get(ENV_EXCLUDED_PATHS, "")
        self._exact: frozenset[str] = frozenset()
        self._patterns: tuple[re.Pattern[str], ...] = ()
        if option is None:
            return
        entries: list[object]
        if isinstance(option, str):
            entries = list(_split(option))
        elif isinstance(option, re.Pattern):
            entries = [option]
        else:
            try:
                entries = list(option)
            except TypeError:
                log_bad_setting("excluded_paths", option, _EXCLUDED_ACCEPTED, "no excluded path")
                return
        for entry in entries:
            if not isinstance(entry, (str, re.Pattern)):
                log_bad_setting("excluded_paths entry", entry, _EXCLUDED_ACCEPTED, "skipped")
        self._exact = frozenset(e for e in entries if isinstance(e, str))
        self._patterns = tuple(e for e in entries if isinstance(e, re.Pattern))

    def __bool__(self) -> bool:
        return bool(self._exact or self._patterns)

    def matches(self, path: str) -> bool:
        return path in self._exact or any(p.fullmatch(path) for p in self._patterns)


_EXCLUDED_ACCEPTED: Final = "exact paths and compiled patterns, or a comma-separated string"


def checked_provider(value: object) -> Any:
    """A tracer provider, or None (the global one) for anything that is not one."""
    if value is None or callable(getattr(value, "get_tracer", None)):
        return value
    log_bad_setting("tracer_provider", value, "a TracerProvider or None", "the global provider")
    return None


def checked_flag(name: str, value: object, default: bool) -> bool:
    if isinstance(value, bool):
        return value
    log_bad_setting(name, value, "True or False", repr(default))
    return default


def checked_hook(name: str, value: HookT | None) -> HookT | None:
    """A hook option: a callable, or None; anything else is logged and no hook is used."""
    if value is None or callable(value):
        return value
    log_bad_setting(name, value, "a callable or None", "no hook")
    return None


def checked_header_names(value: object, default: tuple[str, ...]) -> tuple[str, ...]:
    """Lower-cased header names to read; the defaults when none usable is given."""
    default = tuple(n.lower() for n in default)
    if value is None:
        return default
    entries = [value] if isinstance(value, str) else value
    accepted = "an iterable of non-empty header names"
    try:
        names = tuple(dict.fromkeys(n.strip().lower() for n in entries))  # type: ignore[attr-defined]
    except (TypeError, AttributeError):
        log_bad_setting("header_names", value, accepted, repr(default))
        return default
    usable = tuple(n for n in names if n and n.isascii())
    if len(usable) != len(names):
        log_bad_setting("header_names", value, accepted, repr(usable or default))
    return usable or default


F = TypeVar("F", bound=Callable[..., Any])


def tolerant_options(func: F) -> F:
    """An option nobody reads (a typo) is logged and dropped instead of raising TypeError.

    Type checkers still see `func`'s own signature, so they flag the typo; at run time the
    app starts and serves (Starlette builds a middleware at the first request, where a
    TypeError would turn every request into a 500)."""
    parameters = inspect.signature(func).parameters.values()
    known = frozenset(p.name for p in parameters if p.kind is p.KEYWORD_ONLY)
    owner = func.__qualname__.removesuffix(".__init__")

    @functools.wraps(func)
    def call(*args: Any, **kwargs: Any) -> Any:
        for name in [k for k in kwargs if k not in known]:
            accepted = ", ".join(sorted(known))
            log_bad_setting(f"{owner}({name})", kwargs.pop(name), accepted, "nothing: ignored")
        return func(*args, **kwargs)

    return cast(F, call)


def is_signed_request(authorization: str | None, query: str) -> bool:
    """An AWS SigV4 request: an added header would break its signature."""
    if authorization and authorization.lstrip().upper().startswith("AWS4-HMAC-SHA256"):
        return True
    return "x-amz-signature=" in query.lower()


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]
