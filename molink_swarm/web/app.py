"""`molink-swarm web`: the chat page, the OpenAI-compatible API, the swarm status page and metrics, in one
aiohttp app that is itself a client of the swarm.

Pages are plain HTML/CSS/JS from ``static/`` (no build step); they talk to the same JSON API anyone can use.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import socket
import time
from pathlib import Path
from typing import AsyncIterator, Optional, Sequence

from aiohttp import web

from molink_swarm.client.loop import run_on_client_loop
from molink_swarm.client.status import SwarmView, swarm_snapshot
from molink_swarm.errors import UserError
from molink_swarm.web.engine import ChatEngine
from molink_swarm.web.metrics import WebMetrics
from molink_swarm.web.openai_api import ApiError, Limits, OpenAIApi

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
SNAPSHOT_TTL_S = 3.0


class WebApp:
    def __init__(
        self,
        engines: Sequence[ChatEngine],
        *,
        limits: Limits = Limits(),
        initial_peers: Sequence[str] = (),
        metrics: Optional[WebMetrics] = None,
        private: bool = False,
    ):
        if not engines:
            raise ValueError("The web app needs at least one model")
        self.engines = list(engines)
        self.limits = limits
        self.initial_peers = list(initial_peers)
        self.private = private  # a private swarm: volunteers need its key file to join
        self.metrics = metrics or WebMetrics()
        self.metrics.watch_spot_checks(self.engines)
        self.api = OpenAIApi(self.engines, limits, self.client_slot)
        self._per_client: collections.Counter[str] = collections.Counter()
        self._snapshot: Optional[SwarmView] = None
        self._snapshot_lock = asyncio.Lock()

    def build(self) -> web.Application:
        app = web.Application(client_max_size=self.limits.max_body_bytes, middlewares=[self._errors_and_metrics])
        app.router.add_get("/", self._page("index.html"))
        app.router.add_get("/status", self._page("status.html"))
        app.router.add_static("/static/", STATIC, append_version=True)
        app.router.add_get("/api/v1/swarm", self.swarm)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/healthz", self.health)
        self.api.add_routes(app)
        return app

    # ---- pages and JSON

    def _page(self, name: str):
        async def handler(_request: web.Request) -> web.FileResponse:
            return web.FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})

        return handler

    async def swarm(self, request: web.Request) -> web.Response:
        """Block coverage per model and per server, plus what this app serves and how to join."""
        view = await self.snapshot()
        served = {e.model.source.model_id: e.name for e in self.engines}
        return web.json_response(
            {
                "models": [
                    {**m.model_dump(mode="json"), "served_here_as": served.get(m.model_id)} for m in view.models
                ],
                "served_models": [
                    {"name": e.name, "model_id": e.model.source.model_id, "num_blocks": e.model.swarm.num_blocks} for e in self.engines
                ],
                "initial_peers": self.initial_peers,
                "join_args": self.join_args(),
                "spot_checks": {e.name: dataclasses.asdict(e.model.swarm.spot_checks) for e in self.engines},
                "taken_at": view.taken_at,
            }
        )

    def join_args(self) -> str:
        """What a volunteer adds to `molink-swarm join --model M --blocks A:B` to join this swarm (pages show it)."""
        args = f"--initial-peers {self.initial_peers[0] if self.initial_peers else 'ADDR'}"
        return args + " --swarm-key SWARM_KEY_FILE" if self.private else args

    async def snapshot(self) -> SwarmView:
        async with self._snapshot_lock:
            if self._snapshot is None or time.time() - self._snapshot.taken_at > SNAPSHOT_TTL_S:
                swarm = self.engines[0].model.swarm
                self._snapshot = await run_on_client_loop(swarm_snapshot(swarm.dht, swarm.p2p))
            return self._snapshot

    async def metrics_page(self, _request: web.Request) -> web.Response:
        return self.metrics.response()

    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "models": [e.name for e in self.engines]})

    # ---- limits and errors

    @contextlib.asynccontextmanager
    async def client_slot(self, request: web.Request, wanted: int = 1) -> AsyncIterator[int]:
        """At most ``max_sessions_per_client`` generations at once per client address. A request with several prompts
        gets as many as are free, up to ``wanted`` (how many it may run at once), and at least one."""
        client = request.remote or "?"
        free = self.limits.max_sessions_per_client - self._per_client[client]
        if free <= 0:
            raise ApiError(
                429,
                f"At most {self.limits.max_sessions_per_client} generations at once per client; wait for one to finish",
                kind="rate_limit_exceeded",
                code="too_many_sessions",
            )
        granted = max(1, min(free, wanted))
        self._per_client[client] += granted
        try:
            yield granted
        finally:
            self._per_client[client] -= granted
            if not self._per_client[client]:
                del self._per_client[client]

    @web.middleware
    async def _errors_and_metrics(self, request: web.Request, handler) -> web.StreamResponse:
        endpoint = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except ApiError as e:
            status = e.status
            return e.response()
        except web.HTTPException as e:
            status = e.status
            if request.path.startswith("/v1/") and e.status >= 400:
                kind = "invalid_request_error" if e.status < 500 else "server_error"
                return ApiError(e.status, _http_message(e, self.limits), kind=kind).response()
            raise
        except UserError as e:  # the swarm cannot serve (missing blocks, all servers failed)
            status = 503
            return ApiError(503, str(e), kind="service_unavailable", code="swarm_unavailable").response()
        except Exception:
            logger.exception("Error while answering %s %s", request.method, request.path)
            return ApiError(500, "Internal error; see the server's log", kind="server_error").response()
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()


def _http_message(error: web.HTTPException, limits: Limits) -> str:
    if error.status == 413:
        return f"The request body is too large (at most {limits.max_body_bytes} bytes)"
    if error.status == 405:
        return f"Method not allowed: {error.text}"
    return error.reason if not error.text else f"{error.reason}: {error.text}"


async def serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Start serving; a taken port is a user error (one line), not a traceback."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as e:
        await runner.cleanup()
        raise UserError(f"Cannot listen on {host}:{port} ({e.strerror}); pass another --port") from None
    return runner


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            raise UserError(f"Cannot listen on {host}:{port} ({e.strerror}); pass another --port") from None


def load_engine(
    model: str, initial_peers: Sequence[str], *, metrics: WebMetrics, max_concurrent: int, wait_for_blocks_s: float,
    wire_dtype: str = "auto", swarm_key=None, spot_check: float = 0.0,
) -> ChatEngine:
    """Connect to the swarm for ``model`` (loading only its embeddings and head) and wrap it for the web."""
    from transformers import AutoTokenizer

    from molink_swarm.client.model import AutoDistributedModelForCausalLM

    distributed = AutoDistributedModelForCausalLM.from_pretrained(
        model, initial_peers=initial_peers, wait_for_blocks_s=wait_for_blocks_s, wire_dtype=wire_dtype, swarm_key=swarm_key,
        spot_check=spot_check,
    )
    tokenizer = AutoTokenizer.from_pretrained(distributed.source.path)
    if tokenizer.chat_template is None:
        logger.warning("%s has no chat template: /v1/chat/completions will use a plain one", distributed.source.name)
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    return ChatEngine(
        distributed,
        tokenizer,
        name=distributed.source.name,
        aliases=(model, distributed.source.model_id),
        max_concurrent=max_concurrent,
        metrics=metrics,
    )


# For base models without a template: "role: text" lines, then the assistant's turn.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


async def run_web(
    models: Sequence[str],
    initial_peers: Sequence[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    limits: Limits = Limits(),
    max_concurrent: int = 24,
    wait_for_blocks_s: float = 10.0,
    wire_dtype: str = "auto",
    swarm_key=None,
    spot_check: float = 0.0,
    stop: Optional[asyncio.Event] = None,
    on_ready=None,
) -> None:
    """Serve until ``stop`` is set. ``on_ready(url)`` is called once the app listens. ``swarm_key``: the key file
    (or loaded key) of a private swarm."""
    _check_port(host, port)  # before the slow part: connecting and loading the model
    metrics = WebMetrics()
    engines = [
        await asyncio.to_thread(
            load_engine, m, initial_peers, metrics=metrics, max_concurrent=max_concurrent, wait_for_blocks_s=wait_for_blocks_s,
            wire_dtype=wire_dtype, swarm_key=swarm_key, spot_check=spot_check,
        )
        for m in models
    ]
    try:
        app = WebApp(engines, limits=limits, initial_peers=initial_peers, metrics=metrics, private=swarm_key is not None).build()
        runner = await serve(app, host, port)
        try:
            bound_port = runner.addresses[0][1]
            url = f"http://{'localhost' if host in ('0.0.0.0', '::') else host}:{bound_port}/"
            if on_ready is not None:
                on_ready(url)
            await (stop or asyncio.Event()).wait()
        finally:
            await runner.cleanup()
    finally:
        for engine in engines:
            engine.model.shutdown()
