"""One compute queue per server: every session's work goes through it, batched across sessions, decode steps
first, nothing starves.

Blocks run on worker threads (torch releases the GIL, so the event loop keeps serving the network while a pass
computes). Work comes in two lanes: decode steps, and prompt chunks and forward passes (*prefill*).

- On a CPU (``prefill_worker=True``) each lane has a worker thread of its own, and the prefill worker runs at a
  lower OS priority (``PREFILL_NICE``). Decode steps never wait behind a prompt: while a pass of prompt tokens
  computes, a decode step that arrives runs at once, and the prompt's pass stops at its next layer until the
  decode pass is done (:func:`between_layers`), so the two do not share this server's cores and memory bandwidth.
  Where they still compete (cores the server shares with other programs, other servers and clients of a
  one-machine swarm), the operating system gives them to the decode pass. A prompt thus computes in the time
  decode steps leave free (MoLink's decode priority, in compute as the client's link gate does on the wire); it is
  slowed while others decode, not stopped (it moves on by a layer per decode pass at least, and a niced thread
  still gets a share of a busy core).
- On a GPU one worker serves both lanes (the device runs kernels in order anyway). Each task gets a deadline:
  its arrival time plus the slack of its class (none for decode steps, more for prefill chunks, most for forward
  passes), and the worker takes the earliest deadline first. A decode step therefore jumps ahead of queued
  prefills, but a prefill that has waited longer than its slack goes before newer decode steps: a steady stream
  of decode steps cannot starve it. Prompt chunks are kept small while sessions decode (:class:`PassTimes`).

Continuous batching: when a worker takes a task of :class:`BatchWork`, it takes with it every queued task of its
lanes with the same key (the same blocks) that fits the batch (:func:`select_batch`), and runs them as one pass.
Nothing waits for a batch to fill: a task that arrives while a pass computes joins the next one, so a lone
session runs as soon as the worker is free. The one wait: decode steps that ran in one pass expect each other in
the next, and the first to arrive waits (briefly, see :meth:`ComputeQueue._hold_s`) for the others, which come a
few messages behind it. Long work is handed in as chunks (see handler.py), so no pass is long.

Two passes on one worker never overlap, and a session's steps come one at a time (its stream reads the next
message only after answering the last), so no two passes touch one session's cache at once.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import heapq
import itertools
import logging
import os
import threading
import time
from typing import Any, Callable, Hashable, Optional, Sequence

from molink_swarm.protocol.errors import ProtocolError

logger = logging.getLogger(__name__)


class Priority(enum.IntEnum):
    DECODE = 0
    PREFILL = 1
    FORWARD = 2


# How long a task of each class may wait behind later, more urgent work (seconds).
SLACK_S = {Priority.DECODE: 0.0, Priority.PREFILL: 0.5, Priority.FORWARD: 1.0}

# The OS priority (nice value) of the prefill worker: under contention it gets about a tenth of a core that a
# normal thread also wants (the kernel weighs nice 10 at about 1/9 of nice 0), so it slows decode passes little
# and is never starved outright. Raising one's own nice value needs no privilege.
PREFILL_NICE = 10


class Lane(enum.IntEnum):
    DECODE = 0
    PREFILL = 1


_worker = threading.local()  # what the worker thread running a pass wants done between its layers


def between_layers() -> None:
    """Called by a pass between two of its layers (handler.py): on the prefill worker, it waits there while a decode
    pass of its server computes (see ComputeQueue._give_way); elsewhere it does nothing."""
    give_way = getattr(_worker, "give_way", None)
    if give_way is not None:
        give_way()


@dataclasses.dataclass(eq=False)
class BatchWork:
    """Work that may run in one pass with other work of the same ``key``: ``run`` gets the whole batch and returns
    one result per item, in order."""

    key: Hashable
    tokens: int
    payload: Any
    run: Callable[[list["BatchWork"]], list[Any]]
    decode: bool = False  # a decode step (always joins a pass), else a chunk of a prompt or forward pass
    member: Hashable = None  # whose step it is (its session): decode steps that ran together wait for each other


@dataclasses.dataclass(order=True)
class _Task:
    deadline: float
    order: int
    fn: Optional[Callable[[], Any]] = dataclasses.field(compare=False, default=None)
    work: Optional[BatchWork] = dataclasses.field(compare=False, default=None)
    future: Optional[asyncio.Future] = dataclasses.field(compare=False, default=None)
    loop: Optional[asyncio.AbstractEventLoop] = dataclasses.field(compare=False, default=None)
    # The chunks that follow this one (see ComputeQueue.run_sequence): queued once this one is taken.
    then: Optional[collections.deque] = dataclasses.field(compare=False, default=None)
    priority: Priority = dataclasses.field(compare=False, default=Priority.DECODE)

    @property
    def lane(self) -> Lane:
        return Lane.DECODE if self.work is None or self.priority == Priority.DECODE else Lane.PREFILL


def select_batch(head: BatchWork, queued: Sequence[BatchWork], *, max_items: int, max_tokens: int) -> list[BatchWork]:
    """Which of ``queued`` (earliest deadline first) join ``head`` in one pass.

    Decode steps of the same blocks always join (up to ``max_items``): each costs little next to reading every
    weight once more. Prompt chunks join while the pass stays within ``max_tokens`` tokens, so that a pass, and so
    the wait of the next decode steps, stays about as short as one chunk.
    """
    batch, tokens = [head], head.tokens
    for work in queued:
        if len(batch) >= max_items:
            break
        if work.key != head.key:
            continue
        if work.decode or tokens + work.tokens <= max_tokens:
            batch.append(work)
            tokens += work.tokens
    return batch


class PassTimes:
    """What the compute thread measures of its passes, to size prompt chunks while sessions decode.

    A prompt chunk that runs in the same pass as decode steps (or just before them) delays them by its compute
    time. While decode steps are running, a chunk is therefore kept to ``share`` of a decode pass's time, so their
    steps slow by at most about that share (SPEC P5); with no decode step lately, a prompt goes in full-size
    chunks. The prompt then takes longer to go through, but only while others are decoding (MoLink's decode
    priority, here in compute as the client's link gate does on the wire).
    """

    def __init__(self, prompt_token_s: float, *, share: float = 0.25, min_tokens: int = 32, idle_s: float = 1.0):
        self.prompt_token_s = prompt_token_s  # seconds of compute per prompt token (measured at start, then here)
        self.decode_pass_s: Optional[float] = None
        self.share, self.min_tokens, self.idle_s = share, min_tokens, idle_s
        self.last_decode_at = -float("inf")

    def record(self, works: Sequence[BatchWork], seconds: float) -> None:
        decoding = any(work.decode for work in works)
        prompt_tokens = sum(work.tokens for work in works if not work.decode)
        if decoding:
            self.last_decode_at = time.monotonic()
        if not prompt_tokens:
            self.decode_pass_s = _smoothed(self.decode_pass_s, seconds)
        elif not decoding or self.decode_pass_s is not None:
            prompt_s = seconds - (self.decode_pass_s if decoding else 0.0)
            if prompt_s > 0:
                self.prompt_token_s = _smoothed(self.prompt_token_s, prompt_s / prompt_tokens)

    def prompt_chunk(self, max_tokens: int) -> int:
        """How many tokens the next chunk of a prompt may have."""
        if self.decode_pass_s is None or time.monotonic() - self.last_decode_at > self.idle_s:
            return max_tokens
        return max(1, min(max_tokens, max(self.min_tokens, int(self.share * self.decode_pass_s / self.prompt_token_s))))


def _smoothed(old: Optional[float], new: float, weight: float = 0.2) -> float:
    return new if old is None else old + weight * (new - old)


class ComputeQueue:
    def __init__(
        self,
        name: str = "compute",
        max_queued: int = 1024,
        max_batch: int = 32,
        max_batch_tokens: int = 256,
        *,
        prefill_worker: bool = False,
    ):
        """``prefill_worker``: prompt chunks and forward passes get a worker thread of their own, at a lower OS
        priority (for CPUs; see the module docstring)."""
        self.max_queued = max_queued
        self.max_batch = max_batch  # 1: no batching across sessions
        self.max_batch_tokens = max_batch_tokens
        self.prefill_worker = prefill_worker
        self._heaps: dict[Lane, list[_Task]] = {Lane.DECODE: [], Lane.PREFILL: []}
        self._ready = threading.Condition()
        self._closed = False
        self._counter = itertools.count()
        self.busy_s = 0.0
        self.on_batch: Optional[Callable[[int, int], None]] = None  # (items, tokens) of each batched pass
        self.pass_times = PassTimes(prompt_token_s=0.25 / max_batch_tokens)  # chunks are sized for ~0.25 s
        self.hold_share = 0.25  # of a decode pass's time: how long a pass may wait for the steps that ran with it
        self._partners: dict[Hashable, tuple[int, frozenset]] = {}  # member -> (pass number, its last decode pass)
        self._passes = 0
        self._decoding = False  # the decode worker computes a pass (with a prefill worker)
        self._decode_passes = 0
        lanes = [((Lane.DECODE,), 0), ((Lane.PREFILL,), PREFILL_NICE)] if prefill_worker else [(tuple(Lane), 0)]
        self._threads = [
            threading.Thread(target=self._run, args=(lanes_, nice), name=f"{name}-{lanes_[-1].name.lower()}", daemon=True)
            for lanes_, nice in lanes
        ]
        for thread in self._threads:
            thread.start()

    def __len__(self) -> int:
        return sum(len(heap) for heap in self._heaps.values())

    def prompt_chunk(self, max_tokens: int) -> int:
        """How many tokens the next chunk of a prompt may have: all ``max_tokens`` where prompts compute beside decode
        steps, fewer while sessions decode where they take turns (see :class:`PassTimes`)."""
        return max_tokens if self.prefill_worker else self.pass_times.prompt_chunk(max_tokens)

    async def run(self, fn: Callable[[], Any], priority: Priority) -> Any:
        """Run ``fn()`` on the decode worker when its turn comes; returns its result or raises its error."""
        return await self._submit(priority, fn=fn)

    async def run_batched(self, work: BatchWork, priority: Priority) -> Any:
        """Run ``work`` in a pass with other queued work of its key; returns its own result or raises."""
        return await self._submit(priority, work=work)

    async def run_together(self, works: Sequence[BatchWork], priority: Priority) -> list[Any]:
        """Run ``works`` (the steps of a group step) as :meth:`run_batched` does each, queued at once: no pass takes
        some of them without the others (as far as the batch limits allow). Returns their results, or raises the
        first error."""
        loop = asyncio.get_running_loop()
        tasks = [_Task(0.0, 0, work=work, future=loop.create_future(), loop=loop, priority=priority) for work in works]
        with self._ready:
            if len(self) + len(tasks) > self.max_queued:
                raise ProtocolError("Server is overloaded; try another server")
            for task in tasks:
                self._push(task)
        try:
            return list(await asyncio.gather(*(task.future for task in tasks)))
        finally:
            for task in tasks:
                task.future.cancel()  # a member failed: the others' results are not wanted

    async def run_sequence(self, works: Sequence[BatchWork], priority: Priority) -> list[Any]:
        """Run ``works`` (the chunks of one prompt) one after the other, each in a pass with other queued work.

        Only one of them is queued at a time: the next is queued, with a fresh deadline, as soon as the worker
        takes the one before for a pass, so it can go in the very next pass. One prompt thus holds one place in
        the queue however long it is, never lets its chunks overtake one another, and cannot crowd out decode
        steps with a heap of overdue chunks."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in works]
        rest = collections.deque(
            _Task(0.0, 0, work=work, future=future, loop=loop, priority=priority) for work, future in zip(works[1:], futures[1:])
        )
        self._enqueue(_Task(0.0, 0, work=works[0], future=futures[0], loop=loop, then=rest, priority=priority))
        try:
            return list(await asyncio.gather(*futures))
        finally:
            for future in futures:
                future.cancel()  # after a failed chunk, the rest must not run

    async def _submit(self, priority: Priority, **task: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._enqueue(_Task(0.0, 0, future=future, loop=asyncio.get_running_loop(), priority=priority, **task))
        return await future

    def _enqueue(self, task: _Task) -> None:
        with self._ready:
            if len(self) >= self.max_queued:
                raise ProtocolError("Server is overloaded; try another server")
            self._push(task)

    def _push(self, task: _Task) -> None:
        """Queue ``task`` with its deadline from now (called with the lock held)."""
        task.deadline, task.order = time.monotonic() + SLACK_S[task.priority], next(self._counter)
        heapq.heappush(self._heaps[task.lane], task)
        self._ready.notify_all()  # the worker of its lane (with two workers, only one of them cares)

    def shutdown(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        for thread in self._threads:
            thread.join(timeout=10)

    def _run(self, lanes: tuple[Lane, ...], nice: int) -> None:
        if nice:
            _lower_priority(nice)
        split_decode = self.prefill_worker and lanes == (Lane.DECODE,)
        if self.prefill_worker and lanes == (Lane.PREFILL,):
            _worker.give_way = self._give_way
        while True:
            with self._ready:
                while True:
                    heads = [self._heaps[lane][0] for lane in lanes if self._heaps[lane]]
                    if self._closed:
                        return
                    if not heads:
                        self._ready.wait()
                        continue
                    head = min(heads)
                    hold_s = self._hold_s(head)
                    if hold_s <= 0:
                        break
                    self._ready.wait(hold_s)
                heapq.heappop(self._heaps[head.lane])
                batch = self._take_batch(head, lanes) if head.work is not None else [head]
                for task in batch:
                    self._queue_next(task)
            batch = [task for task in batch if not task.future.cancelled()]
            if not batch:
                continue
            started = time.perf_counter()
            if batch[0].work is not None:
                if any(task.work.decode for task in batch):
                    self._remember_partners(batch)
                if split_decode:
                    with self._ready:
                        self._decoding = True
                try:
                    self._run_batch(batch)
                finally:
                    if split_decode:
                        with self._ready:
                            self._decoding, self._decode_passes = False, self._decode_passes + 1
                            self._ready.notify_all()
                self.pass_times.record([task.work for task in batch], time.perf_counter() - started)
            else:
                self._settle(batch[0], *_call(batch[0].fn))
            with self._ready:
                self.busy_s += time.perf_counter() - started

    def _give_way(self) -> None:
        """Between two layers of a prefill pass: wait while the decode worker computes a pass, so that the two do not
        share this server's cores and memory bandwidth. At most for the pass under way: a prompt moves on by at least
        a layer per decode pass, however many of them come."""
        with self._ready:
            seen = self._decode_passes
            while self._decoding and self._decode_passes == seen and not self._closed:
                self._ready.wait()

    def _hold_s(self, head: _Task) -> float:
        """How much longer ``head`` waits for the decode steps that ran with it last time (called with the lock
        held); 0: it goes now.

        Sessions that step together (a client's micro-batch, the pushes that follow the previous server's pass)
        arrive a few messages apart. Without this wait the first would go alone and the rest in the next pass,
        after it, and a pass costs about the same for one step as for many. A lone session never waits, nor does
        a step whose partners are all queued; the wait is at most ``hold_share`` of a decode pass's measured time,
        counted from the step's arrival, and a partner that did not come is not waited for again."""
        work = head.work
        if work is None or not work.decode or work.member is None or self.max_batch <= 1:
            return 0.0
        partners = self._partners.get(work.member)
        if partners is None or len(partners[1]) < 2 or self.pass_times.decode_pass_s is None:
            return 0.0
        queued = {task.work.member for task in self._heaps[Lane.DECODE] if task.work is not None and task.work.decode}
        if partners[1] <= queued:
            return 0.0
        arrived = head.deadline - SLACK_S[head.priority]
        return arrived + self.hold_share * self.pass_times.decode_pass_s - time.monotonic()

    def _remember_partners(self, batch: list[_Task]) -> None:
        """The decode steps of this pass expect each other next time (called on the compute thread)."""
        members = [task.work.member for task in batch if task.work.decode and task.work.member is not None]
        together = frozenset(members)
        self._passes += 1
        for member in members:
            self._partners[member] = (self._passes, together)
        if len(self._partners) > 4 * self.max_queued:  # members of sessions long gone
            self._partners = {m: p for m, p in self._partners.items() if p[0] > self._passes - self.max_queued}

    def _queue_next(self, task: _Task) -> None:
        """The chunk after ``task`` in its sequence goes in the queue (called with the lock held)."""
        while task.then:
            following = task.then.popleft()
            if following.future.cancelled():
                continue
            following.then = task.then
            self._push(following)
            return

    def _take_batch(self, head: _Task, lanes: tuple[Lane, ...]) -> list[_Task]:
        """Remove and return ``head`` and the tasks of ``lanes`` that join it (called with the lock held)."""
        if self.max_batch <= 1:
            return [head]
        queued = sorted(
            task for lane in lanes for task in self._heaps[lane] if task.work is not None and task.work.key == head.work.key
        )
        chosen = select_batch(
            head.work, [task.work for task in queued], max_items=self.max_batch, max_tokens=self.max_batch_tokens
        )
        if len(chosen) == 1:
            return [head]
        taken = {id(work) for work in chosen[1:]}
        batch = [head, *(task for task in queued if id(task.work) in taken)]
        for lane in lanes:
            self._heaps[lane] = [task for task in self._heaps[lane] if task.work is None or id(task.work) not in taken]
            heapq.heapify(self._heaps[lane])
        return batch

    def _run_batch(self, batch: list[_Task]) -> None:
        works = [task.work for task in batch]
        results, error = _call(lambda: batch[0].work.run(works))
        if error is not None and len(batch) > 1:
            # One member's fault must not fail the others: each runs alone, so only the faulty one gets the error.
            for task in batch:
                self._settle(task, *_call(lambda: task.work.run([task.work])[0]))
            return
        if self.on_batch is not None:
            self.on_batch(len(batch), sum(work.tokens for work in works))
        for index, task in enumerate(batch):
            self._settle(task, None if results is None else results[index], error)

    @staticmethod
    def _settle(task: _Task, result: Any, error: Optional[BaseException]) -> None:
        task.loop.call_soon_threadsafe(_settle, task.future, result, error)


def _lower_priority(nice: int) -> None:
    """Give the calling thread (and the threads it starts, such as torch's intra-op pool) the OS priority ``nice``."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError) as e:  # not Linux, or not allowed: the lanes still never wait on each other
        logger.info("Could not lower the priority of %s (%r)", threading.current_thread().name, e)


def _call(fn: Callable[[], Any]) -> tuple[Any, Optional[BaseException]]:
    try:
        return fn(), None
    except BaseException as e:  # handed to the awaiting coroutine, which answers the peer
        return None, e


def _settle(future: asyncio.Future, result: Any, error: Optional[BaseException]) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
