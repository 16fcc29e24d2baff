"""The swarm's DHT: record schemas, validation, announcing servers and finding them."""

from molink_swarm.dht.records import ModelRecord, Reachability, ServerRecord, ServerState, block_key
from molink_swarm.dht.swarm_dht import (
    ServerInfo,
    declare_server,
    fetch_models,
    fetch_servers,
    start_dht,
)

__all__ = [
    "ModelRecord",
    "Reachability",
    "ServerInfo",
    "ServerRecord",
    "ServerState",
    "block_key",
    "declare_server",
    "fetch_models",
    "fetch_servers",
    "start_dht",
]
