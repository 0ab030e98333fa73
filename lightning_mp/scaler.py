"""Loss scaling for fp16 training: static or dynamic, with Megatron-LM's hysteresis.

fp16 has 5 exponent bits: gradients below ~6e-8 flush to zero. Multiplying the loss by a
large power of two shifts the whole gradient distribution into range; the optimizer step
divides it back out in FP32. A dynamic scale halves on overflow and doubles after a run
of clean steps, so it hovers just below the overflow point.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class LossScaleError(RuntimeError):
    """Raised when gradients keep overflowing at the minimum loss scale: training has diverged."""


class LossScaler:
    """Loss scale state for one run.

    Dynamic policy (``dynamic=True``), as Megatron-LM's ``DynamicGradScaler``: every overflow
    resets the growth tracker and spends one unit of ``hysteresis``; the scale backs off
    (multiplied by ``backoff_factor``, never below ``min_scale``) only once the hysteresis is
    spent. After ``growth_interval`` consecutive clean steps the scale grows by
    ``growth_factor`` and the hysteresis is refilled. An overflow that would back off below
    ``min_scale`` raises :class:`LossScaleError` instead of skipping steps forever.

    Static policy (``dynamic=False``): the scale never changes; overflowing steps are skipped.

    Scales are kept as Python floats: ``loss * scale`` needs no device tensor and the policy
    advances on the host once the step's overflow flag is known there (see the plugin's
    ``sync_free`` for when that is one step later).
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        *,
        dynamic: bool = True,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        hysteresis: int = 2,
        min_scale: float = 1.0,
    ) -> None:
        if init_scale <= 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        if dynamic:
            if growth_factor <= 1.0:
                raise ValueError(f"growth_factor must be > 1, got {growth_factor}")
            if not 0.0 < backoff_factor < 1.0:
                raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor}")
            if growth_interval < 1:
                raise ValueError(f"growth_interval must be >= 1, got {growth_interval}")
            if hysteresis < 1:
                raise ValueError(f"hysteresis must be >= 1, got {hysteresis}")
            if not 0.0 < min_scale <= init_scale:
                raise ValueError(f"min_scale must be in (0, init_scale={init_scale}], got {min_scale}")
        self.dynamic = dynamic
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.hysteresis = hysteresis
        self.min_scale = min_scale
        self.scale = float(init_scale)
        self.growth_tracker = 0
        self.hysteresis_tracker = hysteresis

    def scale_loss(self, loss: Tensor) -> Tensor:
        """The loss to call ``backward`` on."""
        return loss * self.scale

    def inv_scale(self, device: torch.device) -> Tensor:
        """``1 / scale`` as a 0-dim float32 tensor, computed in float64 as ``torch.amp.GradScaler`` does."""
        return torch.tensor(1.0 / self.scale, dtype=torch.float64).float().to(device)

    def update(self, found_inf: bool) -> None:
        """Advance the policy after one optimizer step (``found_inf``: the step was skipped)."""
        if not self.dynamic:
            return
        if not found_inf:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.growth_tracker = 0
                self.hysteresis_tracker = self.hysteresis
                self.scale *= self.growth_factor
            return
        self.growth_tracker = 0
        self.hysteresis_tracker = max(self.hysteresis_tracker - 1, 0)
        if self.hysteresis_tracker > 0:
            return
        if self.scale <= self.min_scale:
            raise LossScaleError(
                f"Gradients overflow fp16 even at the minimum loss scale ({self.min_scale:g}) for "
                f"{self.hysteresis} consecutive steps: the loss has diverged or the model produces "
                "inf/NaN. Lower the learning rate, add gradient clipping, or train with "
                "precision='bf16-master', whose range matches FP32."
            )
        self.scale = max(self.scale * self.backoff_factor, self.min_scale)

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "growth_tracker": self.growth_tracker,
            "hysteresis_tracker": self.hysteresis_tracker,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scale = float(state_dict["scale"])
        self.growth_tracker = int(state_dict["growth_tracker"])
        self.hysteresis_tracker = int(state_dict["hysteresis_tracker"])
