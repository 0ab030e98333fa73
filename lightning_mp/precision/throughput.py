"""The 16-bit compute dtype for Lightning's throughput monitors (and so for litgpt's MFU).

Lightning's ``ThroughputMonitor`` (the Trainer callback, and Fabric's utility that litgpt's
``pretrain`` and ``finetune`` scripts build) looks up the GPU's peak FLOP/s for the dtype that
``_plugin_to_compute_dtype`` derives from the precision plugin's class. That function knows
Lightning's own plugins only and calls any other one FP32, so under ``bf16-master`` an H100's
MFU would be measured against its TF32 peak (494.7 TFLOP/s, half its 989.4 in bf16) or, at
``float32_matmul_precision("highest")``, its FP32 peak (66.9): 2x or 15x too high. The matmuls
of a ``*-master`` run are 16-bit ones, as under ``bf16-mixed`` and ``bf16-true``, so
:func:`install` has both lookups answer the plugin's 16-bit dtype and pass every other plugin on
unchanged. Lightning's own TODO there is to ask the plugin; until it does, this is the one seam.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from lightning.fabric.utilities import throughput as fabric_throughput
from lightning.pytorch.callbacks import throughput_monitor as trainer_throughput

from lightning_mp.precision.options import MASTER_DTYPES

_LOOKUP = "_plugin_to_compute_dtype"


def master_compute_dtype(lookup: Callable[[Any], torch.dtype]) -> Callable[[Any], torch.dtype]:
    """``lookup`` that answers ``torch.bfloat16``/``torch.float16`` for a ``*-master`` plugin."""

    def compute_dtype(plugin: Any) -> torch.dtype:
        dtype = MASTER_DTYPES.get(getattr(plugin, "precision", None))  # type: ignore[arg-type]
        return dtype if dtype is not None else lookup(plugin)

    compute_dtype.wrapped = lookup  # type: ignore[attr-defined]
    return compute_dtype


def install() -> None:
    """Wrap the lookup in both of Lightning's throughput modules, once; absent ones are left be."""
    for module, name in ((fabric_throughput, _LOOKUP), (trainer_throughput, _LOOKUP),
                         (trainer_throughput, "fabric" + _LOOKUP)):
        lookup = getattr(module, name, None)
        if callable(lookup) and not hasattr(lookup, "wrapped"):
            setattr(module, name, master_compute_dtype(lookup))
