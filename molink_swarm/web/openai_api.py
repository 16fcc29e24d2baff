"""The OpenAI-compatible API: `/v1/chat/completions`, `/v1/completions` (streamed over SSE or not), `/v1/models`.

Requests are validated with pydantic; every error is answered in OpenAI's format
(``{"error": {"message", "type", "param", "code"}}``) so that OpenAI clients raise their usual exceptions.

`/v1/completions` is OpenAI's legacy API in full, so that evaluation tools (lm-evaluation-harness's
``local-completions``) can score text through it: a prompt as a string, token ids, or a list of either (one choice
per prompt, run side by side); ``echo`` (the prompt is part of the reply); ``logprobs=k`` (each token's
log-probability, its ``k`` likeliest alternatives, its offset in the text), also for an echoed prompt, whose first
token has none; ``max_tokens=0`` (nothing generated: with echo and logprobs, a pure scoring of the prompt).
Log-probabilities are the model's own distribution (log_softmax of its raw logits, in float32), whatever the
temperature and top_p: a token's score does not depend on how it was sampled. An end-of-sequence token is listed
with the others, though neither the text nor ``usage`` shows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from typing import Any, AsyncIterator, Callable, Literal, Optional, Sequence, Union

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from molink_swarm.errors import UserError
from molink_swarm.web.engine import ChatEngine, Generation, Piece, Prompt, SamplingParams, TokenLogprob

# The most likely tokens a reply may list per position (``logprobs``): OpenAI's own limit for completions.
MAX_LOGPROBS = 5


class ApiError(Exception):
    """An error answered to the API client; ``status`` and ``kind`` follow OpenAI's conventions."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask of a public demo."""

    max_new_tokens: int = 512
    default_new_tokens: int = 256
    max_prompt_tokens: int = 2048
    max_sessions_per_client: int = 2
    max_body_bytes: int = 256 * 1024
    max_prompts_per_request: int = 16  # /v1/completions with a list of prompts (a batch of an evaluation tool)


class _Request(BaseModel):
    # OpenAI clients send many optional fields; the ones we do not use are ignored, the ones we cannot honour
    # (several choices, logprobs of chat completions, tools) are refused below with a clear message.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    stop: Optional[Union[str, list[str]]] = None
    logprobs: Optional[Union[bool, int]] = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(len(s) > 64 for s in stops):
            raise ApiError(400, "At most 4 stop strings of up to 64 characters each", param="stop")
        return tuple(stops)

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[_TextPart], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    tools: Optional[list[Any]] = None


class CompletionRequest(_Request):
    prompt: Union[str, list[str], list[StrictInt], list[list[StrictInt]]]
    max_tokens: Optional[int] = Field(default=None, ge=0)  # 0: generate nothing (with echo: score the prompt)
    echo: bool = False
    logprobs: Optional[StrictInt] = None  # here the number of likeliest tokens to list per position


PROMPT_FORMS = "give a string, a list of token ids, or a list of either (one choice per prompt)"


def parse_request(schema: type[BaseModel], body: Any) -> Any:
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        if first["loc"] and first["loc"][0] == "prompt":
            raise ApiError(400, f"Invalid request: prompt: {PROMPT_FORMS}", param="prompt") from None
        where = ".".join(str(part) for part in first["loc"]) or None
        raise ApiError(400, f"Invalid request: {where + ': ' if where else ''}{first['msg']}", param=where) from None


class OpenAIApi:
    """The handlers; ``engines`` maps lower-cased model names and aliases to the engines serving them."""

    def __init__(self, engines: list[ChatEngine], limits: Limits, on_generation: Callable[[web.Request], Any]):
        self.engines = engines
        self.limits = limits
        self.client_slot = on_generation  # an async context manager per request: enforces per-client limits

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)

    def engine(self, model: str) -> ChatEngine:
        for engine in self.engines:
            if model.lower() in engine.aliases:
                return engine
        names = ", ".join(e.name for e in self.engines)
        raise ApiError(404, f"The model {model!r} is not served here; available: {names}", param="model", code="model_not_found")

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": e.name, "object": "model", "created": e.created, "owned_by": "molink-swarm"} for e in self.engines],
            }
        )

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = parse_request(ChatCompletionRequest, await _json_body(request))
        engine = self.engine(body.model)
        if body.tools:
            raise ApiError(400, "Tools / function calling are not supported by this server", param="tools")
        if body.logprobs:
            raise ApiError(
                400, "logprobs are not supported for chat completions by this server; /v1/completions has them", param="logprobs"
            )
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            prompt = Prompt(engine.encode_chat(messages))
        except Exception as e:  # a template that rejects this conversation (e.g. roles out of order)
            raise ApiError(400, f"The model's chat template rejected these messages: {e}", param="messages") from None
        params = self._sampling(body, [prompt], param="messages")
        return await self._complete(request, body, engine, [prompt], params, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = parse_request(CompletionRequest, await _json_body(request))
        engine = self.engine(body.model)
        if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
            raise ApiError(
                400,
                f"logprobs is the number of likeliest tokens to list per position: 0 to {MAX_LOGPROBS}, not {body.logprobs}",
                param="logprobs",
            )
        prompts = self._prompts(body.prompt, engine)
        params = self._sampling(body, prompts, param="prompt", logprobs=body.logprobs)
        return await self._complete(request, body, engine, prompts, params, chat=False, echo=body.echo)

    def _prompts(self, raw: Union[str, list], engine: ChatEngine) -> list[Prompt]:
        """A completion request's prompts: a string, token ids, or a list of either."""
        single = isinstance(raw, str) or (raw and all(isinstance(item, int) for item in raw))
        items = [raw] if single else list(raw)
        if not items:
            raise ApiError(400, f"The prompt is empty: {PROMPT_FORMS}", param="prompt")
        if len(items) > self.limits.max_prompts_per_request:
            raise ApiError(
                400, f"At most {self.limits.max_prompts_per_request} prompts per request on this server", param="prompt"
            )
        prompts = []
        for item in items:
            if isinstance(item, str):
                prompts.append(engine.text_prompt(item))
                continue
            outside = next((token for token in item if not 0 <= token < engine.vocab_size), None)
            if outside is not None:
                raise ApiError(
                    400, f"Token id {outside} is not in the model's vocabulary (0 to {engine.vocab_size - 1})", param="prompt"
                )
            prompts.append(engine.token_prompt(item))
        if any(not prompt.ids for prompt in prompts):
            raise ApiError(400, "A prompt is empty: it needs at least one token", param="prompt")
        return prompts

    def _sampling(self, body: _Request, prompts: list[Prompt], param: str, logprobs: Optional[int] = None) -> SamplingParams:
        if body.n != 1:
            raise ApiError(400, "Only n=1 is supported", param="n")
        longest = max(len(prompt.ids) for prompt in prompts)
        if longest > self.limits.max_prompt_tokens:
            raise ApiError(
                400,
                f"The prompt has {longest} tokens; this server accepts at most {self.limits.max_prompt_tokens}",
                param=param,
                code="context_length_exceeded",
            )
        wanted = next((n for n in (body.max_completion_tokens, body.max_tokens) if n is not None), self.limits.default_new_tokens)
        if wanted > self.limits.max_new_tokens:
            raise ApiError(
                400, f"max_tokens is at most {self.limits.max_new_tokens} on this server", param="max_tokens"
            )
        return SamplingParams(
            max_new_tokens=wanted, temperature=body.temperature, top_p=body.top_p, stop=body.stop_strings(), logprobs=logprobs
        )

    async def _complete(
        self,
        request: web.Request,
        body: _Request,
        engine: ChatEngine,
        prompts: list[Prompt],
        params: SamplingParams,
        chat: bool,
        echo: bool = False,
    ) -> web.StreamResponse:
        reports = [Generation(prompt_tokens=len(prompt.ids)) for prompt in prompts]
        reply = _Reply(f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", engine.name, chat, params.logprobs is not None)
        async with self.client_slot(request, len(prompts)) as sessions:
            async with contextlib.aclosing(_choices(engine, prompts, params, reports, echo, sessions)) as events:
                first = await _first_event(events)  # swarm errors surface here, before any header is sent
                if not body.stream:
                    return web.json_response(reply.whole([first, *[event async for event in events]], reports))
                return await self._stream_reply(request, reply, first, events, reports, body.include_usage())

    async def _stream_reply(
        self,
        request: web.Request,
        reply: _Reply,
        first: _Event,
        events: AsyncIterator[_Event],
        reports: list[Generation],
        include_usage: bool,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        await response.prepare(request)

        async def send(payload: Any) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
            await response.write(f"data: {data}\n\n".encode())

        try:
            await send(reply.chunk(first, reports))
            try:
                async for event in events:
                    await send(reply.chunk(event, reports))
            except (UserError, OSError, RuntimeError) as e:  # the swarm failed mid-answer: tell the client
                if isinstance(e, ConnectionResetError):
                    raise
                await send(_error_body(e))
                return response
            if include_usage:
                await send(reply.usage_chunk(reports))
            await send("[DONE]")
        except ConnectionResetError:
            return response  # the visitor left (or pressed stop): closing the events stops the generations
        await response.write_eof()
        return response


@dataclasses.dataclass(frozen=True)
class _Event:
    """A piece of choice ``index``'s answer, or (``piece`` None) its end."""

    index: int
    piece: Optional[Piece]


async def _choices(
    engine: ChatEngine,
    prompts: list[Prompt],
    params: SamplingParams,
    reports: list[Generation],
    echo: bool,
    concurrency: int,
) -> AsyncIterator[_Event]:
    """The answers to ``prompts``, ``concurrency`` at a time, as their pieces come; each ends with its end event.

    The first error of any of them is raised (and the others are stopped)."""
    events: asyncio.Queue = asyncio.Queue()
    turns = asyncio.Semaphore(concurrency)

    async def answer(index: int) -> None:
        try:
            async with turns, contextlib.aclosing(engine.stream(prompts[index], params, reports[index], echo=echo)) as pieces:
                async for piece in pieces:
                    events.put_nowait(_Event(index, piece))
            events.put_nowait(_Event(index, None))
        except Exception as e:
            events.put_nowait(e)

    tasks = [asyncio.create_task(answer(index)) for index in range(len(prompts))]
    try:
        ended = 0
        while ended < len(prompts):
            event = await events.get()
            if isinstance(event, BaseException):
                raise event
            ended += event.piece is None
            yield event
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclasses.dataclass
class _Reply:
    """How a reply looks in OpenAI's format: whole, or as the chunks of a stream."""

    id: str
    model: str
    chat: bool
    logprobs: bool
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    _started: set[int] = dataclasses.field(default_factory=set)  # choices that have sent a chunk

    def whole(self, events: list[_Event], reports: list[Generation]) -> dict[str, Any]:
        choices = []
        for index, report in enumerate(reports):
            pieces = [event.piece for event in events if event.index == index and event.piece is not None]
            text = "".join(piece.text for piece in pieces)
            logprobs = _logprobs([token for piece in pieces for token in piece.logprobs]) if self.logprobs else None
            if self.chat:
                choice = {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": report.finish_reason, "logprobs": None}
            else:
                choice = {"index": index, "text": text, "finish_reason": report.finish_reason, "logprobs": logprobs}
            choices.append(choice)
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": _usage(reports),
        }

    def chunk(self, event: _Event, reports: list[Generation]) -> dict[str, Any]:
        """One event as a stream chunk: a piece, or the end of a choice (with its finish reason)."""
        piece = event.piece
        finish = reports[event.index].finish_reason if piece is None else None
        if self.chat:
            delta: dict[str, Any] = {} if piece is None else {"content": piece.text}
            if event.index not in self._started:  # a chat stream's first chunk names the role
                delta = {"role": "assistant", "content": "", **delta}
            choice = {"index": event.index, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            logprobs = _logprobs(piece.logprobs) if self.logprobs and piece is not None else None
            choice = {"index": event.index, "text": "" if piece is None else piece.text, "finish_reason": finish, "logprobs": logprobs}
        self._started.add(event.index)
        return self._chunk([choice])

    def usage_chunk(self, reports: list[Generation]) -> dict[str, Any]:
        return {**self._chunk([]), "usage": _usage(reports)}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}


def _logprobs(tokens: Sequence[TokenLogprob]) -> dict[str, list]:
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [t.top for t in tokens],
        "text_offset": [t.offset for t in tokens],
    }


async def _json_body(request: web.Request) -> Any:
    try:
        return await request.json()
    except web.HTTPRequestEntityTooLarge:
        raise
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "The request body must be JSON") from None


async def _first_event(events: AsyncIterator[_Event]) -> _Event:
    """The first event (every choice has at least its end); errors of the swarm become API errors."""
    try:
        return await anext(events)
    except UserError as e:
        raise ApiError(503, str(e), kind="service_unavailable", code="swarm_unavailable") from None


def _error_body(error: BaseException) -> dict[str, Any]:
    return ApiError(503, f"The swarm failed while answering: {error}", kind="service_unavailable").body()


def _usage(reports: list[Generation]) -> dict[str, int]:
    prompt = sum(report.prompt_tokens for report in reports)
    completion = sum(report.completion_tokens for report in reports)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
