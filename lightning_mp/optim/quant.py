"""8-bit Adam moments: block-wise scaled 8-bit floating-point codes.

Each tensor's moments are cut, from its first element (a shard's first element under FSDP2),
into blocks of :data:`BLOCK` elements. A block keeps one FP32 scale, its largest magnitude, and
per element an 8-bit code of the element over that scale, a number in [0, 1]:

- ``exp_avg`` (signed, ``int8``): sign and a 7-bit minifloat of ``|m| / absmax``, 4 exponent
  bits (bias 15) and 3 mantissa bits: relative spacing 1/8, values down to 2**-17 of the block's
  largest (subnormals), then 0;
- ``exp_avg_sq`` (never negative, ``uint8``): an 8-bit minifloat of ``v / absmax``, 5 exponent
  bits (bias 31) and 3 mantissa bits: values down to 2**-33, i.e. ``sqrt(v)`` (what Adam divides
  by) down to 2**-16.5 of the block's largest, with about half ``v``'s relative error. Companding ``v`` by
  its exponent keeps the small second moments that a linear code would flush to zero (a zero
  ``v`` beside a non-zero ``m`` makes an update of ``m / eps``).

Rounding is to the nearest code, ties to the even code (the code of a value is the FP32 value
rounded to 3 mantissa bits, as a float8 cast): deterministic, with a relative error of at most
1/16 (``m`` and ``v``; about 1/32 of ``sqrt(v)``) above the subnormal codes. A step decodes the stored moments, updates them in FP32, steps the weight
with the FP32 moments (as bitsandbytes does) and encodes them again. The largest element of a
block encodes exactly (code of 1.0), so decoding and encoding again gives back the same codes and
scales: a checkpoint holding decoded FP32 moments resumes bit-exactly.

These functions are the eager path and the reference of the C++ kernel (``kernels/step.cpp``),
which does the same arithmetic per element.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_mp.storage import local

BLOCK = 256
MANTISSA = 3
# (code dtype, exponent bias) per moment
CODES = {"exp_avg": (torch.int8, 15), "exp_avg_sq": (torch.uint8, 31)}
SCALE = "_absmax"  # state key suffix of a moment's block scales: "exp_avg_absmax", "exp_avg_sq_absmax"


def blocks(numel: int) -> int:
    """Blocks (scales) of a tensor of ``numel`` elements."""
    return math.ceil(numel / BLOCK)


def _value(codes: Tensor, bias: int) -> Tensor:
    """The value (FP32) of each code (int32, >= 0) of a minifloat with ``bias``, over a scale of 1."""
    sub = codes.float() * 2.0 ** (1 - bias - MANTISSA)
    normal = ((codes + ((127 - bias) << MANTISSA)) << (23 - MANTISSA)).view(torch.float32)
    return torch.where(codes < (1 << MANTISSA), sub, normal)


def _encode(u: Tensor, bias: int) -> Tensor:
    """The code (int32) of each FP32 ``u`` in [0, 1]: round to 3 mantissa bits, nearest even."""
    bits = u.view(torch.int32)
    normal = ((bits + ((1 << (22 - MANTISSA)) - 1) + ((bits >> (23 - MANTISSA)) & 1)) >> (23 - MANTISSA)) - (
        (127 - bias) << MANTISSA)
    sub = torch.round(u * 2.0 ** (bias - 1 + MANTISSA)).to(torch.int32)  # (round: half to even)
    return torch.where(u < 2.0 ** (1 - bias), sub, normal)


def _padded(t: Tensor) -> Tensor:
    """Flat ``t`` as rows of a block each, the last padded with zeros."""
    flat = t.reshape(-1)
    return F.pad(flat, (0, (-flat.numel()) % BLOCK)).view(-1, BLOCK)


def decode(key: str, codes: Tensor, absmax: Tensor) -> Tensor:
    """The FP32 moment ``key`` (``"exp_avg"`` or ``"exp_avg_sq"``) from its codes and block scales.
    (Plain torch ops: the ``torch.compile``'d step uses it too.)"""
    _, bias = CODES[key]
    c = _padded(codes.to(torch.int32))
    values = _value(c.abs(), bias) * absmax[:, None]
    if key == "exp_avg":
        values = torch.where(c < 0, -values, values)
    return values.view(-1)[: codes.numel()].view(codes.shape)


def encode_(key: str, values: Tensor, codes: Tensor, absmax: Tensor) -> None:
    """Write FP32 ``values`` of moment ``key`` into ``codes`` and ``absmax`` (in place)."""
    dtype, bias = CODES[key]
    x = _padded(values.float())
    scale = x.abs().amax(dim=1)
    # times the reciprocal (a multiply is cheaper than a division in the kernel): the largest
    # element's u is within an ulp of 1, whose code is 1.0's
    inv = 1.0 / torch.where(scale > 0, scale, torch.ones_like(scale))
    u = x.abs() * inv[:, None]
    c = _encode(u, bias)
    if key == "exp_avg":
        c = torch.where(x < 0, -c, c)
    absmax.copy_(scale)
    codes.view(-1).copy_(c.view(-1)[: codes.numel()].to(dtype))


def zeros(key: str, like: Tensor) -> tuple[Tensor, Tensor]:
    """Codes shaped (and, for a DTensor, sharded) as ``like``, and the block scales of its local
    elements, of a zero moment."""
    dtype, _ = CODES[key]
    return torch.zeros_like(like, dtype=dtype), torch.zeros(blocks(local(like).numel()), device=like.device)


def is_quantized(state: dict) -> bool:
    """Whether a parameter's optimizer state holds 8-bit moments."""
    return any(key + SCALE in state for key in CODES)
