"""Test and benchmark tooling: local swarms with emulated WAN links, NAT labs. Runtime code never imports it."""

from molink_swarm.lab.forkserver import use_forkserver
from molink_swarm.lab.local_swarm import LocalSwarm, LocalSwarmError, SwarmProcess, run, spawn, spawn_module

__all__ = ["LocalSwarm", "LocalSwarmError", "SwarmProcess", "run", "spawn", "spawn_module", "use_forkserver"]
