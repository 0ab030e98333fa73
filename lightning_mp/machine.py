"""The machine a number was measured on: CPU model, its bf16 support, threads, torch, the GPU if any.

CPU machines differ a lot for bf16: a CPU without native bf16 emulates it (bf16 matmuls ~10
GFLOP/s on an AMD EPYC with AVX2), one with AMX runs them at ~1.4 TFLOP/s. Every benchmark prints
:func:`describe` so its numbers say where they come from.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def _cpuinfo(field: str) -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def bf16_support() -> str:
    """The CPU's native bf16: ``"AMX"`` (AMX-BF16 tiles), ``"avx512_bf16"`` (dot products and
    conversions), or ``"none"`` (bf16 is emulated in FP32)."""
    flags = set(_cpuinfo("flags").split())
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    return "none"


def describe() -> str:
    """One line: the CPU, its bf16 support, torch's threads and version, and the GPU if any."""
    text = f"{cpu_model()}, native bf16: {bf16_support()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        text += f", {torch.cuda.get_device_name()} (sm_{major}{minor}, CUDA {torch.version.cuda})"
    return text
