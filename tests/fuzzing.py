"""Adversarial input for every RPC of a server and of a relay, and the byte-level I/O that delivers it (issue #9).

An :class:`Attack` is what one call sends: for a stream RPC the exact bytes written to the stream (so frames can be
broken on purpose), for a unary RPC one request body. It says whether a successful answer is acceptable, which is
only the case for requests that are actually valid. :class:`AttackGenerator` is seeded: the same seed gives the
same messages. :func:`deliver` sends one attack and names what the peer did with it (:data:`OUTCOMES`).

Frames on a hivemind stream are one marker byte (0: message, 1: error / end of stream), an 8-byte big-endian
length and the protobuf bytes (see ``hivemind.p2p.P2P.send_protobuf``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import random
from typing import Callable, Optional, Sequence

import torch
from hivemind.p2p import P2P, P2PDaemonError, P2PHandlerError, PeerID
from hivemind.proto import runtime_pb2

from molink_swarm.protocol.tensors import serialize_tensor

# What a peer did with an attack. "reply": every request got a successful answer; "error": it answered an error;
# "closed": it closed the stream (or dropped the call) without answering everything; "abandoned": we walked away
# mid-call on purpose; "hung": none of these within the call's timeout.
OUTCOMES = ("reply", "error", "closed", "abandoned", "hung")

SERVER_STREAMS = {
    "inference": "BlockServicer.rpc_inference",
    "forward": "BlockServicer.rpc_forward",
    "push_stream": "BlockServicer.rpc_push_stream",
    "group_step": "BlockServicer.rpc_group_step",
}
SERVER_UNARY = {"push": "BlockServicer.rpc_push", "info": "BlockServicer.rpc_info", "ping": "BlockServicer.rpc_ping"}
RELAY_STREAMS = {"register": "RelayService.rpc_register", "relay_stream": "RelayService.rpc_relay_stream"}
RELAY_UNARY = {
    "relay_call": "RelayService.rpc_relay_call",
    "relay_load": "RelayService.rpc_relay_load",
    "dial_back": "RelayService.rpc_dial_back",
}
HANDLERS = {**SERVER_STREAMS, **SERVER_UNARY, **RELAY_STREAMS, **RELAY_UNARY}
STREAM_RPCS = frozenset({*SERVER_STREAMS, *RELAY_STREAMS})

END_OF_STREAM = b"\x01" + (0).to_bytes(8, "big")  # an empty RPCError: hivemind's end-of-stream message


def frame(message) -> bytes:
    data = message.SerializeToString()
    return b"\x00" + len(data).to_bytes(8, "big") + data


@dataclasses.dataclass(frozen=True)
class ServerTarget:
    """A server under attack: its peer id and the blocks it holds."""

    name: str
    peer_id: PeerID
    start: int
    end: int


@dataclasses.dataclass(frozen=True)
class Attack:
    rpc: str  # a key of HANDLERS
    kind: str  # what is wrong with it
    peer: PeerID  # whom it goes to
    payload: tuple[bytes, ...]  # stream: the bytes written, in order; unary: one request body
    may_succeed: bool  # a valid request: a successful answer is fine
    answers: int = 1  # replies a stream call gets when every request in it succeeds
    ending: str = "end"  # stream: "end" (end-of-stream), "abort" (drop the connection), "none" (leave it open)
    slow: bool = False  # takes one of the server's own timeouts by design (waits for a push that never comes)

    @property
    def label(self) -> str:
        return f"{self.rpc}: {self.kind}"


# ---- delivering attacks


class RawStream:
    """A stream to a handler at the byte level: what is written is exactly what the peer's handler reads."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, p2p: P2P, peer: PeerID, handler: str) -> "RawStream":
        _info, reader, writer = await p2p.call_binary_stream_handler(peer, handler)
        return cls(reader, writer)

    async def write(self, data: bytes) -> bool:
        """False once the peer has closed the stream."""
        try:
            self.writer.write(data)
            await self.writer.drain()
            return True
        except (ConnectionError, OSError):
            return False

    async def send(self, message) -> bool:
        return await self.write(frame(message))

    async def next_reply(self) -> tuple[str, Optional[runtime_pb2.ExpertResponse | str]]:
        """("reply", response), ("error", message) or ("closed", None)."""
        try:
            response, error = await P2P.receive_protobuf(runtime_pb2.ExpertResponse, self.reader)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            return "closed", None
        except Exception as e:  # the peer wrote something that is not a frame: as good as closed
            return "closed", repr(e)
        if error is not None:
            return "error", error.message
        return "reply", response

    async def read_until_closed(self) -> tuple[int, Optional[str]]:
        """Replies until the peer closes the stream or answers an error: (number of replies, error message)."""
        replies = 0
        while True:
            kind, content = await self.next_reply()
            if kind == "reply":
                replies += 1
            elif kind == "error":
                return replies, content
            else:
                return replies, None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


async def deliver(p2p: P2P, attack: Attack, timeout: float) -> tuple[str, str]:
    """Send one attack; returns (outcome, detail). Never raises."""
    try:
        return await asyncio.wait_for(_deliver(p2p, attack), timeout)
    except asyncio.TimeoutError:
        return "hung", f"no answer and not closed within {timeout:.0f} s"


async def _deliver(p2p: P2P, attack: Attack) -> tuple[str, str]:
    handler = HANDLERS[attack.rpc]
    if attack.rpc not in STREAM_RPCS:
        [body] = attack.payload
        try:
            await p2p._client.call_unary_handler(attack.peer, handler, body)
        except P2PHandlerError as e:
            return "error", str(e)[:200]
        except (P2PDaemonError, ConnectionError, OSError) as e:
            return "closed", repr(e)[:200]
        return "reply", ""
    try:
        stream = await RawStream.open(p2p, attack.peer, handler)
    except (P2PDaemonError, ConnectionError, OSError) as e:
        return "error", f"stream refused: {e!r}"[:200]
    try:
        for chunk in attack.payload:
            if not await stream.write(chunk):
                break
        if attack.ending == "abort":  # walk away once the server has taken the first request in
            if attack.answers:
                await stream.next_reply()
            return "abandoned", ""
        if attack.ending == "end":
            await stream.write(END_OF_STREAM)
        replies, error = await stream.read_until_closed()
    finally:
        stream.close()
    if error is not None:
        return "error", error[:200]
    if replies >= attack.answers:
        return "reply", f"{replies} replies"
    return "closed", f"{replies} replies"


async def deliver_all(p2p: P2P, attacks: Sequence[Attack], *, concurrency: int, timeout: float) -> list[tuple[str, str]]:
    """Deliver every attack, at most ``concurrency`` at a time (slow ones outside that bound)."""
    limit = asyncio.Semaphore(concurrency)

    async def one(attack: Attack) -> tuple[str, str]:
        if attack.slow:
            return await deliver(p2p, attack, timeout)
        async with limit:
            return await deliver(p2p, attack, timeout)

    return await asyncio.gather(*(one(a) for a in attacks))


class Tally:
    """Outcomes per RPC, and the calls whose outcome is not allowed (a hang, or success for invalid input)."""

    def __init__(self, title: str):
        self.title = title
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.by_label: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.violations: collections.Counter[tuple[str, str]] = collections.Counter()  # (label, outcome)
        self.examples: dict[tuple[str, str], str] = {}

    def add(self, attack: Attack, outcome: str, detail: str) -> None:
        self.counts[attack.rpc, outcome] += 1
        self.by_label[attack.label][outcome] += 1
        if outcome == "hung" or (outcome == "reply" and not attack.may_succeed):
            self.violations[attack.label, outcome] += 1
            self.examples.setdefault((attack.label, outcome), detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def count(self, outcome: str) -> int:
        return sum(n for (_rpc, o), n in self.counts.items() if o == outcome)

    def violations_of(self, outcome: str) -> dict[str, int]:
        return {label: n for (label, o), n in sorted(self.violations.items()) if o == outcome}

    def kinds_table(self) -> str:
        """Outcomes per kind of message: which kinds get errors, which are dropped."""
        return "\n".join(
            f"    {label:<72} " + ", ".join(f"{o} {n}" for o, n in sorted(counts.items()))
            for label, counts in sorted(self.by_label.items())
        )

    def table(self) -> str:
        rpcs = sorted({rpc for rpc, _ in self.counts})
        lines = [f"{self.title}: {self.total} calls", f"  {'rpc':<14}" + "".join(f"{o:>10}" for o in OUTCOMES)]
        for rpc in rpcs:
            lines.append(f"  {rpc:<14}" + "".join(f"{self.counts[rpc, o]:>10}" for o in OUTCOMES))
        if self.violations:
            lines.append("  not allowed (hung, or a success for invalid input):")
            for (label, outcome), n in sorted(self.violations.items()):
                lines.append(f"    {n:>4} x {outcome:<6} {label}  [{self.examples[label, outcome]}]")
        return "\n".join(lines)


# ---- generating attacks


def json_bytes(value) -> bytes:
    return json.dumps(value).encode()


class AttackGenerator:
    """Seeded adversarial messages for each RPC, against ``servers`` (block servers) and ``relay`` (a dht peer)."""

    def __init__(
        self,
        seed: int,
        servers: Sequence[ServerTarget],
        relay: PeerID,
        *,
        hidden_size: int,
        max_length: int,
        others: Sequence[PeerID] = (),
    ):
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.servers, self.relay = list(servers), relay
        self.hidden, self.max_length = hidden_size, max_length
        self.others = list(others)  # peers that are not registered with the relay (routes to them must be refused)
        self._ids = 0

    # -- building blocks

    def session_id(self) -> str:
        self._ids += 1
        return f"fuzz-{self._ids:06d}-{self.rng.getrandbits(32):08x}"

    def server(self) -> ServerTarget:
        return self.rng.choice(self.servers)

    def hidden_states(self, batch: int = 1, tokens: Optional[int] = None) -> torch.Tensor:
        tokens = tokens if tokens is not None else self.rng.randint(1, 12)
        return torch.randn(batch, tokens, self.hidden, generator=self.gen)

    def proto(self, tensor: torch.Tensor) -> runtime_pb2.Tensor:
        return serialize_tensor(tensor)

    def spec(self, server: ServerTarget, **overrides) -> dict:
        start = self.rng.randint(server.start, server.end - 1)
        fields = dict(
            session_id=self.session_id(),
            start=start,
            end=self.rng.randint(start + 1, server.end),
            max_length=self.rng.randint(32, self.max_length),
            batch_size=self.rng.choice([1, 1, 1, 2, 3]),
        )
        return {**fields, **overrides}

    @staticmethod
    def step_meta(position: int, open_spec: Optional[dict] = None, **extra) -> dict:
        return {"open": open_spec, "position": position, **extra}

    def request(self, metadata: dict | bytes, *tensors: runtime_pb2.Tensor, uid: str = "") -> runtime_pb2.ExpertRequest:
        meta = metadata if isinstance(metadata, bytes) else json_bytes(metadata)
        return runtime_pb2.ExpertRequest(uid=uid, metadata=meta, tensors=list(tensors))

    def bad_tensor(self, batch: int = 1) -> tuple[str, runtime_pb2.Tensor]:
        """A tensor every RPC that takes hidden states must refuse (its kind, the tensor)."""
        h, n = self.hidden, self.rng.randint(1, 6)
        kind = self.rng.choice(_BAD_TENSOR_KINDS)
        if kind == "wrong hidden size":
            return kind, self.proto(torch.randn(batch, n, h + self.rng.choice([-1, 1, 64])))
        if kind == "zero tokens":
            return kind, self.proto(torch.zeros(batch, 0, h))
        if kind == "batch of 0":
            return kind, self.proto(torch.zeros(0, n, h))
        if kind == "5-D tensor":
            return kind, self.proto(torch.randn(1, batch, 1, n, h))
        if kind == "2-D tensor":
            return kind, self.proto(torch.randn(n, h))
        if kind == "scalar tensor":
            return kind, self.proto(torch.tensor(1.0))
        if kind in ("NaN", "inf", "-inf"):
            values = torch.randn(batch, n, h)
            values.view(-1)[self.rng.randrange(values.numel())] = float(kind)
            return kind, self.proto(values)
        if kind == "NaN in float16":
            values = torch.randn(batch, n, h, dtype=torch.float16)
            values.view(-1)[0] = float("nan")
            return kind, self.proto(values)
        if kind == "inf under FLOAT16 compression":
            inf16 = torch.full((batch, n, h), float("inf"), dtype=torch.float16).numpy().tobytes()
            return kind, runtime_pb2.Tensor(buffer=inf16, size=[batch, n, h], dtype="float32",
                                            compression=runtime_pb2.CompressionType.FLOAT16)
        if kind == "declared size far above the payload":
            t = self.proto(torch.randn(batch, n, h))
            t.size[1] = self.rng.choice([10_000, 2**20, 2**31])
            return kind, t
        if kind == "huge declared shape":
            return kind, runtime_pb2.Tensor(buffer=b"\0" * 64, size=[2**32 - 1, 2**32 - 1, h], dtype="float32")
        if kind == "buffer longer than the shape":
            t = self.proto(torch.randn(batch, n, h))
            t.buffer += b"\0" * self.rng.choice([1, 4, 4096])
            return kind, t
        if kind == "truncated buffer":
            t = self.proto(torch.randn(batch, n, h))
            t.buffer = t.buffer[: self.rng.randrange(len(t.buffer))]
            return kind, t
        if kind.startswith("dtype "):
            dtype = kind.removeprefix("dtype ").strip('"')
            return kind, runtime_pb2.Tensor(buffer=b"cos\nsystem\n(S'true'\ntR.", size=[batch, n, h], dtype=dtype)
        if kind == "bfloat16 with FLOAT16 compression":
            return kind, runtime_pb2.Tensor(
                buffer=torch.randn(batch, n, h, dtype=torch.float16).numpy().tobytes(),
                size=[batch, n, h],
                dtype="bfloat16",
                compression=runtime_pb2.CompressionType.FLOAT16,
            )
        if kind == "8-bit compression, buffer that fits no codec":
            compression = self.rng.choice([runtime_pb2.MEANSTD_16BIT, runtime_pb2.QUANTILE_8BIT, runtime_pb2.UNIFORM_8BIT,
                                           runtime_pb2.BLOCKWISE_8BIT])
            return kind, runtime_pb2.Tensor(buffer=b"\x01" * 7, size=[batch, n, h], dtype="float32",
                                            compression=compression)
        if kind.startswith("int8 "):
            t = serialize_tensor(torch.randn(batch, n, h, generator=self.gen), "int8")
            rows, values = batch * n, batch * n * h
            if kind == "int8 without its outliers":
                t.buffer = t.buffer[: values + 2 * rows]
            elif kind == "int8 outlier index past the row":
                at = values + 2 * rows + 2 * self.rng.randrange(4 * rows)
                t.buffer = t.buffer[:at] + self.rng.randrange(h, 2**16).to_bytes(2, "little") + t.buffer[at + 2 :]
            else:  # "int8 NaN scale": the row decodes to NaN
                at = values + 2 * self.rng.randrange(rows)
                t.buffer = t.buffer[:at] + torch.tensor([float("nan")], dtype=torch.bfloat16).view(torch.int16).numpy().tobytes() + t.buffer[at + 2 :]
            return kind, t
        if kind == "requires_grad":
            t = self.proto(torch.randn(batch, n, h))
            t.requires_grad = True
            return kind, t
        raise AssertionError(kind)

    def bad_metadata(self, valid: dict) -> tuple[str, bytes]:
        """Metadata the schema must refuse: junk bytes, or ``valid`` with one thing wrong."""
        kind = self.rng.choice(_BAD_METADATA_KINDS)
        if kind == "random bytes":
            return kind, self.rng.randbytes(self.rng.randint(1, 300))
        if kind == "empty":
            return kind, b""
        if kind == "JSON of another type":
            return kind, self.rng.choice([b"null", b"[1, 2, 3]", b'"open"', b"42", b"true"])
        if kind == "truncated JSON":
            data = json_bytes(valid)
            return kind, data[: self.rng.randrange(1, len(data) - 1)]
        if kind == "deeply nested JSON":
            depth = self.rng.choice([1_000, 100_000])
            return kind, b'{"position": ' + b"[" * depth + b"]" * depth + b"}"
        if kind == "invalid UTF-8":
            return kind, json_bytes(valid).replace(b"{", b'{"\xff\xfe": 1, ', 1)
        if kind == "unknown field":
            return kind, json_bytes({**valid, self.rng.choice(["__class__", "tensors", "priority", "x"]): 1})
        if kind == "missing field":
            missing = self.rng.choice([k for k in valid if k in _REQUIRED])
            return kind, json_bytes({k: v for k, v in valid.items() if k != missing})
        if kind == "wrong type":
            key = self.rng.choice([k for k in valid if k in _INT_FIELDS])
            return kind, json_bytes({**valid, key: self.rng.choice(["not a number", 1.5, [1], {"a": 1}, None])})
        if kind == "negative number":
            key = self.rng.choice([k for k in valid if k in _INT_FIELDS])
            return kind, json_bytes({**valid, key: self.rng.choice([-1, -(2**63), -(10**30)])})
        if kind == "huge string":
            return kind, json_bytes({**valid, "session_id": "a" * self.rng.choice([65, 100_000, 1_000_000])})
        raise AssertionError(kind)

    # -- one generator per RPC: each returns one Attack

    def inference(self) -> Attack:
        server = self.server()
        kind = self.rng.choices(*zip(*_INFERENCE_KINDS.items()))[0]
        spec = self.spec(server)
        b = spec["batch_size"]
        good = self.proto(self.hidden_states(b))
        n = good.size[1]

        def attack(label: str, *requests: runtime_pb2.ExpertRequest, may_succeed=False, **kw) -> Attack:
            return Attack("inference", label, server.peer_id, tuple(frame(r) for r in requests), may_succeed,
                          answers=len(requests), **kw)

        if kind == "valid step":
            return attack(kind, self.request(self.step_meta(0, spec), good), may_succeed=True)
        if kind == "valid steps with a rollback":
            return attack(
                kind,
                self.request(self.step_meta(0, spec), good),
                self.request(self.step_meta(n), self.proto(self.hidden_states(b, 1))),
                self.request(self.step_meta(self.rng.randint(0, n)), self.proto(self.hidden_states(b, 2))),
                may_succeed=True,
            )
        if kind == "bad tensor":
            label, tensor = self.bad_tensor(b)
            return attack(f"bad tensor: {label}", self.request(self.step_meta(0, spec), tensor))
        if kind == "bad tensor after a valid step":
            label, tensor = self.bad_tensor(b)
            return attack(f"bad tensor after a valid step: {label}",
                          self.request(self.step_meta(0, spec), good), self.request(self.step_meta(n), tensor))
        if kind == "bad metadata":
            label, meta = self.bad_metadata(self.step_meta(0, spec, step_id=0))
            return attack(f"bad metadata: {label}", self.request(meta, good))
        if kind == "bad session spec":
            label, bad_spec = self.bad_spec(server, spec)
            return attack(f"bad session spec: {label}", self.request(self.step_meta(0, bad_spec), good))
        if kind == "no open":
            return attack(kind, self.request(self.step_meta(0), good))
        if kind == "second open on one stream":
            return attack(kind, self.request(self.step_meta(0, spec), good),
                          self.request(self.step_meta(n, self.spec(server, batch_size=b)), good))
        if kind == "out-of-order step":
            return attack(kind, self.request(self.step_meta(0, spec), good),
                          self.request(self.step_meta(n + self.rng.randint(1, 50)), self.proto(self.hidden_states(b, 1))))
        if kind == "huge position":
            position = self.rng.choice([2**31, 2**40, 2**63 - 1, 10**30])
            return attack(kind, self.request(self.step_meta(position, spec), good))
        if kind == "past max_length":
            tight = {**spec, "max_length": n + 1}
            return attack(kind, self.request(self.step_meta(0, tight), good),
                          self.request(self.step_meta(n), self.proto(self.hidden_states(b, 2))))
        if kind == "longer than the server's max_length":
            single = {**spec, "max_length": self.max_length, "batch_size": 1}
            too_long = self.proto(self.hidden_states(1, self.max_length + 1))
            return attack(kind, self.request(self.step_meta(0, single), too_long))
        if kind == "batch size changes":
            return attack(kind, self.request(self.step_meta(0, spec), good),
                          self.request(self.step_meta(n), self.proto(self.hidden_states(b + 1, 1))))
        if kind == "pushed step carrying a tensor":
            return attack(kind, self.request(self.step_meta(0, spec, expect_push=True), good))
        if kind == "bad push target":
            target = self.rng.choice([
                {"peer_id": "short", "session_id": self.session_id()},
                {"peer_id": "0OIl0OIl0OIl0OIl", "session_id": self.session_id()},
                {"peer_id": str(server.peer_id), "session_id": "no"},
                {"peer_id": str(server.peer_id), "session_id": self.session_id(), "relay": "not a multiaddr"},
                {"peer_id": str(server.peer_id), "session_id": self.session_id(), "extra": 1},
            ])
            return attack(kind, self.request(self.step_meta(0, spec, push_to=target), good))
        if kind == "abandoned mid-session":
            return attack(kind, self.request(self.step_meta(0, spec), good), may_succeed=True, ending="abort")
        raise AssertionError(kind)

    def group_step(self) -> Attack:
        """Group steps (client/group_step.py) from a peer that owns none of the sessions it names, or malformed: a
        server must refuse every one (a session is stepped in a group only by the peer that opened it)."""
        server = self.server()
        kind = self.rng.choice(["sessions not open", "bad tensor", "bad metadata", "pushed step carrying a tensor",
                                "a session twice", "too many members", "next sessions do not match", "abandoned"])
        count = self.rng.randint(1, 6)
        members = [{"session_id": self.session_id(), "position": self.rng.randint(0, 64)} for _ in range(count)]
        meta = {"members": members}
        good = self.proto(self.hidden_states(count, 1))

        def attack(label: str, request: runtime_pb2.ExpertRequest, **kw) -> Attack:
            return Attack("group_step", label, server.peer_id, (frame(request),), may_succeed=False, **kw)

        if kind == "sessions not open":
            return attack(kind, self.request(meta, good))
        if kind == "bad tensor":
            label, tensor = self.bad_tensor(count)
            return attack(f"bad tensor: {label}", self.request(meta, tensor))
        if kind == "bad metadata":  # a member with one thing wrong (or junk in its place)
            label, bad = self.bad_metadata(members[0])
            others = b"".join(b", " + json_bytes(m) for m in members[1:])
            return attack(f"bad metadata: {label}", self.request(b'{"members": [' + bad + others + b"]}", good))
        if kind == "pushed step carrying a tensor":
            return attack(kind, self.request({**meta, "expect_push": True}, good))
        if kind == "a session twice":
            return attack(kind, self.request({"members": members + members[:1]}, self.proto(self.hidden_states(count + 1, 1))))
        if kind == "too many members":
            many = [{"session_id": self.session_id(), "position": 0} for _ in range(self.rng.choice([257, 5000]))]
            return attack(kind, self.request({"members": many}, self.proto(self.hidden_states(1, 1))))
        if kind == "next sessions do not match":
            target = {"peer_id": str(server.peer_id), "session_ids": [self.session_id() for _ in range(count + 1)]}
            return attack(kind, self.request({**meta, "push_to": target}, good))
        return Attack("group_step", kind, server.peer_id, (frame(self.request(meta, good)),), may_succeed=True,
                      answers=0, ending="abort")

    def group_push_request(self) -> runtime_pb2.ExpertRequest:
        """A group step's push (one row per step) for sessions that are not open."""
        steps = [{"session_id": self.session_id(), "position": self.rng.randint(0, 64)} for _ in range(self.rng.randint(2, 5))]
        return self.request({"steps": steps}, self.proto(self.hidden_states(len(steps), 1)))

    def bad_spec(self, server: ServerTarget, spec: dict) -> tuple[str, dict]:
        """A SessionSpec the schema or the server must refuse."""
        options = [
            ("session id too short", {"session_id": "abc"}),
            ("session id with odd characters", {"session_id": "../../etc/passwd"}),
            ("session id too long", {"session_id": "x" * 65}),
            ("negative start", {"start": -1}),
            ("end before start", {"start": server.end - 1, "end": server.end - 1}),
            ("blocks outside the server's", {"start": server.start, "end": server.end + 1}),
            ("blocks far outside the server's", {"start": 10**6, "end": 10**6 + 1}),
            ("max_length 0", {"max_length": 0}),
            ("huge max_length", {"max_length": self.rng.choice([self.max_length + 1, 10**9, 2**63])}),
            ("batch_size 0", {"batch_size": 0}),
            ("huge batch_size", {"batch_size": self.rng.choice([1025, 10**6])}),
            ("batch_size x max_length over the cache", {"batch_size": 1024, "max_length": self.max_length}),
            ("unknown field", {"priority": "high"}),
        ]
        if server.start > 0:
            options.append(("blocks before the server's", {"start": 0, "end": server.end}))
        label, changes = self.rng.choice(options)
        return label, {**spec, **changes}

    def forward(self) -> Attack:
        server = self.server()
        kind = self.rng.choices(*zip(*_FORWARD_KINDS.items()))[0]
        start = self.rng.randint(server.start, server.end - 1)
        meta = {"start": start, "end": self.rng.randint(start + 1, server.end)}
        good = self.proto(self.hidden_states(self.rng.randint(1, 3)))

        def attack(label: str, *requests: runtime_pb2.ExpertRequest, may_succeed=False, **kw) -> Attack:
            return Attack("forward", label, server.peer_id, tuple(frame(r) for r in requests), may_succeed, **kw)

        if kind == "valid":
            return attack(kind, self.request(meta, good), may_succeed=True)
        if kind == "blocks outside the server's":
            bad = self.rng.choice([
                {"start": server.end, "end": server.end + 1},
                {"start": server.start, "end": server.end + 3},
                {"start": start, "end": start},
                {"start": 2**40, "end": 2**41},
            ] + ([{"start": 0, "end": server.start + 1}] if server.start > 0 else []))
            return attack(kind, self.request(bad, good))
        if kind == "bad tensor":
            label, tensor = self.bad_tensor()
            return attack(f"bad tensor: {label}", self.request(meta, tensor))
        if kind == "too many tokens":
            return attack(kind, self.request(meta, self.proto(torch.zeros(8, self.max_length + 1, self.hidden))))
        if kind == "bad metadata":
            label, bad = self.bad_metadata(meta)
            return attack(f"bad metadata: {label}", self.request(bad, good))
        if kind == "no tensor":
            return attack(kind, self.request(meta))
        if kind == "two tensors":
            return attack(kind, self.request(meta, good, good))
        if kind == "empty stream":
            return attack(kind)
        if kind == "abandoned":
            return attack(kind, self.request(meta, good), may_succeed=True, ending="abort")
        raise AssertionError(kind)

    def push_request(self, session_id: Optional[str] = None, position: Optional[int] = None) -> runtime_pb2.ExpertRequest:
        position = self.rng.randint(0, 64) if position is None else position
        meta = {"session_id": session_id or self.session_id(), "position": position}
        hidden = self.hidden_states(self.rng.choice([1, 1, 2]), self.rng.choice([1, 1, 4, 200]))
        return self.request(meta, self.proto(hidden))

    def bad_push(self) -> tuple[str, runtime_pb2.ExpertRequest]:
        """A push every server must refuse."""
        kind = self.rng.choice(["bad tensor", "bad tensor", "bad metadata", "no tensor", "two tensors"])
        meta = {"session_id": self.session_id(), "position": self.rng.randint(0, 64)}
        good = self.proto(self.hidden_states())
        if kind == "bad tensor":
            label, tensor = self.bad_tensor()
            return f"bad tensor: {label}", self.request(meta, tensor)
        if kind == "bad metadata":
            label, bad = self.bad_metadata(meta)
            return f"bad metadata: {label}", self.request(bad, good)
        if kind == "no tensor":
            return kind, self.request(meta)
        return kind, self.request(meta, good, good)

    def push(self) -> Attack:
        server = self.server()
        if self.rng.random() < 0.25:  # well-formed, for a session that is not open: kept a while, or refused
            position = self.rng.choice([0, 1, 63, 2**40, 10**30])
            request = self.push_request(position=position)
            return Attack("push", "well-formed push for a session that is not open", server.peer_id,
                          (request.SerializeToString(),), may_succeed=True)
        label, request = self.bad_push()
        body = request.SerializeToString()
        if self.rng.random() < 0.1:
            label, body = "not a protobuf", self.rng.randbytes(self.rng.randint(1, 200))
        return Attack("push", label, server.peer_id, (body,), may_succeed=False)

    def push_stream(self) -> Attack:
        server = self.server()
        roll = self.rng.random()
        if roll < 0.1:
            pushes = [self.group_push_request() for _ in range(self.rng.randint(1, 3))]
            return Attack("push_stream", "well-formed group pushes", server.peer_id, tuple(frame(p) for p in pushes),
                          may_succeed=True, answers=1)
        if roll < 0.15:
            push = self.group_push_request()
            rows = self.proto(self.hidden_states(len(json.loads(push.metadata)["steps"]) + 1, 1))
            bad = self.request(push.metadata, rows)
            return Attack("push_stream", "group push: rows and steps differ", server.peer_id, (frame(bad),),
                          may_succeed=False, answers=1)
        if roll < 0.3:
            pushes = [self.push_request() for _ in range(self.rng.randint(1, 5))]
            return Attack("push_stream", "well-formed pushes", server.peer_id, tuple(frame(p) for p in pushes),
                          may_succeed=True, answers=1)
        if roll < 0.35:
            return Attack("push_stream", "empty stream", server.peer_id, (), may_succeed=True, answers=1)
        if roll < 0.4:
            return Attack("push_stream", "abandoned", server.peer_id, (frame(self.push_request()),), may_succeed=True,
                          answers=0, ending="abort")
        label, bad = self.bad_push()
        pushes = [self.push_request() for _ in range(self.rng.randint(0, 3))]
        pushes.insert(self.rng.randint(0, len(pushes)), bad)
        # A push stream never answers a success (only an error, or nothing when it ends): "reply" cannot happen.
        return Attack("push_stream", label, server.peer_id, tuple(frame(p) for p in pushes), may_succeed=False, answers=1)

    def info_or_ping(self, rpc: str) -> Attack:
        server = self.server()
        label, body = self.rng.choice([
            ("empty request", b""),
            ("not a protobuf", self.rng.randbytes(self.rng.randint(1, 100))),
            ("junk metadata", runtime_pb2.ExpertRequest(metadata=self.rng.randbytes(100)).SerializeToString()),
            ("big metadata", runtime_pb2.ExpertRequest(metadata=b"m" * 500_000).SerializeToString()),
            ("with a tensor", self.request(b"{}", self.proto(self.hidden_states())).SerializeToString()),
            ("unknown protobuf field", b"\xf8\x07\x01" + runtime_pb2.ExpertRequest(uid="x").SerializeToString()),
        ])
        return Attack(rpc, label, server.peer_id, (body,), may_succeed=True)  # nothing to validate: any answer

    def route(self, methods: Sequence[str]) -> tuple[str, str]:
        """A route (ExpertRequest.uid) a relay must refuse."""
        target = str(self.rng.choice([*(s.peer_id for s in self.servers), *self.others, self.relay]))
        return self.rng.choice([
            ("no route", ""),
            ("no route prefix", f"{target}:{self.rng.choice(methods)}"),
            ("malformed route", "relay-to:" + self.rng.choice(["", ":", "::", "not-a-peer:rpc_info", "x" * 10_000])),
            ("extra colons", f"relay-to:{target}:{self.rng.choice(methods)}:extra"),
            ("target not registered", f"relay-to:{target}:{self.rng.choice(methods)}"),
            ("method it does not relay", f"relay-to:{target}:" + self.rng.choice(
                ["rpc_dial_back", "rpc_relay_call", "rpc_register", "__class__", "get_stub", "shutdown", ""])),
            ("route of the other kind", f"relay-to:{target}:" + self.rng.choice(
                ["rpc_inference", "rpc_forward"] if "rpc_info" in methods else ["rpc_info", "rpc_push"])),
            ("huge route", "relay-to:" + target + ":" + "rpc_ping" * 12_500),
        ])

    def relay_call(self) -> Attack:
        label, uid = self.route(["rpc_info", "rpc_ping", "rpc_push"])
        body = self.request(b"{}", uid=uid).SerializeToString()
        if self.rng.random() < 0.1:
            label, body = "not a protobuf", self.rng.randbytes(self.rng.randint(1, 100))
        return Attack("relay_call", label, self.relay, (body,), may_succeed=False)

    def relay_stream(self) -> Attack:
        label, uid = self.route(["rpc_inference", "rpc_forward", "rpc_push_stream"])
        first = self.request(self.step_meta(0, self.spec(self.servers[0])), self.proto(self.hidden_states()), uid=uid)
        payload: tuple[bytes, ...] = (frame(first),)
        if self.rng.random() < 0.1:
            label, payload = "empty stream", ()
        return Attack("relay_stream", label, self.relay, payload, may_succeed=False)

    def relay_load(self) -> Attack:
        junk = runtime_pb2.ExpertRequest(metadata=b"junk").SerializeToString()
        body = self.rng.choice([b"", self.rng.randbytes(50), junk])
        return Attack("relay_load", "junk request", self.relay, (body,), may_succeed=True)

    def dial_back(self, closed_port: int) -> Attack:
        if self.rng.random() < 0.2:  # valid: dials a port nobody listens on, on our own address
            body = self.request({"ports": [closed_port]}).SerializeToString()
            return Attack("dial_back", "valid, port closed", self.relay, (body,), may_succeed=True)
        label, meta = self.rng.choice([
            ("no ports", json_bytes({"ports": []})),
            ("too many ports", json_bytes({"ports": [closed_port] * 5})),
            ("port 0", json_bytes({"ports": [0]})),
            ("port above 65535", json_bytes({"ports": [70000]})),
            ("port not a number", json_bytes({"ports": ["ssh"]})),
            ("unknown field", json_bytes({"ports": [closed_port], "host": "10.0.0.1"})),
            ("junk metadata", self.rng.randbytes(40)),
        ])
        return Attack("dial_back", label, self.relay, (self.request(meta).SerializeToString(),), may_succeed=False)

    def register(self) -> Attack:
        # A registration takes any keep-alive: junk content is not wrong here, only broken framing (see stalls).
        body = self.rng.choice([runtime_pb2.ExpertRequest(), self.request(self.rng.randbytes(30))])
        return Attack("register", "junk keep-alive", self.relay, (frame(body),), may_succeed=True, answers=1)

    def attacks(self, counts: dict[str, int], *, closed_port: int, awaiting_push: int) -> list[Attack]:
        """``counts[rpc]`` attacks per RPC, shuffled; plus ``awaiting_push`` inference steps whose input never comes."""
        makers: dict[str, Callable[[], Attack]] = {
            "inference": self.inference,
            "forward": self.forward,
            "push": self.push,
            "push_stream": self.push_stream,
            "group_step": self.group_step,
            "info": lambda: self.info_or_ping("info"),
            "ping": lambda: self.info_or_ping("ping"),
            "relay_call": self.relay_call,
            "relay_stream": self.relay_stream,
            "relay_load": self.relay_load,
            "dial_back": lambda: self.dial_back(closed_port),
            "register": self.register,
        }
        attacks = [makers[rpc]() for rpc, n in counts.items() for _ in range(n)]
        for _ in range(awaiting_push):
            server = self.server()
            spec = self.spec(server)
            step = self.request(self.step_meta(0, spec, expect_push=True))
            # Valid; the server answers an error once its push timeout passes (or right away, if it refuses).
            attacks.append(Attack("inference", "awaits a push nobody sends", server.peer_id, (frame(step),),
                                  may_succeed=False, slow=True))
        self.rng.shuffle(attacks)
        return attacks

    # -- streams the server must close by itself (nothing more comes, or the framing is broken)

    def stall(self, kind: str) -> Attack:
        """An attack left open (ending="none"): the peer must close it; ``kind`` is one of :data:`STALL_KINDS`."""
        rpc = self.rng.choice(["inference", "forward", "push_stream", "relay_stream", "register"])
        if kind == "silent stream" and rpc == "register":
            rpc = "relay_stream"  # a registration with no keep-alive yet is what a real server looks like for 20 s
        peer = self.relay if rpc in RELAY_STREAMS else self.server().peer_id
        request = self.request(self.step_meta(0, self.spec(self.servers[0])), self.proto(self.hidden_states()))
        data = frame(request)
        payload = {
            "silent stream": b"",
            "truncated header": data[: self.rng.randint(1, 8)],
            "half a frame": data[: len(data) // 2],
            "declared 2**40 bytes": b"\x00" + (2**40).to_bytes(8, "big") + self.rng.randbytes(100),
            "declared 1 GiB, 64 KiB sent": b"\x00" + (2**30).to_bytes(8, "big") + self.rng.randbytes(2**16),
            "garbage marker byte": bytes([self.rng.randint(2, 255)]) + self.rng.randbytes(20),
            "drip-fed frame": data,  # written one byte every DRIP_PERIOD_S by the caller
        }[kind]
        return Attack(rpc, kind, peer, (payload,), may_succeed=False, ending="none")


STALL_KINDS = {  # kind -> how many of the stalled streams have it
    "silent stream": 80,
    "truncated header": 30,
    "half a frame": 40,
    "declared 2**40 bytes": 20,
    "declared 1 GiB, 64 KiB sent": 10,
    "garbage marker byte": 20,
    "drip-fed frame": 20,
}
DRIP_PERIOD_S = 2.0  # a drip-fed frame of ~300 bytes would take ten minutes


@dataclasses.dataclass
class Stalled:
    """A stream left open by :meth:`AttackGenerator.stall` (the peer must close it), or why it did not open."""

    attack: Attack
    opened_at: float
    stream: Optional[RawStream] = None
    drip: Optional[asyncio.Task] = None
    refused: Optional[str] = None


async def open_stall(p2p: P2P, attack: Attack, timeout: float) -> Stalled:
    """Open the stream and write the attack (drip-fed if that is its kind), then leave it."""
    opened_at = asyncio.get_running_loop().time()
    try:
        stream = await asyncio.wait_for(RawStream.open(p2p, attack.peer, HANDLERS[attack.rpc]), timeout)
    except (asyncio.TimeoutError, P2PDaemonError, ConnectionError, OSError) as e:
        return Stalled(attack, opened_at, refused=f"stream refused: {e!r}"[:200])
    [data] = attack.payload
    if attack.kind != "drip-fed frame":
        await stream.write(data)
        return Stalled(attack, opened_at, stream)

    async def drip_feed():
        for i in range(len(data)):
            if not await stream.write(data[i : i + 1]):
                return
            await asyncio.sleep(DRIP_PERIOD_S)

    return Stalled(attack, opened_at, stream, drip=asyncio.create_task(drip_feed()))


async def watch_stall(stalled: Stalled, deadline_s: float) -> tuple[str, str]:
    """Wait until the peer closes the stream: "closed" / "error" if it did within ``deadline_s`` of the opening,
    "hung" if not. Closes it from this side after that."""
    if stalled.stream is None:
        return "error", stalled.refused or ""
    remaining = stalled.opened_at + deadline_s - asyncio.get_running_loop().time()
    try:
        _replies, error = await asyncio.wait_for(stalled.stream.read_until_closed(), max(0.0, remaining))
    except asyncio.TimeoutError:
        return "hung", f"still open {deadline_s:.0f} s after it was opened"
    finally:
        if stalled.drip is not None:
            stalled.drip.cancel()
        stalled.stream.close()
    return ("error", error[:200]) if error is not None else ("closed", "")


async def open_stalls(p2p: P2P, attacks: Sequence[Attack], timeout: float) -> list[Stalled]:
    return await asyncio.gather(*(open_stall(p2p, a, timeout) for a in attacks))


async def watch_stalls(stalled: Sequence[Stalled], deadline_s: float) -> list[tuple[str, str]]:
    return await asyncio.gather(*(watch_stall(s, deadline_s) for s in stalled))


def stall_attacks(generator: AttackGenerator, kinds: dict[str, int] = STALL_KINDS) -> list[Attack]:
    return [generator.stall(kind) for kind, n in kinds.items() for _ in range(n)]


_BAD_TENSOR_KINDS = (
    "wrong hidden size",
    "zero tokens",
    "batch of 0",
    "5-D tensor",
    "2-D tensor",
    "scalar tensor",
    "NaN",
    "inf",
    "-inf",
    "NaN in float16",
    "inf under FLOAT16 compression",
    "declared size far above the payload",
    "huge declared shape",
    "buffer longer than the shape",
    "truncated buffer",
    'dtype "object"',
    'dtype "int64"',
    'dtype "float64"',
    'dtype "bool"',
    'dtype ""',
    "bfloat16 with FLOAT16 compression",
    "8-bit compression, buffer that fits no codec",
    "int8 without its outliers",
    "int8 outlier index past the row",
    "int8 NaN scale",
    "requires_grad",
)
_BAD_METADATA_KINDS = (
    "random bytes",
    "empty",
    "JSON of another type",
    "truncated JSON",
    "deeply nested JSON",
    "invalid UTF-8",
    "unknown field",
    "missing field",
    "wrong type",
    "negative number",
    "huge string",
)
_REQUIRED = {"position", "session_id", "start", "end", "max_length"}
_INT_FIELDS = {"position", "step_id", "start", "end", "max_length", "batch_size"}
_INFERENCE_KINDS = {  # kind -> weight
    "valid step": 10,
    "valid steps with a rollback": 4,
    "bad tensor": 25,
    "bad tensor after a valid step": 8,
    "bad metadata": 15,
    "bad session spec": 15,
    "no open": 3,
    "second open on one stream": 3,
    "out-of-order step": 3,
    "huge position": 3,
    "past max_length": 3,
    "longer than the server's max_length": 2,
    "batch size changes": 3,
    "pushed step carrying a tensor": 2,
    "bad push target": 3,
    "abandoned mid-session": 4,
}
_FORWARD_KINDS = {
    "valid": 15,
    "blocks outside the server's": 15,
    "bad tensor": 30,
    "too many tokens": 4,
    "bad metadata": 15,
    "no tensor": 4,
    "two tensors": 3,
    "empty stream": 4,
    "abandoned": 3,
}
