"""Django and aiohttp benchmarks: the same comparison as the other HTTP groups in `run.py`.

- Django: a one-route project called through raw WSGI calls (Django's `WSGIHandler`, the
  body consumed and closed, the environ of the WSGI group): bare, with
  `laminar_middleware.django.LaminarMiddleware` first in `MIDDLEWARE`, and with contrib's
  `DjangoInstrumentor` middleware.
- aiohttp server: a one-route application whose `_handle` (the middlewares, the router and
  the handler: what aiohttp's request handler calls for each request) is given a request
  cloned from one built by `aiohttp.test_utils.make_mocked_request`, with the headers of the
  other groups and a connection of plain objects (mocks would record every call and grow):
  bare, with this package's `middleware()`, with contrib's aiohttp-server middleware.
- aiohttp client: `session.get()` inside a span against an aiohttp server on 127.0.0.1 in
  the same event loop (aiohttp's client has no transport without a socket): bare, with
  `instrument_aiohttp(session)`, with contrib's `create_trace_config()`. The server's share
  is the same in every variant, so it cancels out of the overheads.

Each group also has its floor (`floor.py`): the SDK's span with our attributes, and nothing
else of this package.
"""

from __future__ import annotations

import asyncio
import atexit
import time
from typing import Any

from floor import FloorDjango, FloorOutbound, floor_aiohttp, floor_trace_config
from run import (
    LAMINAR_HEADER,
    REMOTE,
    TRACEPARENT,
    Runner,
    in_a_span,
    provider,
    wsgi_runner,
)

OURS = "laminar_middleware.django.LaminarMiddleware"


# -- Django ----------------------------------------------------------------------------------


def _item(request: Any, item_id: int) -> Any:
    from django.http import HttpResponse

    return HttpResponse("ok")


def _url_patterns() -> list[Any]:
    from django.urls import path

    return [path("items/<int:item_id>", _item)]


def __getattr__(name: str) -> Any:
    # Django reads this module as the URL conf; Django itself is imported only when asked.
    if name == "urlpatterns":
        return _url_patterns()
    raise AttributeError(name)


def _django_handler(middleware: list[str], **settings: Any) -> Any:
    import django
    from django.conf import settings as django_settings
    from django.core.handlers.wsgi import WSGIHandler
    from django.test import override_settings

    if not django_settings.configured:
        django_settings.configure(
            DEBUG=False,
            SECRET_KEY="bench",
            ALLOWED_HOSTS=["*"],
            ROOT_URLCONF=__name__,
            MIDDLEWARE=[],
            INSTALLED_APPS=[],
            LOGGING_CONFIG=None,
        )
        django.setup()
    with override_settings(MIDDLEWARE=middleware, **settings):
        return WSGIHandler()  # reads MIDDLEWARE (and our options) now


def django_runners() -> dict[str, Runner]:
    from opentelemetry.instrumentation.django import DjangoInstrumentor

    bare = _django_handler([])
    ours = _django_handler([OURS], LAMINAR_MIDDLEWARE={"tracer_provider": provider()})
    # Contrib puts its middleware into settings.MIDDLEWARE: build its handler while it is
    # there, then take it out again (the handler keeps its middleware).
    from django.conf import settings

    settings.MIDDLEWARE = []
    instrumentor = DjangoInstrumentor()
    instrumentor.instrument(tracer_provider=provider())
    contrib = _django_handler(list(settings.MIDDLEWARE))
    instrumentor.uninstrument()
    FloorDjango.tracer = provider().get_tracer("floor")
    FloorDjango.remote = REMOTE
    floor = _django_handler([f"{FloorDjango.__module__}.FloorDjango"])
    return {
        "bare": wsgi_runner(bare),
        "laminar": wsgi_runner(ours),
        "contrib": wsgi_runner(contrib),
        "floor": wsgi_runner(floor),
    }


# -- aiohttp server --------------------------------------------------------------------------

_HEADERS = {
    "Host": "service-b.internal:8000",
    "User-Agent": "bench/1.0",
    "Accept": "*/*",
    "traceparent": TRACEPARENT,
    "X-Laminar-Span-Context": LAMINAR_HEADER,
}


def _aiohttp_app(middlewares: list[Any]) -> Any:
    from aiohttp import web

    async def item(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(middlewares=middlewares)
    app.router.add_get("/items/{item_id}", item)
    return app


class _Transport:
    """The socket's side of a connection, as much of it as a request asks for."""

    _extra = {"peername": ("10.0.0.1", 51234), "sockname": ("10.0.0.2", 8000)}

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def is_closing(self) -> bool:
        return False


class _Protocol:
    max_field_size = max_line_length = 8190
    max_headers = 128
    ssl_context = None
    peername = _Transport._extra["peername"]
    sockname = _Transport._extra["sockname"]

    def __init__(self) -> None:
        self.transport = _Transport()
        self.writer = None


def aiohttp_runners() -> dict[str, Runner]:
    from aiohttp.test_utils import make_mocked_request
    from opentelemetry.instrumentation.aiohttp_server import (
        AioHttpServerInstrumentor,
        create_aiohttp_middleware,
    )

    from laminar_middleware.aiohttp import middleware

    loop = asyncio.new_event_loop()
    bare = _aiohttp_app([])
    ours = _aiohttp_app([middleware(tracer_provider=provider())])
    # Contrib's middleware reads globals that instrument() sets; instrument() also makes
    # every later Application carry contrib's middleware, which uninstrument() undoes.
    instrumentor = AioHttpServerInstrumentor()
    instrumentor.instrument()
    contrib_middleware = create_aiohttp_middleware(tracer_provider=provider())
    instrumentor.uninstrument()
    contrib = _aiohttp_app([contrib_middleware])

    def runner(app: Any) -> Runner:
        app.freeze()
        protocol = _Protocol()
        template = make_mocked_request(
            "GET",
            "/items/42?q=1",
            headers=_HEADERS,
            app=app,
            loop=loop,
            protocol=protocol,
            transport=protocol.transport,
            writer=object(),
        )

        async def many(n: int) -> int:
            started = time.perf_counter_ns()
            for _ in range(n):
                await app._handle(template.clone())
            return time.perf_counter_ns() - started

        return lambda n: loop.run_until_complete(many(n))

    floor = _aiohttp_app([floor_aiohttp(provider().get_tracer("floor"), REMOTE)])
    return {
        "bare": runner(bare),
        "laminar": runner(ours),
        "contrib": runner(contrib),
        "floor": runner(floor),
    }


# -- aiohttp client --------------------------------------------------------------------------


def aiohttp_client_runners() -> dict[str, Runner]:
    import aiohttp
    from aiohttp import web
    from opentelemetry.instrumentation.aiohttp_client import create_trace_config

    from laminar_middleware.aiohttp import instrument_aiohttp

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server = web.AppRunner(_aiohttp_app([]), access_log=None)
    loop.run_until_complete(server.setup())
    site = web.TCPSite(server, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = server.addresses[0][1]
    url = f"http://127.0.0.1:{port}/items/42?q=1"

    async def session(**options: Any) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(**options)

    bare = loop.run_until_complete(session())
    ours = loop.run_until_complete(session())
    instrument_aiohttp(ours, tracer_provider=provider())
    contrib = loop.run_until_complete(
        session(trace_configs=[create_trace_config(tracer_provider=provider())])
    )
    floor_config = floor_trace_config(FloorOutbound(provider().get_tracer("floor")))
    floor = loop.run_until_complete(session(trace_configs=[floor_config]))

    async def get(client: aiohttp.ClientSession) -> None:
        async with client.get(url) as response:
            await response.read()

    def runner(client: aiohttp.ClientSession) -> Runner:
        return in_a_span(lambda: loop.run_until_complete(get(client)))

    async def close() -> None:
        for client in (bare, ours, contrib, floor):
            await client.close()
        await server.cleanup()

    atexit.register(lambda: loop.run_until_complete(close()))

    return {
        "bare": runner(bare),
        "laminar": runner(ours),
        "contrib": runner(contrib),
        "floor": runner(floor),
    }
