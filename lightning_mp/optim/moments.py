"""The dtypes an optimizer keeps its moments in, and moments carried between them through checkpoints.

``torch.float32``, ``torch.bfloat16`` (updated with stochastic rounding) or :data:`EIGHT_BIT`:
block-wise 8-bit codes with an FP32 scale per block (:mod:`lightning_mp.optim.quant`). A
checkpoint's moments load into any of the three: torch's FP32 ones into 8-bit codes, 8-bit codes
into FP32 moments, and back.
"""

from __future__ import annotations

from typing import Any, Union

import torch
from torch import Tensor

from lightning_mp.optim import quant
from lightning_mp.storage import like, local

EIGHT_BIT = "8bit"  # moment_dtype of block-wise 8-bit moments (lightning_mp.optim.quant)
MomentDtype = Union[torch.dtype, str]
_BY_NAME = {"float32": torch.float32, "bfloat16": torch.bfloat16, EIGHT_BIT: EIGHT_BIT}
_STORED_AS = {EIGHT_BIT: (torch.int8, torch.uint8)}  # the dtypes of a moment_dtype's tensors, where not itself


def moment_dtype_of(value: MomentDtype) -> MomentDtype:
    """``torch.float32``, ``torch.bfloat16`` or ``"8bit"`` from a dtype or its name."""
    found = _BY_NAME.get(value) if isinstance(value, str) else value
    if found not in (torch.float32, torch.bfloat16, EIGHT_BIT):
        raise ValueError(f"moment_dtype must be torch.float32, torch.bfloat16 or '8bit', got {value!r}")
    return found


def stored_dtypes(moment_dtype: MomentDtype) -> tuple[Any, ...]:
    """The dtypes of the tensors that hold moments of ``moment_dtype``."""
    return _STORED_AS.get(moment_dtype, (moment_dtype,))  # type: ignore[arg-type]


def loaded_moment(p: Tensor, key: str, saved: dict[str, Any], moment_dtype: MomentDtype) -> dict[str, Tensor]:
    """Moment ``key`` of parameter ``p`` kept as ``moment_dtype``, from ``saved``, a parameter's
    saved state in any moment dtype: the state entries to set."""
    value, scales = saved[key], saved.get(key + quant.SCALE)
    if scales is not None and moment_dtype == EIGHT_BIT:
        return {key: value.to(p.device), key + quant.SCALE: scales.to(p.device)}
    if scales is not None:  # 8-bit codes into float moments
        value = like(quant.decode(key, local(value), scales).to(p.device), p)
    if moment_dtype != EIGHT_BIT:
        return {key: value.to(device=p.device, dtype=moment_dtype)}
    codes, absmax = quant.zeros(key, p)
    quant.encode_(key, local(value).to(p.device), local(codes), absmax)
    return {key: codes, key + quant.SCALE: absmax}


def decoded_moments(saved: dict[str, Any], keys: tuple[str, ...], p: Tensor) -> dict[str, Any]:
    """``saved``, a sharded parameter ``p``'s state with 8-bit moments, with the moments ``keys``
    decoded into FP32 tensors shaped as ``p``: what torch's distributed checkpoint reshards. They
    encode back to the same codes and scales (quant's round trip)."""
    saved = dict(saved)
    for key in keys:
        saved[key] = like(quant.decode(key, local(saved[key]), saved.pop(key + quant.SCALE)), p)
    return saved
