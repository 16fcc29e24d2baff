"""Model families, loading and conversion: resolve ``--model`` to local safetensors and read them lazily."""

from molink_swarm.models.source import (
    DEFAULT_MODEL_ALIAS,
    ModelSource,
    load_config,
    read_tensors,
    resolve_model,
    tensor_names,
)

__all__ = [
    "DEFAULT_MODEL_ALIAS",
    "ModelSource",
    "load_config",
    "read_tensors",
    "resolve_model",
    "tensor_names",
]
