"""Prometheus metrics of the web app (its ``/metrics``), in a registry of its own."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class WebMetrics:
    """What the web app exports: requests by endpoint and status, tokens, latency, concurrency."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "molink_web_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry
        )
        self.prompt_tokens = Counter("molink_web_prompt_tokens", "Prompt tokens received", registry=self.registry)
        self.completion_tokens = Counter(
            "molink_web_completion_tokens", "Tokens generated", registry=self.registry
        )
        self.generation_seconds = Histogram(
            "molink_web_generation_seconds", "Time to generate a whole answer", buckets=REQUEST_BUCKETS, registry=self.registry
        )
        self.first_token_seconds = Histogram(
            "molink_web_first_token_seconds", "Time from request to first token", buckets=REQUEST_BUCKETS, registry=self.registry
        )
        self.active_generations = Gauge("molink_web_active_generations", "Answers being generated", registry=self.registry)
        self.queued_generations = Gauge(
            "molink_web_queued_generations", "Requests waiting for a generation slot", registry=self.registry
        )


    def watch_spot_checks(self, engines) -> None:
        """Export the spot checks of these engines' swarm clients (client/spot_check.py), read at each scrape."""
        self.registry.register(_SpotCheckCollector(engines))

    def response(self) -> web.Response:
        return web.Response(body=generate_latest(self.registry), content_type=CONTENT_TYPE_LATEST.split(";")[0], charset="utf-8")


class _SpotCheckCollector:
    def __init__(self, engines) -> None:
        self.engines = list(engines)

    def collect(self):
        checks = CounterMetricFamily(
            "molink_web_spot_checks", "Steps of a server re-run on another to check them, by outcome", labels=["model", "outcome"]
        )
        caught = CounterMetricFamily(
            "molink_web_spot_check_caught_servers", "Servers caught answering wrong outputs (banned)", labels=["model"]
        )
        compute = CounterMetricFamily(
            "molink_web_spot_check_compute_seconds", "Compute time the checks cost the swarm's servers", labels=["model"]
        )
        for engine in self.engines:
            stats = engine.model.swarm.spot_checks
            outcomes = {
                "agreed": stats.checks - stats.disagreements,
                "disagreed": stats.disagreements,
                "undecided": stats.undecided,
                "skipped": stats.skipped,
            }
            for outcome, count in outcomes.items():
                checks.add_metric([engine.name, outcome], count)
            caught.add_metric([engine.name], len(stats.caught))
            compute.add_metric([engine.name], stats.compute_s)
        yield from (checks, caught, compute)
