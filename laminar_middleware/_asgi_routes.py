"""The route template of an ASGI request, as Starlette and FastAPI leave it in the scope.

Starlette's `scope["route"]` is the innermost matched route, whose template is relative to
the Mounts it sits in; the Mounts' own templates are not in the scope. They are found here
by matching the request again against the app's routes, which is why this is a module of
its own. FastAPI's request telemetry, when there, already has the full template.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, Final

__all__ = ["RouteTemplates"]

Scope = MutableMapping[str, Any]

_MAX_MOUNT_DEPTH: Final = 8
_MAX_CHAIN: Final = 32  # wrappers followed to find an app's routes


class RouteTemplates:
    """The route templates of one app's requests; the app's routes are found once."""

    __slots__ = ("_app", "_routes")

    def __init__(self, app: object) -> None:
        self._app = app
        self._routes: list[Any] | None = None

    def of(self, scope: Scope, root_path: str) -> str | None:
        """The matched route's template (`root_path`: the scope's when the middleware was
        entered), or None before routing."""
        # FastAPI's request telemetry has the full template (router prefixes and mounts).
        telemetry = scope.get("fastapi.telemetry")
        if telemetry is not None:
            route_name = getattr(telemetry, "route", None)
            if isinstance(route_name, str) and route_name:
                return route_name
        route = scope.get("route")
        if route is None:
            return None
        template: Any = None
        fastapi_scope = scope.get("fastapi")
        if isinstance(fastapi_scope, dict):
            # FastAPI's included routers: the route's own path lacks the routers' prefixes.
            effective = fastapi_scope.get("effective_route_context")
            if effective is not None and getattr(effective, "original_route", None) is route:
                template = getattr(effective, "path_format", None)
        if not template:
            template = getattr(route, "path_format", None) or getattr(route, "path", None)
        if not isinstance(template, str) or not template:
            return None
        if scope.get("root_path", "") != root_path:
            # Inside a Mount: the route's template is relative to it.
            prefix = self._mount_prefix(scope, root_path)
            if prefix is not None:
                if _is_mount(route):
                    return prefix + "/{path}"
                return prefix + template
        return template

    def _mount_prefix(self, scope: Scope, root_path: str) -> str | None:
        """The templates of the Mounts the request went through, found by matching again."""
        routes = self._routes
        if routes is None:
            routes = self._routes = _find_routes(self._app)
        if not routes:
            return None
        probe: dict[str, Any] = {
            "type": scope["type"],
            "path": scope["path"],
            "root_path": root_path,
            "path_params": {},
            "method": scope.get("method", "GET"),
            "headers": scope.get("headers") or [],
        }
        prefix = ""
        current: Any = routes
        for _ in range(_MAX_MOUNT_DEPTH):
            if not current:
                break
            for candidate in current:
                match, child = candidate.matches(probe)
                if getattr(match, "name", None) == "FULL":
                    break
            else:
                break
            if not _is_mount(candidate):
                break
            prefix += candidate.path
            probe.update(child)
            current = candidate.routes
        return prefix or None


def _is_mount(route: object) -> bool:
    return any(cls.__name__ == "Mount" for cls in type(route).__mro__)


def _find_routes(app: object) -> list[Any] | None:
    """The route list of the first router inside this middleware."""
    for _ in range(_MAX_CHAIN):
        routes = getattr(app, "routes", None)
        if isinstance(routes, list):
            return routes
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None
