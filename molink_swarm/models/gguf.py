"""GGUF files: converted once into a cached safetensors folder (plus a tokenizer that tokenizes like the
original model's), so that later loads read only the blocks they need."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from molink_swarm.errors import ModelNotFoundError
from molink_swarm.models.gguf_tokenizer import repair_gguf_tokenizer
from molink_swarm.models.progress import spinner

logger = logging.getLogger(__name__)

# Bump when the conversion output changes, so that stale converted folders are not reused.
# 2: converted by transformers 5 (its config.json format and tokenizer files; fingerprints differ from 1's).
_CONVERSION_VERSION = 2
# A conversion takes about a minute; temp folders older than this were left by a killed process.
_STALE_TEMP_AGE_S = 6 * 3600


def converted_folder(gguf: Path, cache_dir: Path, progress: bool) -> Path:
    """The safetensors folder converted from ``gguf``, converting it once if needed.

    The folder name depends on the GGUF's path, size and mtime, so a replaced file is converted again. The result
    appears by an atomic rename of a complete temp folder: concurrent converters never see a half-written one.
    """
    stat = gguf.stat()
    identity = json.dumps([str(gguf), stat.st_size, stat.st_mtime_ns, _CONVERSION_VERSION])
    final = cache_dir / f"{gguf.stem}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"
    if final.is_dir():
        return final

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp_dirs(cache_dir)
        temp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache_dir))
    except OSError as e:
        raise ModelNotFoundError(
            f"Cannot write the model cache {str(cache_dir)!r} ({e}); set MOLINK_SWARM_CACHE to a writable folder."
        ) from e

    try:
        message = f"Converting {gguf.name} to safetensors (once)…"
        logger.info("%s into %s", message, final)
        started = time.perf_counter()
        with spinner(message, enabled=progress):
            try:
                _convert_gguf(gguf, temp)
            except (MemoryError, KeyboardInterrupt):
                raise
            except Exception as e:
                logger.debug("GGUF conversion failed", exc_info=True)
                reason = " ".join(str(e).split()) or type(e).__name__
                raise ModelNotFoundError(
                    f"Cannot convert {str(gguf)!r} to safetensors ({reason}); pass a Hugging Face folder instead."
                ) from e
        logger.info(
            "Converted %s in %.1f s: its weights are float32 now (the GGUF's quantized blocks are not kept; "
            "`molink-swarm join --quant int8|nf4` serves blocks compact again)", gguf.name, time.perf_counter() - started,
        )
        _make_readable(temp)
        try:
            os.rename(temp, final)
        except OSError:
            if not final.is_dir():
                raise
            logger.info("Another process converted %s first; using its folder", gguf.name)
            shutil.rmtree(temp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return final


def _make_readable(folder: Path) -> None:
    """mkdtemp and safetensors create owner-only entries; a shared cache must be readable by other users."""
    os.chmod(folder, 0o755)
    for entry in folder.iterdir():
        if entry.is_file():
            os.chmod(entry, 0o644)


def _remove_stale_temp_dirs(cache_dir: Path) -> None:
    """Delete temp folders that killed conversions left behind (each is as big as the model)."""
    now = time.time()
    for entry in cache_dir.glob(".*.tmp-*"):
        with contextlib.suppress(OSError):
            if entry.is_dir() and now - entry.stat().st_mtime > _STALE_TEMP_AGE_S:
                logger.info("Removing stale conversion folder %s", entry)
                shutil.rmtree(entry, ignore_errors=True)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` to a float32 safetensors checkpoint plus a tokenizer in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = repair_gguf_tokenizer(tokenizer, _gguf_metadata(gguf))
    tokenizer.save_pretrained(out)
    # Every weight unpacked to float32 at load: a plain checkpoint. (Else transformers keeps weights in their GGUF
    # blocks where it has kernels for them, and such a model cannot be saved.)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    model.save_pretrained(out)  # safetensors
    del model
    _drop_sentencepiece_copy(out)


def _gguf_metadata(gguf: Path) -> dict[str, Any]:
    """The GGUF's scalar key/values (token lists and merges are skipped)."""
    from gguf import GGUFReader

    metadata: dict[str, Any] = {}
    for key, field in GGUFReader(str(gguf)).fields.items():
        if key.startswith("tokenizer.ggml.") and key.endswith(("tokens", "merges", "token_type", "scores")):
            continue
        with contextlib.suppress(Exception):
            metadata[key] = field.contents()
    return metadata


def _drop_sentencepiece_copy(folder: Path) -> None:
    """Delete ``tokenizer.model``: the GGUF export copies the whole GGUF there, unused beside tokenizer.json."""
    from transformers import AutoTokenizer

    spm = folder / "tokenizer.model"
    if not spm.is_file() or not (folder / "tokenizer.json").is_file():
        return
    aside = folder / ".tokenizer.model.aside"
    os.rename(spm, aside)
    try:
        AutoTokenizer.from_pretrained(folder)
    except Exception:
        logger.warning("The tokenizer in %s needs tokenizer.model; keeping it", folder, exc_info=True)
        os.rename(aside, spm)
        return
    aside.unlink()
