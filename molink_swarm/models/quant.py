"""Quantized blocks (``join --quant int8|nf4``): a server keeps the weights of its blocks compact in memory and computes
with them as they are, so a machine holds 4 (int8) to 7 (nf4) times as many float32 blocks.

Applied to blocks after they are built (:func:`quantize_blocks`), whatever their family: every ``nn.Linear`` (and
GPT-2's ``Conv1D``) inside them becomes a :class:`QuantizedLinear`, and the fused 3-D expert weights of transformers'
mixture-of-experts layers become :class:`QuantizedWeight` modules that the experts' own (eager) code indexes one
expert at a time. Norms, embeddings, biases and routers keep their dtype: they are small, and a router's choice of
experts must not flip.

- ``int8``: one int8 per weight and one scale per output row (absmax / 127). Small batches (decode steps) run
  through torch's weight-only int8 kernel (``aten._weight_int8pack_mm``), which reads the int8 weights directly; on
  x86 CPUs only its bfloat16 path is vectorized, so activations pass through it in bfloat16 (the other paths are
  scalar loops, several times slower than a float32 matmul). On CUDA, torch's kernel computes in float32. Larger
  batches (prompts), and devices without the kernel, convert the weight on the fly for the dense matmul.
- ``nf4``: 4-bit NormalFloat (QLoRA): two codes per byte, one float16 absmax per block of 32 weights, so 4.5 bits
  per weight, as QLoRA's blocks of 64 with float32 absmax, but closer to the weights: on the embedded SmolLM2 (a
  GGUF Q4_1 model, whose blocks are 32 weights) blocks of 64 double the logits' error and garble its answers.
  Dequantized on the fly before each matmul (no fused kernel: slower than float32 on a CPU; memory is what it
  saves).

A quantized block computes other numbers than the original one, so the quantization is part of the block's identity:
:func:`quantized_digest` derives the digest a server announces (routing/copies.py never chains two copies of a block
whose digests differ, and keeps one quantization per chain).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import platform
import re
from typing import TYPE_CHECKING, Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from molink_swarm.models.family import BlockSpan

logger = logging.getLogger(__name__)

QuantMode = Literal["none", "int8", "nf4"]
QUANT_MODES: tuple[str, ...] = ("none", "int8", "nf4")

# What the digest of a quantized block commits to: change the string when a scheme computes other numbers.
_SCHEMES = {"int8": "int8/absmax-per-row/v1", "nf4": "nf4/float16-absmax-per-32/v1"}

NF4_BLOCK = 32
# The 16 levels of 4-bit NormalFloat (Dettmers et al., QLoRA, 2023): quantiles of a standard normal, scaled to [-1, 1].
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635, -0.18477343022823334,
    -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# Batches of up to this many rows (tokens) go through the int8 kernel; it reads the weights once per few rows, so a
# dense matmul on the dequantized weight is faster for prompts (benchmarks/bench_quant.py measures both).
INT8_KERNEL_MAX_ROWS = 32

# Linear layers that stay as they are: routers (a flipped expert choice costs more than their few bytes save).
_KEPT = re.compile(r"(^|\.)(gate|router|shared_expert_gate)$")


def check_quant_mode(mode: str) -> QuantMode:
    if mode not in QUANT_MODES:
        raise ValueError(f"quantization {mode!r} is not one of {', '.join(QUANT_MODES)}")
    return mode  # type: ignore[return-value]


def quantized_digest(digest: str, mode: str) -> str:
    """The digest a server announces for a block whose weights have ``digest`` (fingerprint.block_digests), served
    with quantization ``mode``: the same for ``none``, another one (16 hex chars) for each scheme."""
    if check_quant_mode(mode) == "none":
        return digest
    return hashlib.sha256(f"molink-quant\0{_SCHEMES[mode]}\0{digest}".encode()).hexdigest()[:16]


def bytes_per_weight(mode: str, itemsize: int) -> float:
    """Memory per weight of a linear layer (scales included, for the usual sizes): to estimate how many blocks fit."""
    return {"none": float(itemsize), "int8": 1.0 + 4 / 512, "nf4": 0.5 + 2 / NF4_BLOCK}[check_quant_mode(mode)]


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (a tensor shared by several modules counted once)."""
    seen, total = set(), 0
    for tensor in [*module.parameters(), *module.buffers()]:
        key = (tensor.data_ptr(), tensor.device, tensor.shape)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


# ---- quantized weights


class QuantizedWeight(nn.Module):
    """A weight tensor kept quantized; ``weight[i]`` (an expert) or :meth:`dequantize` give it back in ``dtype``."""

    def __init__(self, shape: torch.Size, dtype: torch.dtype):
        super().__init__()
        self.shape, self.dtype = torch.Size(shape), dtype

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device

    def dequantize(self) -> torch.Tensor:
        return self[:]

    def __getitem__(self, index) -> torch.Tensor:  # along the first dimension, like the experts' code indexes them
        raise NotImplementedError

    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """``x @ W.T + bias`` for a 2-D weight ``W`` [out, in]."""
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, dtype={self.dtype}"


class Int8Weight(QuantizedWeight):
    """int8 values and one float32 scale (absmax / 127) per row of the last dimension."""

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight.shape, weight.dtype)
        w = weight.detach().float().contiguous()
        scale = (w.abs().amax(dim=-1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        self.register_buffer("qweight", torch.round(w / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self._kernel_scale: dict[torch.dtype, torch.Tensor] = {}

    def __getitem__(self, index) -> torch.Tensor:
        return (self.qweight[index] * self.scale[index].unsqueeze(-1)).to(self.dtype)

    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        rows, features = x.numel() // x.shape[-1], x.shape[-1]
        kernel_dtype = _int8_kernel_dtype(x.device) if rows <= INT8_KERNEL_MAX_ROWS and features % 16 == 0 else None
        if kernel_dtype is None and x.dtype == torch.float16:  # int8 * activations could overflow float16
            return F.linear(x, self[:].to(x.dtype), bias)
        if kernel_dtype is None:  # the scales multiply the output: one pass over the weight less than dequantizing
            out = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
            return out + bias if bias is not None else out
        if kernel_dtype not in self._kernel_scale:
            self._kernel_scale[kernel_dtype] = self.scale.to(kernel_dtype)
        flat = x.reshape(rows, features).to(kernel_dtype).contiguous()
        if flat.data_ptr() % 64:  # the CPU kernel loads rows with aligned vector loads (a tensor read from the wire)
            flat = flat.clone()
        out = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self._kernel_scale[kernel_dtype]).to(x.dtype)
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out + bias if bias is not None else out

    def _apply(self, fn, recurse=True):
        self._kernel_scale = {}  # moved or cast: made again from the new scale
        return super()._apply(fn, recurse)


class Nf4Weight(QuantizedWeight):
    """4-bit NormalFloat codes, two per byte, and one float16 absmax per block of 32 values. Each slice along the
    first dimension of a 3-D weight (an expert) is quantized on its own, so that an expert is dequantized alone."""

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight.shape, weight.dtype)
        groups = weight.detach().float().reshape(weight.shape[0] if weight.dim() == 3 else 1, -1)
        size = groups.shape[1]
        padded = -(-size // NF4_BLOCK) * NF4_BLOCK
        blocks = F.pad(groups, (0, padded - size)).reshape(groups.shape[0], -1, NF4_BLOCK)
        # float16 from the start, so that codes are chosen for the scale they will be multiplied by (a block whose
        # largest weight is below float16's smallest normal number is all but zero anyway).
        absmax = blocks.abs().amax(dim=-1).clamp(min=torch.finfo(torch.float16).tiny).to(torch.float16)
        levels = torch.tensor(NF4_LEVELS, device=weight.device)
        codes = torch.bucketize(blocks / absmax.float().unsqueeze(-1), (levels[1:] + levels[:-1]) / 2).to(torch.uint8)
        codes = codes.reshape(groups.shape[0], -1)
        self.register_buffer("packed", (codes[:, 0::2] << 4) | codes[:, 1::2])
        self.register_buffer("absmax", absmax)
        self.size = size

    def __getitem__(self, index) -> torch.Tensor:
        if len(self.shape) == 2:  # one group: the whole matrix
            return self._dequantize(self.packed, self.absmax).reshape(self.shape)[index]
        packed, absmax = self.packed[index], self.absmax[index]
        return self._dequantize(packed, absmax).reshape(*packed.shape[:-1], *self.shape[1:])

    def _dequantize(self, packed: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
        """[groups, size] in ``dtype`` from their codes [..., padded / 2] and absmax [..., padded / 32]: one lookup
        of both values of each byte, then one multiplication by the blocks' absmax."""
        values = torch.empty(packed.numel(), 2, device=packed.device, dtype=self.dtype)
        torch.index_select(_nf4_pairs(packed.device, self.dtype), 0, packed.reshape(-1).to(torch.int32), out=values)
        blocks = values.view(-1, NF4_BLOCK).mul_(absmax.reshape(-1, 1).to(self.dtype))
        return blocks.view(-1, self.packed.shape[-1] * 2)[:, : self.size]


@functools.lru_cache(maxsize=None)
def _nf4_pairs(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 2]: the two NF4 levels each byte holds (high nibble first), to dequantize a byte in one lookup."""
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32)
    return torch.stack([levels.repeat_interleave(16), levels.repeat(16)], dim=1).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=None)
def _int8_kernel_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The activation dtype to call torch's int8 weight-only kernel with on ``device`` (None: no usable kernel).

    x86 CPUs vectorize only its bfloat16 path; ARM CPUs all of them (float32 then); CUDA computes in float32."""
    if device.type == "cpu":
        dtype = torch.bfloat16 if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86") else torch.float32
    elif device.type == "cuda":
        dtype = torch.float32
    else:
        dtype = None
    if dtype is not None:
        try:  # a build without it (or an older torch) raises; check the answer too
            x = torch.ones(2, 16, device=device, dtype=dtype)
            w = torch.ones(4, 16, device=device, dtype=torch.int8)
            out = torch.ops.aten._weight_int8pack_mm(x, w, torch.full((4,), 0.5, device=device, dtype=dtype))
            if torch.allclose(out.float().cpu(), torch.full((2, 4), 8.0)):
                return dtype
        except (RuntimeError, NotImplementedError, AttributeError) as e:
            logger.debug("int8 kernel unavailable on %s: %r", device, e)
    logger.info("No int8 matmul kernel on %s: int8 weights are dequantized on the fly for every matmul", device)
    return None


_WEIGHTS: dict[str, type[QuantizedWeight]] = {"int8": Int8Weight, "nf4": Nf4Weight}


class QuantizedLinear(nn.Module):
    """Stands for an ``nn.Linear`` (or a GPT-2 ``Conv1D``, transposed) whose weight is kept quantized."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], mode: str):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.qweight = _WEIGHTS[mode](weight)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qweight.linear(x, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# ---- applying it to blocks


@dataclasses.dataclass
class QuantReport:
    mode: str
    linears: int = 0
    experts: int = 0  # 3-D expert weights quantized
    kept: list[str] = dataclasses.field(default_factory=list)  # weights of 2+ dimensions left as they were
    bytes_before: int = 0
    bytes_after: int = 0

    def merge(self, other: "QuantReport") -> "QuantReport":
        return QuantReport(
            self.mode, self.linears + other.linears, self.experts + other.experts, self.kept + other.kept,
            self.bytes_before + other.bytes_before, self.bytes_after + other.bytes_after,
        )


def build_quantized(
    build: Callable[[int, int], "BlockSpan"], start: int, end: int, mode: str, *, blocks_at_once: int = 1
) -> "BlockSpan":
    """Blocks ``start..end-1``, built by ``build(first, last)`` a few at a time and quantized as soon as they are:
    the span never sits in memory at full precision, only ``blocks_at_once`` blocks of it."""
    from molink_swarm.models.family import BlockSpan

    if check_quant_mode(mode) == "none":
        return build(start, end)
    parts, report = [], QuantReport(mode)
    for first in range(start, end, max(1, blocks_at_once)):
        parts.append(build(first, min(end, first + max(1, blocks_at_once))))
        report = report.merge(quantize_blocks(parts[-1], mode))
    log_report(report, f"blocks {start}:{end}")
    return parts[0] if len(parts) == 1 else BlockSpan.join(parts)


@torch.no_grad()
def quantize_blocks(module: nn.Module, mode: str) -> QuantReport:
    """Quantize, in place, the linear layers and fused expert weights inside ``module`` (blocks of any family)."""
    report = QuantReport(check_quant_mode(mode), bytes_before=module_bytes(module))
    if mode == "none":
        report.bytes_after = report.bytes_before
        return report
    from transformers.pytorch_utils import Conv1D

    for name, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            full = f"{name}.{attr}" if name else attr
            if isinstance(sub, (nn.Linear, Conv1D)) and not _KEPT.search(full):
                weight = sub.weight.t() if isinstance(sub, Conv1D) else sub.weight  # Conv1D: [in, out]
                setattr(child, attr, QuantizedLinear(weight, sub.bias, mode))
                report.linears += 1
        for attr, param in list(child.named_parameters(recurse=False)):
            if param.dim() < 3:
                continue
            full = f"{name}.{attr}" if name else attr
            if _is_experts(child):
                delattr(child, attr)
                setattr(child, attr, _WEIGHTS[mode](param))
                child.config._experts_implementation = "eager"  # the code that indexes one expert at a time
                report.experts += 1
            else:
                report.kept.append(f"{full} {tuple(param.shape)}")
    report.bytes_after = module_bytes(module)
    return report


def _is_experts(module: nn.Module) -> bool:
    """A transformers mixture-of-experts layer with fused weights whose eager code takes one expert at a time
    (``weight[expert_idx]``): classes decorated with ``use_experts_implementation``."""
    return hasattr(module, "is_concatenated") and hasattr(getattr(module, "config", None), "_experts_implementation")


def log_report(report: QuantReport, what: str) -> None:
    if report.mode == "none":
        return
    logger.info(
        "Quantized %s to %s: %d linear layers%s, %.1f MB -> %.1f MB",
        what, report.mode, report.linears, f" and {report.experts} expert weights" if report.experts else "",
        report.bytes_before / 1e6, report.bytes_after / 1e6,
    )
    if report.kept:
        more = f" and {len(report.kept) - 3} more" if len(report.kept) > 3 else ""
        logger.info(
            "Kept %d weight tensors of %s unquantized (their layer's code is not one %s knows): %s%s",
            len(report.kept), what, report.mode, ", ".join(report.kept[:3]), more,
        )
