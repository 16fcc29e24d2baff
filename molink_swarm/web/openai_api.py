"""The OpenAI-compatible API: `/v1/chat/completions`, `/v1/completions` (streamed over SSE or not), `/v1/models`.

Requests are validated with pydantic; every error is answered in OpenAI's format
(``{"error": {"message", "type", "param", "code"}}``) so that OpenAI clients raise their usual exceptions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import uuid
from typing import Any, AsyncIterator, Callable, Literal, Optional, Union

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from molink_swarm.errors import UserError
from molink_swarm.web.engine import ChatEngine, Generation, SamplingParams


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


class _Request(BaseModel):
    # OpenAI clients send many optional fields; the ones we do not use are ignored, the ones we cannot honour
    # (several choices, logprobs, tools) are refused below with a clear message.
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
    prompt: Union[str, list[str]]


def parse_request(schema: type[BaseModel], body: Any) -> Any:
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
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
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            prompt = engine.encode_chat(messages)
        except Exception as e:  # a template that rejects this conversation (e.g. roles out of order)
            raise ApiError(400, f"The model's chat template rejected these messages: {e}", param="messages") from None
        return await self._complete(request, body, engine, prompt, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = parse_request(CompletionRequest, await _json_body(request))
        engine = self.engine(body.model)
        prompt_text = body.prompt
        if isinstance(prompt_text, list):
            if len(prompt_text) != 1:
                raise ApiError(400, "Send one prompt per request", param="prompt")
            prompt_text = prompt_text[0]
        return await self._complete(request, body, engine, engine.encode_text(prompt_text), chat=False)

    async def _complete(self, request: web.Request, body: _Request, engine: ChatEngine, prompt: list[int], chat: bool) -> web.StreamResponse:
        params = self._sampling(body, prompt)
        report = Generation(prompt_tokens=len(prompt))
        reply_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        async with self.client_slot(request), contextlib.aclosing(engine.stream(prompt, params, report)) as chunks:
            first = await _first_chunk(chunks)  # swarm errors surface here, before any header is sent
            if not body.stream:
                text = first + "".join([chunk async for chunk in chunks])
                return web.json_response(_full_reply(reply_id, engine.name, chat, text, report))
            return await self._stream_reply(request, reply_id, engine.name, chat, first, chunks, report, body.include_usage())

    def _sampling(self, body: _Request, prompt: list[int]) -> SamplingParams:
        if body.n != 1:
            raise ApiError(400, "Only n=1 is supported", param="n")
        if body.logprobs:
            raise ApiError(400, "logprobs are not supported by this server", param="logprobs")
        if len(prompt) > self.limits.max_prompt_tokens:
            raise ApiError(
                400,
                f"The prompt has {len(prompt)} tokens; this server accepts at most {self.limits.max_prompt_tokens}",
                param="messages",
                code="context_length_exceeded",
            )
        wanted = body.max_completion_tokens or body.max_tokens or self.limits.default_new_tokens
        if wanted > self.limits.max_new_tokens:
            raise ApiError(
                400, f"max_tokens is at most {self.limits.max_new_tokens} on this server", param="max_tokens"
            )
        return SamplingParams(max_new_tokens=wanted, temperature=body.temperature, top_p=body.top_p, stop=body.stop_strings())

    async def _stream_reply(
        self,
        request: web.Request,
        reply_id: str,
        model: str,
        chat: bool,
        first: str,
        chunks: AsyncIterator[str],
        report: Generation,
        include_usage: bool,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        await response.prepare(request)
        created = int(time.time())

        async def send(payload: Any) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
            await response.write(f"data: {data}\n\n".encode())

        def chunk(delta: Optional[str], finish: Optional[str] = None, role: bool = False) -> dict[str, Any]:
            if chat:
                content: dict[str, Any] = {} if delta is None else {"content": delta}
                if role:
                    content["role"] = "assistant"
                choice = {"index": 0, "delta": content, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            obj = "chat.completion.chunk" if chat else "text_completion"
            return {"id": reply_id, "object": obj, "created": created, "model": model, "choices": [choice]}

        try:
            await send(chunk(first, role=True))
            try:
                async for text in chunks:
                    await send(chunk(text))
            except (UserError, OSError, RuntimeError) as e:  # the swarm failed mid-answer: tell the client
                if isinstance(e, ConnectionResetError):
                    raise
                await send(_error_body(e))
                return response
            await send(chunk(None, finish=report.finish_reason))
            if include_usage:
                usage = chunk(None)
                usage["choices"] = []
                usage["usage"] = _usage(report)
                await send(usage)
            await send("[DONE]")
        except ConnectionResetError:
            return response  # the visitor left (or pressed stop): closing ``chunks`` stops the generation
        await response.write_eof()
        return response


async def _json_body(request: web.Request) -> Any:
    try:
        return await request.json()
    except web.HTTPRequestEntityTooLarge:
        raise
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "The request body must be JSON") from None


async def _first_chunk(chunks: AsyncIterator[str]) -> str:
    """The first piece of text, or "" if the answer is empty; errors of the swarm become API errors."""
    try:
        return await anext(chunks)
    except StopAsyncIteration:
        return ""
    except UserError as e:
        raise ApiError(503, str(e), kind="service_unavailable", code="swarm_unavailable") from None


def _error_body(error: BaseException) -> dict[str, Any]:
    return ApiError(503, f"The swarm failed while answering: {error}", kind="service_unavailable").body()


def _usage(report: Generation) -> dict[str, int]:
    return {
        "prompt_tokens": report.prompt_tokens,
        "completion_tokens": report.completion_tokens,
        "total_tokens": report.prompt_tokens + report.completion_tokens,
    }


def _full_reply(reply_id: str, model: str, chat: bool, text: str, report: Generation) -> dict[str, Any]:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": report.finish_reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": report.finish_reason, "logprobs": None}
    return {
        "id": reply_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": _usage(report),
    }
