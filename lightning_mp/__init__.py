"""lightning-mp: 16-bit training in PyTorch Lightning with FP32 master weights."""

from lightning_mp.convert import DEFAULT_KEEP_FP32, is_norm_layer
from lightning_mp.diagnostics import SwallowedUpdateMonitor, bytes_per_param, estimate_memory, memory_audit
from lightning_mp.masters import FP32Masters
from lightning_mp.module import MoEModule
from lightning_mp.precision import PRECISION_NAMES, MasterWeightPrecision, precision_plugin
from lightning_mp.scaler import LossScaleError, LossScaler

__all__ = [
    "DEFAULT_KEEP_FP32",
    "FP32Masters",
    "LossScaleError",
    "LossScaler",
    "bytes_per_param",
    "estimate_memory",
    "memory_audit",
    "MasterWeightPrecision",
    "MoEModule",
    "PRECISION_NAMES",
    "SwallowedUpdateMonitor",
    "is_norm_layer",
    "precision_plugin",
]
__version__ = "0.1.0"
