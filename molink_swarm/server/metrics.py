"""Prometheus metrics of a server, served at ``/metrics`` on `join --metrics-port`.

Each server keeps its own registry (not prometheus_client's global one), so tests can run many in one process.
"""

from __future__ import annotations

from typing import Callable, Optional

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class ServerMetrics:
    """What a `join` server exports: work done, sessions, step latency, cache use, refused requests."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.tokens = Counter(
            "molink_server_tokens", "Tokens processed by this server's blocks", ["kind"], registry=self.registry
        )
        self.step_seconds = Histogram(
            "molink_server_step_seconds",
            "Time from a step's arrival to its output (queueing and compute)",
            ["kind"],
            buckets=STEP_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "molink_server_rpc_errors", "Requests answered with an error", ["rpc"], registry=self.registry
        )
        self.active_sessions = Gauge("molink_server_active_sessions", "Open inference sessions", registry=self.registry)
        self.cache_tokens_reserved = Gauge(
            "molink_server_cache_tokens_reserved", "KV cache tokens reserved by open sessions", registry=self.registry
        )
        self.cache_tokens_total = Gauge(
            "molink_server_cache_tokens_total", "KV cache budget in tokens", registry=self.registry
        )
        self.blocks = Gauge("molink_server_blocks", "Blocks served", registry=self.registry)
        self.batch_steps = Histogram(
            "molink_server_batch_steps",
            "Steps (of different sessions or forward passes) computed in one pass of the blocks",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        # Hidden states on the wire (payload bytes, not framing): in = inputs received (steps, pushes, forward
        # passes), out = outputs sent (replies, pushes). Bytes / tokens is what --wire-dtype buys.
        self.activation_bytes = Counter(
            "molink_server_activation_bytes", "Bytes of hidden states received (in) and sent (out)", ["direction"],
            registry=self.registry,
        )
        self.activation_tokens = Counter(
            "molink_server_activation_tokens", "Tokens of hidden states received (in) and sent (out)", ["direction"],
            registry=self.registry,
        )

    def observe_batch(self, steps: int, tokens: int) -> None:
        self.batch_steps.observe(steps)

    def count_activations(self, direction: str, nbytes: int, tokens: int) -> None:
        self.activation_bytes.labels(direction).inc(nbytes)
        self.activation_tokens.labels(direction).inc(tokens)

    def bytes_per_token(self, direction: str = "out") -> Optional[float]:
        """Average bytes per token of hidden states sent (out) or received (in); None before any."""
        tokens = self.registry.get_sample_value("molink_server_activation_tokens_total", {"direction": direction})
        if not tokens:
            return None
        return self.registry.get_sample_value("molink_server_activation_bytes_total", {"direction": direction}) / tokens

    def track_sessions(self, count: Callable[[], int], reserved: Callable[[], int], total: int) -> None:
        self.active_sessions.set_function(count)
        self.cache_tokens_reserved.set_function(reserved)
        self.cache_tokens_total.set(total)


async def start_metrics_server(registry: CollectorRegistry, host: str, port: int) -> web.AppRunner:
    """A tiny HTTP server answering ``GET /metrics``."""

    async def handle(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type=CONTENT_TYPE_LATEST.split(";")[0], charset="utf-8")

    app = web.Application()
    app.router.add_get("/metrics", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
