"""The WAN link emulator delays, throttles and relays faithfully: only lower bounds on time (which the delay
model guarantees) and byte-exact correctness are checked, never upper bounds, so a loaded machine cannot
make these tests flaky."""

from __future__ import annotations

import asyncio
import hashlib
import random
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from typing import AsyncIterator, Iterator

import pytest

from molink_swarm.lab import wan_emulator
from molink_swarm.lab.wan_emulator import TO_CLIENT, TO_TARGET, WanEmulator, WanLink

pytestmark = pytest.mark.timeout(60)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF, then close (so the client sees EOF only after the link relayed its own EOF)."""
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def echo_target() -> AsyncIterator[tuple[str, int]]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    try:
        yield ("127.0.0.1", server.sockets[0].getsockname()[1])
    finally:
        server.close()


@pytest.fixture
def sync_echo_target() -> Iterator[tuple[str, int]]:
    """An echo server on its own thread, for tests written as synchronous code."""

    class Echo(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := self.request.recv(65536):
                self.request.sendall(data)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address
    finally:
        server.shutdown()
        server.server_close()


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


async def test_round_trip_takes_twice_the_one_way_delay(echo_target):
    async with WanLink(echo_target, delay_s=0.05) as link:
        reader, writer = await _open(link.port)
        for payload in (b"ping", bytes(range(256)) * 4):
            start = time.perf_counter()
            writer.write(payload)
            echoed = await reader.readexactly(len(payload))
            assert time.perf_counter() - start >= 0.1
            assert echoed == payload
        writer.close()
        await writer.wait_closed()
    assert link.bytes_forwarded == {TO_TARGET: 4 + 1024, TO_CLIENT: 4 + 1024}


async def test_bandwidth_cap_bounds_throughput(echo_target):
    size, bandwidth = 250_000, 2e6
    payload = random.Random(0).randbytes(size)
    async with WanLink(echo_target, delay_s=0.01, bandwidth_bps=bandwidth) as link:
        reader, writer = await _open(link.port)
        start = time.perf_counter()
        writer.write(payload)
        echoed = await reader.readexactly(size)
        elapsed = time.perf_counter() - start
        writer.close()
        await writer.wait_closed()
    assert echoed == payload
    # Each direction is capped separately; one full pass of the payload needs size * 8 / bandwidth seconds.
    assert elapsed >= 0.9 * size * 8 / bandwidth
    assert link.total_bytes_forwarded == 2 * size


@pytest.mark.parametrize(
    "delay_s, bandwidth_bps, max_buffer",
    [(0.005, None, None), (0.002, 100e6, None), (0.002, None, 32 * 1024)],
    ids=["delay", "delay+bandwidth", "tiny-proxy-buffer"],
)
async def test_many_small_writes_arrive_in_order_and_intact(
    echo_target, monkeypatch, delay_s, bandwidth_bps, max_buffer
):
    if max_buffer is not None:
        monkeypatch.setattr(wan_emulator, "_MAX_BUFFER", max_buffer)  # exercise the reader's backpressure
    rng = random.Random(42)
    chunks = [rng.randbytes(rng.randint(1, 4096)) for _ in range(2000)]
    sent = hashlib.sha256(b"".join(chunks)).hexdigest()
    total = sum(map(len, chunks))
    async with WanLink(echo_target, delay_s=delay_s, bandwidth_bps=bandwidth_bps) as link:
        reader, writer = await _open(link.port)

        async def send() -> None:
            for chunk in chunks:
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        received = await reader.read()  # until EOF: the echo server closes after the relayed EOF
        await sender
        writer.close()
    assert len(received) == total
    assert hashlib.sha256(received).hexdigest() == sent
    assert link.bytes_forwarded == {TO_TARGET: total, TO_CLIENT: total}


async def test_half_close_propagates_both_ways(echo_target):
    async with WanLink(echo_target, delay_s=0.03) as link:
        reader, writer = await _open(link.port)
        start = time.perf_counter()
        writer.write(b"last words")
        writer.write_eof()
        # The echo server sees EOF only after the data, echoes it, then closes; the client gets both in order.
        assert await reader.read() == b"last words"
        assert time.perf_counter() - start >= 0.06
        assert reader.at_eof()
        writer.close()
        await writer.wait_closed()


async def test_refused_target_closes_client_connection():
    async with WanLink(("127.0.0.1", free_port()), delay_s=0.01) as link:
        reader, writer = await _open(link.port)
        assert await asyncio.wait_for(reader.read(), timeout=10) == b""
        writer.close()
        await writer.wait_closed()


async def test_target_reset_closes_client_connection():
    async def reset_after_hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        writer.write(b"bye")
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()  # linger 0: the kernel sends RST

    server = await asyncio.start_server(reset_after_hello, "127.0.0.1", 0)
    try:
        async with WanLink(("127.0.0.1", server.sockets[0].getsockname()[1]), delay_s=0.01) as link:
            reader, writer = await _open(link.port)
            writer.write(b"hello")
            try:
                rest = await asyncio.wait_for(reader.read(), timeout=10)
            except ConnectionResetError:
                rest = None  # a reset is a fine way for the client to learn the connection is gone
            assert rest in (None, b"", b"bye")
            writer.close()
    finally:
        server.close()


async def test_stop_aborts_open_connections(echo_target):
    link = WanLink(echo_target, delay_s=0.01)
    port = await link.start()
    reader, writer = await _open(port)
    writer.write(b"x")
    assert await reader.readexactly(1) == b"x"
    await link.stop()
    try:
        assert await asyncio.wait_for(reader.read(), timeout=10) == b""
    except ConnectionResetError:
        pass
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


def test_thread_runner_from_synchronous_code(sync_echo_target):
    with WanEmulator() as emulator:
        slow = emulator.add_link(sync_echo_target, delay_s=0.02)
        fast = emulator.add_link(sync_echo_target)
        assert slow != fast
        for port, min_rtt in ((slow, 0.04), (fast, 0.0)):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                start = time.perf_counter()
                sock.sendall(b"sync ping")
                assert sock.recv(100) == b"sync ping"
                assert time.perf_counter() - start >= min_rtt
        assert emulator.links[slow].bytes_forwarded == {TO_TARGET: 9, TO_CLIENT: 9}
    emulator.close()  # idempotent


def test_cli_prints_listening_line_and_exits_on_sigterm(sync_echo_target):
    host, port = sync_echo_target
    proc = subprocess.Popen(
        [sys.executable, "-m", "molink_swarm.lab.wan_emulator", "--target", f"{host}:{port}",
         "--delay-ms", "20", "--bandwidth-mbit", "50", "--listen-port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on 127.0.0.1:"), line
        proxy_port = int(line.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as sock:
            start = time.perf_counter()
            sock.sendall(b"via cli")
            assert sock.recv(100) == b"via cli"
            assert time.perf_counter() - start >= 0.04
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


async def test_libp2p_traffic_crosses_the_link():
    from hivemind.p2p import P2P, P2PContext
    from hivemind.proto import runtime_pb2

    import molink_swarm.dht.swarm_dht  # noqa: F401  (patches hivemind multiaddr encoding of /p2p/)

    async def echo(request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return runtime_pb2.ExpertResponse(tensors=request.tensors)

    real_port = free_port()
    server = client = None
    async with WanLink(("127.0.0.1", real_port), delay_s=0.03) as link:
        try:
            server = await P2P.create(
                host_maddrs=[f"/ip4/127.0.0.1/tcp/{real_port}"],
                announce_maddrs=[f"/ip4/127.0.0.1/tcp/{link.port}"],
            )
            await server.add_protobuf_handler("wan_echo", echo, runtime_pb2.ExpertRequest)
            client = await P2P.create(initial_peers=[f"/ip4/127.0.0.1/tcp/{link.port}/p2p/{server.peer_id}"])
            request = runtime_pb2.ExpertRequest(uid="wan", tensors=[runtime_pb2.Tensor(buffer=b"\x01" * 1000)])
            for _ in range(3):
                start = time.perf_counter()
                response = await client.call_protobuf_handler(
                    server.peer_id, "wan_echo", request, runtime_pb2.ExpertResponse
                )
                assert time.perf_counter() - start >= 0.06
                assert response.tensors[0].buffer == b"\x01" * 1000
            assert link.bytes_forwarded[TO_TARGET] > 1000
            assert link.bytes_forwarded[TO_CLIENT] > 1000
        finally:
            for peer in (client, server):
                if peer is not None:
                    await peer.shutdown()
