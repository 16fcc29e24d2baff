"""The tensor codec: activations as raw bytes with dtype and shape (hivemind's serialization, which never
unpickles), checked against what we decode before a byte of the buffer is interpreted."""

from __future__ import annotations

import math

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.compression.base import USE_LEGACY_BFLOAT16
from hivemind.proto import runtime_pb2

from molink_swarm.protocol.errors import ProtocolError

MAX_TENSOR_BYTES = 512 * 2**20
# Activations may only travel in these dtypes (the compression issue adds 8-bit codecs). Bytes per element on
# the wire: hivemind sends bfloat16 as float32 unless USE_LEGACY_BFLOAT16=0.
_ALLOWED_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 4 if USE_LEGACY_BFLOAT16 else 2}
_COMPRESSION_BY_NAME = {
    "none": runtime_pb2.CompressionType.NONE,
    "float16": runtime_pb2.CompressionType.FLOAT16,
}


def serialize_tensor(tensor: torch.Tensor, compression: str = "none") -> runtime_pb2.Tensor:
    return serialize_torch_tensor(tensor.detach().cpu(), _COMPRESSION_BY_NAME[compression])


def deserialize_tensor(proto: runtime_pb2.Tensor, *, max_bytes: int = MAX_TENSOR_BYTES) -> torch.Tensor:
    """Checks the declared dtype, shape and byte size before hivemind decodes the buffer."""
    check_tensor(proto, max_bytes=max_bytes)
    return deserialize_torch_tensor(proto)


def check_tensor(proto: runtime_pb2.Tensor, *, max_bytes: int = MAX_TENSOR_BYTES) -> None:
    """Refuses a tensor whose dtype, compression, shape or buffer size is not one we decode."""
    itemsize = _ALLOWED_DTYPES.get(proto.dtype)
    if itemsize is None:
        raise ProtocolError(f"Unsupported tensor dtype {proto.dtype!r}; expected one of {sorted(_ALLOWED_DTYPES)}")
    if proto.compression not in _COMPRESSION_BY_NAME.values():
        raise ProtocolError(f"Unsupported tensor compression {proto.compression}")
    if proto.compression == runtime_pb2.CompressionType.FLOAT16 and proto.dtype != "float32":
        raise ProtocolError(f"16-bit compression applies to float32 tensors, not {proto.dtype}")
    if not 1 <= len(proto.size) <= 4:
        raise ProtocolError(f"Tensor rank {len(proto.size)} is not supported")
    if any(dim <= 0 for dim in proto.size):
        raise ProtocolError(f"Tensor of shape {list(proto.size)} is empty")
    numel = math.prod(proto.size)
    if numel * itemsize > max_bytes:
        raise ProtocolError(f"Tensor of shape {list(proto.size)} exceeds the {max_bytes} byte limit")
    expected = numel * (2 if proto.compression == runtime_pb2.CompressionType.FLOAT16 else itemsize)
    if len(proto.buffer) != expected:
        raise ProtocolError(f"Tensor buffer holds {len(proto.buffer)} bytes, shape/dtype need {expected}")
    if proto.requires_grad:
        raise ProtocolError("Tensors with requires_grad are not accepted")


