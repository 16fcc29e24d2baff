"""Text generation for the web app: many requests at once over one distributed model, streamed as text.

All requests share one :class:`BatchedDecoder` (client/batched.py): each has its own inference session, the
servers compute their steps in shared passes, and the client's LM head runs once per step for all of them. The
decoding runs on the client's event loop; tokens travel to the web app's loop as ids, and all tokenizer work
happens there, so the tokenizer is never used from two threads. A fixed number of generation slots, handed out
first come first served, shares the swarm fairly among visitors; a request that is stopped (stop string, client
gone) frees its slot as soon as the running step ends.

With ``logprobs``, each piece of text comes with its tokens: their text, log-probabilities (the model's own, see
client/batched.py), likeliest alternatives and where they start in the answer; with ``echo``, the prompt comes first,
as its own piece (its tokens scored from the prompt pass).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from typing import Any, AsyncIterator, Optional, Sequence

from molink_swarm.client.batched import BatchedDecoder, Sampling, ScoredToken
from molink_swarm.client.loop import event_loop as client_loop
from molink_swarm.web.metrics import WebMetrics


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    logprobs: Optional[int] = None  # report each token's log-probability and this many likeliest alternatives


@dataclasses.dataclass
class Generation:
    """What a finished (or running) generation reports besides its text."""

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: Optional[str] = None  # "stop" (end of answer or a stop string) or "length"


@dataclasses.dataclass(frozen=True)
class Prompt:
    ids: list[int]
    text: str = ""  # what an echo shows
    offsets: Optional[list[int]] = None  # where each token's text starts in ``text`` (None: work it out if needed)


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One token as the API reports it with ``logprobs``."""

    token: str
    logprob: Optional[float]  # None for a prompt's first token
    top: Optional[dict[str, float]]  # the likeliest tokens at its position and itself (None with logprob None)
    offset: int  # where its text starts in the reply's text


@dataclasses.dataclass(frozen=True)
class Piece:
    """Text as it can be shown now, and (with logprobs) the tokens behind it."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


class TokenOffsets:
    """Where each token's text starts in the text of a sequence of tokens (special tokens left out), token by token.

    Decodes a few tokens at a time, as streaming detokenizers do: a token's text is what decoding it adds to the
    tokens just before it (decoding the whole prefix each time would cost quadratic time). A character split over
    several tokens appears once its last byte has come; the tokens that carry its bytes after the first start at the
    character, like the offsets of a fast tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.length = 0  # of the text of the tokens read
        self._start = self._read = 0  # ids[_start:_read] were read last (the context of the next decode)

    def add(self, token: int) -> int:
        """Take the next token; return where its text starts."""
        read = self._decode(self._start, self._read)
        pending = self._decode(self._start, len(self.ids))[len(read) :]  # tokens that have not made a whole character
        offset = self.length + len(pending.rstrip("\ufffd"))
        self.ids.append(token)
        text = self._decode(self._start, len(self.ids))
        if len(text) > len(read) and not text.endswith("\ufffd"):
            self.length += len(text) - len(read)
            self._start, self._read = self._read, len(self.ids)
        return offset

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=True) if end > start else ""


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

    def text_prompt(self, text: str) -> Prompt:
        """A prompt given as text: its tokens, and where each starts in the text (fast tokenizers know)."""
        if not self.tokenizer.is_fast:
            return Prompt(self.encode_text(text), text)
        encoded = self.tokenizer(text, return_offsets_mapping=True)
        return Prompt(list(encoded["input_ids"]), text, [start for start, _end in encoded["offset_mapping"]])

    def token_prompt(self, ids: Sequence[int]) -> Prompt:
        """A prompt given as token ids; its text is worked out only if an echo needs it."""
        return Prompt(list(ids))

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().num_embeddings

    # ---- generation

    async def stream(
        self, prompt: Prompt, params: SamplingParams, report: Generation, *, echo: bool = False
    ) -> AsyncIterator[Piece]:
        """Generate after ``prompt``, yielding text as it comes (with its tokens if ``params.logprobs`` is set);
        ``report`` is filled in along the way. ``echo``: the prompt comes first, as its own piece.

        Errors of the swarm (missing blocks, every server failed) are raised from the first iteration.
        """
        prompt_ids = prompt.ids
        scored = params.logprobs is not None
        if echo and (scored or not prompt.text):
            prompt = self._with_offsets(prompt)
        shift = len(prompt.text) if echo else 0  # the answer's text starts after the echoed prompt
        echo_due = echo
        loop = asyncio.get_running_loop()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_concurrent)
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        assembler = TextAssembler(self.tokenizer, params.stop)
        answer_offsets = TokenOffsets(self.tokenizer)
        self.metrics.queued_generations.inc()
        try:
            await self._slots.acquire()
        finally:
            self.metrics.queued_generations.dec()
        self.metrics.active_generations.inc()
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        started = time.perf_counter()
        try:
            asyncio.run_coroutine_threadsafe(self._decode(prompt_ids, params, echo, queue, cancel, loop), client_loop())
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
                if echo_due:  # once the swarm has answered, so that its errors come before anything is shown
                    echo_due = False
                    prompt_scores = item if item and item[0].prompt else []
                    yield Piece(prompt.text, self._report(prompt_scores, prompt.offsets) if scored else ())
                    if prompt_scores:
                        continue
                if first:
                    self.metrics.first_token_seconds.observe(time.perf_counter() - started)
                    first = False
                new = [t for t in item if t.id not in self.eos_ids]
                if len(new) < len(item):
                    report.finish_reason = "stop"
                report.completion_tokens += len(new)
                self.metrics.completion_tokens.inc(len(new))
                text = assembler.add([token.id for token in new])
                # Logprobs list the end-of-sequence token too (as OpenAI and vLLM do; the text leaves it out): tools
                # that score an echoed prompt with max_tokens=1 drop the last token as the generated one.
                offsets = [shift + answer_offsets.add(token.id) for token in item] if scored else []
                if assembler.stopped:
                    report.finish_reason = "stop"
                    cancel.set()
                    # Tokens that completed a stop string start at best where the shown text ends.
                    offsets = [min(offset, shift + assembler.sent) for offset in offsets]
                if text or (scored and item):
                    yield Piece(text, self._report(item, offsets) if scored else ())
                if assembler.stopped:
                    break
            if echo_due:  # nothing came back at all (the swarm answered with its end only)
                yield Piece(prompt.text)
            rest = assembler.finish()
            if rest:
                yield Piece(rest)
            if report.finish_reason is None:
                report.finish_reason = "length" if report.completion_tokens >= params.max_new_tokens else "stop"
        finally:
            cancel.set()  # a client that went away, a stop string, or the end: the worker stops at its next step
            self.metrics.generation_seconds.observe(time.perf_counter() - started)

    def _with_offsets(self, prompt: Prompt) -> Prompt:
        if prompt.offsets is not None:
            return prompt
        tracker = TokenOffsets(self.tokenizer)
        offsets = [tracker.add(token) for token in prompt.ids]
        return Prompt(prompt.ids, prompt.text or tracker.text, offsets)

    def _report(self, tokens: Sequence[ScoredToken], offsets: Sequence[int]) -> tuple[TokenLogprob, ...]:
        """Scored tokens as the API reports them: as text, with their likeliest alternatives (and themselves)."""
        ids = sorted({t.id for t in tokens} | {alt for t in tokens for alt, _ in t.top})
        names = dict(zip(ids, self.tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False)))
        report = []
        for token, offset in zip(tokens, offsets):
            top = None
            if token.logprob is not None:
                top = {names[alt]: logprob for alt, logprob in token.top}
                top.setdefault(names[token.id], token.logprob)
            report.append(TokenLogprob(names[token.id], token.logprob, top, offset))
        return tuple(report)

    async def _decode(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        echo: bool,
        queue: asyncio.Queue,
        cancel: threading.Event,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """Runs on the client loop; hands the scored prompt (if asked, as one list), each token, then _DONE or the
        error, to the web app's loop."""
        outcome: Any = _DONE
        prompt_scores: list[ScoredToken] = []
        try:
            sampling = Sampling(temperature=params.temperature, top_p=params.top_p)
            tokens = self.decoder.generate_scored(
                prompt_ids, params.max_new_tokens, sampling, stopped=cancel.is_set, logprobs=params.logprobs, score_prompt=echo
            )
            async with contextlib.aclosing(tokens):
                async for token in tokens:
                    if token.prompt:
                        prompt_scores.append(token)
                        continue
                    if prompt_scores:
                        loop.call_soon_threadsafe(queue.put_nowait, prompt_scores)
                        prompt_scores = []
                    loop.call_soon_threadsafe(queue.put_nowait, [token])
            if prompt_scores:
                loop.call_soon_threadsafe(queue.put_nowait, prompt_scores)
        except BaseException as e:  # handed to the request, which answers with a clear error
            outcome = e
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, outcome)
            loop.call_soon_threadsafe(self._release_slot)

    def _release_slot(self) -> None:
        self.metrics.active_generations.dec()
        self._slots.release()
