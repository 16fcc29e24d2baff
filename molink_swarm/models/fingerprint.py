"""A model's identity: a fingerprint of its config and tensor bytes, so that a swarm never mixes two copies.

Hashing every byte costs about 1 s per 500 MB, so the result is cached in the folder (or in memory when the
folder is read-only) and redone only when a file's name, size or mtime changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from molink_swarm.errors import ModelNotFoundError
from molink_swarm.models.checkpoint import CONFIG, INDEX, safetensors_header, tensor_files
from molink_swarm.models.source import HEX16

logger = logging.getLogger(__name__)

_FINGERPRINT_CACHE = ".molink-fingerprint.json"
_FINGERPRINT_VERSION = 1
# config.json keys that describe provenance or runtime defaults, not the function the weights compute.
_CONFIG_KEYS_IGNORED = frozenset(
    {"_name_or_path", "_model_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"}
)
# Fallback for folders where the fingerprint cache file cannot be written (read-only mounts).
_fingerprints_in_process: dict[tuple[str, str], str] = {}


def fingerprint(folder: Path) -> str:
    """Fingerprint of the folder's weights (16 hex chars), from the cache when the files have not changed."""
    key = _folder_key(folder)
    memo_key = (str(folder), json.dumps(key))
    if memo_key in _fingerprints_in_process:
        return _fingerprints_in_process[memo_key]

    cache_file = folder / _FINGERPRINT_CACHE
    try:
        cached = json.loads(cache_file.read_text(encoding="utf-8"))
        if cached.get("version") == _FINGERPRINT_VERSION and cached.get("key") == key:
            fingerprint = str(cached["fingerprint"])
            if HEX16.match(fingerprint):
                _fingerprints_in_process[memo_key] = fingerprint
                return fingerprint
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # missing or corrupt cache: recompute

    started = time.perf_counter()
    fingerprint = _compute_fingerprint(folder)
    logger.info("Fingerprinted %s in %.2f s: %s", folder, time.perf_counter() - started, fingerprint)
    _fingerprints_in_process[memo_key] = fingerprint
    payload = {"version": _FINGERPRINT_VERSION, "key": key, "fingerprint": fingerprint}
    try:
        _atomic_write_text(cache_file, json.dumps(payload, indent=1))
    except OSError as e:
        logger.debug("Cannot cache the fingerprint in %s (%s); keeping it in memory", folder, e)
    return fingerprint


def _folder_key(folder: Path) -> list[list[Any]]:
    """(name, size, mtime_ns) of every file in the folder, except our own cache files."""
    key = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith(_FINGERPRINT_CACHE):
            continue
        try:
            if not entry.is_file():  # follows symlinks, as hub cache snapshots are links to blobs
                continue
            stat = entry.stat()
        except OSError:
            continue
        key.append([entry.name, stat.st_size, stat.st_mtime_ns])
    return key


def _compute_fingerprint(folder: Path) -> str:
    """sha256 over the canonical config and every tensor's name, dtype, shape and bytes, in name order.

    It depends only on the tensors, not on how they are split into shards, so re-sharded copies match.
    """
    config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    config = {k: v for k, v in config.items() if k not in _CONFIG_KEYS_IGNORED}
    digest = hashlib.sha256()
    digest.update(b"molink-fingerprint-v1\0config\0")
    digest.update(json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode())

    files = tensor_files(folder)
    by_file: dict[Path, list[str]] = {}
    for name in files:
        by_file.setdefault(files[name], []).append(name)
    entries: dict[str, tuple[str, list[int], str]] = {}
    for file, names in by_file.items():
        header, data_start = safetensors_header(file)
        with open(file, "rb") as handle, contextlib.ExitStack() as stack:
            size = os.fstat(handle.fileno()).st_size
            view = None
            if size > data_start:
                mapped = stack.enter_context(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))
                view = stack.enter_context(memoryview(mapped))
            for name in names:
                info = header.get(name)
                if info is None:
                    raise ModelNotFoundError(
                        f"{str(file)!r} lacks tensor {name!r} listed in {INDEX}; download the model again."
                    )
                begin, end = (data_start + int(offset) for offset in info["data_offsets"])
                tensor_digest = hashlib.sha256()
                for chunk_start in range(begin, end, 1 << 26):  # 64 MiB chunks keep huge tensors streaming
                    assert view is not None
                    with view[chunk_start : min(end, chunk_start + (1 << 26))] as chunk:
                        tensor_digest.update(chunk)
                entries[name] = (str(info["dtype"]), [int(d) for d in info["shape"]], tensor_digest.hexdigest())

    for name in sorted(entries):
        dtype, shape, tensor_hash = entries[name]
        digest.update(f"\0tensor\0{name}\0{dtype}\0{shape}\0{tensor_hash}".encode())
    return digest.hexdigest()[:16]


def _atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file and rename, so a concurrent reader never sees half a file."""
    handle = tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=path.name + ".tmp-", delete=False
    )
    try:
        with handle:
            handle.write(text)
        os.replace(handle.name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(handle.name)
        raise
