"""A userspace WAN link emulator: a TCP relay that adds one-way delay and a bandwidth cap per direction.

Why: a real swarm's peers sit tens of milliseconds and a few megabits apart, and the client's routing,
inference steps and failover all behave differently there than on loopback. The usual tool for emulating
that, ``tc netem``, needs root and kernel modules this machine does not have, so the link is emulated in
userspace instead: a :class:`WanLink` listens on ``127.0.0.1:<port>`` and relays every TCP connection to a
target ``host:port`` (for example a libp2p daemon, p2pd), delaying each direction. A server that
*announces the proxy's address* (``announce_maddrs=["/ip4/127.0.0.1/tcp/<proxy port>"]``) while listening
on its real port makes every peer dial the proxy, so every byte of libp2p traffic to that server (the
security and muxer handshakes, DHT RPCs, inference streams) really crosses the emulated link.

Delay model, per direction (client->target and target->client are independent, like a full-duplex link):

* A chunk read from one side at ``read_time`` is handed to the other side no earlier than
  ``read_time + delay_s``; chunks keep their order. The delay is a propagation delay, not a per-chunk
  cost: each direction is a pipeline (a queue of ``(due_time, bytes)`` drained by a writer task that
  sleeps until each chunk is due), so any number of chunks can be in flight and delays never add up.
* With ``bandwidth_bps`` set, the link also serializes: a chunk occupies the link for
  ``len * 8 / bandwidth_bps`` seconds after the previous chunk finished transmitting, and then
  propagates for ``delay_s``: ``due = max(read_time, link_free_at) + len * 8 / bandwidth_bps + delay_s``.
  The reader stops reading while more than a few milliseconds of transmission are queued, so a fast
  sender is pushed back through TCP flow control instead of piling data up in the proxy. Chunks are at
  most about a millisecond of transmission (and at least one MTU), like packets on a real link.
* EOF (half-close) travels the same queue, so it arrives after all pending data; a connection reset
  travels it too and aborts the other side. A target that refuses the connection closes the client's.

Both sockets use ``TCP_NODELAY`` so the relay adds no Nagle delay of its own.

Caveats: the client's TCP handshake completes locally at the proxy, so a connect does not cost the extra
round trip it would on a real WAN; everything after it (including TLS/Noise handshakes) does. Delays are
lower bounds: asyncio's epoll timers round up to whole milliseconds and the relay itself costs about
0.1-0.3 ms per round trip, so a delivered chunk is typically up to ~1 ms later than due.

Synchronous code (tests, benchmarks that start subprocesses) can use :class:`WanEmulator`, which runs links
on a background thread; a single link can also run as a process:
``python -m molink_swarm.lab.wan_emulator --target 127.0.0.1:1234 --delay-ms 20 --bandwidth-mbit 50``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
import threading
from collections import deque
from typing import Optional, Sequence, Union

logger = logging.getLogger(__name__)

TO_TARGET = "to_target"
TO_CLIENT = "to_client"

_MAX_CHUNK = 256 * 1024
_MIN_CHUNK = 1500  # one Ethernet MTU: a bandwidth-limited link never sends smaller "packets" than this
_TX_QUEUE_S = 0.005  # how far ahead of the link's transmission the reader may read with a bandwidth cap
_MAX_BUFFER = 8 * 1024 * 1024  # bytes queued in the proxy per direction before the reader stops reading


class _Eof:
    """Queue marker: the source half-closed; pass the EOF on after pending data."""


class _Reset:
    """Queue marker: the source reset the connection; abort the other side after pending data."""


class _LinkReset(Exception):
    """Raised inside a connection to tear down both sides at once."""


_Item = Union[bytes, _Eof, _Reset]


def _set_nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _sleep_until(loop: asyncio.AbstractEventLoop, due: float) -> None:
    """Sleep until ``loop.time() >= due``; loops because timers may fire up to one clock tick early."""
    while (remaining := due - loop.time()) > 0:
        await asyncio.sleep(remaining)


class _Direction:
    """One direction of one relayed connection: a reader that timestamps chunks, a writer that delivers
    them when due. The queue between them is the emulated link's pipeline."""

    def __init__(
        self,
        link: "WanLink",
        name: str,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
    ) -> None:
        self.link = link
        self.name = name
        self.src = src
        self.dst = dst
        self.queue: deque[tuple[float, _Item]] = deque()
        self.buffered = 0
        self.link_free_at = 0.0
        self.has_items = asyncio.Event()  # wakes the writer
        self.has_space = asyncio.Event()  # wakes a reader that filled the proxy's buffer

    def _chunk_size(self) -> int:
        bandwidth = self.link.bandwidth_bps
        if bandwidth is None:
            return _MAX_CHUNK
        return max(_MIN_CHUNK, min(_MAX_CHUNK, int(bandwidth / 8 / 1000)))

    def _put(self, item: _Item, size: int) -> float:
        """Queue an item read now; returns when its transmission ends (the link is busy until then)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        sent_at = now
        if self.link.bandwidth_bps is not None:
            sent_at = max(now, self.link_free_at) + size * 8 / self.link.bandwidth_bps
            self.link_free_at = sent_at
        self.queue.append((sent_at + self.link.delay_s, item))
        self.buffered += size
        self.has_items.set()
        return sent_at

    async def read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        chunk_size = self._chunk_size()
        while True:
            while self.buffered >= _MAX_BUFFER:
                self.has_space.clear()
                await self.has_space.wait()
            try:
                data = await self.src.read(chunk_size)
            except (ConnectionError, OSError) as e:
                logger.debug("%s: source reset (%r)", self.name, e)
                self._put(_Reset(), 0)
                return
            if not data:
                self._put(_Eof(), 0)
                return
            sent_at = self._put(data, len(data))
            # The link is busy until sent_at. Reading a little ahead (a short transmit queue, as in a router)
            # keeps the link saturated although timers wake up to a millisecond late; the due times are
            # computed from link_free_at, not from when the reader woke, so this never exceeds the bandwidth.
            await _sleep_until(loop, sent_at - _TX_QUEUE_S)

    async def write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self.has_items.clear()
                await self.has_items.wait()
            due, item = self.queue[0]
            await _sleep_until(loop, due)
            self.queue.popleft()
            if isinstance(item, _Reset):
                raise _LinkReset(f"{self.name}: source reset")
            if isinstance(item, _Eof):
                try:
                    if self.dst.can_write_eof():
                        self.dst.write_eof()
                    else:
                        self.dst.close()
                except (ConnectionError, OSError, RuntimeError) as e:
                    raise _LinkReset(f"{self.name}: write_eof failed ({e!r})") from e
                return
            try:
                self.dst.write(item)
                await self.dst.drain()
            except (ConnectionError, OSError, RuntimeError) as e:
                raise _LinkReset(f"{self.name}: write failed ({e!r})") from e
            self.buffered -= len(item)
            self.link.bytes_forwarded[self.name] += len(item)
            self.has_space.set()


class WanLink:
    """A TCP relay to ``target`` that adds ``delay_s`` of one-way delay per direction and, optionally, caps each
    direction at ``bandwidth_bps`` bits per second (see the module docstring for the exact model)."""

    def __init__(
        self,
        target: tuple[str, int],
        *,
        delay_s: float = 0.0,
        bandwidth_bps: Optional[float] = None,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s}")
        if bandwidth_bps is not None and bandwidth_bps <= 0:
            raise ValueError(f"bandwidth_bps must be positive or None, got {bandwidth_bps}")
        self.target = (target[0], int(target[1]))
        self.delay_s = float(delay_s)
        self.bandwidth_bps = None if bandwidth_bps is None else float(bandwidth_bps)
        self.listen_host = listen_host
        self.port = listen_port
        self.bytes_forwarded: dict[str, int] = {TO_TARGET: 0, TO_CLIENT: 0}
        self._server: Optional[asyncio.AbstractServer] = None
        self._connections: set[asyncio.Task] = set()

    @property
    def total_bytes_forwarded(self) -> int:
        return sum(self.bytes_forwarded.values())

    async def start(self) -> int:
        """Start listening; returns the bound port (also stored in ``self.port``)."""
        if self._server is not None:
            raise RuntimeError("WanLink already started")
        self._server = await asyncio.start_server(self._handle, self.listen_host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info(
            "WAN link %s:%d -> %s:%d (delay %.1f ms, bandwidth %s)",
            self.listen_host,
            self.port,
            *self.target,
            self.delay_s * 1000,
            "unlimited" if self.bandwidth_bps is None else f"{self.bandwidth_bps / 1e6:g} Mbit/s",
        )
        return self.port

    async def stop(self) -> None:
        """Stop listening and abort every relayed connection."""
        if self._server is None:
            return
        self._server.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> "WanLink":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._relay(client_reader, client_writer)
        except asyncio.CancelledError:
            # stop() cancels live connections; nothing awaits this task, and Python 3.11's StreamReaderProtocol
            # logs a cancelled client_connected_cb task as an error, so end it quietly (transports are aborted).
            pass
        finally:
            self._connections.discard(task)

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        _set_nodelay(client_writer)
        try:
            target_reader, target_writer = await asyncio.open_connection(*self.target)
        except OSError as e:
            logger.debug("WAN link %d: target %s:%d unreachable (%r)", self.port, *self.target, e)
            client_writer.close()
            with contextlib.suppress(Exception):
                await client_writer.wait_closed()
            return
        _set_nodelay(target_writer)
        directions = (
            _Direction(self, TO_TARGET, client_reader, target_writer),
            _Direction(self, TO_CLIENT, target_reader, client_writer),
        )
        clean = False
        try:
            async with asyncio.TaskGroup() as group:
                for direction in directions:
                    group.create_task(direction.read_loop())
                    group.create_task(direction.write_loop())
            clean = True
        except* _LinkReset as group_error:
            logger.debug("WAN link %d: connection reset: %s", self.port, group_error.exceptions)
        finally:
            for writer in (client_writer, target_writer):
                if clean:
                    writer.close()
                else:
                    writer.transport.abort()
            for writer in (client_writer, target_writer):
                with contextlib.suppress(Exception):
                    await writer.wait_closed()


class WanEmulator:
    """Runs any number of :class:`WanLink` on a background thread with its own event loop, for synchronous
    code (tests, benchmarks) that cannot host an asyncio server itself."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="wan-emulator", daemon=True)
        self._thread.start()
        self.links: dict[int, WanLink] = {}

    def add_link(
        self,
        target: tuple[str, int],
        delay_s: float = 0.0,
        bandwidth_bps: Optional[float] = None,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> int:
        """Start a link to ``target`` and return its listening port (the link is in ``self.links[port]``)."""
        if self._loop.is_closed():
            raise RuntimeError("WanEmulator is closed")
        link = WanLink(
            target, delay_s=delay_s, bandwidth_bps=bandwidth_bps, listen_host=listen_host, listen_port=listen_port
        )
        port = asyncio.run_coroutine_threadsafe(link.start(), self._loop).result(timeout=30)
        self.links[port] = link
        return port

    def close(self) -> None:
        """Stop every link and the background loop; idempotent."""
        if self._loop.is_closed():
            return

        async def stop_all() -> None:
            await asyncio.gather(*(link.stop() for link in self.links.values()), return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(stop_all(), self._loop).result(timeout=30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> "WanEmulator":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _parse_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


async def _serve(args: argparse.Namespace) -> None:
    link = WanLink(
        args.target,
        delay_s=args.delay_ms / 1000,
        bandwidth_bps=None if args.bandwidth_mbit is None else args.bandwidth_mbit * 1e6,
        listen_host=args.listen_host,
        listen_port=args.listen_port,
    )
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    port = await link.start()
    print(f"listening on {args.listen_host}:{port}", flush=True)
    try:
        await stopped.wait()
    finally:
        await link.stop()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m molink_swarm.lab.wan_emulator",
        description="Relay TCP connections to a target, adding one-way delay and a bandwidth cap per direction.",
    )
    parser.add_argument("--target", type=_parse_host_port, required=True, help="HOST:PORT to relay to")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per direction, ms")
    parser.add_argument("--bandwidth-mbit", type=float, default=None, help="cap per direction, Mbit/s")
    parser.add_argument("--listen-host", default="127.0.0.1")
    parser.add_argument("--listen-port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    if args.delay_ms < 0:
        parser.error("--delay-ms must be >= 0")
    if args.bandwidth_mbit is not None and args.bandwidth_mbit <= 0:
        parser.error("--bandwidth-mbit must be positive")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
