"""A model's identity in the swarm, and the digests of the blocks a server holds.

*Identity* (:func:`fingerprint`): sha256 over the canonical config (its storage dtype included) and the sorted
names of the checkpoint's tensors. Every peer computes it from config.json and the shard index (or the header of
the one safetensors file) without reading any weights, so the servers of different blocks of one model get the
same model id and find each other, while a copy stored in another dtype, quantized, or of another architecture
gets another id.

*Block digests* (:func:`block_digests`): a server hashes the bytes of the blocks it serves, and only those, and
announces one digest per block; a client never chains servers whose digests for a block disagree (see
routing/copies.py). A digest covers each tensor's name, dtype, shape and bytes, not how the checkpoint is sharded.

Hashing costs about 1 s per 500 MB, so tensor hashes are cached in the folder per shard file (redone when the
file's size or mtime changes), or in memory when the folder is read-only.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import mmap
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Optional

from molink_swarm.errors import ModelNotFoundError
from molink_swarm.models.checkpoint import CONFIG, INDEX, check_files_present, safetensors_header, tensor_files
from molink_swarm.models.progress import byte_bar

logger = logging.getLogger(__name__)

DIGEST_CACHE = ".molink-digests.json"
_DIGEST_CACHE_VERSION = 1
# config.json keys that describe provenance or runtime defaults, not the function the weights compute.
_CONFIG_KEYS_IGNORED = frozenset({"_name_or_path", "_model_name_or_path", "transformers_version", "use_cache"})
# Where transformers writes the dtype the weights are stored in (4.x: torch_dtype, 5.x: dtype).
_DTYPE_KEYS = ("dtype", "torch_dtype")
_HASH_CHUNK = 1 << 26  # 64 MiB: huge tensors are hashed as a stream
_HASH_WORKERS = 4
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Fallback for folders where the digest cache cannot be written (read-only mounts):
# (resolved file, size, mtime_ns, tensor name) -> sha256 of its bytes.
_tensor_hashes_in_process: dict[tuple[str, int, int, str], str] = {}


def fingerprint(folder: Path) -> str:
    """The model's identity (16 hex chars): its config and tensor names; reads no weights."""
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"{str(folder / CONFIG)!r} is unreadable ({e}); download the model again.") from e
    stored_dtype = next((str(config[key]) for key in _DTYPE_KEYS if config.get(key) is not None), "")
    config = {k: v for k, v in config.items() if k not in _CONFIG_KEYS_IGNORED and k not in _DTYPE_KEYS}
    digest = hashlib.sha256(b"molink-identity-v2\0config\0")
    digest.update(json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode())
    digest.update(b"\0dtype\0" + stored_dtype.removeprefix("torch.").encode())
    for name in sorted(tensor_files(folder)):
        digest.update(b"\0tensor\0" + name.encode())
    return digest.hexdigest()[:16]


def block_digests(
    folder: Path, blocks: Mapping[int, Iterable[str]], *, progress: bool = False, model_name: Optional[str] = None
) -> dict[int, str]:
    """block index -> digest (16 hex chars) of the named tensors of each block: their names, dtypes, shapes and
    bytes. Opens only the shards that hold these tensors and reads only their bytes (memory-mapped, streamed).
    ``model_name`` is for the progress bar."""
    blocks = {index: sorted(set(names)) for index, names in blocks.items()}
    files = tensor_files(folder)
    wanted = sorted({name for names in blocks.values() for name in names})
    unknown = [name for name in wanted if name not in files]
    if unknown:
        raise KeyError(f"tensor(s) not in checkpoint {folder}: {', '.join(unknown[:5])}")
    check_files_present(folder, {files[name] for name in wanted})

    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(files[name], []).append(name)
    cache = _read_cache(folder)
    entries: dict[str, tuple[str, list[int], str]] = {}  # name -> (dtype, shape, sha256 of its bytes)
    pending: list[tuple[Path, str, int, int, tuple[str, int, int, str]]] = []
    stats: dict[str, tuple[int, int]] = {}
    for file, names in by_file.items():
        header, data_start = safetensors_header(file)
        stat = file.stat()
        key = _file_key(folder, file)
        stats[key] = (stat.st_size, stat.st_mtime_ns)
        cached = cache.get(key, {})
        cached = cached.get("tensors") if [cached.get("size"), cached.get("mtime_ns")] == list(stats[key]) else {}
        cached = cached if isinstance(cached, dict) else {}
        for name in names:
            try:
                info = header[name]
                begin, end = (data_start + int(offset) for offset in info["data_offsets"])
                dtype, shape = str(info["dtype"]), [int(d) for d in info["shape"]]
            except (KeyError, TypeError, ValueError) as e:
                raise ModelNotFoundError(
                    f"{str(file)!r} lacks tensor {name!r} listed in {INDEX} or describes it wrongly ({e!r}); "
                    "download the model again."
                ) from None
            memo_key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns, name)
            known = cached.get(name) or _tensor_hashes_in_process.get(memo_key)
            entries[name] = (dtype, shape, known if _is_sha256(known) else "")
            if not entries[name][2]:
                pending.append((file, name, begin, end, memo_key))

    if pending:
        hashed = _hash_pending(folder, pending, progress, model_name or folder.name)
        for name, sha in hashed.items():
            dtype, shape, _ = entries[name]
            entries[name] = (dtype, shape, sha)
        _write_cache(folder, stats, {name: entries[name][2] for name in wanted}, files)

    digests = {}
    for index, names in blocks.items():
        digest = hashlib.sha256(b"molink-block-v1")
        for name in names:
            dtype, shape, sha = entries[name]
            digest.update(f"\0{name}\0{dtype}\0{shape}\0{sha}".encode())
        digests[index] = digest.hexdigest()[:16]
    return digests


def _hash_pending(folder: Path, pending: list, progress: bool, name: str) -> dict[str, str]:
    total = sum(end - begin for _file, _name, begin, end, _key in pending)
    started = time.perf_counter()
    hashed: dict[str, str] = {}
    with byte_bar(f"Hashing the weights of {name}", total, enabled=progress) as bar:
        with concurrent.futures.ThreadPoolExecutor(max_workers=_HASH_WORKERS) as pool:  # hashlib releases the GIL
            futures = {
                pool.submit(_hash_tensor, file, begin, end, bar.advance): (name, memo_key)
                for file, name, begin, end, memo_key in pending
            }
            for future in concurrent.futures.as_completed(futures):
                name, memo_key = futures[future]
                hashed[name] = _tensor_hashes_in_process[memo_key] = future.result()
    elapsed = time.perf_counter() - started
    logger.info("Hashed %d tensors (%.0f MB) of %s in %.2f s", len(pending), total / 1e6, folder, elapsed)
    return hashed


def _hash_tensor(file: Path, begin: int, end: int, advance: Callable[[int], None] = lambda nbytes: None) -> str:
    """sha256 of bytes ``begin..end`` of ``file``: memory-mapped and read in chunks, never all in RAM at once."""
    digest = hashlib.sha256()
    if end <= begin:
        return digest.hexdigest()
    with open(file, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            for start in range(begin, end, _HASH_CHUNK):
                with view[start : min(end, start + _HASH_CHUNK)] as chunk:
                    digest.update(chunk)
                    advance(len(chunk))
        finally:
            view.release()
    return digest.hexdigest()


def _file_key(folder: Path, file: Path) -> str:
    return file.relative_to(folder).as_posix()


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and bool(_SHA256.match(value))


def _read_cache(folder: Path) -> dict[str, Any]:
    """file name -> {"size", "mtime_ns", "tensors": {name: sha256}}; empty if missing or corrupt."""
    try:
        cached = json.loads((folder / DIGEST_CACHE).read_text(encoding="utf-8"))
        if cached.get("version") == _DIGEST_CACHE_VERSION and isinstance(cached.get("files"), dict):
            return {name: entry for name, entry in cached["files"].items() if isinstance(entry, dict)}
    except (OSError, ValueError, AttributeError):
        pass  # missing or corrupt cache: hash again
    return {}


def _write_cache(
    folder: Path, stats: dict[str, tuple[int, int]], hashes: dict[str, str], files: dict[str, Path]
) -> None:
    """Merge our hashes (tensor name -> sha256) of the files in ``stats`` (file key -> size, mtime) into the cache
    file, which another server may have added others to meanwhile; losing a race only costs a hash later."""
    cache = _read_cache(folder)
    for file_name, (size, mtime_ns) in stats.items():
        entry = cache.get(file_name, {})
        if [entry.get("size"), entry.get("mtime_ns")] != [size, mtime_ns] or not isinstance(entry.get("tensors"), dict):
            entry = {"size": size, "mtime_ns": mtime_ns, "tensors": {}}
        entry["tensors"].update({n: sha for n, sha in hashes.items() if _file_key(folder, files[n]) == file_name})
        cache[file_name] = entry
    payload = {"version": _DIGEST_CACHE_VERSION, "files": cache}
    try:
        _atomic_write_text(folder / DIGEST_CACHE, json.dumps(payload, indent=1, sort_keys=True))
    except OSError as e:
        logger.debug("Cannot cache tensor hashes in %s (%s); keeping them in memory", folder, e)


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
