"""aiohttp, both sides: the server middleware and the client hook.

    app = web.Application(middlewares=[middleware(**options)])
    instrument_aiohttp()  # every ClientSession made from now on; or instrument_aiohttp(session)

The two sides live in `_aiohttp_server` and `_aiohttp_client` (inbound never imports
outbound); this module is where users find them.
"""

from __future__ import annotations

from ._aiohttp_client import instrument_aiohttp, uninstrument_aiohttp
from ._aiohttp_server import middleware

__all__ = ["instrument_aiohttp", "middleware", "uninstrument_aiohttp"]
