"""Inference sessions: a chain of servers, each holding the KV cache of its blocks for this session.

Decode steps go to every hop at once and each server pushes its output to the next (server to server). A prompt
goes in chunks (see chunking.py), relayed by the client and pipelined over the hops, each chunk let onto each link
only once the chunks before it have crossed it, so that decode steps find at most one ahead (see link_gate.py).
Server pushes thus carry decode steps only, and need no gate of their own (without chunking, a prompt of up to
FORWARD_MAX_BYTES is pushed too). A micro-batch of sessions on one chain may send its decode steps together, one
message per hop (group_step.py); each session's record of its steps stays the same.

Failover: the client keeps every input it sent to each hop of the chain. When a server fails (error reply,
closed stream, step timeout, or it left the DHT), the client bans it (a server behind a NAT is first tried
through the next relay it announced: the relay may be what failed), plans a replacement chain for that hop's
blocks (possibly split differently), replays the kept inputs to rebuild the cache there, and retries the step.
Downstream hops are untouched: the replacement reproduces the same outputs for the same inputs.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import random
import time
import uuid
from typing import AsyncIterator, Optional

import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from molink_swarm.client.chunking import ChunkPolicy
from molink_swarm.client.failures import SERVER_FAILURES
from molink_swarm.client.group_step import KEEPALIVE_S
from molink_swarm.client.loop import run_sync
from molink_swarm.client.spot_check import (
    Verdict,
    WrongOutputs,
    choose_verifier,
    disagreement,
    judge,
    sample_step,
    spot_check_rate,
)
from molink_swarm.client.swarm import SwarmClient
from molink_swarm.errors import UserError
from molink_swarm.net.push import PushChannel
from molink_swarm.protocol import messages
from molink_swarm.protocol.streams import queued
from molink_swarm.protocol.tensors import deserialize_tensor, wire_dtype_of
from molink_swarm.routing.planner import Hop, MissingBlocksError, Mode, format_blocks, plan_chain

logger = logging.getLogger(__name__)

# Steps up to this size go server to server (decode steps); larger ones (prefills) are relayed by the client,
# since they are bandwidth-bound anyway and hivemind caps unary messages (pushes) at 4 MiB.
FORWARD_MAX_BYTES = 1 << 20
NO_VERIFIER_RETRY_S = 5.0  # a span no second server holds is looked up again after this long

class SwarmError(UserError):
    """The swarm could not serve a request (missing blocks, every candidate failed)."""


class StepTimer:
    """Adaptive step timeouts: a hung server is detected in a few multiples of its usual step time.

    Decode steps and prefills are timed separately (per token for prefills). Until a step has been measured
    the timeout is generous, since the first step of a session also opens the stream.
    """

    def __init__(self, min_timeout: float, initial_timeout: float, factor: float = 4.0):
        self.min_timeout, self.initial_timeout, self.factor = min_timeout, initial_timeout, factor
        self.decode_s: Optional[float] = None
        self.per_token_s: Optional[float] = None

    def expected(self, tokens: int) -> Optional[float]:
        """How long a step of ``tokens`` tokens usually takes (None until measured)."""
        if messages.is_decode(tokens):
            return self.decode_s
        return None if self.per_token_s is None else self.per_token_s * tokens

    def timeout(self, tokens: int) -> float:
        expected = self.expected(tokens)
        if expected is None:
            return self.initial_timeout + 0.01 * tokens
        return max(self.min_timeout, self.factor * expected)

    def record(self, tokens: int, seconds: float) -> None:
        if messages.is_decode(tokens):
            self.decode_s = seconds if self.decode_s is None else 0.8 * self.decode_s + 0.2 * seconds
        else:
            per_token = seconds / tokens
            self.per_token_s = per_token if self.per_token_s is None else 0.8 * self.per_token_s + 0.2 * per_token


class _HopStream:
    """The open inference stream to one server of the chain, and every input sent to it."""

    def __init__(self, swarm: SwarmClient, hop: Hop, spec: messages.SessionSpec, timer: StepTimer):
        self.hop, self.spec, self.timer = hop, spec, timer
        self._swarm = swarm
        self._requests: asyncio.Queue[Optional[runtime_pb2.ExpertRequest]] = asyncio.Queue()
        self._responses: Optional[AsyncIterator[runtime_pb2.ExpertResponse]] = None
        self._opened = False
        self._step_id = 0
        self._inputs: list[torch.Tensor] = []
        self._held = 0  # positions in _inputs
        self.created_at = time.monotonic()
        self.last_result: Optional[messages.StepResult] = None
        self.last_output: Optional[runtime_pb2.Tensor] = None  # the last reply's tensor, as it came off the wire
        self._pending: Optional[tuple[int, torch.Size, float]] = None
        self.push_channel: Optional[PushChannel] = None  # the client's fallback copies of pushed inputs
        self.fallback_push: Optional[asyncio.TimerHandle] = None  # a copy due unless this hop answers first
        self.fallback_sent = False  # the copy went for the pending step: its time includes our wait
        self.verified = False  # a spot check has compared one of its answers with another server's
        self.last_sent = time.monotonic()  # of a message on its own stream (it keeps the server's session alive)

    @property
    def peer_id(self):
        return self.hop.peer_id

    @property
    def opened(self) -> bool:
        return self._opened

    def next_step_id(self) -> int:
        self._step_id += 1
        return self._step_id - 1

    def record_step(
        self, hidden: torch.Tensor, position: int, result: messages.StepResult, wire: runtime_pb2.Tensor, elapsed_s: float
    ) -> None:
        """A step this server answered outside its stream (a group step, client/group_step.py), recorded as
        :meth:`receive` records its own."""
        self.remember(hidden, position)
        self.last_result, self.last_output = result, wire
        self.timer.record(hidden.shape[1], elapsed_s)

    def remember(self, hidden: torch.Tensor, position: int) -> None:
        """Keep the input of the step at ``position``; what was kept from there on is replaced (a step retried
        after a failed one that got partway through the chain)."""
        if position < self._held:
            self._inputs = [self.history()[:, :position]]
        self._inputs.append(hidden)
        self._held = position + hidden.shape[1]

    @property
    def held(self) -> int:
        """Positions of the session this server holds (as far as the client knows)."""
        return self._held

    def truncate(self, position: int) -> None:
        """Forget the inputs kept from ``position`` on (a step being redone elsewhere)."""
        if position < self._held:
            self._inputs = [self.history()[:, :position]]
            self._held = position

    def history(self) -> Optional[torch.Tensor]:
        """Inputs of every position this hop holds, [batch, positions, hidden] (None before the first step)."""
        if len(self._inputs) > 1:
            self._inputs = [torch.cat(self._inputs, dim=1)]
        return self._inputs[0] if self._inputs else None

    async def step(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        """Send the input of one step and wait for this server's output."""
        await self.send(position, hidden.shape, hidden=hidden)
        return await self.receive()

    async def send(
        self,
        position: int,
        shape: torch.Size,
        *,
        hidden: Optional[torch.Tensor] = None,
        push_from: Optional[str] = None,
        push_to: Optional[messages.PushTarget] = None,
    ) -> None:
        """Send a step; without ``hidden`` its input will be pushed (by the previous server ``push_from`` or the
        client)."""
        self._pending = (position, shape, time.perf_counter())
        if self._responses is None:
            self._responses = await asyncio.wait_for(
                self._swarm.stub(self.peer_id).rpc_inference(queued(self._requests)), self.timer.initial_timeout
            )
        message = messages.InferenceStep(
            open=None if self._opened else self.spec,
            position=position,
            step_id=self._step_id,
            expect_push=hidden is None,
            push_from=push_from,
            push_to=push_to,
        )
        self._opened = True
        self._step_id += 1
        self.last_sent = time.monotonic()
        self._requests.put_nowait(messages.request(message, *([] if hidden is None else [hidden]), wire_dtype=self._swarm.wire_dtype))

    def cancel_pending(self) -> None:
        """Forget a step whose sending failed, so that it is sent again (or the server replaced)."""
        self._pending = None

    @property
    def pending(self) -> bool:
        return self._pending is not None

    async def receive(self, extra_timeout: float = 0.0, upstream_done: Optional[float] = None) -> torch.Tensor:
        """This server's output for the step sent last; ``extra_timeout`` covers the hops before it, and
        ``upstream_done`` (perf_counter) is when the previous hop's output arrived, if this step was forwarded."""
        position, shape, started = self._pending
        tokens = shape[1]
        try:
            reply = await asyncio.wait_for(anext(self._responses), self.timer.timeout(tokens) + extra_timeout)
        except StopAsyncIteration:
            raise ConnectionError(f"Server {self.peer_id} closed the session") from None
        finally:
            if self.fallback_push is not None:
                self.fallback_push.cancel()
                self.fallback_push = None
        self._pending = None
        result = messages.decode_metadata(reply.metadata, messages.StepResult)
        if len(reply.tensors) != 1 or result.position != position + tokens:
            raise messages.ProtocolError(f"Server {self.peer_id} sent an inconsistent step result")
        output = deserialize_tensor(reply.tensors[0], dtype=self._swarm.dtype)
        if output.shape != shape:
            raise messages.ProtocolError(f"Server {self.peer_id} returned shape {list(output.shape)}")
        self.last_output = reply.tensors[0]
        if self.fallback_sent:
            # The step waited for our copy: timing it would add that wait to the next grace, again and again.
            self.fallback_sent = False
        elif extra_timeout == 0.0:
            self.timer.record(tokens, time.perf_counter() - started)
        elif upstream_done is not None:
            # Forwarded: its input left the previous server about when that one's output reached us. Without
            # this, a hop after the first never measures its steps and a hung one takes initial_timeout to detect.
            self.timer.record(tokens, time.perf_counter() - max(started, upstream_done))
        self.last_result = result
        return output

    def push_target(self) -> messages.PushTarget:
        return messages.PushTarget(
            peer_id=self.peer_id.to_base58(), session_id=self.spec.session_id, relay=self._swarm.links.routes.get(self.peer_id)
        )

    async def close(self) -> None:
        if self.push_channel is not None:
            self.push_channel.close()
        self._requests.put_nowait(None)
        if self._responses is not None:
            with contextlib.suppress(Exception):  # closing must never raise, whatever state the peer is in
                await asyncio.wait_for(anext(self._responses), 2.0)


class InferenceSession:
    """Keeps attention caches on the servers across steps (and across ``generate()`` calls).

    ``position`` is the number of tokens the servers hold; ``history`` the token ids the client has seen,
    which ``generate()`` uses to continue a conversation from where it left off.
    """

    def __init__(
        self,
        swarm: SwarmClient,
        *,
        max_length: int,
        model_name: str,
        wait_for_blocks_s: float = 30.0,
        min_step_timeout: float = 5.0,
        initial_step_timeout: float = 60.0,
        leave_check_period: float = 1.0,
        forwarding: bool = True,
        prefill_chunking: bool = True,
        chunk_policy: ChunkPolicy = ChunkPolicy(),
        spot_check: Optional[bool | float] = None,
    ):
        """``prefill_chunking=False`` sends a prompt as one step (as servers still compute it in chunks), which
        stalls other sessions' decode steps on slow links while it crosses them; ``chunk_policy`` sizes chunks.
        ``spot_check``: the fraction of steps re-run on a second server (None: the swarm client's setting; see
        client/spot_check.py)."""
        self.swarm = swarm
        self.max_length = max_length
        self.model_name = model_name
        self.wait_for_blocks_s = wait_for_blocks_s
        self.min_step_timeout, self.initial_step_timeout = min_step_timeout, initial_step_timeout
        self.leave_check_period = leave_check_period
        self.forwarding = forwarding
        self.prefill_chunking, self.chunk_policy = prefill_chunking, chunk_policy
        self.session_id = uuid.uuid4().hex
        self.position = 0
        self.history: Optional[torch.Tensor] = None
        self.failovers = 0
        self.prefill_chunks = 0  # prompt chunks sent (steps of a prefill)
        self.replay_compute_s = 0.0
        self.compute_s = 0.0  # the chain's servers' compute time for this session's steps, as they measured it
        self.spot_check_rate = swarm.spot_checks.rate if spot_check is None else spot_check_rate(spot_check)
        self.spot_checks = 0  # hop-steps compared with a second server
        self.spot_check_compute_s = 0.0  # the second (and third) servers' compute time for those
        self._spot_rng = random.Random()
        self._verifiers: dict[_HopStream, _HopStream] = {}  # a hop of the chain -> its verifier's stream
        self._hops: list[_HopStream] = []
        self._batch_size: Optional[int] = None
        self._leave_check: Optional[asyncio.Task] = None
        self._last_leave_check = time.monotonic()
        self.closed = False

    @property
    def chain(self) -> list[Hop]:
        return [h.hop for h in self._hops]

    @property
    def hop_streams(self) -> list[_HopStream]:
        return self._hops

    @property
    def peers(self) -> list[PeerID]:
        return [hop.peer_id for hop in self._hops]

    def group_key(self, hidden: torch.Tensor) -> Optional[tuple]:
        """What this session's next step (``hidden``) may share a group step with (client/group_step.py): a decode
        step of one sequence on the same chain; None if it goes on its own (a prompt, the first step, a hop whose
        server left or whose own stream has been quiet for too long)."""
        if self.closed or not self._hops or not self.forwarding or self._batch_size != 1 or hidden.shape[0] != 1:
            return None
        if not messages.is_decode(hidden.shape[1]) or self.position + hidden.shape[1] > self.max_length:
            return None
        now = time.monotonic()
        for hop in self._hops:
            if hop.pending or not hop.opened or now - hop.last_sent > KEEPALIVE_S or hop.peer_id in self.swarm.departed:
                return None
        return (hidden.shape[1], *((hop.peer_id, hop.hop.start, hop.hop.end) for hop in self._hops))

    async def after_step(self, tokens: int, output: torch.Tensor) -> torch.Tensor:
        """Finish a step of ``tokens`` positions that the chain answered with ``output`` (a group step's share):
        spot-check it if sampled, and count it. Returns the (possibly redone) output."""
        self._schedule_leave_check()
        if self.spot_check_rate > 0.0:
            output = await self._spot_check(tokens, output)
        self.position += tokens
        return output

    @property
    def hop_compute_s(self) -> list[float]:
        """Each hop's time for the last step, as its server measured it (queueing and compute)."""
        return [h.last_result.compute_s for h in self._hops if h.last_result is not None]

    # ---- synchronous API (what the model classes call)

    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Send hidden states for the next ``hidden.shape[1]`` tokens through the chain."""
        return run_sync(self.astep(hidden))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            run_sync(self._close_hops())

    async def aclose(self) -> None:
        """``close()`` from the client loop."""
        if not self.closed:
            self.closed = True
            await self._close_hops()

    def __enter__(self) -> "InferenceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- async implementation

    async def astep(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.closed:
            raise SwarmError("This inference session is closed")
        if self.position + hidden.shape[1] > self.max_length:
            raise SwarmError(
                f"The session would hold {self.position + hidden.shape[1]} tokens, over its max_length "
                f"{self.max_length}; open it with a larger inference_session(max_length=...)"
            )
        if self._batch_size is None:
            self._batch_size = hidden.shape[0]
        elif hidden.shape[0] != self._batch_size:
            raise SwarmError(f"Batch size changed from {self._batch_size} to {hidden.shape[0]} within a session")
        if not self._hops:
            self._hops = await self._open_hops(0, self.swarm.num_blocks, replay=None)
        for index, hop in enumerate(self._hops):
            if hop.peer_id in self.swarm.departed:
                await self._replace(index, f"server {hop.peer_id} left the swarm")
        if messages.is_decode(hidden.shape[1]):
            started = time.perf_counter()
            output = await self._step(hidden)
            self.swarm.decode_pace.record(self.peers, time.perf_counter() - started, time.monotonic())
        elif self.prefill_chunking:
            output = await self._prefill(hidden)
        else:
            output = await self._step(hidden)
        return await self.after_step(hidden.shape[1], output)

    async def _step(self, hidden: torch.Tensor, first: int = 0) -> torch.Tensor:
        """One step through the chain: forwarded server to server where it is small enough, else relayed.
        ``first``: redo the step from that hop on (relayed), ``hidden`` being that hop's input; the hops before it
        keep what they computed."""
        forwarded = (
            self.forwarding and first == 0 and len(self._hops) > 1 and hidden.numel() * hidden.element_size() <= FORWARD_MAX_BYTES
        )
        if forwarded:
            await self._send_forwarded(hidden)
        index, upstream_s, upstream_done = first, 0.0, None
        while index < len(self._hops):
            hop = self._hops[index]
            try:
                if hop.pending:
                    output = await hop.receive(extra_timeout=upstream_s, upstream_done=upstream_done)
                else:
                    output = await hop.step(hidden, self.position)
            except SERVER_FAILURES as e:
                await self._replace(index, f"server {hop.peer_id} (blocks {hop.hop.start}:{hop.hop.end}) failed: {e!r}", e)
                continue
            self.compute_s += hop.last_result.compute_s
            upstream_s += hop.timer.timeout(hidden.shape[1])
            upstream_done = time.perf_counter()
            hop.remember(hidden, self.position)
            hidden = output
            index += 1
            if index < len(self._hops) and self._hops[index].pending:
                # Also deliver the input ourselves: it keeps the chain going when the previous server could not
                # push (or was replaced); the server uses whichever copy arrives first.
                self._push(self._hops[index], hop.last_output)
        return hidden

    async def _prefill(self, hidden: torch.Tensor) -> torch.Tensor:
        """A prompt in chunks, each its own step at its own position, relayed by the client and pipelined: hop 1
        gets chunk k+1 while hop 2 works on chunk k (MoLink's overlap of transfer and compute). The outputs,
        concatenated, are what one step of the whole prompt gives. At most one chunk per hop is under way (one
        in all with ``ChunkPolicy(pipelined=False)``), so each chunk is sized on recent measurements.

        Each hop's blocks are a stage with its own task; a failover replaces the stage's hop (by one or more
        hops) and the stage carries on, the others untouched. If a stage fails for good, the chunks already
        under way finish (no stream is left waiting for a reply) and the error is raised."""
        stages = [[hop] for hop in self._hops]
        inboxes: list[asyncio.Queue] = [asyncio.Queue() for _ in stages[1:]]  # between stage i-1 and stage i
        outputs: list[torch.Tensor] = []
        failures: list[Exception] = []
        bytes_per_token = 2 * hidden[:, :1].numel() * hidden.element_size()  # input and output of one position
        under_way = asyncio.Semaphore(len(stages) if self.chunk_policy.pipelined else 1)  # chunks in the chain
        offset = 0

        async def first_inputs() -> Optional[tuple[int, torch.Tensor]]:
            nonlocal offset
            await under_way.acquire()
            if failures or offset >= hidden.shape[1]:
                under_way.release()
                return None
            peers = [hop.peer_id for stage in stages for hop in stage]
            slowest = self.swarm.link_throughput.slowest(peers, self.chunk_policy.unmeasured_bytes_per_s)
            rtt = max(self.swarm.links.rtts.get(peer, 0.0) for peer in peers)
            decode_s = self.swarm.decode_pace.recent(peers, time.monotonic())
            size = self.chunk_policy.tokens(bytes_per_token, slowest, rtt, decode_s)
            chunk = (offset, hidden[:, offset : offset + size])
            offset += size
            self.prefill_chunks += 1
            return chunk

        async def run_stage(index: int) -> None:
            receive = first_inputs if index == 0 else inboxes[index - 1].get
            try:
                while (item := await receive()) is not None:
                    if failures:
                        under_way.release()  # the prefill failed: drop what is left
                        continue
                    chunk_offset, chunk = item
                    try:
                        output = await self._through_stage(stages[index], chunk, self.position + chunk_offset)
                    except Exception as e:  # SwarmError, or a bug: stop feeding chunks, let the others finish
                        failures.append(e)
                        under_way.release()
                        continue
                    if index + 1 < len(stages):
                        inboxes[index].put_nowait((chunk_offset, output))
                    else:
                        outputs.append(output)
                        under_way.release()
            finally:
                if index + 1 < len(stages):
                    inboxes[index].put_nowait(None)

        try:
            await asyncio.gather(*(run_stage(index) for index in range(len(stages))))
        finally:
            self._hops = [hop for stage in stages for hop in stage]
        if failures:
            raise failures[0]
        return torch.cat(outputs, dim=1)

    async def _through_stage(self, hops: list[_HopStream], hidden: torch.Tensor, position: int) -> torch.Tensor:
        """One chunk through the hops of one stage (more than one after a failover split its blocks), each hop when
        the gate gives it the link; a failed hop is replaced in ``hops`` and the chunk sent again."""
        index = 0
        while index < len(hops):
            hop = hops[index]
            try:
                nbytes = 2 * hidden.numel() * hidden.element_size()  # its input and its output
                rate = self.swarm.link_throughput.get(hop.peer_id)
                async with self.swarm.gate.prefill(hop.peer_id, None if rate is None else nbytes / rate):
                    started = time.perf_counter()
                    output = await hop.step(hidden, position)
                    elapsed = time.perf_counter() - started
                    rtt = self.swarm.links.rtts.get(hop.peer_id, 0.0)
                    self.swarm.link_throughput.record(hop.peer_id, nbytes, elapsed, hop.last_result.compute_s, rtt)
            except SERVER_FAILURES as e:
                hops[index : index + 1] = await self._rebuild(
                    hop, f"server {hop.peer_id} (blocks {hop.hop.start}:{hop.hop.end}) failed: {e!r}", e
                )
                continue
            self.compute_s += hop.last_result.compute_s
            hop.remember(hidden, position)
            hidden = output
            index += 1
        return hidden

    async def _send_forwarded(self, hidden: torch.Tensor) -> None:
        """Send the step to every hop at once: the first gets the input, each pushes its output to the next.

        If a server cannot be reached, it and the hops after it get the step from the client instead (the step
        loop then replaces the unreachable one).
        """
        for index, hop in enumerate(self._hops):
            following = self._hops[index + 1] if index + 1 < len(self._hops) else None
            try:
                await hop.send(
                    self.position,
                    hidden.shape,
                    hidden=hidden if index == 0 else None,
                    push_from=self._hops[index - 1].peer_id.to_base58() if index > 0 else None,
                    push_to=following.push_target() if following is not None else None,
                )
            except SERVER_FAILURES as e:
                logger.info("Could not forward the step to %s (%r); the client relays it", hop.peer_id, e)
                hop.cancel_pending()
                return

    def _push(self, hop: _HopStream, hidden: runtime_pb2.Tensor) -> None:
        """Our copy of ``hop``'s input: the previous server's output as it came, not re-encoded (the bytes that server
        pushed itself, so the next server computes the same thing whichever copy arrives first). In the healthy path
        the server's push got there first and the hop answers within about its usual step time; only if it does
        not is the copy sent (each copy costs a message per hop and token, which adds up over many sessions)."""
        if hop.push_channel is None:
            hop.push_channel = PushChannel(self.swarm.p2p, hop.peer_id, hop.spec.session_id, self.swarm.links.relay_for(hop.peer_id))
        expected = hop.timer.expected(hidden.size[1])
        if expected is None:  # nothing measured yet: no usual step time to wait for, and nothing to skew
            hop.push_channel.push(self.position, hidden)
            return
        grace = 2.0 * expected + 0.01
        hop.fallback_push = asyncio.get_running_loop().call_later(grace, self._send_copy, hop, self.position, hidden)

    @staticmethod
    def _send_copy(hop: _HopStream, position: int, hidden: runtime_pb2.Tensor) -> None:
        hop.fallback_sent = True
        hop.push_channel.push(position, hidden)

    # ---- spot checks (the judging is client/spot_check.py)

    async def _spot_check(self, tokens: int, output: torch.Tensor) -> torch.Tensor:
        """Check the step just taken (``tokens`` positions from ``self.position``; ``output``: the chain's) on a
        sample of hops, each against a second server. A hop whose server turns out wrong is replaced (banned, its
        cache rebuilt elsewhere from its kept inputs, as in a failover) and the step redone from there, so no wrong
        output leaves: generate() cannot take a token back, so a checked step waits for its checks, which run at
        once, one per hop. Returns the step's output (redone if it had to be)."""
        sampled = sample_step(self._spot_rng, self.spot_check_rate)
        first = 0
        while True:
            self._drop_stale_verifiers()
            checked = [(i, hop) for i, hop in enumerate(self._hops) if i >= first and (sampled or not hop.verified)]
            if not checked:
                return output
            wrong = await asyncio.gather(*(self._check_hop(i, hop, tokens, output) for i, hop in checked))
            liar = next((i for (i, _hop), caught in zip(checked, wrong) if caught), None)
            if liar is None:
                return output
            output = await self._redo_from(liar, tokens)
            first = liar

    async def _check_hop(self, index: int, hop: _HopStream, tokens: int, output: torch.Tensor) -> bool:
        """Re-run ``hop``'s part of the last step on its verifier and compare; True if ``hop``'s server is wrong."""
        position, stats = self.position, self.swarm.spot_checks
        inputs = hop.history()[:, : position + tokens]
        following = self._hops[index + 1] if index + 1 < len(self._hops) else None
        claimed = output if following is None else following.history()[:, position : position + tokens]
        claimed_wire = wire_dtype_of(hop.last_output)
        verifier = await self._verifier_for(hop)
        if verifier is None:
            stats.skipped += 1
            return False
        try:
            second = await self._run_check(verifier, inputs, tokens)
        except SERVER_FAILURES as e:
            logger.info("Spot check on %s failed (%r); skipping it", verifier.peer_id, e)
            self._drop_verifier(hop)
            await self.swarm.report_failure(verifier.peer_id, e)
            stats.skipped += 1
            return False
        second_wire = wire_dtype_of(verifier.last_output)
        self.spot_checks += 1
        stats.checks += 1
        excess = disagreement(claimed, second, claimed_wire, second_wire, self.swarm.dtype)
        if excess <= 1.0:
            hop.verified = True
            return False
        stats.disagreements += 1
        where = f"blocks {hop.hop.start}:{hop.hop.end}, positions {position}:{position + tokens}"
        logger.warning(
            "Spot check: servers %s and %s disagree on %s (%.3g times the tolerance); asking a third",
            hop.peer_id, verifier.peer_id, where, excess,
        )
        verdict, third = await self._third_opinion(hop, verifier, inputs, tokens, (claimed, claimed_wire), (second, second_wire))
        if verdict is Verdict.PRIMARY_WRONG:
            return True  # _spot_check replaces it and redoes the step
        self._drop_verifier(hop)
        if verdict is Verdict.VERIFIER_WRONG:
            await self.swarm.report_failure(verifier.peer_id, WrongOutputs(f"wrong outputs for {where}"))
            self._verifiers[hop] = third  # it holds the session's inputs so far: the next verifier
            hop.verified = True
        else:
            stats.undecided += 1
            logger.warning(
                "Spot check: cannot tell whether %s or %s is wrong on %s (%s); keeping the chain's answer",
                hop.peer_id, verifier.peer_id, where,
                "the third server agrees with neither" if third is not None else "no third server could answer",
            )
            if third is not None:
                asyncio.create_task(third.close())
        return False

    async def _run_check(self, stream: _HopStream, inputs: torch.Tensor, tokens: int) -> torch.Tensor:
        """``stream``'s outputs for the last ``tokens`` of ``inputs`` (every position so far), sending only what it does
        not hold yet: from the first position where its kept inputs differ from ``inputs`` (a step redone after a
        wrong answer) or the step's first, whichever comes first."""
        start = min(stream.held, inputs.shape[1] - tokens)
        kept = stream.history()
        if start > 0 and not torch.equal(kept[:, :start], inputs[:, :start]):
            start = int((kept[:, :start] != inputs[:, :start]).any(-1).any(0).nonzero()[0])
        outputs = await stream.step(inputs[:, start:], start)
        stream.remember(inputs[:, start:], start)
        compute_s = stream.last_result.compute_s
        self.spot_check_compute_s += compute_s
        self.swarm.spot_checks.compute_s += compute_s
        return outputs[:, -tokens:]

    async def _verifier_for(self, hop: _HopStream) -> Optional[_HopStream]:
        """The stream to the second server that checks ``hop`` (opened on first use, kept for the session)."""
        verifier = self._verifiers.get(hop)
        if verifier is not None:
            return verifier
        span = (hop.hop.start, hop.hop.end)
        looked = self.swarm.unchecked_spans.get(span)
        if looked is not None and time.monotonic() - looked < NO_VERIFIER_RETRY_S:
            return None
        candidates = await self.swarm.candidates()
        chosen = choose_verifier(candidates, *span, exclude={hop.peer_id} | self.swarm.banned(), rng=self._spot_rng)
        if chosen is None:
            if looked is None:
                logger.warning("No second server holds blocks %d:%d: they are not spot-checked", *span)
            self.swarm.unchecked_spans[span] = time.monotonic()
            return None
        self.swarm.unchecked_spans.pop(span, None)
        verifier = self._verifiers[hop] = self._stream(Hop(chosen.peer_id, *span), hop.timer)
        return verifier

    async def _third_opinion(
        self,
        hop: _HopStream,
        verifier: _HopStream,
        inputs: torch.Tensor,
        tokens: int,
        first: tuple[torch.Tensor, str],
        second: tuple[torch.Tensor, str],
    ) -> tuple[Verdict, Optional[_HopStream]]:
        """Who of ``hop``'s server (answer ``first``) and ``verifier`` (``second``) is wrong, by a third server's
        answer; also its stream (None if none could answer)."""
        exclude = {hop.peer_id, verifier.peer_id} | self.swarm.banned()
        chosen = choose_verifier(await self.swarm.candidates(), hop.hop.start, hop.hop.end, exclude, rng=self._spot_rng)
        if chosen is None:
            return judge(None, None), None
        stream = self._stream(Hop(chosen.peer_id, hop.hop.start, hop.hop.end), hop.timer)
        try:
            third = await self._run_check(stream, inputs, tokens)
        except SERVER_FAILURES as e:
            asyncio.create_task(stream.close())
            await self.swarm.report_failure(chosen.peer_id, e)
            return judge(None, None), None
        third_wire, dtype = wire_dtype_of(stream.last_output), self.swarm.dtype
        verdict = judge(disagreement(first[0], third, first[1], third_wire, dtype), disagreement(second[0], third, second[1], third_wire, dtype))
        if verdict is not Verdict.VERIFIER_WRONG:
            asyncio.create_task(stream.close())
        return verdict, stream

    async def _redo_from(self, index: int, tokens: int) -> torch.Tensor:
        """Hop ``index`` answered the last step wrong: ban its server, rebuild its blocks elsewhere from the inputs
        kept before this step (as a failover does), and redo the step from there on. The hops after it get the
        step again at the same position, so their servers roll their caches back (and so do their verifiers, at
        their next check). Returns the step's new output."""
        hop, position = self._hops[index], self.position
        inputs = hop.history()[:, position : position + tokens]
        hop.truncate(position)
        verifier = self._verifiers.pop(hop, None)
        what = f"wrong outputs for blocks {hop.hop.start}:{hop.hop.end} at positions {position}:{position + tokens}"
        await self._replace(index, f"server {hop.peer_id} answered {what} (spot check)", WrongOutputs(what))
        replacement = self._hops[index]
        if verifier is not None:
            if (replacement.hop.start, replacement.hop.end) == (hop.hop.start, hop.hop.end) and replacement.peer_id != verifier.peer_id:
                self._verifiers[replacement] = verifier  # it holds this session's inputs: no need to start over
            else:
                asyncio.create_task(verifier.close())
        return await self._step(inputs, first=index)

    def _drop_verifier(self, hop: _HopStream) -> None:
        verifier = self._verifiers.pop(hop, None)
        if verifier is not None:
            asyncio.create_task(verifier.close())

    def _drop_stale_verifiers(self) -> None:
        """Close the verifiers of hops that left the chain (failovers)."""
        for hop in [hop for hop in self._verifiers if hop not in self._hops]:
            self._drop_verifier(hop)

    def _schedule_leave_check(self) -> None:
        """Refresh the server list in the background so that servers that announced leaving are moved off early."""
        now = time.monotonic()
        if now - self._last_leave_check < self.leave_check_period:
            return
        if self._leave_check is None or self._leave_check.done():
            self._last_leave_check = now
            self._leave_check = asyncio.create_task(self.swarm.refresh_departures())

    async def _open_hops(
        self, start: int, end: int, replay: Optional[torch.Tensor], timer: Optional[StepTimer] = None
    ) -> list[_HopStream]:
        """Plan hops for blocks ``start..end-1`` and, if given, replay ``replay`` through them to rebuild caches.

        Retries with other servers (banning the ones that fail) until the wait for missing blocks runs out.
        """
        deadline = time.monotonic() + self.wait_for_blocks_s
        refresh = replay is not None
        while True:
            hops = await plan_with_wait(
                self.swarm,
                max(0.0, deadline - time.monotonic()),
                self.model_name,
                cache_tokens=self.max_length * self._batch_size,
                start=start,
                end=end,
                refresh=refresh,
                mode="forwarding" if self.forwarding else "relayed",
            )
            streams = [self._stream(hop, timer) for hop in hops]
            if replay is None:
                return streams
            current = None
            try:
                inputs = replay
                for current in streams:
                    outputs = await current.step(inputs, 0)
                    current.remember(inputs, 0)
                    self.replay_compute_s += current.last_result.compute_s if current.last_result else 0.0
                    inputs = outputs
                return streams
            except SERVER_FAILURES as e:
                logger.warning("Replay on %s failed (%r); trying another server", current.peer_id, e)
                await self.swarm.report_failure(current.peer_id, e)
                for stream in streams:
                    asyncio.create_task(stream.close())
                refresh = True
                if time.monotonic() >= deadline:
                    raise SwarmError(f"Could not rebuild the session on blocks {start}:{end}: {e}") from e

    async def _replace(self, index: int, reason: str, error: Optional[BaseException] = None) -> None:
        self._hops[index : index + 1] = await self._rebuild(self._hops[index], reason, error)

    async def _rebuild(self, failed: _HopStream, reason: str, error: Optional[BaseException] = None) -> list[_HopStream]:
        """The hops that take over ``failed``'s blocks, their caches rebuilt from its inputs."""
        logger.warning("Session %s: %s; rebuilding blocks %d:%d", self.session_id[:8], reason, failed.hop.start, failed.hop.end)
        await self.swarm.report_failure(failed.peer_id, error)
        asyncio.create_task(failed.close())  # never wait on a dead or hung peer
        # The replacement starts with the failed hop's step times: a replica that hangs during the replay is
        # then detected as fast as the original would have been.
        history = failed.history()
        replay = history if history is not None and history.shape[1] > 0 else None
        replacement = await self._open_hops(failed.hop.start, failed.hop.end, replay, failed.timer)
        self.failovers += 1
        return replacement

    def _stream(self, hop: Hop, timer: Optional[StepTimer] = None) -> _HopStream:
        spec = messages.SessionSpec(
            session_id=uuid.uuid4().hex,  # a fresh id per stream: a replacement never collides with a dead one
            start=hop.start,
            end=hop.end,
            max_length=self.max_length,
            batch_size=self._batch_size,
        )
        timer = copy.copy(timer) if timer is not None else StepTimer(self.min_step_timeout, self.initial_step_timeout)
        return _HopStream(self.swarm, hop, spec, timer)

    async def _close_hops(self) -> None:
        if self._leave_check is not None:
            self._leave_check.cancel()
        streams = [*self._hops, *self._verifiers.values()]
        await asyncio.gather(*(stream.close() for stream in streams), return_exceptions=True)
        self._hops, self._verifiers = [], {}


async def plan_with_wait(
    swarm: SwarmClient,
    wait_s: float,
    model_name: str,
    cache_tokens: int = 0,
    *,
    start: int = 0,
    end: Optional[int] = None,
    refresh: bool = False,
    mode: Mode = "relayed",
) -> list[Hop]:
    """Plan a chain; if some blocks have no server, wait up to ``wait_s`` for one to join, then fail clearly.

    The digests of the blocks the chain holds are pinned: this client never chains another copy of them."""
    deadline = time.monotonic() + wait_s
    while True:
        candidates = await swarm.candidates(refresh=refresh)
        try:
            hops = plan_chain(
                swarm.num_blocks,
                candidates,
                start=start,
                end=end,
                banned=swarm.banned(),
                min_cache_tokens=cache_tokens,
                mode=mode,
            )
        except MissingBlocksError as e:
            if time.monotonic() >= deadline:
                blocks = format_blocks(e.missing)
                why = "; ".join(
                    filter(None, [swarm.missing_in_other_dtypes(e.missing), swarm.missing_in_other_copies(e.missing)])
                )
                raise SwarmError(
                    f"No server in the swarm holds blocks {blocks} of {model_name}"
                    + (f" ({why})" if why else "")
                    + f". Connect your GPU: molink-swarm join --model {model_name} --blocks {blocks.split(',')[0]} "
                    "--initial-peers ..."
                ) from None
            logger.info("Waiting for servers of blocks %s", format_blocks(e.missing))
            await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            refresh = True
        else:
            swarm.pin(hops)
            return hops


async def forward_through_chain(swarm: SwarmClient, hidden: torch.Tensor, model_name: str, wait_s: float) -> torch.Tensor:
    """A cache-less pass of full sequences through every block (``model(input_ids)`` without a session).

    A failing server is banned and its blocks re-planned; nothing needs replaying since nothing is cached."""
    position, end = 0, swarm.num_blocks
    deadline = time.monotonic() + wait_s
    while position < end:
        remaining = max(0.0, deadline - time.monotonic())
        hop = (await plan_with_wait(swarm, remaining, model_name, start=position, mode="throughput"))[0]
        request = messages.request(messages.ForwardRequest(start=hop.start, end=hop.end), hidden, wire_dtype=swarm.wire_dtype)
        try:
            reply = await asyncio.wait_for(call_forward(swarm, hop.peer_id, request), 600)
            if len(reply.tensors) != 1:
                raise messages.ProtocolError(f"Server {hop.peer_id} sent {len(reply.tensors)} tensors")
            output = deserialize_tensor(reply.tensors[0], dtype=swarm.dtype)
            if output.shape != hidden.shape:
                raise messages.ProtocolError(f"Server {hop.peer_id} returned shape {list(output.shape)}")
        except SERVER_FAILURES as e:
            logger.warning("Forward on %s failed (%r); re-planning blocks %d:%d", hop.peer_id, e, hop.start, hop.end)
            await swarm.report_failure(hop.peer_id, e)
            if time.monotonic() >= deadline:
                raise SwarmError(f"Server {hop.peer_id} (blocks {hop.start}:{hop.end}) failed: {e}") from e
            continue
        hidden, position = output, hop.end
    return hidden


async def call_forward(swarm: SwarmClient, peer_id, request: runtime_pb2.ExpertRequest) -> runtime_pb2.ExpertResponse:
    """One request, one reply, over a stream (unary calls are capped at 4 MiB)."""
    replied = asyncio.Event()

    async def one():
        yield request
        await replied.wait()  # end the stream only after the reply: closing early races with it

    try:
        replies = await swarm.stub(peer_id).rpc_forward(one())
        reply = await anext(replies, None)
    finally:
        replied.set()
    if reply is None:
        raise ConnectionError(f"Server {peer_id} closed the forward stream without a reply")
    return reply
