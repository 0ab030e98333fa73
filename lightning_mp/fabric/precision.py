"""``MasterWeightPrecision`` for Lightning Fabric: the Trainer plugin's store and step behind Fabric's hooks.

Fabric's ``Precision`` has no ``connect``: the module is converted in ``fabric.setup`` before any
optimizer is known, the optimizer step comes without a closure, gradient clipping goes through
``unscale_gradients`` + ``main_params``, and the loss is scaled in ``backward``. This adapter
maps those hooks onto :class:`lightning_mp.MasterWeightPrecision`'s own mechanism (its
:class:`~lightning_mp.masters.MasterStore`, FP32 gradient sums, loss scaler, skip tracker and
:class:`~lightning_mp.precision.step.MasterStep`); nothing of the step is written twice.

- An optimizer is attached when it is known: at ``fabric.setup(model, optimizer)``, in
  ``lightning_mp.Fabric.setup_optimizers``, else at its first step; a torch AdamW, Adam or SGD is
  adopted there, as under the Trainer.
- Under DDP the plugin all-reduces the FP32 gradient sums at the step (DDP's own bf16 bucket
  reduction would see one micro-batch of an accumulated step): found once, at the first backward.
- A skipped step holds the LR schedulers of its optimizer, found when the step is skipped.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, Literal, Optional

import torch
from lightning.fabric.plugins.precision import Precision
from lightning.fabric.utilities.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from lightning_mp.precision import ddp
from lightning_mp.precision import master as trainer_plugin
from lightning_mp.precision.options import report_storage
from lightning_mp.precision.schedulers import hold, make_skip_aware
from lightning_mp.precision.step import unwrap
from lightning_mp.storage import HALF


class Adapter(Precision):
    """What both Fabric plugins expose of the Trainer plugin they wrap (``self.core``)."""

    core: Any

    @property
    def store(self) -> Any:
        """Where each parameter's FP32 value lives (:class:`~lightning_mp.masters.MasterStore`)."""
        return self.core.store

    @property
    def grads(self) -> Any:
        """The FP32 gradients kept apart from ``.grad`` (sums between micro-batches, or shards)."""
        return self.core.grads

    @property
    def scaler(self) -> Any:
        return self.core.scaler

    @property
    def skipped_steps(self) -> int:
        return self.core.skipped_steps

    def convert_output(self, data: Any) -> Any:
        """Outputs in FP32, as Fabric's ``bf16-mixed``: a loss computed outside the forward is FP32."""
        return apply_to_collection(data, function=_to_fp32, dtype=Tensor)

    def backward(self, tensor: Tensor, model: Optional[nn.Module], *args: Any, **kwargs: Any) -> None:
        if self.scaler is not None:
            tensor = self.scaler.scale_loss(tensor)
        tensor.backward(*args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        return self.core.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.core.load_state_dict(state_dict)


class MasterWeightPrecision(Adapter):
    """16-bit weights and autocast compute, FP32 master values, for ``lightning.Fabric``.

    Takes the arguments of :class:`lightning_mp.MasterWeightPrecision` (``precision``, ``master``,
    ``keep_fp32``, ``loss_scale`` and the dynamic-scale options, ``max_consecutive_skips``,
    ``grad_reduce_dtype``, ``sync_free``, ``device``) and behaves the same. Save its state with
    the rest: ``fabric.save(path, {"model": model, "optimizer": opt, "precision": fabric.strategy.precision})``
    (``lightning_mp.Fabric`` adds it itself).
    """

    precision: Literal["bf16-master", "16-master"] = "bf16-master"

    def __init__(self, precision: Literal["bf16-master", "16-master"] = "bf16-master", **options: Any) -> None:
        self.core = trainer_plugin.MasterWeightPrecision(precision, **options)
        self.precision = precision
        self._attached: dict[int, Optimizer] = {}
        self._ddp_checked = False

    # -- setup -------------------------------------------------------------------------------

    def convert_module(self, module: nn.Module) -> nn.Module:
        """Cast to 16 bits (but the ``keep_fp32`` modules); every 16-bit parameter gets its storage."""
        module = self.core.convert_module(module)
        self.core._module = module
        self.store.track(module, module.parameters())  # the policy's storage; an optimizer may change it
        self.core.grads.attach(p for p in self.store.params() if p.requires_grad)
        for optimizer in _optimizers_of(module):  # fabric.setup(model, optimizer): it exists already
            self.attach(optimizer)
        return module

    def attach(self, optimizer: Any) -> Optimizer:
        """Attach ``optimizer`` to the store (adopted, or stepping FP32 masters) and return the raw
        one. ``lightning_mp.Fabric`` calls it in ``setup``; a plain ``lightning.Fabric`` at the
        optimizer's first step, or at ``fabric.setup(model, optimizer)``. Call it yourself before
        ``fabric.load`` when the optimizer was set up on its own in a plain ``lightning.Fabric``:
        torch's ``load_state_dict`` casts an optimizer's state to its parameters' 16-bit dtype
        unless the plugin keeps it FP32."""
        raw = unwrap(getattr(optimizer, "optimizer", optimizer))  # (a _FabricOptimizer's)
        if id(raw) not in self._attached:
            self._attached[id(raw)] = raw
            # state of steps taken elsewhere (a loaded file), cast to 16 bits by torch's load_state_dict
            rounded = [k for st in raw.state.values() if float(st.get("step", 0)) > 0 for k, v in st.items()
                       if k != "step" and isinstance(v, Tensor) and v.dtype in HALF]
            if rounded:
                warnings.warn(f"lightning-mp: {type(raw).__qualname__}'s state ({rounded[0]}...) was loaded in 16 bits "
                              "before the precision plugin saw the optimizer: call fabric.strategy.precision.attach("
                              "optimizer) before fabric.load, or use lightning_mp.Fabric", stacklevel=2)
            report_storage(self.precision, "weight", [raw], [self.core.attach(raw)])
        return raw

    def _device(self) -> str:
        if self.core.device is None:
            params = self.store.params()
            self.core.device = params[0].device.type if params else "cpu"
            self.core.step_runner.device = self.core.device
        return self.core.device

    # -- compute -----------------------------------------------------------------------------

    def forward_context(self) -> AbstractContextManager:
        return torch.autocast(self._device(), dtype=self.core.dtype)

    def pre_backward(self, tensor: Tensor, module: Optional[nn.Module]) -> Any:
        if not self._ddp_checked:
            self._ddp_checked = True
            self._take_over_ddp()
        self.core.step_runner.before_backward()
        self.core.grads.attach(p for p in self.store.params() if p.requires_grad)  # parameters unfrozen since

    def post_backward(self, tensor: Tensor, module: Optional[nn.Module]) -> Any:
        for p in self.store.params():  # DDP may have rewritten the 16-bit grads
            self.core.grads.record(p)

    def _take_over_ddp(self) -> None:
        """Under DDP: rank 0's FP32 values everywhere, and the FP32 sums all-reduced at the step."""
        wrapper = _ddp_of(self.core._module)
        if wrapper is None:
            return
        self.store.take_first_rank(lambda tensors: ddp.broadcast(tensors, wrapper.process_group))
        dtype = torch.float32 if self.core.grad_reduce_dtype == "fp32" else self.core.dtype
        self.core.step_runner.reducer = ddp.GradReducer(wrapper, dtype)

    # -- the step ----------------------------------------------------------------------------

    def optimizer_step(self, optimizer: Any, **kwargs: Any) -> Any:
        """Prepare the FP32 gradients, skip or step the FP32 values, store them back."""
        raw = self.attach(optimizer)
        self._device()
        skipped = self.skipped_steps
        self.core.step_runner.run(raw, lambda: None, None, keep_grads=True, **kwargs)
        if self.skipped_steps > skipped:  # the weights did not move: neither do the schedules
            hold_schedulers_of(raw)
        return None

    def unscale_gradients(self, optimizer: Optimizer) -> None:
        self.core.step_runner.unscale(self.attach(optimizer))

    def main_params(self, optimizer: Optimizer) -> Iterator[Tensor]:
        """Stand-ins whose ``.grad`` are the step's unscaled FP32 gradients, for Fabric's clipping
        (none on a step that will be skipped: its gradients are not finite)."""
        prepared = self.core.step_runner.unscale(self.attach(optimizer))
        if bool(prepared.found_inf.item()):
            return
        for p in prepared.params:
            g = prepared.fp32.get(p, p.grad)
            if g is not None:
                holder = torch.empty((), dtype=g.dtype, device=g.device).expand(g.shape)  # no memory
                holder.grad = g
                yield holder

    def teardown(self) -> None:
        self.core.teardown()


def _to_fp32(t: Tensor) -> Tensor:
    return t.float() if t.is_floating_point() and t.dtype != torch.float64 else t


def _ddp_of(module: Optional[nn.Module]) -> Optional[DistributedDataParallel]:
    """The DDP wrapper Fabric's strategy put around ``module`` (one scan of the live objects)."""
    if module is None or not torch.distributed.is_initialized():
        return None
    # (type(o), not isinstance: some live objects warn when their __class__ is read)
    return next((o for o in gc.get_objects() if issubclass(type(o), DistributedDataParallel) and o.module is module), None)


def _optimizers_of(module: nn.Module) -> list[Optimizer]:
    """The live optimizers stepping ``module``'s parameters (one scan of the live objects, at setup)."""
    params = {id(p) for p in module.parameters()}
    return [o for o in gc.get_objects() if issubclass(type(o), Optimizer)
            and any(id(p) in params for g in o.param_groups for p in g["params"])]


def hold_schedulers_of(optimizer: Optimizer) -> None:
    """Hold the next ``step()`` of the LR schedulers stepping ``optimizer`` (directly or through
    Fabric's wrapper), found by a scan of the live objects: only on a skipped step."""
    for o in gc.get_objects():
        if issubclass(type(o), (LRScheduler, ReduceLROnPlateau)):
            target = getattr(o, "optimizer", None)
            if target is optimizer or getattr(target, "optimizer", None) is optimizer:
                make_skip_aware(o)
                hold(o)
