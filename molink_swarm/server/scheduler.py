"""One compute queue per server: every session's work goes through it, decode steps first, nothing starves.

Blocks run on one worker thread (torch releases the GIL, so the event loop keeps serving the network while a
step computes). Each task gets a deadline: its arrival time plus the slack of its class (none for decode
steps, more for prefill chunks, most for forward passes), and the worker runs the earliest deadline first. A
decode step therefore jumps ahead of queued prefills, but a prefill that has waited longer than its slack goes
before newer decode steps: a steady stream of decode steps cannot starve it (strict priorities could). Long
work is handed in as chunks (see handler.py), so one task never holds the worker for long.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import logging
import threading
import time
from typing import Any, Callable

from molink_swarm.protocol.errors import ProtocolError

logger = logging.getLogger(__name__)


class Priority(enum.IntEnum):
    DECODE = 0
    PREFILL = 1
    FORWARD = 2


# How long a task of each class may wait behind later, more urgent work (seconds).
SLACK_S = {Priority.DECODE: 0.0, Priority.PREFILL: 0.5, Priority.FORWARD: 1.0}


class ComputeQueue:
    def __init__(self, name: str = "compute", max_queued: int = 1024):
        self.max_queued = max_queued
        self._heap: list[tuple[float, int, Callable | None, asyncio.Future | None, Any]] = []
        self._ready = threading.Condition()
        self._counter = itertools.count()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self.busy_s = 0.0

    def __len__(self) -> int:
        return len(self._heap)

    async def run(self, fn: Callable[[], Any], priority: Priority) -> Any:
        """Run ``fn()`` on the compute thread when its turn comes; returns its result or raises its error."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._ready:
            if len(self._heap) >= self.max_queued:
                raise ProtocolError("Server is overloaded; try another server")
            deadline = time.monotonic() + SLACK_S[priority]
            heapq.heappush(self._heap, (deadline, next(self._counter), fn, future, loop))
            self._ready.notify()
        return await future

    def shutdown(self) -> None:
        with self._ready:
            heapq.heappush(self._heap, (-float("inf"), -1, None, None, None))
            self._ready.notify()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._heap:
                    self._ready.wait()
                _deadline, _count, fn, future, loop = heapq.heappop(self._heap)
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
