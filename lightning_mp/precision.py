"""The precision plugin: 16-bit weights and compute, FP32 master weights in the optimizer.

Use it as ``Trainer(plugins=[MasterWeightPrecision("bf16-master")])``, or name any precision,
ours or Lightning's, through :func:`precision_plugin`.

One training step, in order (:meth:`MasterWeightPrecision.optimizer_step`):

1. forward and backward under ``torch.autocast`` with 16-bit weights (fp16: on a scaled loss);
2. after every backward the 16-bit grads are added into FP32 master grads and freed;
3. unscale (fp16) and one fused inf/NaN check over all master grads;
4. an overflowing step is skipped whole: no optimizer update, no LR-scheduler step;
5. otherwise Lightning's hooks and gradient clipping on the FP32 grads, the inner
   optimizer's step on the masters, and the masters rounded back into the 16-bit weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

import lightning.pytorch as pl
from lightning.pytorch.plugins.precision import DoublePrecision, FSDPPrecision, HalfPrecision, MixedPrecision, Precision
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_mp.convert import _TORCH_NORMS, DEFAULT_KEEP_FP32, KeepFP32, cast_module_
from lightning_mp.model import RMSNorm
from lightning_mp.masters import FP32Masters
from lightning_mp.optim import MASTER_POLICIES, _blocks, _StoredMasterOptimizer
from lightning_mp.scaler import LossScaler

_MASTER_DTYPES = {"bf16-master": torch.bfloat16, "16-master": torch.float16}
_SKIP_FLAG = "_lightning_mp_skip_scheduler"  # set on an optimizer whose step was skipped


class MasterWeightPrecision(Precision):
    """16-bit weights and autocast compute, FP32 master weights stepped by the optimizer.

    Args:
        precision: ``"bf16-master"`` (bfloat16 weights and compute) or ``"16-master"``
            (float16 weights and compute, with loss scaling).
        keep_fp32: modules whose parameters and buffers stay FP32 (they are then their own
            masters): module-name patterns, module classes or predicates ``(name, module)``.
            Default :data:`~lightning_mp.convert.DEFAULT_KEEP_FP32`, every normalization layer.
            A module that sets ``keep_fp32 = True`` on itself is always kept.
        loss_scale: ``"dynamic"`` or a fixed float. Default: dynamic for ``16-master``, none
            for ``bf16-master`` (whose exponent range is FP32's).
        init_scale, growth_factor, backoff_factor, growth_interval, hysteresis, min_scale:
            the dynamic loss-scale policy, see :class:`~lightning_mp.scaler.LossScaler`.
        device: device type for ``torch.autocast`` (``"cuda"``, ``"cpu"``...). Default: the
            device of the model's parameters.
        sync_free: skip overflowing steps without a host sync, for optimizers that skip on the
            device (torch's ``fused=True`` Adam, AdamW, SGD...). ``None`` (default): on CUDA;
            ``True``: on any device; ``False``: never. See below.
        master: where the FP32 value of each bf16 weight lives (``bf16-master`` only):

            - ``"fp32"`` (default): a separate FP32 master tensor (4 extra bytes per parameter),
              stepped by any ``torch.optim.Optimizer``; micro-batch gradients sum in FP32;
            - ``"remainder"``: an int16 remainder beside the weight, the exact FP32 value bit for
              bit (2 extra bytes);
            - ``"stochastic"``: nothing beside the weight; stochastically rounded updates;
            - ``"kahan"``: a bf16 compensation buffer (2 extra bytes).

            The last three need :class:`lightning_mp.optim.AdamW` or :class:`lightning_mp.optim.SGD`,
            which step the 16-bit weights themselves; their gradients stay bf16 (and accumulate in
            bf16) and are freed inside the step. Checkpoints hold the exact FP32 values under
            every policy, so a run can resume under another.
        grad_reduce_dtype: under DDP, ``None`` (default) all-reduces gradients in the 16-bit
            dtype, as DDP does; ``"fp32"`` all-reduces them in FP32, since a 16-bit sum over many
            ranks rounds at every addition. See "Several processes" below.

    Gradients live on the masters: in ``on_before_optimizer_step`` read them from
    ``trainer.precision_plugin.main_params(optimizer)`` (FP32, already unscaled); the
    model's own 16-bit ``.grad`` is freed after each backward (it is still there in
    ``on_after_backward``). Parameters that no optimizer updates get no master.

    Host syncs: with most optimizers each step reads one overflow flag on the host (as
    ``torch.amp.GradScaler`` and Megatron-LM do): one sync per step, whatever the number of
    tensors. With an optimizer that skips on the device (``_step_supports_amp_scaling``, e.g.
    ``torch.optim.AdamW(fused=True)``) on CUDA, the step reads nothing: the flag goes to the
    fused kernel, which leaves weights and state untouched on overflow, and a non-blocking
    copy of it settles the host bookkeeping one step later (the skipped-step count, the loss
    scale, and the LR scheduler, which then holds for the following step instead).

    Several processes (``strategy="ddp"``): every rank holds the same masters, and an inf/NaN
    gradient on any rank reaches all ranks through the gradient all-reduce, so all skip the same
    steps and keep the same loss scale. With ``master="fp32"``, when micro-batches accumulate
    (``accumulate_grad_batches > 1``) or ``grad_reduce_dtype="fp32"``, the plugin takes the
    reduction over from DDP: DDP's hook is a no-op, each micro-batch's gradients are summed
    locally into the FP32 master grads (Lightning runs accumulating micro-batches under
    ``no_sync``), and at the optimizer step one all-reduce per 2**24 elements averages those sums
    over the ranks, in FP32 or in the 16-bit dtype. That reduction no longer overlaps the
    backward pass. Otherwise DDP reduces as usual (16-bit, overlapped), and for the storage
    policies ``grad_reduce_dtype="fp32"`` installs a hook that sums each bucket in FP32.
    """

    precision: Literal["bf16-master", "16-master"] = "bf16-master"

    def __init__(
        self,
        precision: Literal["bf16-master", "16-master"] = "bf16-master",
        *,
        keep_fp32: Optional[Sequence[KeepFP32]] = None,
        loss_scale: Union[float, Literal["dynamic"], None] = None,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        hysteresis: int = 2,
        min_scale: float = 1.0,
        device: Optional[str] = None,
        sync_free: Optional[bool] = None,
        master: str = "fp32",
        grad_reduce_dtype: Optional[Literal["fp32"]] = None,
    ) -> None:
        if precision not in _MASTER_DTYPES:
            raise ValueError(
                f"MasterWeightPrecision accepts precision {sorted(_MASTER_DTYPES)}, got {precision!r}. "
                f"For Lightning's own modes use lightning_mp.precision_plugin({precision!r})."
            )
        if master not in MASTER_POLICIES:
            raise ValueError(f"master must be one of {', '.join(MASTER_POLICIES)}, got {master!r}")
        if master != "fp32" and precision != "bf16-master":
            raise ValueError(f"master={master!r} stores bfloat16 weights: use it with 'bf16-master', not {precision!r}")
        self.precision = precision
        self.master = master
        self.dtype = _MASTER_DTYPES[precision]
        self.keep_fp32: tuple[KeepFP32, ...] = tuple(DEFAULT_KEEP_FP32 if keep_fp32 is None else keep_fp32)
        if loss_scale is None:
            loss_scale = "dynamic" if precision == "16-master" else None
        if loss_scale is None:
            self.scaler: Optional[LossScaler] = None
        elif loss_scale == "dynamic":
            self.scaler = LossScaler(
                init_scale,
                growth_factor=growth_factor,
                backoff_factor=backoff_factor,
                growth_interval=growth_interval,
                hysteresis=hysteresis,
                min_scale=min_scale,
            )
        elif isinstance(loss_scale, (int, float)) and not isinstance(loss_scale, bool) and loss_scale > 0:
            self.scaler = LossScaler(float(loss_scale), dynamic=False)
        else:
            raise ValueError(f"loss_scale must be 'dynamic' or a positive number, got {loss_scale!r}")
        if grad_reduce_dtype not in (None, "fp32"):
            raise ValueError(f"grad_reduce_dtype must be None (the 16-bit dtype) or 'fp32', got {grad_reduce_dtype!r}")
        self.grad_reduce_dtype = grad_reduce_dtype
        self._reduce_group: Any = None  # the DDP process group whose gradients the plugin reduces itself
        self.device = device
        self.sync_free = sync_free
        self.masters = FP32Masters()
        self.skipped_steps = 0
        self._pending: list[tuple[Optimizer, Tensor, Any]] = []  # unread overflow flags of sync-free steps
        self._master_by_name: dict[str, Tensor] = {}  # policy "fp32": checkpoint name -> master
        self._stored_by_name: dict[str, tuple[Tensor, _StoredMasterOptimizer]] = {}  # other policies
        self._warned_accumulation = False

    # -- setup -------------------------------------------------------------------------------

    def convert_module(self, module: nn.Module) -> nn.Module:
        """Cast to the 16-bit dtype, all but the ``keep_fp32`` modules; the FP32 values become the masters."""
        return cast_module_(module, self.dtype, self.keep_fp32, before_cast=self.masters.capture)

    def connect(
        self, model: nn.Module, optimizers: list[Optimizer], lr_schedulers: list[Any]
    ) -> tuple[nn.Module, list[Optimizer], list[Any]]:
        """Swap every optimizer's parameters for FP32 masters (or hand the FP32 values to the
        storage policy) and make step schedulers skip-aware."""
        for optimizer in optimizers:
            if self.master == "fp32":
                self.masters.attach(optimizer)
            else:
                self._attach_stored(optimizer)
        self.masters.discard_pending()
        self.masters.masters_to_params()
        if self.device is None:
            param = next(model.parameters(), None)
            self.device = param.device.type if param is not None else "cpu"
        module = _lightning_module(model)
        self._master_by_name = {
            name: self.masters.master_of[p]
            for name, p in module.named_parameters(remove_duplicate=False)
            if self.masters.master_of.get(p, p) is not p
        }
        owner = {
            p: optimizer
            for optimizer in optimizers
            if isinstance(optimizer, _StoredMasterOptimizer)
            for group in optimizer.param_groups
            for p in group["params"]
        }
        self._stored_by_name = {
            name: (p, owner[p])
            for name, p in module.named_parameters(remove_duplicate=False)
            if p in owner and p.dtype != torch.float32
        }
        for config in lr_schedulers:
            if getattr(config, "interval", "step") == "step" and hasattr(config.scheduler, "optimizer"):
                _make_skip_aware(config.scheduler)
        if isinstance(model, DistributedDataParallel):
            self._take_over_reduction(model, getattr(module, "_trainer", None))
        return model, optimizers, lr_schedulers

    def _take_over_reduction(self, ddp: DistributedDataParallel, trainer: Any) -> None:
        """Choose who all-reduces the gradients under DDP (see the class docstring)."""
        accumulating = trainer is not None and trainer.accumulate_grad_batches > 1
        if self.master == "fp32" and (accumulating or self.grad_reduce_dtype == "fp32"):
            ddp.register_comm_hook(None, _leave_bucket)
            self._reduce_group = ddp.process_group
        elif self.grad_reduce_dtype == "fp32":
            ddp.register_comm_hook(ddp.process_group, _fp32_allreduce)

    def _attach_stored(self, optimizer: Optimizer) -> None:
        """Give a storage-policy optimizer its policy and each weight's exact FP32 value from before the cast."""
        if not isinstance(optimizer, _StoredMasterOptimizer):
            raise TypeError(
                f"master={self.master!r} needs an optimizer that steps the bf16 weights with their "
                f"{self.master} storage: lightning_mp.optim.AdamW or lightning_mp.optim.SGD, not "
                f"{type(optimizer).__module__}.{type(optimizer).__qualname__}. Any optimizer works with master='fp32'."
            )
        if optimizer.master not in (None, self.master):
            raise ValueError(f"the optimizer was built with master={optimizer.master!r} but the plugin has master={self.master!r}")
        optimizer.master = self.master
        for group in optimizer.param_groups:
            for p in group["params"]:
                value = self.masters.take_captured(p)
                if value is not None and p.dtype != torch.float32:
                    optimizer.set_master(p, value)

    # -- compute -----------------------------------------------------------------------------

    def forward_context(self) -> AbstractContextManager:
        """Autocast to the 16-bit dtype, so the op-level FP32 lists (softmax, losses, norms) apply."""
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return torch.autocast(device, dtype=self.dtype)

    def pre_backward(self, tensor: Tensor, module: "pl.LightningModule") -> Tensor:  # type: ignore[override]
        if self.scaler is not None:
            tensor = self.scaler.scale_loss(tensor)
        return super().pre_backward(tensor, module)

    def post_backward(self, tensor: Tensor, module: "pl.LightningModule") -> Tensor:  # type: ignore[override]
        loss = super().post_backward(tensor, module)  # on_after_backward still sees the 16-bit grads
        if self.master != "fp32":
            trainer = getattr(module, "_trainer", None)
            if trainer is not None and trainer.accumulate_grad_batches > 1 and not self._warned_accumulation:
                self._warned_accumulation = True
                warnings.warn(
                    f"master={self.master!r} keeps bf16 gradients, so accumulate_grad_batches="
                    f"{trainer.accumulate_grad_batches} sums micro-batches in bf16; master='fp32' sums them in FP32.",
                    stacklevel=2,
                )
            return loss  # the gradients stay on the weights, where the optimizer reads them
        self.masters.grads_to_masters()
        return loss

    def clip_grad_by_norm(self, optimizer: Optimizer, clip_val: Union[int, float]) -> None:
        """Clip by the global gradient norm. Under the storage policies the grads are bf16: the norm
        is summed in FP32 and the clip factor is handed to the optimizer, which applies it to its
        FP32 copy of the grads, as ``clip_grad_norm_`` does to FP32 master grads (bit for bit)."""
        if self.master == "fp32":
            return super().clip_grad_by_norm(optimizer, clip_val)
        grads = [p.grad for p in self.main_params(optimizer) if p.grad is not None]
        if grads:
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
            total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
            optimizer.grad_factor = torch.clamp(clip_val / (total + 1e-6), max=1.0)  # torch's formula; no host sync
        return None

    # -- the step ----------------------------------------------------------------------------

    def optimizer_step(  # type: ignore[override]
        self,
        optimizer: Optimizer,
        model: Union["pl.LightningModule", nn.Module],
        closure: Callable[[], Any],
        **kwargs: Any,
    ) -> Any:
        """Backward, unscale, overflow check, clipping, inner step on the masters, copy back."""
        closure_result = closure()
        if closure_result is None and isinstance(model, pl.LightningModule) and model.automatic_optimization:
            return None  # training_step returned None: no backward, nothing to step (as Lightning's AMP)
        self.settle()  # the previous sync-free step's bookkeeping: its flag has long been copied
        self.masters.grads_to_masters()  # a backward that bypassed post_backward (manual loss.backward())
        if self._reduce_group is not None:
            self._all_reduce_grads(optimizer)
        found_inf = self._unscale_and_check(optimizer)
        if self._is_sync_free(optimizer):
            self._step_on_device(optimizer, model, found_inf, **kwargs)
        else:
            overflowed = bool(found_inf.item())  # the step's one host sync
            if overflowed:
                optimizer.zero_grad(set_to_none=True)  # this step's inf/NaN gradients
            else:
                if isinstance(model, pl.LightningModule):
                    self._after_closure(model, optimizer)  # on_before_optimizer_step hooks, gradient clipping
                optimizer.step(**kwargs)
                self.masters.masters_to_params(optimizer)
            self._record(optimizer, overflowed)
        self.masters.release_grads(optimizer)
        if self.master != "fp32":
            optimizer.zero_grad(set_to_none=True)  # the 16-bit grads die with the step, as the masters' do
        self._log(model)
        return closure_result

    def _record(self, optimizer: Optimizer, overflowed: bool) -> None:
        """Host bookkeeping of a step once its overflow flag is known: advance the loss scale and,
        for an overflow, count the skip and hold an LR-scheduler step.

        A sync-free step is recorded during the next step, whose gradients are already in the
        masters: nothing here may touch gradients.
        """
        if overflowed:
            self.skipped_steps += 1
            setattr(optimizer, _SKIP_FLAG, True)
        if self.scaler is not None:
            self.scaler.update(overflowed)

    def _is_sync_free(self, optimizer: Optimizer) -> bool:
        if not getattr(optimizer, "_step_supports_amp_scaling", False) or self.sync_free is False:
            return False
        return self.sync_free is True or self.device == "cuda"

    def _step_on_device(self, optimizer: Optimizer, model: nn.Module, found_inf: Tensor, **kwargs: Any) -> None:
        """A step whose overflow skip happens inside the fused kernel; the host learns of it later."""
        if isinstance(model, pl.LightningModule):
            self._after_closure(model, optimizer)  # an inf norm clips to NaN: the kernel skips anyway
        optimizer.found_inf, optimizer.grad_scale = found_inf, None  # torch's contract for fused steps
        try:
            optimizer.step(**kwargs)
        finally:
            del optimizer.found_inf, optimizer.grad_scale
        self.masters.masters_to_params(optimizer)  # unchanged masters on a skipped step: a no-op
        if found_inf.is_cuda:
            flag = torch.empty((), pin_memory=True)
            flag.copy_(found_inf, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            flag, event = found_inf, None
        self._pending.append((optimizer, flag, event))

    def settle(self) -> None:
        """Apply the host bookkeeping of sync-free steps whose overflow flags are now on the host."""
        pending, self._pending = self._pending, []
        for optimizer, flag, event in pending:
            if event is not None:
                event.synchronize()  # waits for the flag's copy, queued a whole step ago
            self._record(optimizer, bool(flag.item()))

    def teardown(self) -> None:
        self.settle()

    @torch.no_grad()
    def _all_reduce_grads(self, optimizer: Optimizer) -> None:
        """Average the masters' summed gradients over the DDP ranks, in FP32 or the 16-bit dtype.

        Every rank holds gradients for the same parameters in the same order (DDP without
        ``find_unused_parameters`` requires every parameter to be used), so the flat buffers line up.
        """
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        dtype = torch.float32 if self.grad_reduce_dtype == "fp32" else self.dtype
        world = dist.get_world_size(self._reduce_group)
        for block in _blocks(grads, 1 << 24):  # one collective per 2**24 elements
            chunk = [seg.of(seg.param) for seg in block]
            flat = torch.cat([g.reshape(-1) for g in chunk]).div_(world).to(dtype)  # average as DDP does: divide first
            dist.all_reduce(flat, group=self._reduce_group)
            torch._foreach_copy_(chunk, [t.view_as(g) for t, g in zip(flat.split([g.numel() for g in chunk]), chunk)])

    def _unscale_and_check(self, optimizer: Optimizer) -> Tensor:
        """Unscale the master grads in place; a 0-dim float tensor, 1.0 if any is inf or NaN.

        One fused kernel per device, and no host sync.
        """
        by_device: dict[torch.device, list[Tensor]] = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    by_device.setdefault(p.grad.device, []).append(p.grad)
        flags = []
        for device, grads in by_device.items():
            found_inf = torch.zeros((), device=device)
            inv_scale = self.scaler.inv_scale(device) if self.scaler else torch.ones((), device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
            flags.append(found_inf)
        if not flags:
            return torch.zeros(())
        found = flags[0]
        for flag in flags[1:]:  # parameters on several devices (rare): gather on the first
            found = torch.maximum(found, flag.to(found.device))
        return found

    def _log(self, model: nn.Module) -> None:
        if not isinstance(model, pl.LightningModule) or getattr(model, "_current_fx_name", None) is None:
            return
        model.log("precision/skipped_steps", float(self.skipped_steps))
        if self.scaler is not None:
            model.log("precision/loss_scale", self.scaler.scale)

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        self.settle()
        state: dict[str, Any] = {"skipped_steps": self.skipped_steps}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        if self.scaler is not None and "scaler" in state_dict:
            self.scaler.load_state_dict(state_dict["scaler"])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store FP32 in ``checkpoint["state_dict"]``: the masters, and exact upcasts of other 16-bit tensors."""
        state = checkpoint.get("state_dict")
        if state is None:
            return
        for name, value in state.items():
            master = self._master_by_name.get(name)
            stored = self._stored_by_name.get(name)
            if master is not None:
                state[name] = master.detach()
            elif stored is not None:
                state[name] = stored[1].master_value(stored[0])
            elif isinstance(value, Tensor) and value.dtype == self.dtype:
                state[name] = value.float()

    @torch.no_grad()
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the masters from the checkpoint's (FP32) state dict, then the 16-bit weights from them."""
        state = checkpoint.get("state_dict", {})
        for name, master in self._master_by_name.items():
            if name in state:
                master.copy_(state[name])
        self.masters.masters_to_params()
        for name, (param, optimizer) in self._stored_by_name.items():
            if name in state:
                optimizer.set_master(param, state[name])


class FSDPMasterWeightPrecision(FSDPPrecision):
    """``bf16-master`` and ``16-master`` for Lightning's ``FSDPStrategy``, which accepts only
    :class:`~lightning.pytorch.plugins.precision.FSDPPrecision` subclasses.

    FSDP keeps each rank's shard of the flat parameters in FP32: they are the masters, sharded,
    and the optimizer steps them. FSDP's mixed precision casts them to bf16 (fp16) for compute
    (``param_dtype``) and reduce-scatters gradients in FP32 (``reduce_dtype=float32``; Lightning's
    ``bf16-mixed`` reduces in bf16); buffers keep their dtype. Forward runs under autocast, so the
    op-level FP32 lists apply as in :class:`MasterWeightPrecision`. ``16-master`` uses FSDP's
    sharded grad scaler (skip on inf/NaN, dynamic scale).

    Args:
        precision: ``"bf16-master"`` or ``"16-master"``.
        keep_fp32: module classes that stay FP32 for compute (FSDP wraps them separately with
            mixed precision disabled; this needs an ``auto_wrap_policy``, as ``trainer=fsdp``
            sets). Default: torch's normalization layers and lightning-mp's ``RMSNorm``. FSDP
            takes classes only: a router computes in FP32 anyway (it upcasts its weights).
        master: ``"fp32"`` only: the shards are FP32 masters (the storage policies need the
            16-bit weights the optimizer steps, which FSDP does not have).
        loss_scale, init_scale, growth_factor, backoff_factor, growth_interval: ``16-master``'s
            dynamic scale, as torch's ``ShardedGradScaler`` takes them; it has no hysteresis and no
            minimum, so ``hysteresis`` and ``min_scale`` must keep their defaults.
        grad_reduce_dtype: ``None`` or ``"fp32"``: both mean FP32, FSDP's reduction here.

    Gradient clipping by norm goes through ``FullyShardedDataParallel.clip_grad_norm_``, the
    norm over all shards (Lightning's ``FSDPPrecision`` refuses it).
    """

    def __init__(
        self,
        precision: Literal["bf16-master", "16-master"] = "bf16-master",
        *,
        keep_fp32: Sequence[type] = (*_TORCH_NORMS, RMSNorm),
        device: Optional[str] = None,
        master: str = "fp32",
        loss_scale: Optional[str] = "dynamic",
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        hysteresis: int = 2,
        min_scale: float = 1.0,
        grad_reduce_dtype: Optional[Literal["fp32"]] = None,
    ) -> None:
        if grad_reduce_dtype not in (None, "fp32"):
            raise ValueError(f"under FSDP gradients are reduce-scattered in FP32; grad_reduce_dtype={grad_reduce_dtype!r}")
        if master != "fp32":
            raise ValueError(f"under FSDP the sharded FP32 parameters are the masters: master={master!r} is not supported")
        if loss_scale != "dynamic" or hysteresis != 2 or min_scale != 1.0:
            raise ValueError("under FSDP the loss scale is torch's ShardedGradScaler: dynamic, no hysteresis, no minimum")
        if precision not in _MASTER_DTYPES:
            raise ValueError(f"FSDPMasterWeightPrecision accepts {sorted(_MASTER_DTYPES)}, got {precision!r}")
        if not all(isinstance(c, type) and issubclass(c, nn.Module) for c in keep_fp32):
            raise TypeError(f"under FSDP keep_fp32 takes nn.Module classes only, got {list(keep_fp32)!r}")
        scaler = None
        if precision == "16-master":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            scaler = ShardedGradScaler(
                init_scale=init_scale,
                growth_factor=growth_factor,
                backoff_factor=backoff_factor,
                growth_interval=growth_interval,
            )
        mixed = "bf16-mixed" if precision == "bf16-master" else "16-mixed"
        self.precision = mixed  # type: ignore[assignment]  # FSDPPrecision checks it before setting it
        super().__init__(mixed, scaler)
        self.scaler = scaler  # FSDPPrecision drops a scaler it is given (it keeps only its own default)
        self.precision = precision  # type: ignore[assignment]
        self.dtype = _MASTER_DTYPES[precision]
        self.keep_fp32 = tuple(keep_fp32)
        self.device = device or "cuda"
        self._root: Optional[nn.Module] = None

    @property
    def mixed_precision_config(self) -> Any:
        from torch.distributed.fsdp import MixedPrecision as TorchMixedPrecision

        return TorchMixedPrecision(
            param_dtype=self.dtype,
            reduce_dtype=torch.float32,
            buffer_dtype=None,  # buffers keep their dtype (rotary tables stay FP32)
            _module_classes_to_ignore=self.keep_fp32,
        )

    def forward_context(self) -> AbstractContextManager:
        return torch.autocast(self.device, dtype=self.dtype)

    def connect(
        self, model: nn.Module, optimizers: list[Optimizer], lr_schedulers: list[Any]
    ) -> tuple[nn.Module, list[Optimizer], list[Any]]:
        self._root = model  # the root FSDP module, whose clip_grad_norm_ sees every shard
        return super().connect(model, optimizers, lr_schedulers)

    def clip_grad_by_norm(self, optimizer: Optimizer, clip_val: Union[int, float]) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not isinstance(self._root, FullyShardedDataParallel):
            raise MisconfigurationException(
                "gradient clipping by norm under FSDP needs the model wrapped whole by FullyShardedDataParallel "
                f"(got {type(self._root).__name__}); use gradient_clip_algorithm='value' or let FSDPStrategy wrap it"
            )
        self._root.clip_grad_norm_(clip_val)


# DDP checks a comm hook's annotations as objects, which `from __future__ import annotations`
# turns into strings: the two hooks below leave `bucket` and the result unannotated.


def _leave_bucket(state: Any, bucket):  # type: ignore[no-untyped-def]
    """A DDP comm hook that reduces nothing: the plugin reduces the FP32 master grads at the step."""
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def _fp32_allreduce(group: Any, bucket):  # type: ignore[no-untyped-def]
    """A DDP comm hook that averages a 16-bit bucket in FP32 and rounds the result once."""
    buffer = bucket.buffer()
    total = buffer.float().div_(dist.get_world_size(group))

    def back(future: torch.futures.Future) -> Tensor:
        buffer.copy_(future.value()[0])
        return buffer

    return dist.all_reduce(total, group=group, async_op=True).get_future().then(back)


def _lightning_module(model: nn.Module) -> nn.Module:
    """The LightningModule inside a strategy's wrapper (DDP...), whose names the checkpoint uses."""
    if isinstance(model, pl.LightningModule):
        return model
    return next((m for m in model.modules() if isinstance(m, pl.LightningModule)), model)


# -- LR schedulers that do not advance on a skipped step --------------------------------------

_SKIP_AWARE_CLASSES: dict[type, type] = {}


def _skip_aware_step(self: Any, *args: Any, **kwargs: Any) -> Any:
    if getattr(self.optimizer, _SKIP_FLAG, False):
        setattr(self.optimizer, _SKIP_FLAG, False)
        return None
    return super(type(self), self).step(*args, **kwargs)


def _new_instance(cls: type) -> Any:
    return cls.__new__(cls)


def _reduce_to_base(self: Any, protocol: int) -> Any:
    # Pickle (and deepcopy) as the user's own scheduler class: the subclass exists only here.
    return _new_instance, (type(self).__bases__[0],), self.__dict__


def _make_skip_aware(scheduler: Any) -> None:
    """Give ``scheduler`` a subclass whose ``step`` does nothing right after a skipped optimizer step.

    The instance keeps its ``__dict__`` (so ``state_dict``, checkpoints, ``LearningRateMonitor``
    and ``isinstance`` checks are unchanged), the way Lightning wraps optimizers.
    """
    base = type(scheduler)
    if base in _SKIP_AWARE_CLASSES.values():
        return
    if base not in _SKIP_AWARE_CLASSES:
        _SKIP_AWARE_CLASSES[base] = type(
            base.__name__, (base,), {"step": _skip_aware_step, "__reduce_ex__": _reduce_to_base}
        )
    scheduler.__class__ = _SKIP_AWARE_CLASSES[base]


# -- one factory for every precision name ----------------------------------------------------

_LIGHTNING_ALIASES = {"64": "64-true", "32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}
PRECISION_NAMES: tuple[str, ...] = (
    "32-true",
    "64-true",
    "bf16-mixed",
    "16-mixed",
    "bf16-true",
    "16-true",
    "bf16-master",
    "16-master",
)


def precision_plugin(
    name: str, *, device: Optional[str] = None, strategy: Optional[str] = None, **kwargs: Any
) -> Precision:
    """The precision plugin for any name, lightning-mp's or Lightning's.

    ``"bf16-master"`` and ``"16-master"`` give :class:`MasterWeightPrecision` (``kwargs`` go to
    it); Lightning's names (``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"``, ``"bf16-true"``,
    ``"16-true"``, ``"64-true"`` and the aliases ``"32"``, ``"16"``, ``"bf16"``, ``"64"``) give
    the plugin that ``Trainer(precision=name)`` builds. ``device`` is the autocast device type
    (default: ``"cuda"`` when available, else ``"cpu"``). ``strategy="fsdp"`` gives the plugins
    Lightning's ``FSDPStrategy`` accepts: :class:`FSDPMasterWeightPrecision` for ours (``kwargs``:
    ``keep_fp32`` classes), Lightning's ``FSDPPrecision`` for the others.
    """
    name = _LIGHTNING_ALIASES.get(str(name), str(name))
    if strategy == "fsdp":
        if name in _MASTER_DTYPES:
            return FSDPMasterWeightPrecision(name, device=device, **kwargs)  # type: ignore[arg-type]
        if kwargs:
            raise TypeError(f"precision {name!r} takes no options, got {sorted(kwargs)}")
        return FSDPPrecision(name)  # type: ignore[arg-type]
    if strategy not in (None, "ddp", "auto", "single_device"):
        raise ValueError(f"strategy must be None, 'ddp' or 'fsdp' (the plugin differs only for FSDP), got {strategy!r}")
    if name in _MASTER_DTYPES:
        return MasterWeightPrecision(name, device=device, **kwargs)  # type: ignore[arg-type]
    if name not in PRECISION_NAMES:
        raise ValueError(f"Unknown precision {name!r}; choose one of {', '.join(PRECISION_NAMES)}.")
    if kwargs:
        raise TypeError(f"precision {name!r} takes no options, got {sorted(kwargs)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "32-true":
        return Precision()
    if name == "64-true":
        return DoublePrecision()
    if name in ("bf16-true", "16-true"):
        return HalfPrecision(name)  # type: ignore[arg-type]
    if name == "16-mixed" and device == "cpu":
        # What Trainer(precision="16-mixed") does on CPU.
        warnings.warn("16-mixed is not supported by autocast on CPU; using bf16-mixed instead.", stacklevel=2)
        name = "bf16-mixed"
    return MixedPrecision(name, device)  # type: ignore[arg-type]
