"""One compute queue per server: every session's work goes through it, decode steps first.

Blocks run on one worker thread (torch releases the GIL, so the event loop keeps serving the network while a
step computes). Tasks are ordered by priority class, then arrival: a decode step (a few tokens) never waits
behind a queue of prefills. Batching of concurrent decode steps plugs in here (the worker can drain all
queued tasks of the same class and run them as one batch).
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import queue
import threading
import time
from typing import Any, Callable

logger = logging.getLogger(__name__)


class Priority(enum.IntEnum):
    DECODE = 0
    PREFILL = 1
    FORWARD = 2


class ComputeQueue:
    def __init__(self, name: str = "compute"):
        self._tasks: queue.PriorityQueue = queue.PriorityQueue()
        self._counter = itertools.count()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self.busy_s = 0.0

    async def run(self, fn: Callable[[], Any], priority: Priority) -> Any:
        """Run ``fn()`` on the compute thread when its turn comes; returns its result or raises its error."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._tasks.put((int(priority), next(self._counter), fn, future, loop))
        return await future

    def shutdown(self) -> None:
        self._tasks.put((-1, -1, None, None, None))
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            _priority, _count, fn, future, loop = self._tasks.get()
            if fn is None:
                return
            if future.cancelled():
                continue
            started = time.perf_counter()
            try:
                result, error = fn(), None
            except BaseException as e:  # handed to the awaiting coroutine, which answers the peer
                result, error = None, e
            self.busy_s += time.perf_counter() - started
            loop.call_soon_threadsafe(_settle, future, result, error)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
