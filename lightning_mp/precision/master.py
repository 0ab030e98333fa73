"""``MasterWeightPrecision``: 16-bit weights and compute, FP32 master values, one mechanism for all of Lightning.

Every optimizer keeps the model's own 16-bit parameters, so whatever Lightning does with an
optimizer's parameters (``toggle_optimizer``, fine-tuning callbacks, ``add_param_group``,
clipping, SWA) acts on the model. Each parameter's FP32 value lives in the plugin's
:class:`~lightning_mp.masters.MasterStore`; the step (:mod:`lightning_mp.precision.step`) works
on those values, and every checkpoint path reads and writes them through the module's
``state_dict`` and ``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import Precision
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from lightning_mp.convert import DEFAULT_KEEP_FP32, KeepFP32, cast_module_, follow_callers, kept_modules
from lightning_mp.masters import MasterStore, check_finite
from lightning_mp.optim.base import StoredMasterOptimizer
from lightning_mp.optim.adopt import adopt, why_not
from lightning_mp.precision import ddp
from lightning_mp.precision.averaging import average_fp32
from lightning_mp.precision.grads import FP32Grads
from lightning_mp.precision.options import (MASTER_DTYPES, STORAGE, check_master_options, device_type, lightning_module,
                                           make_scaler, report_storage, store_policy, user_step_hooks)
from lightning_mp.precision.skips import SkipTracker
from lightning_mp.precision.step import MasterStep, unwrap
from lightning_mp.storage import HALF

class MasterWeightPrecision(Precision):
    """16-bit weights and autocast compute, FP32 master values stepped by the optimizer.

    Args:
        precision: ``"bf16-master"`` (bfloat16 weights and compute) or ``"16-master"``
            (float16 weights and compute, with loss scaling).
        keep_fp32: modules whose parameters stay FP32 (they are then their own masters):
            module-name patterns, module classes or predicates ``(name, module)``. Default
            :data:`~lightning_mp.convert.DEFAULT_KEEP_FP32`, every normalization layer. A module
            that sets ``keep_fp32 = True`` on itself is always kept. Buffers always keep their dtype.
        loss_scale: ``"dynamic"`` or a fixed float. Default: dynamic for ``16-master``, none
            for ``bf16-master`` (whose exponent range is FP32's).
        init_scale, growth_factor, backoff_factor, growth_interval, hysteresis, min_scale:
            the dynamic loss-scale policy, see :class:`~lightning_mp.scaler.LossScaler`.
        device: device type for ``torch.autocast`` (``"cuda"``, ``"cpu"``...). Default: the
            device of the model's parameters.
        sync_free: skip overflowing steps without a host sync, for optimizers that skip on the
            device (torch's ``fused=True`` Adam, AdamW, SGD...). ``None`` (default): on CUDA;
            ``True``: on any device; ``False``: never.
        master: where the FP32 value of each 16-bit weight lives. ``"auto"`` (default): the
            cheapest exact storage each optimizer allows. Under ``bf16-master`` that is an int16
            remainder beside the weight (2 bytes per parameter) for :mod:`lightning_mp.optim` and
            for torch's own ``AdamW``, ``Adam`` and ``SGD``, which keep their object and state
            format (:mod:`lightning_mp.optim.adopt`); a separate FP32 master (4 bytes) for any
            other optimizer, and under ``16-master``. One line at the start says which each
            optimizer got. ``"fp32"``, ``"remainder"`` (exact), ``"kahan"`` (a bf16 compensation)
            or ``"stochastic"`` (nothing; stochastic rounding) force one for every optimizer (the
            last three ``bf16-master`` only, with an optimizer that can step them). Micro-batch
            gradients are summed in FP32 under every one.
        grad_reduce_dtype: under DDP, ``None`` (default) all-reduces gradients in the 16-bit
            dtype, as DDP does; ``"fp32"`` all-reduces them in FP32 (see
            :mod:`lightning_mp.precision.ddp`).
        max_consecutive_skips: a run of this many skipped steps in a row (inf/NaN gradients; with
            a dynamic loss scale, without a back-off) raises
            :class:`~lightning_mp.SkippedStepsError` naming what went non-finite, after a warning
            at half way. ``None``: never.

    Outside the optimizer step every optimizer holds the model's own 16-bit parameters. During
    the step (``on_before_optimizer_step``, gradient clipping) a ``master="fp32"`` optimizer holds
    the FP32 masters with their FP32, unscaled gradients, and each of the model's parameters shows
    the gradient the step uses as its ``.grad`` (FP32 and unscaled where the step holds it so), as
    under ``32-true``. ``state_dict()`` gives the FP32 values, and :attr:`store` gives any of them.
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
        master: str = "auto",
        grad_reduce_dtype: Optional[Literal["fp32"]] = None,
        max_consecutive_skips: Optional[int] = 10,
    ) -> None:
        if precision not in MASTER_DTYPES:
            raise ValueError(
                f"MasterWeightPrecision accepts precision {sorted(MASTER_DTYPES)}, got {precision!r}. "
                f"For Lightning's own modes use lightning_mp.precision_plugin({precision!r})."
            )
        check_master_options(precision, master, max_consecutive_skips, kept="weights")
        if grad_reduce_dtype not in (None, "fp32"):
            raise ValueError(f"grad_reduce_dtype must be None (the 16-bit dtype) or 'fp32', got {grad_reduce_dtype!r}")
        self.precision = precision
        self.master = master
        self.dtype = MASTER_DTYPES[precision]
        self.keep_fp32: tuple[KeepFP32, ...] = tuple(DEFAULT_KEEP_FP32 if keep_fp32 is None else keep_fp32)
        self.scaler = make_scaler(precision, loss_scale, init_scale, growth_factor, backoff_factor, growth_interval,
                                  hysteresis, min_scale)
        if self.scaler is not None and self.scaler.dynamic and max_consecutive_skips is not None:
            if max_consecutive_skips <= hysteresis:
                raise ValueError(f"max_consecutive_skips={max_consecutive_skips} must exceed hysteresis={hysteresis}")
        self.grad_reduce_dtype = grad_reduce_dtype
        self.device = device
        self.store = MasterStore(self.dtype, store_policy(master, self.dtype))
        self.skips = SkipTracker(self.scaler, max_consecutive_skips)
        self.grads = FP32Grads()  # micro-batches summed in FP32 under every storage policy
        self.step_runner = MasterStep(self.store, self.grads, self.scaler, self.skips, sync_free)
        self._module: Optional[nn.Module] = None
        self._hooks: list[Any] = []

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped so far for inf/NaN gradients."""
        return self.skips.skipped_steps

    # -- setup -------------------------------------------------------------------------------

    def convert_module(self, module: nn.Module) -> nn.Module:
        """Cast to the 16-bit dtype, all but the ``keep_fp32`` modules; the store keeps the FP32 values."""
        _refuse_sharded(module)
        _refuse_sparse(module)
        previous = MasterStore.of(module)
        if previous is not None and previous is not self.store:  # converted by another plugin before
            self.store.take_over(previous)
        cast_module_(module, self.dtype, self.keep_fp32, before_cast=self.store.capture)
        follow_callers(kept_modules(module, self.keep_fp32))
        self.store.attach(module)
        return module

    def connect(
        self, model: nn.Module, optimizers: list[Optimizer], lr_schedulers: list[Any]
    ) -> tuple[nn.Module, list[Optimizer], list[Any]]:
        """Give each 16-bit parameter its storage (the policy's if an optimizer steps it), keep
        optimizer state FP32, and hold step schedulers on skipped steps."""
        module = lightning_module(model)
        self._module = module
        trainer = getattr(module, "_trainer", None)
        raw = [unwrap(o) for o in optimizers]
        report_storage(self.precision, "weight", raw, [self.attach(optimizer) for optimizer in raw])
        self.store.track(module, (p for o in raw for g in o.param_groups for p in g["params"]))
        self.grads.attach(p for p in self.store.params() if p.requires_grad)  # also for a raw loss.backward()
        self.device = self.device or device_type(model)
        self.step_runner.device = self.device
        self.skips.watch_schedulers(module, lr_schedulers)
        if isinstance(model, DistributedDataParallel):
            self._setup_ddp(model, trainer)
        for callback in getattr(trainer, "callbacks", []):
            average_fp32(callback, self.store)  # SWA and EMA average the FP32 values
        return model, optimizers, lr_schedulers

    def attach(self, optimizer: Optimizer) -> str:
        """Give ``optimizer`` its way of keeping the FP32 values and say which, in the start line's
        words: the store's storage (a :mod:`lightning_mp.optim` optimizer, or a torch one it
        adopts), or FP32 masters it steps itself (its state kept FP32). Fabric's plugin calls it too."""
        policy = self.store.policy
        if isinstance(optimizer, StoredMasterOptimizer) or (policy != "fp32" and adopt(optimizer, policy)):
            optimizer.use_store(self.store)
            return STORAGE[policy]
        if self.master not in ("auto", "fp32"):
            raise TypeError(
                f"master={self.master!r} needs an optimizer that steps the bf16 weights with their "
                f"{self.master} storage: lightning_mp.optim.AdamW or SGD, or torch's AdamW, Adam or SGD "
                f"(not {type(optimizer).__module__}.{type(optimizer).__qualname__}: {why_not(optimizer)}). "
                "Any optimizer works with master='fp32'."
            )
        _upcast_state(optimizer)
        self._hooks += _keep_fp32_state_on_load(optimizer)
        reason = "" if policy == "fp32" else f" ({why_not(optimizer)})"
        return STORAGE["fp32"] + reason

    def _setup_ddp(self, model: DistributedDataParallel, trainer: Any) -> None:
        """Rank 0's FP32 values on every rank (DDP broadcast only the 16-bit weights); who reduces."""
        self.store.take_first_rank(lambda tensors: ddp.broadcast(tensors, model.process_group))
        if ddp.takes_over(trainer, self.grad_reduce_dtype):
            dtype = torch.float32 if self.grad_reduce_dtype == "fp32" else self.dtype
            self.step_runner.reducer = ddp.GradReducer(model, dtype)

    # -- compute -----------------------------------------------------------------------------

    def forward_context(self) -> AbstractContextManager:
        """Autocast to the 16-bit dtype, so the op-level FP32 lists (softmax, losses, norms) apply."""
        device = self.device or (device_type(self._module) if self._module is not None else "cpu")
        return torch.autocast(device, dtype=self.dtype)

    def pre_backward(self, tensor: Tensor, module: "pl.LightningModule") -> Tensor:  # type: ignore[override]
        self.step_runner.before_backward()
        # parameters unfrozen since the last backward get their FP32 sums too
        self.grads.attach(p for p in self.store.params() if p.requires_grad)
        if self.scaler is not None:
            tensor = self.scaler.scale_loss(tensor)
        return super().pre_backward(tensor, module)

    def post_backward(self, tensor: Tensor, module: "pl.LightningModule") -> Tensor:  # type: ignore[override]
        for p in self.store.params():  # DDP may have rewritten the 16-bit grads with their reduced values
            self.grads.record(p)
        return super().post_backward(tensor, module)

    # -- the step (lightning_mp.precision.step) -------------------------------------------------

    def optimizer_step(  # type: ignore[override]
        self,
        optimizer: Optimizer,
        model: Union["pl.LightningModule", nn.Module],
        closure: Callable[[], Any],
        **kwargs: Any,
    ) -> Any:
        """Backward (the closure), then prepare the grads, skip or clip and step the FP32 values, store back."""
        closure_result = closure()
        lightning = isinstance(model, pl.LightningModule)
        if closure_result is None and lightning and model.automatic_optimization:
            return None  # training_step returned None: no backward, nothing to step (as Lightning's AMP)
        before_step = (lambda: self._after_closure(model, optimizer)) if lightning else (lambda: None)
        self.step_runner.run(optimizer, before_step, closure_result, keep_grads=not _frees_grads(model),
                             hooks=lightning and user_step_hooks(model), **kwargs)
        self._log(model)
        return closure_result

    def clip_grad_by_norm(self, optimizer: Optimizer, clip_val: Union[int, float]) -> None:
        """Clip by the global norm of the unscaled FP32 gradients (also when called before ``opt.step()``)."""
        self.step_runner.clip_by_norm(optimizer, float(clip_val))

    def clip_grad_by_value(self, optimizer: Optimizer, clip_val: Union[int, float]) -> None:
        self.step_runner.clip_by_value(optimizer, float(clip_val))

    def _log(self, model: nn.Module) -> None:
        if not isinstance(model, pl.LightningModule) or getattr(model, "_current_fx_name", None) is None:
            return
        model.log("precision/skipped_steps", float(self.skipped_steps))
        if self.scaler is not None:
            model.log("precision/loss_scale", self.scaler.scale)

    def teardown(self) -> None:
        self.skips.settle()
        self.grads.detach()
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return self.skips.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skips.load_state_dict(state_dict)

    @torch.no_grad()
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Take the FP32 values from the checkpoint's state dict (the model may have rounded them when it
        was loaded, before this plugin converted it: a 16-bit model's weights, and its kept modules,
        upcast at the conversion); refuse non-finite weights, naming them."""
        state = checkpoint.get("state_dict", {})
        if self._module is None:
            return
        for name, p in self._module.named_parameters():
            value = state.get(name)
            if isinstance(value, Tensor):
                check_finite(name, value)
                if p.dtype in HALF:
                    self.store.set_value(p, value)
                elif p.is_floating_point() and value.shape == p.shape:
                    p.copy_(value)  # a kept module of a model handed over in 16 bits: upcast since, rounded then


def _frees_grads(model: nn.Module) -> bool:
    """Whether gradients may die with the step: Lightning's automatic loop with its own
    ``optimizer_zero_grad`` (``set_to_none=True``) clears them before the next backward anyway."""
    return (
        isinstance(model, pl.LightningModule)
        and model.automatic_optimization
        and type(model).optimizer_zero_grad is pl.LightningModule.optimizer_zero_grad
    )


@torch.no_grad()
def _upcast_state(optimizer: Optimizer) -> None:
    """State an optimizer built in its constructor from 16-bit parameters (Adagrad's sums): FP32."""
    for state in optimizer.state.values():
        for key, value in list(state.items()):
            if isinstance(value, Tensor) and value.dtype in HALF:
                state[key] = value.float()


def _keep_fp32_state_on_load(optimizer: Optimizer) -> list[Any]:
    """torch's ``load_state_dict`` casts state to the parameters' (16-bit) dtype; the optimizer
    steps FP32 values, so put the loaded values back in FP32 (a torch optimizer's state loads too)."""
    loaded: dict[str, Any] = {}

    def before(opt: Optimizer, state_dict: dict[str, Any]) -> None:
        loaded["state_dict"] = state_dict

    def after(opt: Optimizer) -> None:
        state_dict = loaded.pop("state_dict", None)
        if state_dict is None:
            return
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in opt.param_groups for p in g["params"]]
        for index, p in zip(saved_ids, params):
            if p.dtype not in HALF:
                continue
            for key, value in state_dict["state"].get(index, {}).items():
                if key != "step" and isinstance(value, Tensor) and value.is_floating_point():
                    opt.state[p][key] = value.to(device=p.device, dtype=torch.float32)

    return [optimizer.register_load_state_dict_pre_hook(before), optimizer.register_load_state_dict_post_hook(after)]


def _refuse_sparse(module: nn.Module) -> None:
    """An ``nn.Embedding`` or ``nn.EmbeddingBag`` with ``sparse=True`` gives sparse gradients, which
    the FP32 sums of micro-batches, the inf/NaN check and the fused step do not take: one line
    here, not a traceback from inside the first step."""
    sparse = next(((n, m) for n, m in module.named_modules()
                   if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse), None)
    if sparse is not None:
        name, m = sparse
        raise ValueError(f"MasterWeightPrecision takes dense gradients only: {name or 'the model'} is an "
                         f"nn.{type(m).__name__} with sparse=True; build it with sparse=False (and use "
                         "torch's Adam or AdamW in place of SparseAdam)")


def _refuse_sharded(module: nn.Module) -> None:
    """DTensor parameters (FSDP2's ``fully_shard``, tensor parallelism): a cast of ``param.data``
    changes the reported dtype while the local shard stays FP32, so the run would silently train
    as ``bf16-mixed`` with a redundant FP32 copy."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.tensor import DTensor

    sharded = next((n for n, p in module.named_parameters() if isinstance(p, DTensor)), None)
    if sharded is not None:
        raise ValueError(
            f"MasterWeightPrecision does not shard: {sharded} is a DTensor (FSDP2's fully_shard or tensor "
            "parallelism); use lightning_mp.precision.FSDP2MasterWeightPrecision (lightning_mp.Trainer picks it "
            "under ModelParallelStrategy) and shard with its shard()"
        )
