"""The web app: chat page, OpenAI-compatible API, swarm status page, metrics."""

from molink_swarm.web.app import WebApp, run_web
from molink_swarm.web.engine import ChatEngine, SamplingParams
from molink_swarm.web.openai_api import Limits

__all__ = ["ChatEngine", "Limits", "SamplingParams", "WebApp", "run_web"]
