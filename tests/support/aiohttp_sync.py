"""An aiohttp `ClientSession` driven from sync test code, so the client contract runs it
as it runs httpx and requests: each call runs on the session's own loop, in a task that
copies the caller's context (its current span)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp
from multidict import CIMultiDict


@dataclass(frozen=True)
class Response:
    status_code: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class SyncSession:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.session: aiohttp.ClientSession = self.loop.run_until_complete(self._make())

    @staticmethod
    async def _make() -> aiohttp.ClientSession:
        return aiohttp.ClientSession()

    async def _get(self, url: str, timeout: float, **kwargs: Any) -> Response:
        limit = aiohttp.ClientTimeout(total=timeout)
        async with self.session.get(url, timeout=limit, **kwargs) as response:
            body = await response.read()
            return Response(response.status, CIMultiDict(response.headers), body)

    def get(self, url: str, timeout: float = 5, **kwargs: Any) -> Response:
        return self.loop.run_until_complete(self._get(url, timeout, **kwargs))

    def close(self) -> None:
        self.loop.run_until_complete(self.session.close())
        self.loop.close()

    def __enter__(self) -> SyncSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
