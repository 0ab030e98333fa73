"""Shared helpers: tiny models and a quiet CPU Trainer."""

from __future__ import annotations

import sys

import lightning.pytorch as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_mp.optim
from lightning_mp import memory_audit, precision_plugin


def trainer(precision="bf16-master", plugin_kwargs=None, **kwargs) -> L.Trainer:
    """A quiet single-process CPU trainer for ``precision`` (a name or a plugin)."""
    plugin = precision if not isinstance(precision, str) else precision_plugin(precision, **(plugin_kwargs or {}))
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    options.update(kwargs)
    return L.Trainer(plugins=[plugin], **options)


def regression_data(n=32, d=8, batch_size=8, seed=0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.randn(d, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class TinyRegressor(L.LightningModule):
    """Linear -> LayerNorm -> GELU -> Linear, MSE loss; the optimizer is chosen by name."""

    def __init__(self, d: int = 8, hidden: int = 16, optimizer: str = "adamw", lr: float = 1e-2, scheduler: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.inp = nn.Linear(d, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x):
        return self.out(nn.functional.gelu(self.norm(self.inp(x))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x).float(), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x).float(), y))

    def configure_optimizers(self):
        lr = self.hparams.lr
        groups = [
            {"params": [self.inp.weight, self.out.weight], "weight_decay": 0.1},
            {"params": [self.inp.bias, self.out.bias, *self.norm.parameters()], "weight_decay": 0.0, "lr": lr / 2},
        ]
        name = self.hparams.optimizer
        if name == "adamw":
            opt = torch.optim.AdamW(groups, lr=lr)
        elif name == "adamw-fused":  # skips overflowing steps on the device (found_inf)
            opt = torch.optim.AdamW(groups, lr=lr, fused=True)
        elif name == "sgd":
            opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
        elif name == "adagrad":
            opt = torch.optim.Adagrad(groups, lr=lr, initial_accumulator_value=0.1)
        elif name == "mp-adamw":  # steps bf16 weights under any master policy
            opt = lightning_mp.optim.AdamW(groups, lr=lr)
        elif name == "mp-adamw-eager":  # torch's foreach ops: bit-exact with torch's AdamW
            opt = lightning_mp.optim.AdamW(groups, lr=lr, compile=False)
        elif name == "mp-adamw-compiled":  # the torch.compile'd step (CUDA's fused path)
            opt = lightning_mp.optim.AdamW(groups, lr=lr, compile=True)
        elif name == "mp-adamw-8bit":  # block-wise 8-bit moments
            opt = lightning_mp.optim.AdamW(groups, lr=lr, moment_dtype="8bit")
        elif name == "mp-sgd":
            opt = lightning_mp.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
        elif name == "sign":
            opt = SignSGD(groups, lr=lr)
        else:
            raise ValueError(name)
        if not self.hparams.scheduler:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, inverse_step)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class LinearLoss(TinyRegressor):
    """TinyRegressor's parameters and optimizers with loss = sum_p s * (p . r_p): s the batch's mean input,
    r_p fixed. Each gradient is s * r_p whatever the weights are, so two runs whose optimizers round
    apart still get the same gradients, and their difference is the optimizers' round-off alone
    (roundoff.adamw_bound with :meth:`gradients`)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        g = torch.Generator().manual_seed(1)
        self.coefficients = {n: torch.randn(p.shape, generator=g) for n, p in self.named_parameters()}

    def training_step(self, batch, batch_idx):
        s = batch[0].mean()
        return sum(s * (p.float() * self.coefficients[n]).sum() for n, p in self.named_parameters())

    def gradients(self, data, accumulate: int = 1) -> dict[str, list[torch.Tensor]]:
        """Each optimizer step's FP32 gradient sum (before clipping or unscaling), by parameter name."""
        means = [x.mean().double() for x, _ in data]
        steps = [sum(means[i:i + accumulate]) for i in range(0, len(means) - accumulate + 1, accumulate)]
        return {n: [s * r.double() for s in steps] for n, r in self.coefficients.items()}


def inverse_step(step: int) -> float:
    return 1.0 / (1 + step)


class Dot(L.LightningModule):
    """loss = w . x, so dloss/dw = x exactly: gradients are whatever the data says."""

    def __init__(self, d=4, lr=0.0):
        super().__init__()
        self.w = nn.Linear(d, 1, bias=False)
        nn.init.ones_(self.w.weight)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        return self.w(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class SignSGD(torch.optim.Optimizer):
    """A user's own optimizer with per-parameter state."""

    def __init__(self, params, lr=1e-2):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["count"] = state.get("count", 0) + 1
                p.add_(p.grad.sign(), alpha=-group["lr"])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# -- the five (precision, master) modes, for tests that hold under each --------------------------

MODES = [
    ("bf16-master", "auto"),  # the default: torch's own optimizers, adopted, with int16 remainders
    ("bf16-master", "fp32"),
    ("bf16-master", "remainder"),
    ("bf16-master", "kahan"),
    ("bf16-master", "stochastic"),
    ("16-master", "fp32"),
]
MODE_IDS = [f"{p}-{m}" for p, m in MODES]


def mode_plugin(mode, **kwargs):
    """``MasterWeightPrecision`` for ``mode``; fp16 starts at a scale these tiny models never overflow."""
    from lightning_mp import MasterWeightPrecision

    precision, master = mode
    if precision == "16-master":
        kwargs.setdefault("init_scale", 2.0**8)
    return MasterWeightPrecision(precision, master=master, **kwargs)


def mode_sgd(mode, params, **kwargs):
    """SGD that steps ``mode``'s weights: torch's for FP32 masters, the default (which adopts it)
    and ``mode=None`` (a 32-true run), lightning_mp's for the forced storage policies."""
    cls = torch.optim.SGD if mode is None or mode[1] in ("fp32", "auto") else lightning_mp.optim.SGD
    return cls(params, **kwargs)


def clip_max(model, weight, bound):
    """Clip ``weight`` at ``bound`` as docs/storage.md shows: its FP32 value, set exactly through
    the model's store, or the weight itself where there is none (32-true)."""
    from lightning_mp import MasterStore

    store = MasterStore.of(model)
    if store is None:
        with torch.no_grad():
            weight.clamp_(max=bound)
    else:
        store.set_value(weight, store.value(weight).clamp(max=bound))


def mode_adamw(mode, params, **kwargs):
    cls = torch.optim.AdamW if mode[1] in ("fp32", "auto") else lightning_mp.optim.AdamW
    return cls(params, **kwargs)


def fp32_values(t, module=None):
    """Each parameter's FP32 value as the run holds it, by name (through the plugin's store)."""
    module = module or t.lightning_module
    store = getattr(t.precision_plugin, "store", None)
    return {n: (store.value(p) if store else p.detach()).float().clone() for n, p in module.named_parameters()}


def exact(mode) -> bool:
    """Whether ``mode`` keeps FP32 values exactly (stochastic rounding keeps only the 16-bit weight)."""
    return mode[1] != "stochastic"


class InterruptAt(L.Callback):
    """Raises KeyboardInterrupt (a user's Ctrl-C) after optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


class Audit(L.Callback):
    """Keeps ``lightning_mp.memory_audit`` of the live run after each training batch (``.audit``)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.audit = memory_audit(pl_module, trainer.optimizers, trainer.precision_plugin)


def run_cli(args, capsys, monkeypatch):
    """``lightning-mp-train *args`` in this process: (exit status, stdout, stderr)."""
    from lightning_mp.cli import main

    monkeypatch.setattr(sys, "argv", ["lightning-mp-train", *args])
    try:
        main()
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


def saved_bytes(fn):
    """``fn()`` and the bytes of the tensors autograd saves for backward while it runs (shared storage once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(storages.values())
