"""A model resolved to a local folder, and its identity in the swarm."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

_SLUG_INVALID = re.compile(r"[^a-z0-9-]")
HEX16 = re.compile(r"^[0-9a-f]{16}$")


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to a local Hugging Face folder.

    ``fingerprint`` identifies the model without reading any weights (its config and the names of its tensors, see
    fingerprint.py), so every peer computes it from the files it has, whichever blocks it serves. A model from the
    hub also names its repository and commit: the folder then holds only the shards downloaded so far, and
    :func:`~molink_swarm.models.checkpoint.fetch_tensors` downloads the others when they are needed.
    """

    name: str
    path: Path
    fingerprint: str
    repo_id: Optional[str] = None
    revision: Optional[str] = None  # the commit the folder is a snapshot of

    def __post_init__(self) -> None:
        if not HEX16.match(self.fingerprint):
            raise ValueError(f"fingerprint must be 16 lowercase hex chars, got {self.fingerprint!r}")

    @property
    def model_id(self) -> str:
        """``<slug>-<fingerprint[:8]>``: readable, yet distinct per model; free of "." as it prefixes DHT keys.

        The same for every server of the model whichever blocks it holds, so that they find each other; copies
        whose blocks differ share it and are told apart by the digests of their blocks (ServerRecord)."""
        slug = _SLUG_INVALID.sub("-", self.name.lower()) or "model"
        return f"{slug}-{self.fingerprint[:8]}"
