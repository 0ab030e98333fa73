"""The step as one ``torch.compile``'d elementwise pass per tensor: Triton on CUDA.

The same arithmetic as the C++ kernel (:mod:`lightning_mp.fused`, which covers CPU tensors) and
the same storage kinds, written with torch ops over a whole tensor and compiled once per (storage
kind, dtypes, flags): sizes are dynamic, and every number that changes between steps (learning
rate, step size, clip factor, noise key) comes in a small tensor, so nothing recompiles per step
or per tensor. ``compile=None`` uses it for CUDA tensors; ``compile=True`` forces it on any device
(on a CPU inductor's C++ does not vectorize int16, so the C++ kernel is faster there).

Bit manipulations (the remainder split, stochastic rounding) work on the FP32 bits as int32, whose
additions wrap as the C++ kernel's do; noise is a 32-bit hash of (key, element index) in int64.
"""

from __future__ import annotations

import os
import shutil
import warnings
from functools import cache
from typing import Callable, Optional

import torch
from torch import Tensor

from lightning_mp import messages
from lightning_mp.optim import quant

_MASK = 0xFFFFFFFF


def _hash32(x: Tensor) -> Tensor:
    """Wellons' lowbias32 on int64 tensors holding 32-bit values (products wrap; the mask keeps 32 bits)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK
    return x ^ (x >> 16)


def _lanes(key: Tensor, first: Tensor, like: Tensor) -> Tensor:
    """32 uniform bits per element of ``like``, from the call's key and each element's index."""
    index = (torch.arange(like.numel(), device=like.device, dtype=torch.int64) + first) & _MASK
    return _hash32(key ^ ((index * 0x9E3779B9) & _MASK)).view(like.shape)


def _round_stochastic(x: Tensor, lane: Tensor) -> Tensor:
    """``x`` (FP32) to bf16, up with probability (low 16 bits) / 2**16: add noise in [-2**15, 2**15)
    to the bits, then split (ties away from zero), as the C++ kernel."""
    b = x.view(torch.int32) + ((lane & 0xFFFF) - 0x8000).to(torch.int32)
    lo = ((b & 0xFFFF) ^ 0x8000) - 0x8000  # the low 16 bits, signed
    return (b - lo).view(torch.float32).to(torch.bfloat16)  # exact: its low 16 bits are zero


def _round_nearest(x: Tensor) -> Tensor:
    """``x`` rounded to the nearest bf16 (ties to even), kept in FP32, on the bits: a compiled
    ``x.to(bfloat16).float()`` may be folded back into ``x``."""
    b = x.view(torch.int32)
    rounded = ((b + 0x7FFF + ((b >> 16) & 1)) & -0x10000).view(torch.float32)
    return torch.where(torch.isnan(x), x, rounded)


def _decode(kind: Optional[str], w: Tensor, s: Optional[Tensor]) -> Tensor:
    if kind is None:
        return w
    if kind == "fp32":
        return s
    if kind == "remainder":
        return ((w.view(torch.int16).to(torch.int32) << 16) + s.to(torch.int32)).view(torch.float32)
    if kind == "kahan":
        return w.float() + s.float()
    return w.float()


def _encode(kind: Optional[str], x: Tensor, w: Tensor, s: Optional[Tensor], lane: Optional[Tensor]) -> None:
    if kind is None:
        w.copy_(x)
    elif kind == "fp32":
        s.copy_(x)
        w.copy_(x)  # round to nearest even
    elif kind == "remainder":  # low 16 bits as signed; the rest, exact, is the bf16 weight (ties away)
        b = x.view(torch.int32)
        lo = ((b & 0xFFFF) ^ 0x8000) - 0x8000
        s.copy_(lo)
        w.copy_((b - lo).view(torch.float32))
    elif kind == "kahan":
        rounded = _round_nearest(x)
        w.copy_(rounded)  # exact
        s.copy_(x - rounded)
    else:
        w.copy_(_round_stochastic(x, lane))


def _grad(g: Tensor, factor: Tensor, clamp: Tensor, maximize: bool) -> Tensor:
    """Unscaled/clipped as the eager path (times the factor, clamped; NaN stays NaN), negated under maximize."""
    g = torch.clamp(g.float() * factor, -clamp, clamp)
    return -g if maximize else g


def _store_moment(m: Tensor, x: Tensor, lane: Optional[Tensor]) -> None:
    m.copy_(x if m.dtype == torch.float32 else _round_stochastic(x, lane))


def _adamw(kind: Optional[str], maximize: bool, w: Tensor, s: Optional[Tensor], g: Tensor, m: Tensor, v: Tensor,
           hf: Tensor, hi: Tensor) -> None:
    factor, clamp, decay, c1, beta2, c2, eps, neg_step, bc2 = hf.unbind(0)
    noisy = kind == "stochastic" or m.dtype != torch.float32
    la = _lanes(hi[0], hi[2], g) if noisy else None
    lb = _lanes(hi[1], hi[2], g) if m.dtype != torch.float32 else None
    grad = _grad(g, factor, clamp, maximize)
    p = _decode(kind, w, s) * decay
    mm = torch.lerp(m.float(), grad, c1)
    vv = v.float() * beta2
    vv = vv + c2 * grad * grad  # addcmul
    d = torch.sqrt(vv) / bc2 + eps
    p = p + neg_step * mm / d  # addcdiv
    _store_moment(m, mm, lb)
    _store_moment(v, vv, None if lb is None else lb >> 16)
    _encode(kind, p, w, s, la)


def _adamw_q8(kind: Optional[str], maximize: bool, w: Tensor, s: Optional[Tensor], g: Tensor, mc: Tensor,
              ms: Tensor, vc: Tensor, vs: Tensor, hf: Tensor, hi: Tensor) -> None:
    """AdamW with 8-bit moments (:mod:`lightning_mp.optim.quant`): decode, step with the FP32
    moments, encode them over each block's new largest magnitude."""
    factor, clamp, decay, c1, beta2, c2, eps, neg_step, bc2 = hf.unbind(0)
    la = _lanes(hi[0], hi[2], g) if kind == "stochastic" else None
    m, v = quant.decode("exp_avg", mc, ms), quant.decode("exp_avg_sq", vc, vs)
    grad = _grad(g, factor, clamp, maximize)
    p = _decode(kind, w, s) * decay
    mm = torch.lerp(m, grad, c1)
    vv = v * beta2
    vv = vv + c2 * grad * grad
    d = torch.sqrt(vv) / bc2 + eps
    p = p + neg_step * mm / d
    quant.encode_("exp_avg", mm, mc, ms)
    quant.encode_("exp_avg_sq", vv, vc, vs)
    _encode(kind, p, w, s, la)


def _sgd(kind: Optional[str], maximize: bool, decays: bool, nesterov: bool, w: Tensor, s: Optional[Tensor], g: Tensor,
         m: Optional[Tensor], hf: Tensor, hi: Tensor) -> None:
    factor, clamp, wd, momentum, keep, neg_lr, fresh = hf.unbind(0)
    la = _lanes(hi[0], hi[2], g) if kind == "stochastic" else None
    p = _decode(kind, w, s)
    grad = _grad(g, factor, clamp, maximize)
    if decays:
        grad = grad + wd * p
    if m is not None:
        buf = torch.where(fresh != 0, grad, m.float() * momentum + keep * grad)
        _store_moment(m, buf, _lanes(hi[1], hi[2], g) if m.dtype != torch.float32 else None)
        grad = grad + momentum * buf if nesterov else buf
    _encode(kind, p + neg_lr * grad, w, s, la)


@cache
def _compiled(op: str, variant: tuple) -> Callable[..., None]:
    """One compiled step per ``variant`` (storage kind, flags, each argument's dtype and rank): dynamo
    then only specializes sizes 0, 1 and the rest, three graphs, under its recompile limit of 8 that
    one shared function with every variant would hit (and, with ``fullgraph``, raise at)."""
    fn = {"adamw": _adamw, "adamw_q8": _adamw_q8, "sgd": _sgd}[op]
    return torch.compile(fn, dynamic=True, fullgraph=True)


_CHECKED: dict[tuple, bool] = {}  # (op, variant, size class) -> whether it compiled and ran


def _key(op: str, args: tuple) -> tuple[str, tuple, int]:
    variant = tuple((a.dtype, a.dim()) if isinstance(a, Tensor) else a for a in args)
    weight = next(a for a in args if isinstance(a, Tensor))
    return op, variant, min(weight.numel(), 2)  # dynamo specializes sizes 0 and 1


def checked(op: str, args: tuple) -> Optional[Callable[..., None]]:
    """The compiled ``op`` for arguments like ``args`` (one tensor's), or ``None`` where it cannot be
    compiled here. A variant's first call compiles it and runs it on copies of the tensors, so a
    compile that fails (a missing host compiler, a Triton error) leaves the optimizer's state
    untouched; the caller then steps with the eager path, after one warning."""
    key = _key(op, args)
    fn = _compiled(op, key[1])
    if key not in _CHECKED:
        try:
            fn(*(a.clone() if isinstance(a, Tensor) else a for a in args))
            _CHECKED[key] = True
        except Exception as err:  # dynamo, inductor and Triton raise many kinds: any failure falls back
            _CHECKED[key] = False
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            warnings.warn(f"lightning-mp: torch.compile could not build the {op} step ({first}); this optimizer "
                          "steps with torch's foreach ops instead", stacklevel=4)
    return fn if _CHECKED[key] else None


def flat(t: Tensor) -> Tensor:
    """A 1-D alias of contiguous ``t``'s elements that is not a view: dynamo guards on a view's base,
    whose shape differs from tensor to tensor (a recompile each), but not on a plain tensor's."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,))


def available(device: torch.device) -> bool:
    """Whether ``torch.compile`` can generate code for ``device`` here: Triton and the host C compiler
    it builds its launchers with on CUDA, a C++ compiler on CPU (a first compile that still fails
    falls back, see :func:`checked`)."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return has_triton() and any(shutil.which(c) for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c)
    if device.type == "cpu":
        from lightning_mp import fused

        try:
            fused.compiler()
        except RuntimeError:
            return False
        return True
    return False


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A step's small host tensor (numbers, keys) on ``device``: on CUDA through pinned memory and
    ``non_blocking``, so the host does not wait for the GPU's queue (a pageable copy would)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def noise_keys(seed: int, counter: int, firsts: list[int], device: torch.device) -> list[Tensor]:
    """Per tensor the int64 row (weight key, moment key, first element), for :func:`_lanes`."""
    key = _mix(seed ^ _mix(counter))
    a, b = key & _MASK, key >> 32
    return list(to_device(torch.tensor([[a, b, f & _MASK] for f in firsts], dtype=torch.int64), device).unbind(0))


def _mix(x: int) -> int:
    """splitmix64's finalizer, on Python ints (the per-call key)."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


REPORTED: set[tuple] = set()  # (optimizer, kind, weight dtype, moment dtype, device) compiled in this process


def report(signature: tuple, seconds: float) -> None:
    """Say once, in one line, what the first compiled step of ``signature`` cost (compiling included)."""
    REPORTED.add(signature)
    name, kind, dtype, moments, device = signature
    what = "FP32 parameters" if kind is None else f"{str(dtype).split('.')[-1]} weights, master={kind!r}"
    messages.info(f"lightning-mp: compiled the {name} step ({what}, {str(moments).split('.')[-1]} moments, {device}) "
                   f"with torch.compile in {seconds:.1f} s (once per kind)")

