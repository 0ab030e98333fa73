"""Diagnostics that make the mantissa trap visible: the :class:`SwallowedUpdateMonitor`, which
counts the updates a 16-bit weight would round away. (Memory per parameter: :mod:`lightning_mp.memory`.)"""

from __future__ import annotations

import copy
import warnings
from typing import Any, NamedTuple, Optional

import lightning.pytorch as L
import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_mp.storage import local


def half_step(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """Half the spacing of ``dtype`` values at each element of ``weight`` (the largest update that rounds away).

    ``w = m * 2**e`` with ``m`` in [0.5, 1): the spacing is ``2**(e - 1 - mantissa_bits)``.
    """
    mantissa_bits = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    _, exponent = torch.frexp(weight.float())
    return torch.ldexp(torch.ones_like(weight, dtype=torch.float32), exponent - 2 - mantissa_bits)


def would_round_away(before: Tensor, update: Tensor, dtype: torch.dtype) -> Tensor:
    """Elements whose ``update`` leaves ``before``, stored in ``dtype``, unchanged (round to nearest)."""
    stored = before.to(dtype)
    return (stored.float() + update.float()).to(dtype) == stored


class SwallowedUpdateMonitor(L.Callback):
    """Logs how many weight updates 16-bit storage rounds away: the mantissa trap, made visible.

    Every ``every_n_steps`` optimizer steps, per parameter group ``i`` and over all groups:

    - ``precision/swallowed_frac[/pg{i}]``: among elements whose intended update is non-zero,
      the fraction the run's stored weights lost. The intended update is what the same
      optimizer step gives in FP32: a throwaway FP32 copy of the optimizer steps once on
      monitored steps. ``bf16-true``/``16-true``: the 16-bit weight did not change.
      ``*-master``: the FP32 master did not change (near 0: masters keep every update).
      ``32-true``/``*-mixed``: the update *would* round away if the weight were stored in bf16
      (fp16 for ``16-mixed``).
    - ``precision/swallowed_without_masters[/pg{i}]`` (``*-master`` only): the master moved but
      its 16-bit copy did not, the updates a ``*-true`` run would have lost this step.
    - ``precision/update_ratio[/pg{i}]``: median ``|update| / |weight|``, and
      ``precision/update_to_half_step[/pg{i}]``: median ``|update|`` over half a 16-bit step of
      the weight; below 1, a 16-bit weight cannot take the update.

    Sharded (``FSDPMasterWeightPrecision``, ``FSDP2MasterWeightPrecision``): each rank counts its
    own shards and the counts are summed over the ranks (one all-reduce), so the fractions are the
    whole model's; the medians are this rank's shards'. ``swallowed_without_masters`` then counts
    the updates the bf16 cast of an FP32 shard does not show. Not for stochastic-rounding shards
    (their FP32 reference needs ``.grad``, which bf16 shards do not keep).

    Under ``bf16-true`` or ``16-true`` it warns once when more than ``warn_above`` of the updates
    are swallowed ``patience`` checks in a row, and names the fix.

    Cost: on monitored steps only, a copy of the weights and one extra optimizer step in FP32.
    Measured on the default recipe's model (``benchmarks/monitor_cost.py``, 2 CPU cores, the
    hooks timed inside the run) at ``every_n_steps=50``: 2.2 % of training time under
    ``32-true``, 0.4 % under ``bf16-true``, 0.3 % under ``bf16-master``.
    """

    def __init__(self, every_n_steps: int = 50, warn_above: float = 0.5, patience: int = 3) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.warn_above, self.patience = every_n_steps, warn_above, patience
        self._before: Optional[list[list[_Snapshot]]] = None
        self._streak = 0
        self._warned = False
        self._exact = False
        self.last: dict[str, float] = {}

    @staticmethod
    def _mode(trainer: "L.Trainer") -> tuple[str, torch.dtype]:
        from lightning_mp.precision import MasterWeightPrecision  # a circular import at module level

        plugin = trainer.precision_plugin
        if isinstance(plugin, (MasterWeightPrecision, *_sharded_plugins())):
            return "master", plugin.dtype
        name = str(getattr(plugin, "precision", "32-true"))
        dtype = torch.float16 if name.startswith("16") else torch.bfloat16
        return ("true" if name in ("bf16-true", "16-true") else "fp32"), dtype

    def on_before_optimizer_step(self, trainer: "L.Trainer", pl_module: L.LightningModule, optimizer: Optimizer) -> None:
        self._before = None
        if (trainer.global_step + 1) % self.every_n_steps:
            return
        mode, _ = self._mode(trainer)
        store = getattr(trainer.precision_plugin, "store", None)
        # the model's parameters (during a master="fp32" step the optimizer holds their masters)
        groups = [store.params_of(g["params"]) if store else list(g["params"]) for g in optimizer.param_groups]
        # the FP32 values the run holds before the step (inside the step, master="fp32" parameters hold
        # them; sharded FP32 masters are their parameters): this rank's elements of sharded ones
        values = [[v.clone() for v in (store.values(g) if store else [local(p).detach() for p in g])] for g in groups]
        # The FP32 reference update, from a throwaway FP32 copy of the optimizer. Exact storage (every
        # policy but "stochastic", and sharded FP32 masters) holds the FP32 step's result itself: its
        # own update is the reference.
        self._exact = mode == "master" and (store is None or store.policy != "stochastic")
        if not self._exact and isinstance(trainer.precision_plugin, _sharded_plugins()):
            return  # stochastic-rounding shards: no FP32 reference (see the docstring)
        intended = _fp32_updates(optimizer, values) if mode != "fp32" and not self._exact else None
        if mode == "true" or (mode == "master" and not self._exact):
            if intended is None:
                return  # an optimizer that cannot be copied: no FP32 reference this time
        self._before = [
            [
                _Snapshot(
                    param=p,
                    param_before=values[g][k],
                    weight_before=local(p).detach().clone(),
                    intended=None if intended is None else intended[g][k],
                )
                for k, p in enumerate(params)
            ]
            for g, params in enumerate(groups)
        ]

    def on_train_batch_end(self, trainer: "L.Trainer", pl_module: L.LightningModule, *args: Any) -> None:
        if self._before is None:
            return
        mode, dtype = self._mode(trainer)
        store = getattr(trainer.precision_plugin, "store", None)
        compute_dtype = getattr(trainer.precision_plugin, "compute_dtype", None)
        metrics: dict[str, float] = {}
        totals = _Counts()
        groups: list[_Counts] = []
        for snapshots in self._before:
            counts = _Counts()
            after = store.values([s.param for s in snapshots]) if store else [local(s.param).detach() for s in snapshots]
            for snap, value in zip(snapshots, after):
                if mode == "fp32":
                    update = local(snap.param).detach() - snap.weight_before
                    lost = would_round_away(snap.weight_before, update, dtype)
                    base = snap.weight_before
                else:
                    intended = value - snap.param_before if self._exact else snap.intended
                    if intended is None:
                        continue
                    update, base = intended, snap.param_before.float()
                    lost = value == snap.param_before  # the value the run holds (its master, or stored)
                    if mode == "master":  # the 16-bit copy: the weight, or FSDP2's cast of an FP32 shard
                        copy = compute_dtype(snap.param) if compute_dtype else snap.weight_before.dtype
                        weight = local(snap.param).detach()
                        counts.add_without_masters(update, weight.to(copy) == snap.weight_before.to(copy))
                counts.add(update, lost, base, dtype)
            groups.append(counts)
        if isinstance(trainer.precision_plugin, _sharded_plugins()):
            _sum_over_ranks(groups)  # each rank counted its own shards
        for g, counts in enumerate(groups):
            totals.merge(counts)
            metrics.update(counts.metrics(f"/pg{g}", mode))
        self._before = None
        if totals.moved:
            metrics.update(totals.metrics("", mode))
            self.last = metrics
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)
            self._maybe_warn(mode, trainer, metrics["precision/swallowed_frac"])

    def _maybe_warn(self, mode: str, trainer: "L.Trainer", fraction: float) -> None:
        self._streak = self._streak + 1 if mode == "true" and fraction > self.warn_above else 0
        if self._streak >= self.patience and not self._warned:
            self._warned = True
            name = getattr(trainer.precision_plugin, "precision", "16-bit")
            warnings.warn(
                f"{100 * fraction:.0f}% of this step's weight updates were rounded away by {name} storage "
                f"({self.patience} checks in a row): the updates are smaller than half a 16-bit step of "
                "the weights, so the model is barely learning (the mantissa trap). Keep FP32 master "
                "weights instead: lightning_mp.Trainer(precision='bf16-master') (lightning_mp.MasterWeightPrecision).",
                stacklevel=2,
            )


def _sharded_plugins() -> tuple[type, ...]:
    """The plugins whose FP32 masters are shards: each rank holds and counts its own elements."""
    from lightning_mp.precision import FSDP2MasterWeightPrecision, FSDPMasterWeightPrecision

    return FSDPMasterWeightPrecision, FSDP2MasterWeightPrecision


def _sum_over_ranks(groups: list["_Counts"]) -> None:
    """Every rank's counts summed (one all-reduce); the medians stay this rank's samples."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or not groups:
        return
    from lightning_mp.precision.skips import collective_device  # a circular import at module level

    device = next((r.device for c in groups for r in c.ratios), None) or collective_device()
    counts = torch.tensor([[c.moved, c.swallowed, c.without_masters] for c in groups], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(counts)
    for c, (moved, swallowed, without) in zip(groups, counts.tolist()):
        c.moved, c.swallowed, c.without_masters = int(moved), int(swallowed), int(without)


class _Snapshot(NamedTuple):
    param: Tensor
    param_before: Tensor  # the FP32 value the run held before the step
    weight_before: Tensor  # the 16-bit (or FP32) weight before the step
    intended: Optional[Tensor]  # the FP32 reference update, where one was computed


class _Counts:
    """Running counts and samples of one parameter group (or all) for the monitor's metrics."""

    def __init__(self) -> None:
        self.moved = self.swallowed = self.without_masters = 0
        self.ratios: list[Tensor] = []
        self.halves: list[Tensor] = []

    def add(self, update: Tensor, lost: Tensor, base: Tensor, dtype: torch.dtype) -> None:
        nonzero = update != 0
        self.moved += int(nonzero.sum())
        self.swallowed += int((lost & nonzero).sum())
        sel = nonzero & (base != 0)
        self.ratios.append((update[sel].abs() / base[sel].abs()).float())
        self.halves.append((update[sel].abs() / half_step(base[sel], dtype)).float())

    def add_without_masters(self, update: Tensor, copy_unchanged: Tensor) -> None:
        self.without_masters += int((copy_unchanged & (update != 0)).sum())

    def merge(self, other: "_Counts") -> None:
        self.moved += other.moved
        self.swallowed += other.swallowed
        self.without_masters += other.without_masters
        self.ratios += other.ratios
        self.halves += other.halves

    def metrics(self, suffix: str, mode: str) -> dict[str, float]:
        if not self.moved:
            return {}
        out = {f"precision/swallowed_frac{suffix}": self.swallowed / self.moved}
        if mode == "master":
            out[f"precision/swallowed_without_masters{suffix}"] = self.without_masters / self.moved
        ratios, halves = torch.cat(self.ratios), torch.cat(self.halves)
        if ratios.numel():
            out[f"precision/update_ratio{suffix}"] = ratios.median().item()
            out[f"precision/update_to_half_step{suffix}"] = halves.median().item()
        return out


def _fp32_updates(optimizer: Optimizer, values: list[list[Tensor]]) -> Optional[list[list[Optional[Tensor]]]]:
    """The update each parameter would get from this step taken in FP32, by a throwaway copy of the
    optimizer; ``values`` are the parameters' values (per group) before the step."""
    groups, copies = [], []
    for group, group_values in zip(optimizer.param_groups, values):
        params = []
        for p, value in zip(group["params"], group_values):
            c = value.float().clone().requires_grad_(p.requires_grad)
            c.grad = None if p.grad is None else p.grad.detach().float().clone()
            params.append(c)
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
        copies.append(params)
    try:
        shadow = type(optimizer)(groups)
        # A deep copy: load_state_dict keeps a tensor that needs no cast (Adam's `step`, FP32
        # moments) as the very same object, and the shadow's step would advance the real optimizer's.
        shadow.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        shadow.step()
    except (TypeError, ValueError, RuntimeError, KeyError):
        return None
    return [
        [None if p.grad is None else c.detach() - v.float() for c, p, v in zip(params, group["params"], group_values)]
        for params, group, group_values in zip(copies, optimizer.param_groups, values)
    ]
