"""lightning-mp: 16-bit training in PyTorch Lightning with FP32 master weights."""

from lightning_mp.convert import DEFAULT_KEEP_FP32, is_norm_layer
from lightning_mp.diagnostics import SwallowedUpdateMonitor, bytes_per_param, estimate_memory, memory_audit
from lightning_mp.masters import MasterStore
from lightning_mp.storage import MASTER_POLICIES
from lightning_mp.module import MoEModule
from lightning_mp.precision import PRECISION_NAMES, MasterWeightPrecision, SkippedStepsError, precision_plugin
from lightning_mp.scaler import LossScaleError, LossScaler

__all__ = [
    "DEFAULT_KEEP_FP32",
    "LossScaleError",
    "LossScaler",
    "MASTER_POLICIES",
    "MasterStore",
    "bytes_per_param",
    "estimate_memory",
    "memory_audit",
    "MasterWeightPrecision",
    "MoEModule",
    "PRECISION_NAMES",
    "SkippedStepsError",
    "SwallowedUpdateMonitor",
    "is_norm_layer",
    "precision_plugin",
]
__version__ = "0.1.0"
