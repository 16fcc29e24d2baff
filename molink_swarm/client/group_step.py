"""Group steps: the decode steps of a micro-batch of sessions that share a chain go as one message per hop.

Why: stepped one by one, a micro-batch of 16 generations over two servers costs 80 messages per token (the step to
each hop, the push between servers, each hop's answer), each with its own encoding, validation, stream framing and
event-loop turn on the client and on both servers, and its steps reach each server a few messages apart (see the
partners' wait in server/scheduler.py). As one group step it costs 5 messages: one per hop from the client (the
first carries the stacked inputs), one push of the stacked outputs from server to server, one answer per hop.

Each session keeps its own inference streams (they open its sessions on the servers, carry its prompt, and keep its
sessions alive) and its own record of every input it sent to each hop (session.py): a group step updates those
records as its own steps would, so failover, replay and spot checks work on a session that stepped in groups. A
group step is all or nothing: if any hop fails it, every member does the same step again on its own (servers roll
back what the group step computed), where a failing server is found and replaced as usual.

A session steps alone (and keeps its own streams alive with it) while its hops' streams have been quiet for
``KEEPALIVE_S``, since a server closes a stream idle for longer than its session timeout.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import AsyncIterator, Optional, Sequence

import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from molink_swarm.client.failures import SERVER_FAILURES
from molink_swarm.protocol import messages
from molink_swarm.protocol.streams import queued
from molink_swarm.protocol.tensors import deserialize_tensor

logger = logging.getLogger(__name__)

KEEPALIVE_S = 60.0  # servers close inference streams idle for longer than their session timeout (300 s by default)


class GroupChannel:
    """The client's group-step stream to one server: one request at a time goes out, answers come back in order."""

    def __init__(self, swarm, peer_id: PeerID):
        self._swarm, self.peer_id = swarm, peer_id
        self._requests: Optional[asyncio.Queue] = None
        self._waiting: collections.deque[asyncio.Future] = collections.deque()
        self._reader: Optional[asyncio.Task] = None

    async def send(self, request: runtime_pb2.ExpertRequest, open_timeout: float) -> asyncio.Future:
        """Send ``request``; the future gets its answer (or the error that broke the stream)."""
        if self._reader is None or self._reader.done():
            self._requests = asyncio.Queue()
            replies = await asyncio.wait_for(
                self._swarm.stub(self.peer_id).rpc_group_step(queued(self._requests)), open_timeout
            )
            self._reader = asyncio.create_task(self._read(replies, self._requests))
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        self._requests.put_nowait(request)
        return future

    async def _read(self, replies: AsyncIterator[runtime_pb2.ExpertResponse], requests: asyncio.Queue) -> None:
        error: BaseException = ConnectionError(f"Server {self.peer_id} closed the group-step stream")
        try:
            async for reply in replies:
                if not self._waiting:
                    raise messages.ProtocolError(f"Server {self.peer_id} answered a group step nobody sent")
                future = self._waiting.popleft()
                if not future.done():
                    future.set_result(reply)
        except Exception as e:  # the server refused a step or went away: this stream is over
            error = e
        finally:
            requests.put_nowait(None)
            while self._waiting:
                future = self._waiting.popleft()
                if not future.done():
                    future.set_exception(error)

    def close(self) -> None:
        """End the stream: the server stops the step it runs for it (a step given up on), and answers still due
        would no longer match the requests."""
        if self._requests is not None:
            self._requests.put_nowait(None)
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None


class GroupChannels:
    """A client's group-step streams, one per server, and how its group steps went."""

    def __init__(self, swarm):
        self._swarm = swarm
        self._channels: dict[PeerID, GroupChannel] = {}
        self.steps = 0  # group steps answered by every hop
        self.failed = 0  # group steps given up on (their members stepped again on their own)

    def __getitem__(self, peer_id: PeerID) -> GroupChannel:
        channel = self._channels.get(peer_id)
        if channel is None:
            channel = self._channels[peer_id] = GroupChannel(self._swarm, peer_id)
        return channel

    def close(self, peer_id: Optional[PeerID] = None) -> None:
        for peer in [peer_id] if peer_id is not None else list(self._channels):
            channel = self._channels.pop(peer, None)
            if channel is not None:
                channel.close()


async def step_together(sessions: Sequence, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor | BaseException]:
    """One step of each session (``inputs[i]``: ``sessions[i]``'s step, as :meth:`InferenceSession.astep` takes it):
    sessions whose decode steps can share a chain go in group steps, the others on their own. Returns each
    session's output, or the error its step ended with."""
    results: list[torch.Tensor | BaseException | None] = [None] * len(sessions)
    groups: dict[tuple, list[int]] = collections.defaultdict(list)
    alone: list[int] = []
    for index, (session, hidden) in enumerate(zip(sessions, inputs)):
        key = session.group_key(hidden)
        (alone if key is None else groups[key]).append(index)
    for indices in [indices for indices in groups.values() if len(indices) == 1]:
        alone += indices

    async def one(index: int) -> None:
        try:
            results[index] = await sessions[index].astep(inputs[index])
        except Exception as e:  # its own error (a SwarmError, say): the others go on
            results[index] = e

    async def group(indices: list[int]) -> None:
        members = [sessions[i] for i in indices]
        outputs = await _group_step(members, [inputs[i] for i in indices])
        for index, output in zip(indices, outputs):
            results[index] = output

    await asyncio.gather(
        *(one(index) for index in alone), *(group(indices) for indices in groups.values() if len(indices) > 1)
    )
    return results


async def _group_step(sessions: Sequence, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor | BaseException]:
    """One group step of ``sessions`` (same chain); if it fails, each does its step again on its own."""
    swarm = sessions[0].swarm
    try:
        outputs = await _through_chain(swarm, sessions, torch.cat(list(inputs)))
    except SERVER_FAILURES as e:
        logger.info("A group step of %d sessions failed (%r); each steps on its own", len(sessions), e)
        swarm.group_channels.failed += 1
        for hop in sessions[0].hop_streams:  # the servers give the step up, so its sessions are free again
            swarm.group_channels.close(hop.peer_id)
        return await asyncio.gather(*(session.astep(hidden) for session, hidden in zip(sessions, inputs)), return_exceptions=True)
    swarm.group_channels.steps += 1
    checked = await asyncio.gather(
        *(session.after_step(hidden.shape[1], output) for session, hidden, output in zip(sessions, inputs, outputs)),
        return_exceptions=True,
    )
    return list(checked)


async def _through_chain(swarm, sessions: Sequence, hidden: torch.Tensor) -> list[torch.Tensor]:
    """Send the group's step to every hop at once (the first gets the stacked inputs, each pushes its output to the
    next), then take the hops' answers in order and record them in each session."""
    chains = [session.hop_streams for session in sessions]
    position = [session.position for session in sessions]
    tokens = hidden.shape[1]
    first = chains[0]
    pending: list[asyncio.Future] = []
    sent_at: list[float] = []
    try:
        for k, hop in enumerate(first):
            following = first[k + 1] if k + 1 < len(first) else None
            message = messages.GroupStep(
                members=[
                    messages.GroupMember(session_id=chain[k].spec.session_id, position=pos, step_id=chain[k].next_step_id())
                    for chain, pos in zip(chains, position)
                ],
                expect_push=k > 0,
                push_from=first[k - 1].peer_id.to_base58() if k > 0 else None,
                push_to=None
                if following is None
                else messages.GroupPushTarget(
                    peer_id=following.peer_id.to_base58(),
                    session_ids=[chain[k + 1].spec.session_id for chain in chains],
                    relay=swarm.links.routes.get(following.peer_id),
                ),
            )
            request = messages.request(message, *([hidden] if k == 0 else []), wire_dtype=swarm.wire_dtype)
            pending.append(await swarm.group_channels[hop.peer_id].send(request, hop.timer.initial_timeout))
            sent_at.append(time.perf_counter())
        waited_s, hop_done = 0.0, sent_at[0]
        for k, hop in enumerate(first):
            waited_s += hop.timer.timeout(tokens)
            try:
                reply = await asyncio.wait_for(asyncio.shield(pending[k]), max(0.0, sent_at[0] + waited_s - time.perf_counter()))
            except asyncio.TimeoutError:
                swarm.group_channels.close(hop.peer_id)  # a late answer would be taken for the next request's
                raise
            results = messages.decode_metadata(reply.metadata, messages.GroupResult).results
            if len(reply.tensors) != 1 or len(results) != len(sessions):
                raise messages.ProtocolError(f"Server {hop.peer_id} sent an inconsistent group step result")
            if any(result.position != pos + tokens for result, pos in zip(results, position)):
                raise messages.ProtocolError(f"Server {hop.peer_id} sent an inconsistent group step result")
            output = deserialize_tensor(reply.tensors[0], dtype=swarm.dtype)
            if output.shape != hidden.shape:
                raise messages.ProtocolError(f"Server {hop.peer_id} returned shape {list(output.shape)}")
            elapsed = time.perf_counter() - (sent_at[k] if k == 0 else max(sent_at[k], hop_done))
            for chain, pos, row, result in zip(chains, position, hidden.split(1), results):
                chain[k].record_step(row, pos, result, reply.tensors[0], elapsed)
            hop_done = time.perf_counter()
            hidden = output
    finally:
        for future in pending:  # answers still due after a failure: nobody reads them
            future.cancel()
    for session in sessions:
        session.compute_s += sum(chain_hop.last_result.compute_s for chain_hop in session.hop_streams)
    swarm.decode_pace.record(sessions[0].peers, time.perf_counter() - sent_at[0], time.monotonic())
    return list(hidden.split(1))
