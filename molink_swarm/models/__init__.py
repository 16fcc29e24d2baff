"""Models: resolve ``--model`` to local safetensors, read only the tensors needed, and adapt each family's blocks."""

from molink_swarm.models.checkpoint import read_tensors, tensor_names
from molink_swarm.models.resolve import DEFAULT_MODEL_ALIAS, GEMMA3_ALIAS, load_config, resolve_model
from molink_swarm.models.source import ModelSource

__all__ = [
    "DEFAULT_MODEL_ALIAS",
    "GEMMA3_ALIAS",
    "ModelSource",
    "load_config",
    "read_tensors",
    "resolve_model",
    "tensor_names",
]
