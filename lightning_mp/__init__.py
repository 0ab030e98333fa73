"""lightning-mp: 16-bit training in PyTorch Lightning with FP32 master weights."""

import torch as _torch

# torch's CPU sqrt (MKL's vector math) has returned wrong values (3e-4 relative, half the
# elements) on its first call in a process when that call ran on several threads, in about one
# process in eight on an Intel Xeon (torch 2.13). A first call too small to use threads sets it
# up safely; every AdamW step, torch's and lightning_mp's eager one, calls it.
_torch.sqrt(_torch.ones(8))

from lightning_mp.convert import DEFAULT_KEEP_FP32, is_norm_layer
from lightning_mp.data import ByteTextDataModule
from lightning_mp.loading import UnsafeCheckpointError
from lightning_mp.fabric import Fabric
from lightning_mp.diagnostics import SwallowedUpdateMonitor
from lightning_mp.memory import bytes_per_param, estimate_memory, memory_audit
from lightning_mp.masters import MasterStore
from lightning_mp.module import MoEModule
from lightning_mp.precision import PRECISION_NAMES, MasterWeightPrecision, SkippedStepsError, precision_plugin
from lightning_mp.scaler import LossScaleError, LossScaler
from lightning_mp.storage import MASTER_POLICIES
from lightning_mp.trainer import Trainer

__all__ = [
    "DEFAULT_KEEP_FP32",
    "Fabric",
    "MASTER_POLICIES",
    "PRECISION_NAMES",
    "ByteTextDataModule",
    "LossScaleError",
    "LossScaler",
    "MasterStore",
    "MasterWeightPrecision",
    "MoEModule",
    "SkippedStepsError",
    "SwallowedUpdateMonitor",
    "Trainer",
    "UnsafeCheckpointError",
    "bytes_per_param",
    "estimate_memory",
    "is_norm_layer",
    "memory_audit",
    "precision_plugin",
]
__version__ = "0.1.0"
