"""What servers announce about themselves in the DHT: one versioned, schema-checked record per server.

Layout: for every block ``i`` of a model there is one DHT key ``"<model-id>.<i>"``; each server serving that
block stores its :class:`ServerRecord` under its own subkey (its peer id plus its public signing key, so only
it can change the record). Every model also registers itself under :data:`MODELS_KEY` so that ``status`` and
the web app can list what the swarm serves.
"""

from __future__ import annotations

import enum
import math
from typing import Annotated, Any, Optional

import multihash
from hivemind.p2p import PeerID
from hivemind.utils.multiaddr import Multiaddr
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

RECORD_VERSION = 3  # 2: servers announce the digests of their blocks (block_digests); 3: their quantization (quant)
MODELS_KEY = "_molink_swarm.models"
SERVER_RECORD_KIND = "molink.server"
MODEL_RECORD_KIND = "molink.model"
MAX_BLOCKS = 4096  # more than any model has; bounds what a reader fetches for one announced model
MAX_THROUGHPUT = 1e7  # tokens/s/block: servers measure at most 1e6 (see Server._measure_throughput)
MAX_RTT_S = 3600.0
MAX_BYTES_PER_TOKEN = 2**24  # a float32 hidden state of 4M dimensions
MAX_COUNT = 2**40  # cache tokens, sessions: far above any real server, far below what breaks arithmetic


_SHA2_256, _IDENTITY = 0x12, 0x00  # multihash codes


class InvalidRecordError(ValueError):
    """A value under one of our DHT keys that is not a valid record (its reason is one short line)."""


def check_peer_id(text: str) -> str:
    """A libp2p peer id in base58: an RSA key's sha2-256 hash, or an inlined (ed25519/secp256k1) public key."""
    if not isinstance(text, str) or not 1 <= len(text) <= 64:
        raise ValueError("not a peer id")
    try:
        digest = multihash.decode(PeerID.from_base58(text).to_bytes())
    except Exception:
        raise ValueError(f"not a peer id: {text[:64]!r}") from None
    sha256_of_key = digest.code == _SHA2_256 and len(digest.digest) == 32
    inlined_key = digest.code == _IDENTITY and 36 <= len(digest.digest) <= 42
    if not (sha256_of_key or inlined_key):
        raise ValueError(f"not a peer id: {text[:64]!r}")
    return text


def check_peer_maddr(text: str) -> str:
    """A multiaddr that names its peer at the end (``/ip4/.../tcp/.../p2p/<peer id>``), as peers dial them."""
    if not isinstance(text, str) or len(text) > 256:
        raise ValueError("multiaddr too long")
    _, sep, peer = text.rpartition("/p2p/")
    try:
        Multiaddr(text)
    except Exception:
        raise ValueError(f"not a multiaddr: {text[:80]!r}") from None
    if not sep:
        raise ValueError(f"multiaddr does not end in /p2p/<peer id>: {text[:80]!r}")
    check_peer_id(peer)
    return text


def is_peer_maddr(text: str) -> bool:
    try:
        check_peer_maddr(text)
    except ValueError:
        return False
    return True


def check_relay_maddr(text: str) -> str:
    """A relay's multiaddr: its peer is the only /p2p/ part (net/paths.py dials it and addresses the relay by it)."""
    check_peer_maddr(text)
    if text.count("/p2p/") != 1 or "p2p-circuit" in text:
        raise ValueError(f"not a relay multiaddr: {text[:80]!r}")
    return text


def _hex16(value: str) -> str:
    if not isinstance(value, str) or len(value) != 16 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError("not 16 lowercase hex chars")
    return value


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be finite")
    return value


PeerIdText = Annotated[str, AfterValidator(check_peer_id)]
PeerMaddr = Annotated[str, AfterValidator(check_peer_maddr)]
RelayMaddr = Annotated[str, AfterValidator(check_relay_maddr)]
Seconds = Annotated[float, Field(ge=0, le=MAX_RTT_S), AfterValidator(_finite)]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
BlockDigest = Annotated[str, AfterValidator(_hex16)]


class ServerState(str, enum.Enum):
    JOINING = "joining"
    ONLINE = "online"
    OFFLINE = "offline"


class Reachability(str, enum.Enum):
    DIRECT = "direct"
    RELAYED = "relayed"


class _Record(BaseModel):
    # Unknown fields are ignored so that an older client can read a newer server's record (versioned decoding).
    model_config = ConfigDict(frozen=True, extra="ignore")

    version: int = RECORD_VERSION

    def to_wire(self) -> dict[str, Any]:
        """A msgpack-friendly dict (what goes into the DHT)."""
        return self.model_dump(mode="json")


class ServerRecord(_Record):
    """Every field is checked, since readers act on them: addresses are dialled, figures go into route costs."""

    kind: str = SERVER_RECORD_KIND
    state: ServerState
    start: int = Field(ge=0, lt=MAX_BLOCKS)
    end: int = Field(gt=0, le=MAX_BLOCKS)
    model_fingerprint: str = Field(min_length=8, max_length=64)
    throughput: Annotated[float, Field(ge=0, le=MAX_THROUGHPUT), AfterValidator(_finite)] = Field(
        description="tokens/s this server can push through one of its blocks"
    )
    free_cache_tokens: Count
    max_sessions: Count
    active_sessions: Count = 0
    reachability: Reachability = Reachability.DIRECT
    relay_addrs: tuple[RelayMaddr, ...] = Field(default=(), max_length=16)
    addrs: tuple[PeerMaddr, ...] = Field(default=(), max_length=16)
    software_version: str = Field(max_length=32)
    public_name: Optional[str] = Field(default=None, max_length=64)
    torch_dtype: str = Field(default="float32", pattern=r"^[a-z0-9_]{1,16}$")
    next_rtts: dict[PeerIdText, Seconds] = Field(
        default_factory=dict, max_length=64, description="peer id -> measured RTT in seconds"
    )
    # Optional, so that records of servers from before --wire-dtype still decode.
    wire_dtype: Optional[str] = Field(default=None, pattern=r"^[a-z0-9_]{1,16}$", description="how it sends activations")
    wire_bytes_per_token: Optional[Annotated[float, Field(ge=0, le=MAX_BYTES_PER_TOKEN), AfterValidator(_finite)]] = Field(
        default=None, description="average bytes of hidden states it sent per token (None: nothing sent yet)"
    )
    # Optional, so that records of older servers (and of joining ones, which have not hashed yet) still decode;
    # clients chain only servers that announce them (see routing/copies.py).
    block_digests: Optional[tuple[BlockDigest, ...]] = Field(
        default=None, max_length=MAX_BLOCKS, description="digest of each block start..end-1 (models/fingerprint.py)"
    )
    # Optional, so that records of servers from before --quant still decode (None: not quantized). Clients chain
    # servers of one quantization only (routing/copies.py); the block digests differ between quantizations too.
    quant: Optional[str] = Field(
        default=None, pattern=r"^[a-z0-9_]{1,16}$", description="how its weights are quantized: none, int8, nf4"
    )

    # Optional, so that records of servers from before placement by capacity still decode.
    batch_throughput: Optional[Annotated[float, Field(ge=0, le=MAX_THROUGHPUT), AfterValidator(_finite)]] = Field(
        default=None, description="block-tokens/s of decode steps batched across sessions (its capacity under load)"
    )
    prefill_throughput: Optional[Annotated[float, Field(ge=0, le=MAX_THROUGHPUT), AfterValidator(_finite)]] = Field(
        default=None, description="prompt tokens/s through one of its blocks"
    )
    network_throughput: Optional[Annotated[float, Field(ge=0, le=MAX_THROUGHPUT), AfterValidator(_finite)]] = Field(
        default=None, description="tokens/s of hidden states its link carries to the next servers (None: not measured)"
    )

    @property
    def relays(self) -> tuple[str, ...]:
        """The relays to reach this server through (none: dial it directly)."""
        return self.relay_addrs if self.reachability == Reachability.RELAYED else ()

    @model_validator(mode="after")
    def _check_span(self) -> "ServerRecord":
        if self.end <= self.start:
            raise ValueError(f"empty block span {self.start}:{self.end}")
        if self.block_digests is not None and len(self.block_digests) != self.end - self.start:
            raise ValueError(f"{len(self.block_digests)} block digests for blocks {self.start}:{self.end}")
        return self

    @property
    def quant_mode(self) -> str:
        """How its weights are quantized ("none" for servers from before --quant)."""
        return self.quant or "none"

    def digest_of(self, block: int) -> Optional[str]:
        """The digest this server announces for ``block`` (None: it announces none)."""
        if self.block_digests is None or not self.start <= block < self.end:
            return None
        return self.block_digests[block - self.start]


class ModelRecord(_Record):
    kind: str = MODEL_RECORD_KIND
    model_id: str = Field(pattern=r"^[a-z0-9-]{1,96}$")
    name: str = Field(max_length=128)
    num_blocks: int = Field(gt=0, le=MAX_BLOCKS)
    fingerprint: str = Field(min_length=8, max_length=64)
    model_type: str = Field(max_length=64)

    @model_validator(mode="after")
    def _check_id(self) -> "ModelRecord":
        # Model ids are "<slug>-<fingerprint[:8]>" (ModelSource.model_id): a record naming another model's
        # fingerprint under this id is forged.
        if not self.model_id.endswith("-" + self.fingerprint[:8]):
            raise ValueError(f"model id {self.model_id!r} does not match fingerprint {self.fingerprint!r}")
        return self


def block_key(model_id: str, index: int) -> str:
    return f"{model_id}.{index}"


def validate_record(value: Any) -> _Record:
    """Parse a value read from the DHT into a record; raises :class:`InvalidRecordError` saying why it is not one."""
    if not isinstance(value, dict):
        raise InvalidRecordError(f"not a record: a {type(value).__name__}")
    kind = value.get("kind")
    schema = {SERVER_RECORD_KIND: ServerRecord, MODEL_RECORD_KIND: ModelRecord}.get(kind) if isinstance(kind, str) else None
    if schema is None:
        raise InvalidRecordError(f"not a record of ours (kind {str(kind)[:40]!r})")
    try:
        return schema.model_validate(value)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "record"
        raise InvalidRecordError(f"invalid {kind} record: {where}: {first.get('msg')}"[:200]) from None


def parse_record(value: Any) -> Optional[_Record]:
    """Parse a value read from the DHT into a record, or None if it is not one of ours or is malformed."""
    try:
        return validate_record(value)
    except InvalidRecordError:
        return None
