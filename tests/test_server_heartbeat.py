"""A server keeps announcing itself whatever goes wrong in one heartbeat, and never blocks its event loop to do it."""

from __future__ import annotations

import asyncio
import logging
import threading

from molink_swarm.dht import ServerState
from molink_swarm.server import server as server_module
from molink_swarm.server.neighbours import NextServerPinger
from molink_swarm.server.server import Server, ServerConfig


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def test_heartbeat_errors_are_logged_and_the_server_keeps_announcing_off_its_event_loop(tiny_llama_path, monkeypatch, caplog):
    announces: list[tuple[ServerState, bool]] = []  # (state, ran on the event loop's thread)
    heartbeats_after_failures = threading.Event()
    original_announce = Server._announce

    def announce(self, dht, validator, state, sessions):
        announces.append((state, _on_event_loop()))
        online = [s for s, _ in announces if s == ServerState.ONLINE]
        if len(online) == 3:
            raise ConnectionError("the DHT is unreachable")  # the second heartbeat's announce fails
        original_announce(self, dht, validator, state, sessions)
        if len(online) >= 5:
            heartbeats_after_failures.set()

    refreshes = 0

    async def refresh(self, timeout: float = 2.0) -> dict[str, float]:
        nonlocal refreshes
        refreshes += 1
        if refreshes == 1:
            raise RuntimeError("fetching the next servers failed")  # the first heartbeat's measurement fails
        return {}

    monkeypatch.setattr(Server, "_announce", announce)
    monkeypatch.setattr(NextServerPinger, "refresh", refresh)
    config = ServerConfig(model=str(tiny_llama_path), blocks=(0, 2), host="127.0.0.1", update_period=0.05)

    async def serve_until_enough_heartbeats() -> None:
        stop = asyncio.Event()
        running = asyncio.create_task(Server(config).run(stop))
        enough = asyncio.create_task(asyncio.to_thread(heartbeats_after_failures.wait, 300))
        try:
            await asyncio.wait({running, enough}, return_when=asyncio.FIRST_COMPLETED)
            ended_early = running.done()
        finally:
            heartbeats_after_failures.set()  # lets the waiting thread go, whatever happened
        assert not ended_early, f"Server.run ended after a failed heartbeat: {running.exception()!r}"
        stop.set()
        await running

    with caplog.at_level(logging.WARNING, logger=server_module.__name__):
        asyncio.run(serve_until_enough_heartbeats())

    assert [state for state, _ in announces][:2] == [ServerState.JOINING, ServerState.ONLINE]
    assert announces[-1][0] == ServerState.OFFLINE
    assert not [state for state, on_loop in announces if on_loop], "announced on the event loop (blocking it)"
    failures = [r for r in caplog.records if r.name == server_module.__name__ and r.levelno == logging.WARNING]
    assert any("fetching the next servers failed" in r.getMessage() for r in failures)
    assert any("the DHT is unreachable" in r.getMessage() for r in failures)
    assert all("\n" not in r.getMessage() and r.exc_info is None for r in failures)
