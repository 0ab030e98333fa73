"""Where the step happens for 16-bit weights: AdamW and SGD that step them through their stored FP32 values.

Each optimizer steps the model's 16-bit weights directly. The FP32 value it updates is kept by a
storage policy (:data:`MASTER_POLICIES`, :mod:`lightning_mp.storage`), chosen with ``master=`` or
by :class:`~lightning_mp.MasterWeightPrecision`: a separate FP32 master (``"fp32"``), an exact
int16 remainder (``"remainder"``), a Kahan compensation (``"kahan"``) or nothing with stochastic
rounding (``"stochastic"``). FP32 parameters (norms under ``keep_fp32``) are stepped in place.

A step reconstructs FP32 values, runs torch's own AdamW or SGD arithmetic on them and stores them
back, in one fused pass per element where it applies (:mod:`lightning_mp.optim.base`). Weight
decay is part of that FP32 update, never a separate 16-bit multiply (which rounds away whenever
``lr * weight_decay`` is below half a bf16 step).

State keys match torch's (``step``, ``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``) plus
``remainder`` or ``compensation``, so a state saved by ``torch.optim.AdamW`` loads here.
"""

from lightning_mp.optim.adamw import AdamW
from lightning_mp.optim.sgd import SGD
from lightning_mp.storage import MASTER_POLICIES

__all__ = ["AdamW", "MASTER_POLICIES", "SGD"]
