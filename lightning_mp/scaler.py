"""Loss scaling for fp16 training: static or dynamic, with Megatron-LM's hysteresis.

fp16 has 5 exponent bits: gradients below ~6e-8 flush to zero. Multiplying the loss by a
large power of two shifts the whole gradient distribution into range; the optimizer step
divides it back out in FP32. A dynamic scale halves on overflow and doubles after a run
of clean steps, so it hovers just below the overflow point.
"""

from __future__ import annotations

from typing import Any, Optional, Union

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
    advances on the host once the step's overflow flag is known there. A sync-free step (the
    plugin's ``sync_free``) reads its flag only one step later, so it also advances a copy of
    the policy on the device (:meth:`advance_on_device`) from the flag itself: the next loss is
    scaled, and its gradients unscaled, by the scale the synced path would use, with no host sync;
    :meth:`update` brings the host's floats level when the flag arrives.
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
        # (scale, growth tracker, hysteresis tracker) in float64 on the device, ahead of the floats
        # above by the sync-free steps whose flags the host has not read yet; None when level
        self._device_state: Optional[Tensor] = None

    def scale_loss(self, loss: Tensor) -> Tensor:
        """The loss to call ``backward`` on (the float32 product a Python-float scale gives)."""
        if self._device_state is not None:
            return loss * self._device_state[0].to(loss.dtype)
        return loss * self.scale

    def inv_scale(self, device: torch.device) -> Tensor:
        """``1 / scale`` as a 0-dim float32 tensor, computed in float64 as ``torch.amp.GradScaler`` does."""
        if self._device_state is not None:
            return (1.0 / self._device_state[0]).float().to(device)
        return torch.tensor(1.0 / self.scale, dtype=torch.float64).float().to(device)

    def current(self) -> Union[float, Tensor]:
        """The scale the next backward uses: the host's float, or the device's ahead of it."""
        return self.scale if self._device_state is None else self._device_state[0]

    def host_inv_scale(self) -> float:
        """``1 / scale`` as a float for kernels that take one. Reads the device's scale where it is
        ahead only on a CPU (free); a CUDA one would cost a host sync, and CPU kernels do not see
        CUDA gradients."""
        state = self._device_state
        return 1.0 / (float(state[0]) if state is not None and state.device.type == "cpu" else self.scale)

    def advance_on_device(self, found_inf: Tensor) -> None:
        """Advance the device's copy of the policy by one step whose flag ``found_inf`` (a 0-dim
        tensor) stays on the device: the same rules as :meth:`update`, as tensor ops. At the minimum
        scale it stays there; the host raises :class:`LossScaleError` when it reads the flag."""
        if not self.dynamic:
            return
        state = self._device_state
        if state is None:
            state = torch.tensor([self.scale, self.growth_tracker, self.hysteresis_tracker], dtype=torch.float64,
                                 device=found_inf.device)
        scale, growth, hysteresis = state.unbind()
        clean = found_inf == 0
        growth = torch.where(clean, growth + 1, 0.0)
        grow = clean & (growth == self.growth_interval)
        growth = torch.where(grow, 0.0, growth)
        hysteresis = torch.where(grow, float(self.hysteresis), torch.where(clean, hysteresis, (hysteresis - 1).clamp(min=0)))
        back_off = ~clean & (hysteresis == 0)
        scale = torch.where(grow, scale * self.growth_factor,
                            torch.where(back_off, (scale * self.backoff_factor).clamp(min=self.min_scale), scale))
        self._device_state = torch.stack([scale, growth, hysteresis])

    def level(self) -> None:
        """The host's floats are the policy again (every flag read, or a synced step taken)."""
        self._device_state = None

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
        self._device_state = None
        self.scale = float(state_dict["scale"])
        self.growth_tracker = int(state_dict["growth_tracker"])
        self.hysteresis_tracker = int(state_dict["hysteresis_tracker"])
