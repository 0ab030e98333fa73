"""``FSDP2MasterWeightPrecision``: ``bf16-master`` and ``16-master`` under Lightning's
``ModelParallelStrategy``, where ``configure_model`` shards the model with torch's
``fully_shard`` (FSDP2).

FSDP2 keeps each parameter as an FP32 DTensor shard and, with a ``MixedPrecisionPolicy``,
all-gathers it in 16 bits for compute and reduce-scatters the gradients in FP32: the shards are
the FP32 masters, sharded. What it lacks, and this plugin adds, is the rest of a master-weight
step: loss scaling for fp16, one decision on every rank to skip a step whose gradients hold an
inf/NaN anywhere (an all-reduce of one flag), LR schedulers held on a skipped step, a limit on
skipped steps in a row, and the loss scaler in checkpoints. Norm layers (and any ``keep_fp32``
module) are sharded with an FP32 policy: FP32 weights, all-gathered in FP32 (norms compute in
FP32 under autocast; a kept module's matmuls run in FP32 only where it turns autocast off, as
the MoE router does).

With ``master="remainder"`` (or ``"kahan"``, ``"stochastic"``) the shards are bf16 instead, and
each one's FP32 value is the shard plus its storage (an int16 remainder: exact), kept by a
:class:`~lightning_mp.masters.MasterStore` and stepped by ``lightning_mp.optim``: AdamW's training
state is then 12 bytes per parameter (2 + 2 + 8), sharded, with the FP32 gradients that the
FP32-shard path steps with (:mod:`~lightning_mp.precision.fsdp2_grads`), so ``"remainder"``
trains as ``"fp32"`` does, bit for bit until an FP32 value lands exactly on a bf16 tie (the
remainder split rounds it away from zero, FSDP2's cast of an FP32 shard to even). Checkpoints
hold the FP32 values.

The user's side, in ``configure_model``::

    plugin = self.trainer.precision_plugin
    plugin.shard(self.model, self.device_mesh["data_parallel"], blocks=[Block])
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import Precision
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_mp.convert import DEFAULT_KEEP_FP32, KeepFP32, follow_callers, matcher
from lightning_mp.masters import MasterStore
from lightning_mp.optim.base import StoredMasterOptimizer
from lightning_mp.parallel import clip_by_global_norm, outermost, shard_units
from lightning_mp.precision.fsdp2_grads import FP32GradShards
from lightning_mp import loading
from lightning_mp.optim.adopt import adopt, why_not
from lightning_mp.precision.options import (MASTER_DTYPES, STORAGE, check_master_options, device_type, lightning_module,
                                           make_scaler, report_storage, store_policy, user_step_hooks)
from lightning_mp.precision.step import unwrap
from lightning_mp.precision.skips import SkipTracker, sharded_step, step_gradients
from lightning_mp.storage import like, local


class FSDP2MasterWeightPrecision(Precision):
    """Master weights under FSDP2: the FP32 DTensor shards are the masters (see the module docstring).

    Args:
        precision: ``"bf16-master"`` or ``"16-master"`` (fp16 compute, dynamic loss scaling).
        keep_fp32: modules that compute in FP32 (default: every normalization layer), as in
            :class:`~lightning_mp.MasterWeightPrecision`; :meth:`shard` gives them an FP32 policy.
        device: the device type for ``torch.autocast`` (default: the mesh's, from :meth:`shard`).
        master: ``"auto"`` (default: bf16 shards with int16 remainders under ``bf16-master``, for
            ``lightning_mp.optim`` and torch's own AdamW, Adam and SGD, which it adopts; FP32 shards
            under ``16-master``), ``"fp32"`` (FP32 shards, any optimizer) or ``"remainder"``,
            ``"kahan"``, ``"stochastic"`` (bf16 shards with that storage, ``bf16-master`` only).
            The shards are cast in :meth:`shard`, before the optimizer exists: an optimizer that
            cannot step bf16 shards is refused at the start, naming ``master="fp32"``.
        grad_reduce_dtype: ``None`` or ``"fp32"``, both FP32 (the policy's ``reduce_dtype``).
        loss_scale, init_scale, growth_factor, backoff_factor, growth_interval, hysteresis,
        min_scale, max_consecutive_skips: as :class:`~lightning_mp.MasterWeightPrecision`'s.
    """

    def __init__(
        self,
        precision: str = "bf16-master",
        *,
        keep_fp32: Optional[Sequence[KeepFP32]] = None,
        device: Optional[str] = None,
        master: str = "auto",
        grad_reduce_dtype: Optional[str] = None,
        loss_scale: Any = None,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        hysteresis: int = 2,
        min_scale: float = 1.0,
        max_consecutive_skips: Optional[int] = 10,
    ) -> None:
        if precision not in MASTER_DTYPES:
            raise ValueError(f"FSDP2MasterWeightPrecision accepts {sorted(MASTER_DTYPES)}, got {precision!r}")
        check_master_options(precision, master, max_consecutive_skips, kept="shards")
        if grad_reduce_dtype not in (None, "fp32"):
            raise ValueError(f"under FSDP2 gradients are reduce-scattered in FP32; grad_reduce_dtype={grad_reduce_dtype!r}")
        self.precision = precision  # type: ignore[assignment]
        self.dtype = MASTER_DTYPES[precision]
        self.keep_fp32 = tuple(DEFAULT_KEEP_FP32 if keep_fp32 is None else keep_fp32)
        self.device = device  # None: the run's, from the mesh (shard) or the sharded model (convert_module)
        self.scaler = make_scaler(precision, loss_scale, init_scale, growth_factor, backoff_factor,
                                  growth_interval, hysteresis, min_scale)
        self.skips = SkipTracker(self.scaler, max_consecutive_skips)
        self.forced = master != "auto"  # auto: bf16 shards with int16 remainders under bf16-master (see connect)
        master = store_policy(master, self.dtype)
        self.master = master
        # bf16 shards (master != "fp32"): where their FP32 values live, and their FP32 gradients
        self.store = MasterStore(torch.bfloat16, master) if master != "fp32" else None
        self.grads = FP32GradShards() if master != "fp32" else None
        self._warned_hooks = False  # (on_before_optimizer_step cannot see bf16 shards' gradients)
        self._module: Optional[nn.Module] = None
        self._fp32_compute: set[int] = set()  # the parameters of the modules kept in FP32
        self._optimizers: list[Any] = []  # the lightning_mp.optim optimizers stepping bf16 shards

    @property
    def skipped_steps(self) -> int:
        return self.skips.skipped_steps

    # -- sharding ------------------------------------------------------------------------------

    def mp_policy(self, fp32: bool = False, cast_forward_inputs: bool = True) -> Any:
        """FSDP2's policy: 16-bit compute (FP32 for kept modules), FP32 gradient reduction."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=torch.float32 if fp32 else self.dtype, reduce_dtype=torch.float32,
                                    cast_forward_inputs=cast_forward_inputs)

    def shard(self, module: nn.Module, mesh: Any, blocks: Iterable[type] = (), experts: Sequence[nn.Module] = (),
              expert_mesh: Optional[Any] = None) -> nn.Module:
        """``fully_shard`` ``module``: the kept (FP32) modules first, each with an FP32 policy,
        then ``experts`` (expert-parallel modules whose parameters are DTensors over their EP
        group already) over ``expert_mesh``, the ranks holding the same experts, then every
        instance of ``blocks`` outside the kept modules (one FSDP unit each), then ``module``
        itself. With bf16 shards (``master != "fp32"``) the other parameters are cast to bf16
        first, their exact FP32 values kept by the store, shard by shard."""
        from torch.distributed.fsdp import FSDPModule

        self.device = self.device or mesh.device_type
        matchers = [matcher(entry) for entry in self.keep_fp32]
        kept = [m for name, m in module.named_modules() if name and (getattr(m, "keep_fp32", False) is True
                                                                      or any(f(name, m) for f in matchers))]
        kept = outermost(kept)
        values = self._cast_to_bf16(module, kept) if self.store is not None else {}

        def policy(kind: str) -> Any:
            # The root leaves the model's inputs as they come, as autocast does on one device: cast
            # to 16 bits there, float inputs would reach a kept FP32 first layer rounded.
            return self.mp_policy(fp32=kind == "fp32", cast_forward_inputs=kind != "root")

        sharded = shard_units(module, mesh, policy, kept=kept, blocks=blocks, experts=experts, expert_mesh=expert_mesh)
        follow_callers(kept)  # after FSDP's hooks, so that its input casts come after ours
        self._fp32_compute.update(id(p) for m in kept for p in m.parameters())
        if self.store is not None:
            for name, p in module.named_parameters():
                if name in values:
                    self.store.set_value(p, values.pop(name))  # this rank's shard of the exact value
            self.store.attach(module)
            for unit in module.modules():
                if isinstance(unit, FSDPModule) and unit not in kept:
                    self.grads.install(unit)  # type: ignore[union-attr]
        return sharded

    @staticmethod
    def _cast_to_bf16(module: nn.Module, kept: list[nn.Module]) -> dict[str, Tensor]:
        """Cast the FP32 parameters outside ``kept`` to bf16; their FP32 values, by name."""
        from torch.distributed.tensor import DTensor

        fp32 = {id(p) for m in kept for p in m.parameters()}
        values = {}
        for name, p in list(module.named_parameters()):
            if p.dtype == torch.float32 and id(p) not in fp32:
                values[name] = p.data  # the FP32 tensor itself: no copy
                if isinstance(p, DTensor):  # (expert-parallel) a DTensor's .data setter keeps its FP32 local tensor
                    owner, _, leaf = name.rpartition(".")
                    module.get_submodule(owner).register_parameter(
                        leaf, nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=p.requires_grad))
                else:
                    p.data = p.data.to(torch.bfloat16)
        return values

    def compute_dtype(self, p: Tensor) -> torch.dtype:
        """The dtype ``p`` computes in: FP32 in the kept modules, else the 16-bit dtype."""
        return torch.float32 if id(p) in self._fp32_compute else self.dtype

    def convert_module(self, module: nn.Module) -> nn.Module:
        """Nothing to cast (FSDP2 casts at all-gather); check that the model was sharded with a
        policy that keeps the masters FP32 and reduces in FP32."""
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        units = [m for m in module.modules() if isinstance(m, FSDPModule)]
        if not units or not any(isinstance(p, DTensor) for p in module.parameters()):
            raise ValueError("FSDP2MasterWeightPrecision needs a model sharded in configure_model: "
                             "self.trainer.precision_plugin.shard(model, self.device_mesh['data_parallel'], blocks=[...])")
        for unit in units:  # (clipping by norm: Lightning's, on DTensor gradients, is the global norm)
            policy = unit._get_fsdp_state()._mp_policy
            if policy.param_dtype not in (self.dtype, torch.float32) or policy.reduce_dtype not in (None, torch.float32):
                raise ValueError(
                    f"{type(unit).__name__} is sharded with MixedPrecisionPolicy(param_dtype={policy.param_dtype}, "
                    f"reduce_dtype={policy.reduce_dtype}), which contradicts {self.precision}: use plugin.shard() "
                    "or plugin.mp_policy()"
                )
        for p in module.parameters():
            kept = self.store is not None and self.store.kind(p) is not None  # a bf16 shard with its storage
            if p.dtype != torch.float32 and not kept:
                raise ValueError(f"a {p.dtype} parameter: under {self.precision} with master={self.master!r} the "
                                 "sharded parameters are the FP32 masters; shard with plugin.shard()")
        self.device = self.device or device_type(module)
        return module

    def forward_context(self) -> AbstractContextManager:
        return torch.autocast(self.device or "cpu", dtype=self.dtype)

    # -- the step --------------------------------------------------------------------------------

    def connect(self, model: nn.Module, optimizers: list[Optimizer], lr_schedulers: list[Any]) -> Any:
        self.skips.watch_schedulers(model, lr_schedulers)
        self._module = lightning_module(model)
        if self.store is not None:
            raw = [unwrap(o) for o in optimizers]
            for optimizer in raw:
                if not (isinstance(optimizer, StoredMasterOptimizer) or adopt(optimizer, self.master)):
                    chosen = f"master={self.master!r}" if self.forced else "the default (master='auto')"
                    raise TypeError(
                        f"{chosen} keeps bf16 shards with their {self.master} storage, which needs "
                        f"lightning_mp.optim.AdamW or SGD, or torch's AdamW, Adam or SGD (not {type(optimizer).__module__}."
                        f"{type(optimizer).__qualname__}: {why_not(optimizer)}); pass master='fp32' for FP32 shards, "
                        "which any optimizer steps."
                    )
                optimizer.use_store(self.store)
            report_storage(self.precision, "shard", raw, [STORAGE[self.master]] * len(raw))
            self._optimizers = raw
            self.store.track(self._module, (p for o in raw for g in o.param_groups for p in g["params"]))
        return super().connect(model, optimizers, lr_schedulers)

    def pre_backward(self, tensor: Tensor, module: Any) -> Tensor:
        return self.scaler.scale_loss(tensor) if self.scaler is not None else tensor

    def optimizer_step(self, optimizer: Optimizer, model: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:
        """Backward, unscale, skip on every rank if any rank's gradients hold inf/NaN, else
        Lightning's hooks and clipping, then the inner step on the FP32 shards."""
        if self.grads is None:
            return sharded_step(self, self.skips, optimizer, model, closure, **kwargs)
        if not self._warned_hooks and isinstance(model, pl.LightningModule) and user_step_hooks(model):
            self._warned_hooks = True
            warnings.warn(f"lightning-mp: with bf16 shards (master={self.master!r}) their FP32 gradients are held apart: "
                          "in on_before_optimizer_step their .grad is None; clip with gradient_clip_val or "
                          "self.clip_gradients, or pass master='fp32' to have FP32 shards with their gradients")
        try:
            return sharded_step(self, self.skips, optimizer, model, closure, held=self.grads.grads, **kwargs)
        finally:  # stepped or skipped, this optimizer's gradients are done
            self.grads.pop([p for g in optimizer.param_groups for p in g["params"]])

    def clip_grad_by_norm(self, optimizer: Optimizer, clip_val: Union[int, float]) -> None:
        """torch's ``clip_grad_norm_`` arithmetic on the FP32 gradient shards (of bf16 shards too),
        by the global norm over every mesh's shards (dense and expert-parallel: each element once)."""
        grads = self._held(optimizer)
        if grads is None:
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        clip_by_global_norm(grads, clip_val)
        return None

    def clip_grad_by_value(self, optimizer: Optimizer, clip_val: Union[int, float]) -> None:
        grads = self._held(optimizer)
        if grads is None:
            return super().clip_grad_by_value(optimizer, clip_val)
        for g in grads:
            local(g).clamp_(min=-clip_val, max=clip_val)
        return None

    def _held(self, optimizer: Optimizer) -> Optional[list[Tensor]]:
        """``optimizer``'s gradients as DTensors: the FP32 shards kept for bf16 shards, the others'
        ``.grad`` (None: FP32 shards only, Lightning's clipping applies)."""
        if self.grads is None:
            return None
        return [like(g, p) for p, g in step_gradients(optimizer, self.grads.grads).items()]

    # -- checkpoints -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = self.skips.state_dict()
        if self.store is not None:
            # Stochastic rounding's generators and each optimizer's noise counter: torch's sharded
            # optimizer state dicts keep only "state" and "param_groups".
            state["store"] = self.store.state_dict()
            state["noise_steps"] = [o._noise_step for o in self._optimizers]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skips.load_state_dict(state_dict)
        if self.store is not None and "store" in state_dict:
            self.store.load_state_dict(state_dict["store"])
            for optimizer, count in zip(self._optimizers, state_dict.get("noise_steps", [])):
                optimizer._noise_step = count  # after Lightning loaded the optimizers

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Give bf16 shards the exact FP32 values of a full (one-file) checkpoint. torch's
        ``set_model_state_dict``, which Lightning loads it with, copies each value into the bf16
        shard (rounding it) before any hook sees it; a distributed checkpoint loads exactly."""
        module = self._module
        path = getattr(getattr(module, "_trainer", None), "ckpt_path", None)
        if self.store is None or path is None or not Path(path).is_file():
            return
        saved = loading.load(path, mmap=True)["state_dict"]  # plain data only, as Lightning's own load of it
        for name, p in module.named_parameters():  # type: ignore[union-attr]
            if name in saved and self.store.kind(p) is not None:
                self.store.set_value(p, saved[name])  # this rank's shard of it, no communication
