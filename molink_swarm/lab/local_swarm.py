"""The demo's local swarm, plus servers behind emulated WAN links (delay, bandwidth) for tests and benchmarks."""

from __future__ import annotations

from typing import Optional

from molink_swarm.cli import local_swarm as base
from molink_swarm.cli.local_swarm import LocalSwarmError, SwarmProcess, run, spawn, spawn_module
from molink_swarm.net.ports import free_port

__all__ = ["LocalSwarm", "LocalSwarmError", "SwarmProcess", "run", "spawn", "spawn_module"]


class LocalSwarm(base.LocalSwarm):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.links: list[SwarmProcess] = []

    def start_server(
        self,
        blocks: str,
        *extra: str,
        wait: bool = True,
        timeout: float = 240.0,
        link_delay_s: Optional[float] = None,
        link_bandwidth_mbit: Optional[float] = None,
    ) -> SwarmProcess:
        """With ``link_delay_s`` or ``link_bandwidth_mbit`` the server sits behind an emulated WAN link (a proxy
        process that delays and rate-limits each direction), and announces the proxy's address so that every
        peer crosses it."""
        if link_delay_s is None and link_bandwidth_mbit is None:
            return super().start_server(blocks, *extra, wait=wait, timeout=timeout)
        port = free_port()
        link_args = ["--target", f"127.0.0.1:{port}", "--delay-ms", str((link_delay_s or 0.0) * 1000)]
        if link_bandwidth_mbit is not None:
            link_args += ["--bandwidth-mbit", str(link_bandwidth_mbit)]
        name = f"link-{blocks.replace(':', '-')}-{len(self.servers)}"
        link = spawn_module(name, "molink_swarm.lab.wan_emulator", link_args, log_dir=self.log_dir)
        self.links.append(link)
        link_port = int(link.wait_for(r"listening on [\d.]+:(\d+)", 30).group(1))
        announce = ["--port", str(port), "--announce-maddrs", f"/ip4/127.0.0.1/tcp/{link_port}"]
        return super().start_server(blocks, *extra, *announce, wait=wait, timeout=timeout)

    def _groups(self) -> list[list[SwarmProcess]]:
        return [*super()._groups(), self.links]
