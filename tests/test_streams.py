"""The guarded stream layer and the compute queue: what a hostile peer can make a server hold or wait for."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from molink_swarm.protocol.messages import ProtocolError
from molink_swarm.protocol.streams import ByteBudget, RefusalLog, StreamLimits, read_frame
from molink_swarm.server.scheduler import ComputeQueue, Priority

LIMITS = StreamLimits(max_message_bytes=1000, min_bytes_per_s=1 << 20)


def frame(body: bytes, declared: int | None = None, marker: bytes = b"\x00") -> bytes:
    return marker + (len(body) if declared is None else declared).to_bytes(8, "big") + body


def reader_with(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


async def test_a_frame_is_read_whole():
    assert await read_frame(reader_with(frame(b"hello")), LIMITS, 1.0) == (b"\x00", b"hello")


async def test_a_clean_end_between_frames_is_the_end_of_the_stream():
    with pytest.raises(EOFError):
        await read_frame(reader_with(b""), LIMITS, 1.0)


async def test_a_declared_size_over_the_limit_is_refused_before_its_bytes_are_read():
    reader = reader_with(frame(b"", declared=2**40), eof=False)  # no body follows: refused from the header alone
    with pytest.raises(ProtocolError, match="exceeds the 1000 byte limit"):
        await asyncio.wait_for(read_frame(reader, LIMITS, 1.0), 5)


async def test_an_oversized_message_is_skipped_so_that_the_caller_reads_the_refusal():
    reader = reader_with(frame(b"x" * 5000) + frame(b"next"))
    with pytest.raises(ProtocolError, match="exceeds"):
        await read_frame(reader, LIMITS, 1.0)
    assert await read_frame(reader, LIMITS, 1.0) == (b"\x00", b"next")


async def test_truncated_and_stalled_frames_are_refused():
    with pytest.raises(ProtocolError, match="middle of a message"):
        await read_frame(reader_with(frame(b"abc", declared=10)), LIMITS, 1.0)
    with pytest.raises(ProtocolError, match="middle of a message"):
        await read_frame(reader_with(b"\x00\x00\x00"), LIMITS, 1.0)  # half a header
    with pytest.raises(ProtocolError, match="Invalid frame marker"):
        await read_frame(reader_with(frame(b"abc", marker=b"\x07")), LIMITS, 1.0)
    with pytest.raises(ProtocolError, match="No message within"):
        await read_frame(reader_with(b"", eof=False), LIMITS, 0.2)  # a stream that says nothing


async def test_a_frame_whose_body_stalls_is_closed_at_its_deadline():
    # The deadline is frame_s + size / rate; the reader gets 2 of the 100 bytes, then nothing.
    slow = StreamLimits(max_message_bytes=1000, frame_s=0.2, min_bytes_per_s=1e9)
    with pytest.raises(ProtocolError, match="too slowly"):
        await read_frame(reader_with(frame(b"ab", declared=100), eof=False), slow, 1.0)
    with pytest.raises(ProtocolError, match="too slowly"):  # a header that trickles in
        await read_frame(reader_with(b"\x00\x00\x00", eof=False), slow, 1.0)


async def test_the_byte_budget_makes_later_messages_wait_and_then_refuses():
    budget = ByteBudget(100)
    await budget.take(80, timeout=1.0)
    with pytest.raises(ProtocolError, match="busy"):
        await budget.take(30, timeout=0.1)
    waiting = asyncio.create_task(budget.take(30, timeout=5.0))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    budget.give(80)
    await asyncio.wait_for(waiting, 1.0)
    assert budget.used == 30
    with pytest.raises(ProtocolError, match="exceeds"):
        await budget.take(101, timeout=0.1)


def test_refusals_are_logged_once_per_peer_and_period(caplog):
    log = RefusalLog(period=60.0)
    with caplog.at_level(logging.INFO, logger="molink_swarm.protocol.streams"):
        for _ in range(1000):
            log.refused("bad-peer", "rpc_inference", "junk")
        log.refused("other-peer", "rpc_push", "junk")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "bad-peer" in lines[0] and "other-peer" in lines[1]
    assert all("Traceback" not in line for line in lines)


async def test_decode_steps_go_first_but_cannot_starve_a_prefill():
    queue = ComputeQueue("test")
    order: list[str] = []

    def work(name: str, seconds: float):
        def run():
            order.append(name)
            time.sleep(seconds)

        return run

    try:
        tasks = [asyncio.ensure_future(queue.run(work("decode-0", 0.05), Priority.DECODE))]
        await asyncio.sleep(0.01)  # decode-0 runs; the prefill and decode-1 queue behind it
        prefill = asyncio.ensure_future(queue.run(work("prefill", 0.0), Priority.PREFILL))
        # Decode steps arrive faster than they run (a busy server): the queue never empties of them.
        for i in range(1, 50):
            tasks.append(asyncio.ensure_future(queue.run(work(f"decode-{i}", 0.03), Priority.DECODE)))
            await asyncio.sleep(0.02)
        await asyncio.wait_for(asyncio.gather(prefill, *tasks), 10)
    finally:
        queue.shutdown()
    position = order.index("prefill")
    assert position > 1, "decode steps queued before the prefill's slack ran out should have gone first"
    assert position < len(order) - 10, "the prefill waited for the stream of decode steps to end"
