"""The `molink-swarm` command line: dht, join, status, chat, web, demo."""

from molink_swarm.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
