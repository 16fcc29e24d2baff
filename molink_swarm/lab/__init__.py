"""Test and benchmark tooling: local swarms with emulated WAN links, NAT labs. Runtime code never imports it."""

from molink_swarm.lab.local_swarm import LocalSwarm, LocalSwarmError, SwarmProcess, spawn, spawn_module

__all__ = ["LocalSwarm", "LocalSwarmError", "SwarmProcess", "spawn", "spawn_module"]
