"""One background event loop per client process: the synchronous torch/transformers API calls into it."""

from __future__ import annotations

import asyncio
import threading
from typing import Awaitable, Optional, TypeVar

T = TypeVar("T")

_loop: Optional[asyncio.AbstractEventLoop] = None
_lock = threading.Lock()


def event_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="molink-swarm-client", daemon=True).start()
        return _loop


def run_sync(coro: Awaitable[T], timeout: Optional[float] = None) -> T:
    """Run ``coro`` on the client loop and wait for its result from a synchronous caller."""
    loop = event_loop()
    try:
        if asyncio.get_running_loop() is loop:
            raise RuntimeError("run_sync() called from the client loop itself")
    except RuntimeError as e:
        if "client loop" in str(e):
            raise
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


async def run_on_client_loop(coro: Awaitable[T]) -> T:
    """Await ``coro`` on the client loop from another event loop (the web app's): P2P objects live there."""
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, event_loop()))
