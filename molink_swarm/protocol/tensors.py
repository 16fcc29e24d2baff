"""The tensor codec: hidden states as raw bytes with dtype and shape, never pickled, checked field by field before
a byte of the buffer is interpreted.

Wire dtypes (what a sender chooses with ``--wire-dtype`` / ``wire_dtype=``; each message says which it is, so
peers with different settings understand each other):

- ``float32``: dtype float32, compression NONE; 4 bytes per value, exact.
- ``float16``: a float16 tensor as is (float16/NONE); any other through hivemind's FLOAT16 compression
  (float32/FLOAT16: clamped to ±65504, so an outlier arrives finite, not as inf); 2 bytes per value.
- ``bfloat16``: bfloat16/NONE, 2 bytes per value. hivemind sends bfloat16 as float32 unless
  ``USE_LEGACY_BFLOAT16=0`` is set before it is imported, a process setting we should not depend on, so we write
  the 2-byte form ourselves: the bits viewed as int16, the layout hivemind's 2-byte mode writes and its decoder
  reads.
- ``int8``: int8/NONE, per-row absmax. Each row (the last dimension: one token's hidden state) sends its 4
  largest-magnitude values apart, exactly (uint16 index + float32 value), and the rest as ``q = round(x / s)``
  in -127..127 with ``s = absmax(rest) / 127``, one bfloat16 ``s`` per row. Buffer: all q (int8), then the
  scales, then the outlier indices, then their values. For SmolLM2 (576 wide): 602 bytes per token, 0.26 of
  float32.
- ``auto``: the tensor's own dtype; a float32 server stays exact, a 16-bit one sends 16 bits.

Why int8 is built this way: hivemind's 8-bit codecs do not fit (UNIFORM_8BIT and QUANTILE_8BIT carry a 1 KiB
codebook per tensor, more than a decode step's payload; BLOCKWISE_8BIT needs bitsandbytes and 4096-value blocks
that straddle rows). Llama-style residual streams have a few channels far above the rest (in SmolLM2's middle
layer a row's largest value is typically 13 standard deviations out, and up to 24890): with one scale for the
whole row they would flatten every other value to a few levels (greedy agreement with float32 fell to 0.86 over 64 tokens); sent apart, the 4
largest cost 24 bytes per row and the agreement is 0.98 (benchmarks/bench_wire.py). The scale is bfloat16
rather than float32: half the bytes, float32's range, at most 0.4% coarser steps, and a decoded float32 row
re-encodes to the same bytes (``127 * s`` is exact in float32; barring a near tie between the 4th and 5th
largest values), so an input the client replays after a failover is the one the failed server saw. Error per
non-outlier value: at most absmax(rest) / 254, plus 0.4%.

The receiver casts what it decodes to its own compute dtype (``deserialize_tensor(..., dtype=)``).
"""

from __future__ import annotations

import math
from typing import Literal, Optional, get_args

import numpy as np
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

from molink_swarm.protocol.errors import ProtocolError

WireDtype = Literal["auto", "float32", "float16", "bfloat16", "int8"]
WIRE_DTYPES: tuple[str, ...] = get_args(WireDtype)

MAX_TENSOR_BYTES = 512 * 2**20
_NONE, _FLOAT16 = runtime_pb2.CompressionType.NONE, runtime_pb2.CompressionType.FLOAT16
# (proto dtype, compression) -> bytes per element on the wire; int8 adds a scale and outliers per row.
_CODECS = {
    ("float32", _NONE): 4,
    ("float16", _NONE): 2,
    ("bfloat16", _NONE): 2,
    ("float32", _FLOAT16): 2,
    ("int8", _NONE): 1,
}
_DTYPES = {dtype for dtype, _ in _CODECS}
_COMPRESSIONS = {compression for _, compression in _CODECS}
# int8 rows: their _OUTLIERS largest values travel apart (uint16 index, float32 value), the rest share one
# bfloat16 scale; an index must fit in uint16.
_OUTLIERS, _MAX_INT8_ROW = 4, 2**16
_SCALE_BYTES, _OUTLIER_BYTES = 2, 2 + 4


def resolve_wire_dtype(wire_dtype: str, compute_dtype: torch.dtype) -> str:
    """The wire dtype ``wire_dtype`` means for tensors of ``compute_dtype`` (``auto``: the compute dtype)."""
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire dtype {wire_dtype!r} is not one of {', '.join(WIRE_DTYPES)}")
    if wire_dtype != "auto":
        return wire_dtype
    return str(compute_dtype).removeprefix("torch.")


def serialize_tensor(tensor: torch.Tensor, wire_dtype: WireDtype = "auto") -> runtime_pb2.Tensor:
    tensor = tensor.detach().cpu()
    wire = resolve_wire_dtype(wire_dtype, tensor.dtype)
    if wire == "int8":
        return _int8_rowwise(tensor)
    if wire == "bfloat16":
        bits = tensor.to(torch.bfloat16).contiguous().view(torch.int16)
        return runtime_pb2.Tensor(buffer=bits.numpy().tobytes(), size=tensor.shape, dtype="bfloat16", compression=_NONE)
    if wire == "float16" and tensor.dtype != torch.float16:
        # hivemind's FLOAT16 compression clamps to the float16 range: an outlier arrives finite, not as inf.
        return serialize_torch_tensor(tensor.float(), _FLOAT16)
    if wire not in ("float32", "float16"):
        raise ValueError(f"cannot send {tensor.dtype} tensors as {wire}")
    return serialize_torch_tensor(tensor.to(getattr(torch, wire)), _NONE)


def _int8_rowwise(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    values = tensor.float()
    width = values.shape[-1]
    if width > _MAX_INT8_ROW:
        raise ValueError(f"int8 rows are at most {_MAX_INT8_ROW} wide, not {width}")
    index = values.abs().topk(min(_OUTLIERS, width), dim=-1).indices.sort(dim=-1).values
    outliers = values.gather(-1, index)
    rest = values.scatter(-1, index, 0.0)
    absmax = rest.abs().amax(dim=-1, keepdim=True)
    # Rounded to the nearest bfloat16 (within 2^-8), the row's absmax still quantizes to ±127 (clamped where the
    # scale came out low): the row decodes with absmax exactly 127 * scale, which re-encodes to the same scale.
    scale = (absmax / 127).to(torch.bfloat16)
    # A row with inf or NaN decodes to NaN (a NaN scale), so the receiver refuses it as it would in float32.
    scale = torch.where(torch.isfinite(absmax), scale, torch.full_like(scale, torch.nan))
    divisor = torch.where(scale > 0, scale.float(), torch.ones_like(absmax))  # an all-zero row: q = 0, s = 0
    quantized = torch.round(rest / divisor).nan_to_num_(0.0).clamp_(-127, 127).to(torch.int8)
    sections = (quantized, scale.view(torch.int16), index.to(torch.int32).numpy().astype(np.uint16), outliers)
    buffer = b"".join(section if isinstance(section, np.ndarray) else section.numpy() for section in sections)
    return runtime_pb2.Tensor(buffer=buffer, size=tensor.shape, dtype="int8", compression=_NONE)


def deserialize_tensor(
    proto: runtime_pb2.Tensor, *, dtype: Optional[torch.dtype] = None, max_bytes: int = MAX_TENSOR_BYTES
) -> torch.Tensor:
    """Checks every field of ``proto`` (see :func:`check_tensor`), decodes it, and casts it to ``dtype`` (the
    receiver's compute dtype; None: as decoded)."""
    check_tensor(proto, max_bytes=max_bytes)
    tensor = _from_int8_rowwise(proto) if proto.dtype == "int8" else deserialize_torch_tensor(proto)
    return tensor if dtype is None else tensor.to(dtype)


def _from_int8_rowwise(proto: runtime_pb2.Tensor) -> torch.Tensor:
    width = proto.size[-1]
    rows, k = math.prod(proto.size) // width, min(_OUTLIERS, width)
    sections, offset = [], 0
    for numpy_dtype, count in ((np.int8, rows * width), (np.int16, rows), (np.uint16, rows * k), (np.float32, rows * k)):
        sections.append(np.frombuffer(proto.buffer, dtype=numpy_dtype, count=count, offset=offset).copy())
        offset += sections[-1].nbytes
    quantized, scale, index, outliers = sections
    index = torch.from_numpy(index.astype(np.int64)).reshape(rows, k)
    if (index >= width).any():
        raise ProtocolError(f"int8 tensor names an outlier beyond its rows' {width} values")
    tensor = torch.from_numpy(quantized).reshape(rows, width).float()
    tensor *= torch.from_numpy(scale).view(torch.bfloat16).float().reshape(rows, 1)
    tensor.scatter_(-1, index, torch.from_numpy(outliers).reshape(rows, k))
    return tensor.reshape(*proto.size)


def check_tensor(proto: runtime_pb2.Tensor, *, max_bytes: int = MAX_TENSOR_BYTES) -> None:
    """Refuses a tensor whose dtype, compression, shape or buffer size is not exactly what one of our codecs
    writes (nothing else is ever decoded)."""
    if proto.dtype not in _DTYPES:
        raise ProtocolError(f"Unsupported tensor dtype {proto.dtype!r}; expected one of {sorted(_DTYPES)}")
    if proto.compression not in _COMPRESSIONS:
        raise ProtocolError(f"Unsupported tensor compression {proto.compression}")
    itemsize = _CODECS.get((proto.dtype, proto.compression))
    if itemsize is None:
        raise ProtocolError(f"16-bit compression applies to float32 tensors, not {proto.dtype}")
    if not 1 <= len(proto.size) <= 4:
        raise ProtocolError(f"Tensor rank {len(proto.size)} is not supported")
    if any(dim <= 0 for dim in proto.size):
        raise ProtocolError(f"Tensor of shape {list(proto.size)} is empty")
    numel = math.prod(proto.size)
    # Bounds what decoding may allocate: at most float32 values, whatever the wire carries.
    if numel * 4 > max_bytes:
        raise ProtocolError(f"Tensor of shape {list(proto.size)} exceeds the {max_bytes} byte limit")
    expected = numel * itemsize
    if proto.dtype == "int8":
        width = proto.size[-1]
        if width > _MAX_INT8_ROW:
            raise ProtocolError(f"int8 rows are at most {_MAX_INT8_ROW} values wide, not {width}")
        expected += numel // width * (_SCALE_BYTES + min(_OUTLIERS, width) * _OUTLIER_BYTES)
    if len(proto.buffer) != expected:
        raise ProtocolError(
            f"Tensor buffer holds {len(proto.buffer)} bytes, shape/dtype ({proto.dtype}) need {expected}"
        )
    if proto.requires_grad:
        raise ProtocolError("Tensors with requires_grad are not accepted")


def wire_bytes(tensor: runtime_pb2.Tensor) -> tuple[int, int]:
    """(payload bytes, tokens) of serialized hidden states (tokens: every position of every sequence)."""
    return len(tensor.buffer), math.prod(tensor.size[:-1])


def wire_dtype_of(tensor: runtime_pb2.Tensor) -> str:
    """The wire dtype a (checked) tensor was sent as: float32, float16, bfloat16 or int8."""
    if tensor.compression == _FLOAT16:
        return "float16"
    return tensor.dtype
