"""A joining server's question "can others dial me?", and, if not, its registrations with relays.

At ``join`` a server asks its initial peers to dial it back (:func:`check_reachability`). If none can, it is
behind a NAT: it keeps a registration stream open to each relay (:class:`RelayRegistration`) and announces
itself as relayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Optional, Sequence

from hivemind.p2p import P2P, P2PDaemonError
from hivemind.proto import runtime_pb2

from molink_swarm.errors import UserError, peers_unreachable
from molink_swarm.net.paths import connect
from molink_swarm.net.relay import RelayService
from molink_swarm.protocol import messages
from molink_swarm.swarm_key import SwarmKey, bind_daemon

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ReachabilityCheck:
    reachable: bool
    observed_ip: Optional[str]
    relays: list[str]  # multiaddrs (with /p2p/<id>) of the initial peers that answered


async def check_reachability(
    initial_peers: Sequence[str], host: str, port: int, timeout: float = 10.0, swarm_key: Optional[SwarmKey] = None
) -> ReachabilityCheck:
    """Ask the initial peers to dial ``port`` back at our public IP; a temporary listener answers them. In a private
    swarm (``swarm_key``) only its peers answer, and only they count."""

    def on_connect(reader, writer):
        writer.close()

    try:
        listener = await asyncio.start_server(on_connect, host, port, reuse_address=True)
    except OSError as e:
        raise UserError(f"Cannot listen on {host}:{port} ({e.strerror}); pass another --port") from None
    try:
        p2p = await P2P.create(initial_peers=list(initial_peers), host_maddrs=["/ip4/0.0.0.0/tcp/0"], dht_mode="client")
    except P2PDaemonError as e:
        listener.close()
        raise peers_unreachable(initial_peers, e) from None
    bind_daemon(p2p.daemon_listen_maddr, swarm_key)
    try:
        peers = list(dict.fromkeys(initial_peers))[:4]
        request = runtime_pb2.ExpertRequest(metadata=messages.encode_metadata(messages.DialBackRequest(ports=[port])))

        async def ask(maddr: str) -> Optional[messages.DialBackReply]:
            try:
                await connect(p2p, maddr)
                stub = RelayService.get_stub(p2p, messages.relay_peer_id(maddr))
                reply = await stub.rpc_dial_back(request, timeout=timeout)
                return messages.decode_metadata(reply.metadata, messages.DialBackReply)
            except Exception as e:  # a peer without the service, or unreachable: it just does not count
                logger.debug("Dial-back via %s failed: %r", maddr, e)
                return None

        replies = await asyncio.gather(*(ask(m) for m in peers))
    finally:
        await p2p.shutdown()
        listener.close()
    answered = [(m, r) for m, r in zip(peers, replies) if r is not None]
    reachable = any(port in r.reachable_ports for _, r in answered)
    observed = next((r.observed_ip for _, r in answered if r.observed_ip), None)
    return ReachabilityCheck(reachable=reachable or not answered, observed_ip=observed, relays=[m for m, _ in answered])


class RelayRegistration:
    """Keeps a registration stream open to each relay, re-opening it when it drops."""

    def __init__(self, p2p: P2P, relays: Sequence[str], keepalive_s: float = 20.0):
        self.p2p, self.relays, self.keepalive_s = p2p, list(relays), keepalive_s
        self.active: set[str] = set()
        self._tasks = [asyncio.create_task(self._keep(relay)) for relay in self.relays]

    async def wait_registered(self, timeout: float) -> bool:
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.active and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        return bool(self.active)

    async def _keep(self, relay: str) -> None:
        backoff = 1.0
        while True:
            try:
                await connect(self.p2p, relay)
                stop = asyncio.Event()

                async def keepalives():
                    yield runtime_pb2.ExpertRequest()
                    while not stop.is_set():
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(stop.wait(), self.keepalive_s)
                        yield runtime_pb2.ExpertRequest()

                replies = await RelayService.get_stub(self.p2p, messages.relay_peer_id(relay)).rpc_register(keepalives())
                try:
                    async for _ in replies:
                        self.active.add(relay)
                        backoff = 1.0
                finally:
                    stop.set()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                logger.warning("Relay %s dropped us (%r); re-registering in %.0f s", relay, e, backoff)
            self.active.discard(relay)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
