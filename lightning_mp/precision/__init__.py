"""The precision plugins, one concept per module:

- :mod:`~lightning_mp.precision.master`: ``MasterWeightPrecision``, its Lightning hooks;
- :mod:`~lightning_mp.precision.step`: where the step happens, phase by phase;
- :mod:`~lightning_mp.precision.grads`: FP32 sums of 16-bit gradients across micro-batches;
- :mod:`~lightning_mp.precision.skips` and :mod:`~lightning_mp.precision.schedulers`: skipped
  steps, held LR schedulers, endless-skip errors;
- :mod:`~lightning_mp.precision.ddp`: gradient reduction under DDP;
- :mod:`~lightning_mp.precision.fsdp`: ``FSDPMasterWeightPrecision`` for Lightning's FSDP;
- :mod:`~lightning_mp.precision.fsdp2`: ``FSDP2MasterWeightPrecision`` for ``ModelParallelStrategy`` (FSDP2);
- :mod:`~lightning_mp.precision.factory`: ``precision_plugin()`` for any precision name;
- :mod:`~lightning_mp.precision.throughput`: the 16-bit compute dtype for Lightning's throughput
  monitors (MFU), installed on import.

Where the FP32 values live is :mod:`lightning_mp.masters`.
"""

from lightning_mp.precision.factory import PRECISION_NAMES, precision_plugin
from lightning_mp.precision.fsdp import FSDPMasterWeightPrecision
from lightning_mp.precision.fsdp2 import FSDP2MasterWeightPrecision
from lightning_mp.precision.master import MasterWeightPrecision
from lightning_mp.precision.skips import SkippedStepsError
from lightning_mp.precision.throughput import install as _install_throughput

_install_throughput()

__all__ = [
    "FSDP2MasterWeightPrecision",
    "FSDPMasterWeightPrecision",
    "MasterWeightPrecision",
    "PRECISION_NAMES",
    "SkippedStepsError",
    "precision_plugin",
]
