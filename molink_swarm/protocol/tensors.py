"""The tensor codec: hidden states as raw bytes with dtype and shape, never pickled, checked field by field before
a byte of the buffer is interpreted.

Wire dtypes (what a sender chooses with ``--wire-dtype`` / ``wire_dtype=``; each message says which it is, so
peers with different settings understand each other):

============  ==============================  ==================  =============================================
wire dtype    proto ``dtype``/``compression``  bytes per element   notes
============  ==============================  ==================  =============================================
``float32``   float32 / NONE                  4                   exact
``float16``   float16 / NONE                  2                   a float16 tensor as is
``float16``   float32 / FLOAT16               2                   hivemind's float16 compression of any other
                                                                  tensor (clamped to ±65504, never inf)
``bfloat16``  bfloat16 / NONE                 2                   the bits viewed as int16 (see below)
``int8``      int8 / NONE                     1 + 2 per row       per-row absmax: int8 values, then one bfloat16
                                                                  scale per last-dim row
============  ==============================  ==================  =============================================

``auto`` sends the tensor's own dtype: a float32 server stays exact, a 16-bit one sends 16 bits.

bfloat16: hivemind sends it as float32 unless ``USE_LEGACY_BFLOAT16=0`` is set before it is imported, a process
setting we should not depend on, so we write the 2-byte form ourselves (the same layout hivemind's 2-byte mode
writes and its decoder reads: the bits viewed as int16).

int8: every row ``x`` (the last dimension: one token's hidden state) becomes ``q = round(x / s)`` in -127..127
with ``s = absmax(x) / 127``. hivemind's 8-bit codecs do not fit: UNIFORM_8BIT and QUANTILE_8BIT have one
1 KiB codebook per tensor (more than a decode step's int8 payload), BLOCKWISE_8BIT needs bitsandbytes and
4096-element blocks that straddle rows. The scale is bfloat16 rather than float32: half the overhead, float32's
range (a float16 scale would clip rows above ~8e6 and lose precision below ~0.008), at most 0.4% coarser steps,
and re-encoding a decoded float32 row gives back the same bytes (``127 * s`` is exact in float32), so an input the
client replays after a failover is the one the failed server saw. Error bound per element: absmax(row) / 254,
plus 0.4%.

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
# (proto dtype, compression) -> bytes per element on the wire; int8 adds a bfloat16 scale per row.
_CODECS = {
    ("float32", _NONE): 4,
    ("float16", _NONE): 2,
    ("bfloat16", _NONE): 2,
    ("float32", _FLOAT16): 2,
    ("int8", _NONE): 1,
}
_DTYPES = {dtype for dtype, _ in _CODECS}
_COMPRESSIONS = {compression for _, compression in _CODECS}
_SCALE_BYTES = 2  # one bfloat16 per row


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
    absmax = values.abs().amax(dim=-1, keepdim=True)
    # Rounded to the nearest bfloat16 (within 2^-8), the row's absmax still quantizes to ±127 (clamped where the
    # scale came out low): the row decodes with absmax exactly 127 * scale, which re-encodes to the same scale.
    scale = (absmax / 127).to(torch.bfloat16)
    # A row with inf or NaN decodes to NaN (a NaN scale), so the receiver refuses it as it would in float32.
    scale = torch.where(torch.isfinite(absmax), scale, torch.full_like(scale, torch.nan))
    divisor = torch.where(scale > 0, scale.float(), torch.ones_like(absmax))  # an all-zero row: q = 0, s = 0
    quantized = torch.round(values / divisor).nan_to_num_(0.0).clamp_(-127, 127).to(torch.int8)
    return runtime_pb2.Tensor(
        buffer=quantized.numpy().tobytes() + scale.view(torch.int16).numpy().tobytes(), size=tensor.shape, dtype="int8", compression=_NONE
    )


def deserialize_tensor(
    proto: runtime_pb2.Tensor, *, dtype: Optional[torch.dtype] = None, max_bytes: int = MAX_TENSOR_BYTES
) -> torch.Tensor:
    """Checks every field of ``proto`` (see :func:`check_tensor`), decodes it, and casts it to ``dtype`` (the
    receiver's compute dtype; None: as decoded)."""
    check_tensor(proto, max_bytes=max_bytes)
    if proto.dtype == "int8":
        numel = math.prod(proto.size)
        buffer = proto.buffer
        quantized = torch.from_numpy(np.frombuffer(buffer, dtype=np.int8, count=numel).copy())
        scale = torch.from_numpy(np.frombuffer(buffer, dtype=np.int16, offset=numel).copy()).view(torch.bfloat16)
        tensor = quantized.reshape(*proto.size[:-1], proto.size[-1]).float() * scale.float().reshape(*proto.size[:-1], 1)
    else:
        tensor = deserialize_torch_tensor(proto)
    return tensor if dtype is None else tensor.to(dtype)


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
        expected += numel // proto.size[-1] * _SCALE_BYTES
    if len(proto.buffer) != expected:
        raise ProtocolError(
            f"Tensor buffer holds {len(proto.buffer)} bytes, shape/dtype ({proto.dtype}) need {expected}"
        )
    if proto.requires_grad:
        raise ProtocolError("Tensors with requires_grad are not accepted")


def wire_bytes(tensor: runtime_pb2.Tensor) -> tuple[int, int]:
    """(payload bytes, tokens) of serialized hidden states (tokens: every position of every sequence)."""
    return len(tensor.buffer), math.prod(tensor.size[:-1])
