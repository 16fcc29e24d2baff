"""What servers announce about themselves in the DHT: one versioned, schema-checked record per server.

Layout: for every block ``i`` of a model there is one DHT key ``"<model-id>.<i>"``; each server serving that
block stores its :class:`ServerRecord` under its own subkey (its peer id plus its public signing key, so only
it can change the record). Every model also registers itself under :data:`MODELS_KEY` so that ``status`` and
the web app can list what the swarm serves.
"""

from __future__ import annotations

import enum
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

RECORD_VERSION = 1
MODELS_KEY = "_molink_swarm.models"
SERVER_RECORD_KIND = "molink.server"
MODEL_RECORD_KIND = "molink.model"


class ServerState(str, enum.Enum):
    JOINING = "joining"
    ONLINE = "online"
    OFFLINE = "offline"


class Reachability(str, enum.Enum):
    DIRECT = "direct"
    HOLE_PUNCHED = "hole_punched"
    RELAYED = "relayed"


class _Record(BaseModel):
    # Unknown fields are ignored so that an older client can read a newer server's record (versioned decoding).
    model_config = ConfigDict(frozen=True, extra="ignore")

    version: int = RECORD_VERSION

    def to_wire(self) -> dict[str, Any]:
        """A msgpack-friendly dict (what goes into the DHT)."""
        return self.model_dump(mode="json")


class ServerRecord(_Record):
    kind: str = SERVER_RECORD_KIND
    state: ServerState
    start: int = Field(ge=0)
    end: int = Field(gt=0)
    model_fingerprint: str = Field(min_length=8, max_length=64)
    throughput: float = Field(ge=0, description="tokens/s this server can push through one of its blocks")
    free_cache_tokens: int = Field(ge=0)
    max_sessions: int = Field(ge=0)
    active_sessions: int = Field(ge=0, default=0)
    reachability: Reachability = Reachability.DIRECT
    relay_addrs: tuple[str, ...] = ()
    addrs: tuple[str, ...] = ()
    software_version: str = Field(max_length=32)
    public_name: Optional[str] = Field(default=None, max_length=64)
    torch_dtype: str = Field(default="float32", max_length=16)
    next_rtts: dict[str, float] = Field(default_factory=dict, description="peer id -> measured RTT in seconds")

    @model_validator(mode="after")
    def _check_span(self) -> "ServerRecord":
        if self.end <= self.start:
            raise ValueError(f"empty block span {self.start}:{self.end}")
        if len(self.next_rtts) > 64 or len(self.addrs) > 16 or len(self.relay_addrs) > 16:
            raise ValueError("record lists are too long")
        return self


class ModelRecord(_Record):
    kind: str = MODEL_RECORD_KIND
    model_id: str = Field(pattern=r"^[a-z0-9-]{1,96}$")
    name: str = Field(max_length=128)
    num_blocks: int = Field(gt=0, le=100_000)
    fingerprint: str = Field(min_length=8, max_length=64)
    model_type: str = Field(max_length=64)


def block_key(model_id: str, index: int) -> str:
    return f"{model_id}.{index}"


def parse_record(value: Any) -> Optional[_Record]:
    """Parse a value read from the DHT into a record, or None if it is not one of ours or is malformed."""
    if not isinstance(value, dict):
        return None
    kind = value.get("kind")
    schema = {SERVER_RECORD_KIND: ServerRecord, MODEL_RECORD_KIND: ModelRecord}.get(kind) if isinstance(kind, str) else None
    if schema is None:
        return None
    try:
        return schema.model_validate(value)
    except ValidationError:
        return None
