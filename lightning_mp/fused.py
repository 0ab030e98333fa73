"""The fused optimizer step on CPU tensors: one pass per element, built at first use for this CPU.

``kernels/step.cpp`` holds AdamW and SGD for every storage kind (FP32 parameters, FP32 masters
beside 16-bit weights, int16 remainders, Kahan compensations, stochastic rounding), with 16-bit or
FP32 gradients and FP32, bf16 or 8-bit moments (AdamW's 8-bit step written by hand with AVX-512
where the CPU has it, ``kernels/adamw_q8_avx512.h``; :func:`avx512` says which), plus the
one-pass helpers of ``MasterWeightPrecision``'s step (upcast + unscale + inf/NaN check, check,
rounding masters into weights). At the first step
it is compiled with the machine's C++ compiler (``$CXX``, else ``c++``, ``g++`` or ``clang++``)
for this CPU (``-march=native``, OpenMP on torch's own threads) into ``$LIGHTNING_MP_CACHE``
(default ``~/.cache/lightning_mp``), once per source, compiler and CPU; the build time is reported
once, in one line. Without a compiler :mod:`lightning_mp.optim` steps with torch's foreach ops.

Why not ``torch.compile`` on a CPU (CUDA tensors do use it, :mod:`lightning_mp.optim.compiled`):
inductor's CPU code generator does not vectorize int16 (the remainders), so a compiled remainder
step runs as a scalar loop, several times slower than torch's fused FP32 AdamW here
(``benchmarks/optimizer_step.py`` measures it); this kernel runs at memory speed.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import struct
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_mp import messages

F32_PARAM, F32_MASTER, REMAINDER, KAHAN, STOCHASTIC = range(5)
KIND = {"fp32": F32_MASTER, "remainder": REMAINDER, "kahan": KAHAN, "stochastic": STOCHASTIC}
DTYPE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, "8bit": 3}  # "8bit": moments (optim.quant)
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=off", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC", "-pthread"]


class Segment(ctypes.Structure):
    _fields_ = [
        ("w", ctypes.c_void_p), ("s", ctypes.c_void_p), ("g", ctypes.c_void_p), ("m", ctypes.c_void_p),
        ("v", ctypes.c_void_p), ("n", ctypes.c_int64), ("index", ctypes.c_int64), ("a", ctypes.c_float),
        ("b", ctypes.c_float), ("ms", ctypes.c_void_p), ("vs", ctypes.c_void_p),
    ]


class Hyper(ctypes.Structure):
    _fields_ = [(name, ctypes.c_float) for name in (
        "decay", "c1", "beta2", "c2", "eps", "lr", "wd", "momentum", "dampening", "factor", "clamp")] + [
        (name, ctypes.c_int32) for name in (
            "has_decay", "maximize", "has_factor", "has_clamp", "nesterov", "has_momentum")] + [
        ("seed", ctypes.c_uint64), ("counter", ctypes.c_uint64), ("threads", ctypes.c_int32)]


_library: Optional[ctypes.CDLL] = None
_tried = False
_portable: Optional[ctypes.CDLL] = None  # the -DLMP_PORTABLE build, for portable()


def library() -> Optional[ctypes.CDLL]:
    """The compiled kernels (built once per machine), or ``None`` where they cannot be built."""
    global _library, _tried
    if _tried:
        return _library
    _tried = True
    try:
        _library = _load(_build())
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        warnings.warn(f"lightning-mp: the fused optimizer step is not available ({err}); "
                      "lightning_mp.optim steps with torch's foreach ops instead", stacklevel=3)
    return _library


def available() -> bool:
    return library() is not None


@contextlib.contextmanager
def portable() -> Iterator[None]:
    """Within the block, steps run the kernel built with ``-DLMP_PORTABLE`` (the compiler's loops
    everywhere, no hand-written AVX-512): to compare the two builds."""
    global _library, _portable
    saved = library()
    if saved is None:
        raise RuntimeError("the fused step is not available here (no C++ compiler)")
    if _portable is None:  # built (or found in the cache) and loaded once
        _portable = _load(_build(("LMP_PORTABLE",)))
    _library = _portable
    try:
        yield
    finally:
        _library = saved


def avx512() -> bool:
    """Whether the built step runs AdamW's 8-bit moments through its AVX-512 loop (else the portable one)."""
    lib = library()
    return lib is not None and bool(lib.lmp_avx512())


def compiler() -> str:
    """The C++ compiler the kernels are built with: ``$CXX``, else the first of c++, g++, clang++ on the path."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    raise RuntimeError("no C++ compiler found (set CXX)")


def _cpu_flags() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()


def _sources() -> dict[str, bytes]:
    """The kernel's files by name: step.cpp and the headers it includes."""
    root = resources.files("lightning_mp.kernels")
    return {f.name: f.read_bytes() for f in root.iterdir() if f.name.endswith((".cpp", ".h"))}


def _build(defines: Sequence[str] = ()) -> Path:
    """The library built for this CPU (``defines``: extra macros, e.g. ``LMP_PORTABLE``), from the cache if there."""
    sources = _sources()
    cxx = compiler()
    flags = [*FLAGS, *(f"-D{d}" for d in defines)]
    parts = [name.encode() + b"\0" + text for name, text in sorted(sources.items())]
    key = hashlib.sha256(b"\0".join([*parts, cxx.encode(), " ".join(flags).encode(), _cpu_flags().encode()])).hexdigest()
    cache = Path(os.environ.get("LIGHTNING_MP_CACHE", Path.home() / ".cache" / "lightning_mp"))
    target = cache / f"step-{key[:16]}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        for name, text in sources.items():
            (Path(tmp) / name).write_bytes(text)
        src, out = Path(tmp) / "step.cpp", Path(tmp) / "step.so"
        # with OpenMP the step runs on torch's threads; a compiler without it gets std::thread
        for attempt in ([*flags, "-fopenmp"], flags):
            result = subprocess.run([cxx, *attempt, str(src), "-o", str(out)], capture_output=True, text=True, timeout=300)
            if result.returncode == 0:
                break
        else:
            first = (result.stderr.strip().splitlines() or ["unknown error"])[0]
            raise RuntimeError(f"{cxx} failed: {first}")
        os.replace(out, target)  # atomic: processes building at once (DDP ranks) all end with one file
    messages.info(f"lightning-mp: built the fused optimizer step for this CPU in {time.perf_counter() - start:.1f} s "
                   f"(once; cached in {cache})")
    return target


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if not lib.lmp_segment_size() == ctypes.sizeof(Segment) == _PACKED.size or lib.lmp_hyper_size() != ctypes.sizeof(Hyper):
        raise RuntimeError("the kernel's structures do not match its bindings")
    fn = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.POINTER(Segment), ctypes.c_int64,
          ctypes.POINTER(Hyper)]
    lib.lmp_adamw.argtypes = lib.lmp_sgd.argtypes = fn
    segs = ctypes.POINTER(Segment)
    lib.lmp_upcast_check.argtypes = [ctypes.c_int, segs, ctypes.c_int64, ctypes.c_float, ctypes.c_int]
    lib.lmp_upcast_check.restype = ctypes.c_int
    lib.lmp_check.argtypes = [ctypes.c_int, segs, ctypes.c_int64, ctypes.c_int]
    lib.lmp_check.restype = ctypes.c_int
    lib.lmp_round.argtypes = [ctypes.c_int, segs, ctypes.c_int64, ctypes.c_int]
    lib.lmp_scale.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int]
    lib.lmp_count.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int64, ctypes.POINTER(ctypes.c_double)]
    lib.lmp_avx512.restype = ctypes.c_int
    return lib


_KNOWN = frozenset(DTYPE) | {torch.int16, torch.int8, torch.uint8}


def applies(*tensors: Optional[Tensor]) -> bool:
    """Whether the kernels can step these tensors: on the CPU, contiguous, of dtypes they know."""
    for t in tensors:
        if t is not None and not (t.is_cpu and t.dtype in _KNOWN and t.is_contiguous()):
            return False
    return True


def hyper(**values: Any) -> Hyper:
    h = Hyper(**values)
    h.threads = torch.get_num_threads()
    return h


_PACKED = struct.Struct("@5Pqqff2P")  # a Segment's fields, as the C compiler lays them out


def segments(rows: Sequence[tuple]) -> ctypes.Array:
    """The Segment array of ``rows`` ``(w, s, g, m, v, index, a, b, ms, vs)``: tensors (``None``
    where absent; ``g``, the gradient or a helper's one tensor, gives the length), where the
    segment starts in the optimizer's numbering, the kernel's two per-tensor numbers, and the
    8-bit moments' block scales. Packed in one pass (a ctypes structure per tensor costs more
    than the step of a small one)."""
    size, pack = _PACKED.size, _PACKED.pack_into
    buf = bytearray(size * len(rows))
    for k, (w, s, g, m, v, index, a, b, ms, vs) in enumerate(rows):  # (the pointers inline: 0 for None)
        pack(buf, k * size, 0 if w is None else w.data_ptr(), 0 if s is None else s.data_ptr(), g.data_ptr(),
             0 if m is None else m.data_ptr(), 0 if v is None else v.data_ptr(), g.numel(), index, a, b,
             0 if ms is None else ms.data_ptr(), 0 if vs is None else vs.data_ptr())
    return (Segment * len(rows)).from_buffer(buf)


def run(op: str, kind: int, wdtype: torch.dtype, gdtype: torch.dtype, mdtype: Any, array: ctypes.Array,
        h: Hyper) -> None:
    """One call of the AdamW (``op="adamw"``) or SGD kernel over the ``array`` of :func:`segments`
    (one kind and dtypes)."""
    fn = library().lmp_adamw if op == "adamw" else library().lmp_sgd  # type: ignore[union-attr]
    fn(kind, DTYPE[wdtype], DTYPE[gdtype], DTYPE[mdtype], array, len(array), ctypes.byref(h))


def _by_dtype(pairs: Sequence[tuple[Optional[Tensor], Optional[Tensor], Tensor]]) -> dict[torch.dtype, Any]:
    """``(w, s, g)`` triples as Segment arrays, one per dtype of the last tensor."""
    groups: dict[torch.dtype, list[tuple]] = {}
    for w, s, t in pairs:
        groups.setdefault(t.dtype, []).append((w, s, t, None, None, 0, 0.0, 0.0, None, None))
    return {dtype: segments(rows) for dtype, rows in groups.items()}


def upcast_check(grads: Sequence[Tensor], inv_scale: float) -> tuple[list[Tensor], bool]:
    """Each 16-bit gradient in FP32 times ``inv_scale``, in one pass over all, and whether any held inf/NaN."""
    out = [torch.empty_like(g, dtype=torch.float32) for g in grads]
    found = False
    for dtype, array in _by_dtype([(None, o, g) for o, g in zip(out, grads)]).items():
        found |= bool(library().lmp_upcast_check(DTYPE[dtype], array, len(array), inv_scale,  # type: ignore[union-attr]
                                                 torch.get_num_threads()))
    return out, found


def check(grads: Sequence[Tensor]) -> bool:
    """Whether any of ``grads`` holds inf/NaN: one read-only pass over all."""
    return any(bool(library().lmp_check(DTYPE[dtype], array, len(array), torch.get_num_threads()))  # type: ignore[union-attr]
               for dtype, array in _by_dtype([(None, None, g) for g in grads]).items())


def round_into(weights: Sequence[Tensor], masters: Sequence[Tensor]) -> None:
    """``weights[i].copy_(masters[i])`` (FP32 into 16 bits, round to nearest even), in one pass over all."""
    for dtype, array in _by_dtype(list(zip(weights, masters, weights))).items():
        library().lmp_round(DTYPE[dtype], array, len(array), torch.get_num_threads())  # type: ignore[union-attr]


def count(steps: Sequence[Tensor]) -> Optional[list[float]]:
    """Add 1 to each of an optimizer's step counters (0-dim FP32 tensors on the CPU, as torch keeps
    them) and return their new values, in one call; ``None``, and nothing done, where the kernels
    are not loaded yet (this never builds them) or a counter is of another kind. (torch's foreach
    add dispatches once per counter: 0.13-0.26 ms a step for 40 of them on 2 cores of an AMD EPYC,
    2026-12-07.)"""
    if _library is None or not all(type(t) is Tensor and t.dtype == torch.float32 and t.is_cpu and t.dim() == 0
                                   for t in steps):
        return None
    out = (ctypes.c_double * len(steps))()
    _library.lmp_count((ctypes.c_void_p * len(steps))(*[t.data_ptr() for t in steps]), len(steps), out)
    return list(out)


def stream_bandwidth(numel: int = 1 << 26, repeats: int = 8) -> float:
    """Bytes per second of an in-place update (read and write) of ``numel`` FP32 values, on torch's
    thread count: what an optimizer step, which updates its tensors in place, can at best stream."""
    a = torch.ones(numel)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        library().lmp_scale(a.data_ptr(), numel, 1.0, torch.get_num_threads())  # type: ignore[union-attr]
        best = min(best, time.perf_counter() - start)
    return 8 * numel / best
