"""A model resolved to a local folder, and its identity in the swarm."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_SLUG_INVALID = re.compile(r"[^a-z0-9-]")
HEX16 = re.compile(r"^[0-9a-f]{16}$")


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to a local Hugging Face folder, identified by what its weights compute."""

    name: str
    path: Path
    fingerprint: str

    def __post_init__(self) -> None:
        if not HEX16.match(self.fingerprint):
            raise ValueError(f"fingerprint must be 16 lowercase hex chars, got {self.fingerprint!r}")

    @property
    def model_id(self) -> str:
        """``<slug>-<fingerprint[:8]>``: readable, yet distinct per weights; free of "." as it prefixes DHT keys."""
        slug = _SLUG_INVALID.sub("-", self.name.lower()) or "model"
        return f"{slug}-{self.fingerprint[:8]}"
