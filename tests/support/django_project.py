"""A Django project in one module: settings configured once per process, the URL conf, the
views, and the WSGI and ASGI handlers built with or without the middleware."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import django
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.urls import include, path

OURS = "laminar_middleware.django.LaminarMiddleware"

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="tests",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=[OURS],
        INSTALLED_APPS=[],
        LOGGING_CONFIG=None,
    )
    django.setup()

# The streaming view's chunks are produced lazily: the test reads them one by one.
produced: list[str] = []


def item(request: HttpRequest, item_id: int) -> JsonResponse:
    return JsonResponse({"item": item_id}, headers={"x-app": "1"})


async def async_item(request: HttpRequest, item_id: int) -> JsonResponse:
    await asyncio.sleep(0)
    return JsonResponse({"item": item_id})


def stream(request: HttpRequest) -> StreamingHttpResponse:
    from opentelemetry import trace

    def chunks() -> Iterator[bytes]:
        try:
            for n in range(3):
                produced.append(f"chunk {n}")
                yield b"chunk %d\n" % n
        finally:  # also when the server closes the response early
            current = trace.get_current_span()
            produced.append(f"done under {getattr(current, 'name', None)}")

    return StreamingHttpResponse(chunks())


async def async_stream(request: HttpRequest) -> StreamingHttpResponse:
    from opentelemetry import trace

    async def chunks() -> AsyncIterator[bytes]:
        for n in range(3):
            with trace.get_tracer("tests.django").start_as_current_span(f"chunk {n}"):
                await asyncio.sleep(0)
            yield b"chunk %d\n" % n

    return StreamingHttpResponse(chunks())


async def async_endless(request: HttpRequest) -> StreamingHttpResponse:
    from opentelemetry import trace

    async def chunks() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"token\n"
                await asyncio.sleep(0.01)
        finally:  # the client went away
            current = trace.get_current_span()
            produced.append(f"closed under {getattr(current, 'name', None)}")

    return StreamingHttpResponse(chunks())


class _Parts:
    """A body that is not a generator: an iterator with a `close()` of its own."""

    def __iter__(self) -> _Parts:
        return self

    def __next__(self) -> bytes:
        raise StopIteration

    def close(self) -> None:
        from opentelemetry import trace

        produced.append(f"closed under {getattr(trace.get_current_span(), 'name', None)}")


def closing_stream(request: HttpRequest) -> StreamingHttpResponse:
    return StreamingHttpResponse(_Parts())


def boom(request: HttpRequest) -> HttpResponse:
    raise ValueError("the view failed")


# The view behind `/ctx`, supplied by the test that serves it (the URL conf is per process).
ctx_view: Callable[[HttpRequest], HttpResponse] | None = None


def ctx(request: HttpRequest) -> HttpResponse:
    assert ctx_view is not None, "set django_project.ctx_view first"
    return ctx_view(request)


urlpatterns = [
    path(
        "api/",
        include(
            [
                path("items/<int:item_id>", item),
                path("async/<int:item_id>", async_item),
                path("stream", stream),
                path("async-stream", async_stream),
                path("closing-stream", closing_stream),
                path("async-endless", async_endless),
                path("boom", boom),
            ]
        ),
    ),
    path("items/<item_id>", item),
    path("ctx", ctx),
]


def wsgi_app(middleware: list[str]) -> Any:
    """A WSGI handler with this MIDDLEWARE (read when the handler is built)."""
    from django.core.handlers.wsgi import WSGIHandler
    from django.test import override_settings

    with override_settings(MIDDLEWARE=middleware):
        return WSGIHandler()


def asgi_app(middleware: list[str]) -> Any:
    from django.core.handlers.asgi import ASGIHandler
    from django.test import override_settings

    with override_settings(MIDDLEWARE=middleware):
        return ASGIHandler()
