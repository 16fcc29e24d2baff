"""Downloading a model from the Hugging Face Hub, where the machine can reach it (never needed by tests)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from molink_swarm.errors import ModelNotFoundError

logger = logging.getLogger(__name__)

_ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
]


def download(repo_id: str, fallback: str) -> Path:
    """Download ``org/name`` (weights, config, tokenizer only) unless the hub is switched off; ``fallback`` says
    what to do instead."""
    offline = os.environ.get("HF_HUB_OFFLINE", "")
    if offline.upper() in {"1", "ON", "YES", "TRUE"}:
        raise ModelNotFoundError(
            f"{repo_id!r} is not a local folder or .gguf file, and HF_HUB_OFFLINE={offline} forbids downloading "
            f"it from the Hugging Face Hub; {fallback}."
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=_ALLOW_PATTERNS)).resolve()
    except Exception as e:
        logger.debug("Hub download of %s failed", repo_id, exc_info=True)
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise ModelNotFoundError(
            f"Cannot download {repo_id!r} from the Hugging Face Hub ({reason}); {fallback}."
        ) from e
