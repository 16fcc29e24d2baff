"""The messages of the wire protocol between clients, servers and relays.

Every RPC carries a hivemind ``ExpertRequest``/``ExpertResponse``: tensors (see :mod:`.tensors`) and, as
metadata, the JSON of one of the pydantic models below. Requests are validated strictly (unknown fields
rejected); nothing received is trusted.
"""

from __future__ import annotations

from typing import Annotated, Optional, TypeVar

import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.multiaddr import Multiaddr
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from molink_swarm.protocol.errors import ProtocolError
from molink_swarm.protocol.tensors import WireDtype, serialize_tensor

PROTOCOL_VERSION = 1
_PEER_ID_PATTERN = r"^[1-9A-HJ-NP-Za-km-z]+$"  # base58
# A relay puts this, plus the caller's peer id, in the uid of a call it pipes to a server behind a NAT; the
# server believes it only from the relays it registered with.
RELAYED_FROM = "relayed-from:"


# A step of at most this many tokens per sequence is a decode step: servers run it ahead of prompt chunks, and
# clients time it apart from prefills.
DECODE_MAX_TOKENS = 4


def is_decode(tokens: int) -> bool:
    return tokens <= DECODE_MAX_TOKENS


# Session ids are chosen by clients: short, and safe to log and to use as keys.
SessionId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{8,64}$")]


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SessionSpec(_Message):
    """Opens an inference session on a server (first message of an inference stream)."""

    session_id: SessionId
    start: int = Field(ge=0)
    end: int = Field(gt=0)
    max_length: int = Field(gt=0)
    batch_size: int = Field(gt=0, le=1024, default=1)


class _NextServer(_Message):
    """The next server of a chain, reached directly or through ``relay``."""

    peer_id: str = Field(min_length=10, max_length=128, pattern=_PEER_ID_PATTERN)
    relay: Optional[str] = Field(default=None, max_length=256, description="multiaddr of the relay to go through")

    @field_validator("relay")
    @classmethod
    def _relay_names_a_peer(cls, relay: Optional[str]) -> Optional[str]:
        if relay is not None:
            relay_peer_id(relay)
        return relay


class PushTarget(_NextServer):
    """Where a server sends its output for the next hop of the chain (server-to-server forwarding)."""

    session_id: SessionId


class InferenceStep(_Message):
    """One step of an inference session: hidden states for tokens ``position .. position+seq_len-1``.

    ``position`` below the number of tokens the server holds rolls the cache back first (used for replays
    and by clients that regenerate from an earlier point). With ``expect_push`` the message carries no
    tensor: the input arrives by ``rpc_push`` from the previous server ``push_from`` (or from the client as a
    fallback); pushes from anyone else are not taken. With ``push_to`` the server pushes its output to the next
    server before answering the client."""

    open: Optional[SessionSpec] = None
    position: int = Field(ge=0)
    step_id: int = Field(ge=0, default=0)
    expect_push: bool = False
    push_from: Optional[str] = Field(default=None, min_length=10, max_length=128, pattern=_PEER_ID_PATTERN)
    push_to: Optional[PushTarget] = None


class PushStep(_Message):
    """The input of step ``position`` of session ``session_id``, pushed by the previous hop."""

    session_id: SessionId
    position: int = Field(ge=0)


# The most sessions one group step (and one group push) carries.
MAX_GROUP = 256


class GroupMember(_Message):
    """One session's decode step within a :class:`GroupStep`."""

    session_id: SessionId
    position: int = Field(ge=0)
    step_id: int = Field(ge=0, default=0)


class GroupPushTarget(_NextServer):
    """Where a server sends a group step's output: the next server and its sessions, one per member."""

    session_ids: list[SessionId] = Field(min_length=1, max_length=MAX_GROUP)


class GroupStep(_Message):
    """Decode steps of several sessions of one caller on this server, as one message (client/group_step.py): their
    inputs stacked in one tensor [members, tokens, hidden], row i for ``members[i]``, or with ``expect_push`` pushed
    by the previous server ``push_from`` as one :class:`GroupPush`. With ``push_to`` the stacked output goes to the
    next server as one GroupPush, for its sessions ``push_to.session_ids`` (in the members' order). The sessions were
    opened by their own inference streams, which keep them alive; a group step is all or nothing."""

    members: list[GroupMember] = Field(min_length=1, max_length=MAX_GROUP)
    expect_push: bool = False
    push_from: Optional[str] = Field(default=None, min_length=10, max_length=128, pattern=_PEER_ID_PATTERN)
    push_to: Optional[GroupPushTarget] = None

    @field_validator("members")
    @classmethod
    def _distinct_sessions(cls, members: list[GroupMember]) -> list[GroupMember]:
        if len({m.session_id for m in members}) != len(members):
            raise ValueError("a session appears twice in one group step")
        return members


class GroupPush(_Message):
    """The inputs of several sessions' steps, pushed by the previous hop as one tensor, row i for ``steps[i]``."""

    steps: list[PushStep] = Field(min_length=1, max_length=MAX_GROUP)


class DialBackRequest(_Message):
    """Asks a relay to dial the caller back on these ports at its observed IP (reachability check at join)."""

    ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field(min_length=1, max_length=4)


class DialBackReply(_Message):
    observed_ip: Optional[str] = None
    reachable_ports: list[int] = Field(default_factory=list)


class RelayLoad(_Message):
    """How busy a relay is: streams it pipes now, and the most it takes."""

    streams: int = Field(ge=0)
    max_streams: int = Field(gt=0)


class RelayRegistered(_Message):
    """A relay's answer when a server behind a NAT registers with it."""

    observed_ip: Optional[str] = None


class StepResult(_Message):
    position: int = Field(ge=0, description="tokens held by the session after this step")
    step_id: int = Field(ge=0, default=0)
    compute_s: float = Field(ge=0, default=0.0)


class GroupResult(_Message):
    """The answer to a :class:`GroupStep`: one result per member, in order (the output tensor stacks their rows)."""

    results: list[StepResult] = Field(min_length=1, max_length=MAX_GROUP)


class ForwardRequest(_Message):
    """A cache-less pass of full sequences through blocks ``start..end-1``."""

    start: int = Field(ge=0)
    end: int = Field(gt=0)


class ServerStatus(_Message):
    """What a server says about itself when asked directly (rpc_info)."""

    model_id: str
    start: int
    end: int
    version: str
    protocol: int = PROTOCOL_VERSION
    torch_dtype: str
    quant: str = "none"  # how its weights are quantized (join --quant)
    active_sessions: int
    free_cache_tokens: int
    max_length: int
    inputs_from_servers: int = 0  # step inputs that arrived from the previous server before the client's copy


M = TypeVar("M", bound=_Message)


def relay_peer_id(maddr: str) -> PeerID:
    """The peer id at the end of a relay's multiaddr (``/ip4/.../tcp/.../p2p/<id>``)."""
    try:
        return PeerID.from_base58(Multiaddr(maddr).value_for_protocol("p2p"))
    except Exception:
        raise ValueError(f"not a multiaddr ending in /p2p/<peer id>: {maddr[:80]!r}") from None


def origin(uid: str, remote_id: PeerID, trusted_relays: set[PeerID] | frozenset[PeerID]) -> str:
    """Who made a call: the peer at the other end, or the caller a trusted relay says it pipes the call for."""
    if remote_id in trusted_relays and uid.startswith(RELAYED_FROM):
        return uid.removeprefix(RELAYED_FROM)
    return remote_id.to_base58()


def encode_metadata(message: _Message) -> bytes:
    return message.model_dump_json(exclude_defaults=False).encode()


def decode_push(data: bytes) -> list[PushStep]:
    """The steps a push carries: one (:class:`PushStep`) or a group step's, one per row of its tensor (:class:`GroupPush`)."""
    if data.startswith(b'{"steps"'):
        return list(decode_metadata(data, GroupPush).steps)
    return [decode_metadata(data, PushStep)]


def decode_metadata(data: bytes, schema: type[M]) -> M:
    try:
        return schema.model_validate_json(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "message"
        raise ProtocolError(f"Invalid {schema.__name__}: {where}: {first.get('msg')}") from None


def request(message: _Message, *tensors: torch.Tensor | runtime_pb2.Tensor, wire_dtype: WireDtype = "auto") -> runtime_pb2.ExpertRequest:
    """A request carrying ``tensors``: torch tensors are serialized as ``wire_dtype``, serialized ones go as they are."""
    return runtime_pb2.ExpertRequest(metadata=encode_metadata(message), tensors=[_wire(t, wire_dtype) for t in tensors])


def response(
    message: Optional[_Message], *tensors: torch.Tensor | runtime_pb2.Tensor, wire_dtype: WireDtype = "auto"
) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(
        metadata=encode_metadata(message) if message is not None else b"",
        tensors=[_wire(t, wire_dtype) for t in tensors],
    )


def _wire(tensor: torch.Tensor | runtime_pb2.Tensor, wire_dtype: WireDtype) -> runtime_pb2.Tensor:
    return tensor if isinstance(tensor, runtime_pb2.Tensor) else serialize_tensor(tensor, wire_dtype)
