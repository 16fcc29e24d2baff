"""Downloading a model from the Hugging Face Hub, where the machine can reach it (tests stand in a local server).

Only what a peer needs comes down: first the small files every peer reads (config, tokenizer, generation config,
the shard index); then, when a server knows its blocks or a client its embeddings and head, the shards that hold
those tensors (:func:`~molink_swarm.models.checkpoint.fetch_tensors`). A checkpoint in one file without an index
is needed whole by everyone and comes down at once. Files go into the hub's usual cache (``HF_HUB_CACHE``), one
snapshot folder per commit, so a later start finds them there. ``HF_ENDPOINT`` names a mirror.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from molink_swarm.errors import ModelNotFoundError
from molink_swarm.models.checkpoint import CONFIG, INDEX
from molink_swarm.models.progress import ByteProgress, byte_bar

logger = logging.getLogger(__name__)

# The small files every peer reads: never weights.
METADATA_PATTERNS = (
    CONFIG,
    "generation_config.json",
    INDEX,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
_POLL_S = 0.25


def download(repo_id: str, fallback: str, *, progress: bool = False) -> tuple[Path, str]:
    """Download the metadata of ``org/name`` (and its weights only if they are one file without an index) unless
    the hub is switched off; ``fallback`` says what to do instead. Returns the snapshot folder and its commit."""
    _check_online(f"{repo_id!r} is not a local folder or .gguf file, and", "it from the Hugging Face Hub", fallback)
    try:
        commit, sizes = _list_files(repo_id, revision=None)
        root = [name for name in sizes if "/" not in name]
        wanted = [name for name in root if any(fnmatch.fnmatchcase(name, p) for p in METADATA_PATTERNS)]
        if CONFIG not in wanted:
            raise ModelNotFoundError(f"{repo_id!r} on the Hugging Face Hub has no config.json; {fallback}.")
        if INDEX not in wanted:  # no index says which file holds which tensor: every peer needs them all
            wanted += [name for name in root if name.endswith(".safetensors")]
        return _download(repo_id, commit, {name: sizes[name] for name in wanted}, progress), commit
    except ModelNotFoundError:
        raise
    except Exception as e:
        raise _download_error(repo_id, e, fallback) from e


def download_files(repo_id: str, revision: str, filenames: list[str], *, progress: bool = False) -> None:
    """Download these files of ``org/name`` at commit ``revision`` into its snapshot folder."""
    fallback = "pass a local Hugging Face folder that holds them"
    what = f"{len(filenames)} shard(s) of {repo_id!r} are not downloaded yet ({', '.join(filenames[:3])}), and"
    _check_online(what, "them", fallback)
    try:
        _commit, sizes = _list_files(repo_id, revision=revision)
        _download(repo_id, revision, {name: sizes.get(name, 0) for name in filenames}, progress)
    except Exception as e:
        raise _download_error(repo_id, e, fallback) from e


def _check_online(what: str, download_what: str, fallback: str) -> None:
    offline = os.environ.get("HF_HUB_OFFLINE", "")
    if offline.upper() in {"1", "ON", "YES", "TRUE"}:
        raise ModelNotFoundError(f"{what} HF_HUB_OFFLINE={offline} forbids downloading {download_what}; {fallback}.")


def _download_error(repo_id: str, error: Exception, fallback: str) -> ModelNotFoundError:
    logger.debug("Hub download of %s failed", repo_id, exc_info=True)
    reason = " ".join(f"{type(error).__name__}: {error}".split())[:200]
    return ModelNotFoundError(f"Cannot download {repo_id!r} from the Hugging Face Hub ({reason}); {fallback}.")


def _endpoint() -> Optional[str]:
    """``HF_ENDPOINT`` as it is now (huggingface_hub reads it once, when it is imported)."""
    return os.environ.get("HF_ENDPOINT") or None


def _list_files(repo_id: str, revision: Optional[str]) -> tuple[str, dict[str, int]]:
    """The commit of ``revision`` (default: the main branch) and the size of every file in it."""
    from huggingface_hub import HfApi

    info = HfApi(endpoint=_endpoint()).model_info(repo_id, revision=revision, files_metadata=True)
    return str(info.sha), {sibling.rfilename: int(sibling.size or 0) for sibling in info.siblings or []}


def _download(repo_id: str, commit: str, files: dict[str, int], progress: bool) -> Path:
    """Download ``files`` (name -> size) of one commit, one after the other, under one progress bar in bytes."""
    from huggingface_hub import hf_hub_download

    total = sum(files.values())
    logger.info("Downloading %d file(s) of %s (%.1f MB): %s", len(files), repo_id, total / 1e6, ", ".join(files))
    folder: Optional[Path] = None
    with byte_bar(f"Downloading {repo_id}", total, enabled=progress) as bar, _hub_bars_hidden(progress):
        done = 0
        for name, size in files.items():
            with _watch_partial_download(repo_id, bar, done, enabled=progress):
                path = Path(hf_hub_download(repo_id, name, revision=commit, endpoint=_endpoint()))
            done += size
            bar.update(done)
            folder = path.parents[len(Path(name).parts) - 1]
    assert folder is not None
    return folder.resolve()


@contextlib.contextmanager
def _hub_bars_hidden(hidden: bool) -> Iterator[None]:
    """Hide huggingface_hub's own tqdm bars while ours is shown (and restore them after)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if not hidden or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


@contextlib.contextmanager
def _watch_partial_download(repo_id: str, bar: ByteProgress, done: int, *, enabled: bool) -> Iterator[None]:
    """Move the bar as the file being downloaded grows (the hub writes it to ``blobs/*.incomplete`` first)."""
    if not enabled:
        yield
        return
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    blobs = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "blobs"
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(_POLL_S):
            partial = 0
            with contextlib.suppress(OSError):
                partial = sum(entry.stat().st_size for entry in blobs.glob("*.incomplete"))
            bar.update(done + partial)

    watcher = threading.Thread(target=watch, name="download-progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
