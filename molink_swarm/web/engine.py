"""Text generation for the web app: many requests at once over one distributed model, streamed as text.

All requests share one :class:`BatchedDecoder` (client/batched.py): each has its own inference session, the
servers compute their steps in shared passes, and the client's LM head runs once per step for all of them. The
decoding runs on the client's event loop; tokens travel to the web app's loop as ids, and all tokenizer work
happens there, so the tokenizer is never used from two threads. A fixed number of generation slots, handed out
first come first served, shares the swarm fairly among visitors; a request that is stopped (stop string, client
gone) frees its slot as soon as the running step ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import Any, AsyncIterator, Optional, Sequence

from molink_swarm.client.batched import BatchedDecoder, Sampling
from molink_swarm.client.loop import event_loop as client_loop
from molink_swarm.web.metrics import WebMetrics


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()


@dataclasses.dataclass
class Generation:
    """What a finished (or running) generation reports besides its text."""

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: Optional[str] = None  # "stop" (end of answer or a stop string) or "length"


class TextAssembler:
    """Turns generated token ids into text deltas: never splits a UTF-8 character, never shows a stop string.

    Text that could be the beginning of a stop string is held back until it is clear that it is not.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # decoded so far
        self.sent = 0  # characters of ``text`` already handed out
        self.stopped = False

    def add(self, token_ids: Sequence[int]) -> str:
        """Take new tokens; return the text that can be shown now."""
        if self.stopped:
            return ""
        self.ids.extend(token_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""  # an incomplete multi-byte character: wait for the next token
        self.text = text
        return self._release(final=False)

    def finish(self) -> str:
        """The text still held back once generation has ended."""
        return "" if self.stopped else self._release(final=True)

    def _release(self, final: bool) -> str:
        for stop in self.stop:
            found = self.text.find(stop, max(0, self.sent - len(stop) + 1))
            if found != -1:
                self.stopped = True
                out = self.text[self.sent : found]
                self.sent = found
                return out
        end = len(self.text) if final else len(self.text) - self._held_back()
        out = self.text[self.sent : max(end, self.sent)]
        self.sent = max(end, self.sent)
        return out

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self.text) - self.sent), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest


_DONE = object()


class ChatEngine:
    """One served model: its tokenizer, chat template, limits, and the generation slots."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        name: str,
        aliases: Sequence[str] = (),
        max_concurrent: int = 24,
        metrics: Optional[WebMetrics] = None,
    ):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.aliases = frozenset(a.lower() for a in (name, *aliases))
        self.max_concurrent = max_concurrent
        self.metrics = metrics or WebMetrics()
        self.created = int(time.time())
        self.decoder = BatchedDecoder(model)
        self._slots: Optional[asyncio.Semaphore] = None
        eos = model.generation_config.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)

    # ---- prompts (event loop only)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    # ---- generation

    async def stream(self, prompt_ids: list[int], params: SamplingParams, report: Generation) -> AsyncIterator[str]:
        """Generate after ``prompt_ids``, yielding text as it comes; ``report`` is filled in along the way.

        Errors of the swarm (missing blocks, every server failed) are raised from the first iteration.
        """
        loop = asyncio.get_running_loop()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_concurrent)
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        assembler = TextAssembler(self.tokenizer, params.stop)
        self.metrics.queued_generations.inc()
        try:
            await self._slots.acquire()
        finally:
            self.metrics.queued_generations.dec()
        self.metrics.active_generations.inc()
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        started = time.perf_counter()
        try:
            asyncio.run_coroutine_threadsafe(self._decode(prompt_ids, params, queue, cancel, loop), client_loop())
        except BaseException:
            self._release_slot()
            raise
        first = True
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                if first:
                    self.metrics.first_token_seconds.observe(time.perf_counter() - started)
                    first = False
                new = [t for t in item if t not in self.eos_ids]
                if len(new) < len(item):
                    report.finish_reason = "stop"
                report.completion_tokens += len(new)
                self.metrics.completion_tokens.inc(len(new))
                text = assembler.add(new)
                if assembler.stopped:
                    report.finish_reason = "stop"
                    cancel.set()
                if text:
                    yield text
                if assembler.stopped:
                    break
            rest = assembler.finish()
            if rest:
                yield rest
            if report.finish_reason is None:
                report.finish_reason = "length" if report.completion_tokens >= params.max_new_tokens else "stop"
        finally:
            cancel.set()  # a client that went away, a stop string, or the end: the worker stops at its next step
            self.metrics.generation_seconds.observe(time.perf_counter() - started)

    async def _decode(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        queue: asyncio.Queue,
        cancel: threading.Event,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """Runs on the client loop; hands tokens, then _DONE or the error, to the web app's loop."""
        outcome: Any = _DONE
        try:
            sampling = Sampling(temperature=params.temperature, top_p=params.top_p)
            async for token in self.decoder.generate(prompt_ids, params.max_new_tokens, sampling, stopped=cancel.is_set):
                loop.call_soon_threadsafe(queue.put_nowait, [token])
        except BaseException as e:  # handed to the request, which answers with a clear error
            outcome = e
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, outcome)
            loop.call_soon_threadsafe(self._release_slot)

    def _release_slot(self) -> None:
        self.metrics.active_generations.dec()
        self._slots.release()
