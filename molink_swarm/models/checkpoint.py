"""Reading a Hugging Face safetensors folder lazily: tensor names from the shard index (or headers), and only the
tensors asked for.

A server holds a few layers; it never loads, reads, hashes or downloads the rest of the checkpoint. A folder may
therefore lack the shards of blocks it does not serve (a hub model is downloaded shard by shard, as needed; a
volunteer may copy only its share): only the shards holding the tensors asked for must be there.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from molink_swarm.errors import ModelNotFoundError
from molink_swarm.models.source import ModelSource

if TYPE_CHECKING:
    import torch

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"


def tensor_names(source: ModelSource) -> list[str]:
    """All tensor names in the checkpoint, sorted; reads only safetensors headers / the shard index."""
    return sorted(tensor_files(source.path))


def fetch_tensors(source: ModelSource, names: Iterable[str], *, progress: bool = False) -> None:
    """Make sure the shards holding ``names`` are on disk: a hub model's missing shards are downloaded (only those);
    in a local folder a missing shard is an error that names it."""
    folder = source.path
    files = tensor_files(folder)
    needed = {files[name] for name in ([names] if isinstance(names, str) else names) if name in files}
    missing = sorted(file for file in needed if not file.is_file())
    if not missing:
        return
    if source.repo_id is None or source.revision is None:
        check_files_present(folder, missing)
    from molink_swarm.models import hub

    names_in_repo = [file.relative_to(folder).as_posix() for file in missing]
    hub.download_files(source.repo_id, source.revision, names_in_repo, progress=progress)
    check_files_present(folder, missing)


def check_files_present(folder: Path, files: Iterable[Path]) -> None:
    """Raise :class:`ModelNotFoundError` naming the shards that are not in ``folder``."""
    missing = sorted({file.relative_to(folder).as_posix() for file in files if not file.is_file()})
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ModelNotFoundError(
            f"{str(folder)!r} lacks shard(s) {shown}, which hold weights this peer needs; "
            "copy them there (or download the model again)."
        )


def read_tensors(
    source: ModelSource, names: Iterable[str], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Read only the named tensors, memory-mapped, so a server holding a few layers never loads the rest.

    Returns them in the requested order, cast to ``dtype`` when given. Raises ``KeyError`` naming any tensor the
    checkpoint does not hold, and :class:`ModelNotFoundError` naming any shard that holds them but is not on disk
    (see :func:`fetch_tensors`), before reading anything.
    """
    from safetensors import safe_open

    wanted = [names] if isinstance(names, str) else list(dict.fromkeys(names))
    files = tensor_files(source.path)
    missing = [name for name in wanted if name not in files]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise KeyError(f"tensor(s) not in checkpoint {source.path}: {shown}")

    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(files[name], []).append(name)
    check_files_present(source.path, by_file)
    tensors: dict[str, torch.Tensor] = {}
    for file, file_names in by_file.items():
        with safe_open(str(file), framework="pt") as handle:
            for name in file_names:
                tensor = handle.get_tensor(name)
                if dtype is not None and tensor.dtype != dtype:
                    tensor = tensor.to(dtype)
                tensors[name] = tensor
    return {name: tensors[name] for name in wanted}


def weight_map(folder: Path) -> dict[str, str]:
    try:
        index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelNotFoundError(f"{str(folder / INDEX)!r} is unreadable ({e}); download the model again.") from e
    return {str(name): str(file) for name, file in weight_map.items()}


def tensor_files(folder: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it."""
    if (folder / INDEX).is_file():
        return {name: folder / file for name, file in weight_map(folder).items()}
    files: dict[str, Path] = {}
    for file in sorted(folder.glob("*.safetensors")):
        for name in safetensors_header(file)[0]:
            files[name] = file
    return files


def safetensors_header(file: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """Tensor entries of a safetensors file and the offset where its data starts; reads only the header."""
    try:
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        header.pop("__metadata__", None)
    except (OSError, struct.error, ValueError, AttributeError) as e:
        raise ModelNotFoundError(f"{str(file)!r} is not a readable safetensors file ({e}); download it again.") from e
    return header, 8 + length
