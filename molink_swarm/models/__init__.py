"""Models: resolve ``--model`` to local safetensors, fetch and read only the tensors needed, digest the blocks served,
and adapt each family's blocks."""

from molink_swarm.models.checkpoint import fetch_tensors, read_tensors, tensor_names
from molink_swarm.models.fingerprint import block_digests
from molink_swarm.models.resolve import DEFAULT_MODEL_ALIAS, GEMMA3_ALIAS, load_config, resolve_model
from molink_swarm.models.source import ModelSource

__all__ = [
    "DEFAULT_MODEL_ALIAS",
    "GEMMA3_ALIAS",
    "ModelSource",
    "block_digests",
    "fetch_tensors",
    "load_config",
    "read_tensors",
    "resolve_model",
    "tensor_names",
]
