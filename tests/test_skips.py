"""Skipped steps: every LR scheduler of the optimizer holds, and endless skipping stops the run, naming the cause."""

from __future__ import annotations

import pytest
import torch
from conftest import MODE_IDS, MODES, TinyRegressor, mode_adamw, mode_plugin, regression_data, trainer
from torch import nn

from lightning_mp import LossScaleError, SkippedStepsError

modes = pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)


class NaNAt(TinyRegressor):
    """NaN loss at the batches in ``bad``; optimizer per mode."""

    def __init__(self, mode, bad=(2,), manual=False):
        super().__init__(optimizer="adamw" if mode[1] in ("fp32", "auto") else "mp-adamw")
        self.mode, self.bad = mode, set(bad)
        self.automatic_optimization = not manual

    def _loss(self, batch, batch_idx):
        loss = nn.functional.mse_loss(self(batch[0]).float(), batch[1])
        return loss * float("nan") if batch_idx in self.bad else loss

    def training_step(self, batch, batch_idx):
        if self.automatic_optimization:
            return self._loss(batch, batch_idx)
        opt, sched = self.optimizers(), self.lr_schedulers()
        opt.zero_grad()
        self.manual_backward(self._loss(batch, batch_idx))
        opt.step()
        sched.step()  # the user steps the scheduler by hand, after each optimizer step

    def configure_optimizers(self):
        opt = mode_adamw(self.mode, self.parameters(), lr=1e-2)
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (1 + step))
        if not self.automatic_optimization:
            return [opt], [warmup]
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


class TwoSchedulers(NaNAt):
    def configure_optimizers(self):
        opt = mode_adamw(self.mode, self.parameters(), lr=1e-2)
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (1 + step))
        decay = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return [opt], [{"scheduler": warmup, "interval": "step"}, {"scheduler": decay, "interval": "step"}]


# -- 9. every scheduler holds on a skipped step ------------------------------------------------------------


@modes
def test_two_step_schedulers_on_one_optimizer_both_hold_on_a_skipped_step(mode):
    t = trainer(mode_plugin(mode), max_steps=5)
    t.fit(TwoSchedulers(mode), regression_data())
    assert t.precision_plugin.skipped_steps == 1
    assert [c.scheduler.last_epoch for c in t.lr_scheduler_configs] == [4, 4]  # 5 steps, one skipped
    clean = trainer("32-true", max_steps=4)  # the learning rate is a clean run's after 4 steps
    clean.fit(TwoSchedulers(("bf16-master", "fp32"), bad=()), regression_data())
    assert t.optimizers[0].param_groups[0]["lr"] == clean.optimizers[0].param_groups[0]["lr"]


@modes
def test_schedulers_stepped_by_hand_in_manual_optimization_hold_on_a_skipped_step(mode):
    t = trainer(mode_plugin(mode), max_steps=5)
    t.fit(NaNAt(mode, manual=True), regression_data())
    assert t.precision_plugin.skipped_steps == 1
    assert t.lr_scheduler_configs[0].scheduler.last_epoch == 4


@modes
def test_a_clean_run_advances_every_scheduler(mode):
    t = trainer(mode_plugin(mode), max_steps=5)
    t.fit(TwoSchedulers(mode, bad=()), regression_data())
    assert [c.scheduler.last_epoch for c in t.lr_scheduler_configs] == [5, 5]


# -- 10. endless skipping warns, then stops with an error naming what went non-finite ---------------------------


@pytest.mark.parametrize("mode", MODES[:4], ids=MODE_IDS[:4])
def test_a_nan_loss_at_every_step_warns_then_raises_naming_the_loss(mode):
    model = NaNAt(mode, bad=range(1000))
    with pytest.warns(UserWarning, match="5 optimizer steps in a row were skipped.*the loss is nan"):
        with pytest.raises(SkippedStepsError, match=r"10 optimizer steps in a row were skipped.*the loss is nan"):
            trainer(mode_plugin(mode), max_steps=40).fit(model, regression_data(n=8, batch_size=1))


class _InfGradient(torch.autograd.Function):
    """Zero in the forward pass, inf gradient in the backward: a finite loss with overflowing gradients."""

    @staticmethod
    def forward(ctx, w):
        ctx.shape, ctx.dtype = w.shape, w.dtype
        return w.sum() * 0

    @staticmethod
    def backward(ctx, grad):
        return torch.full(ctx.shape, float("inf"), dtype=ctx.dtype)


class InfGradient(TinyRegressor):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + _InfGradient.apply(self.out.weight)


def test_inf_gradients_with_a_finite_loss_are_named_by_parameter():
    plugin = mode_plugin(("bf16-master", "fp32"), max_consecutive_skips=3)
    with pytest.raises(SkippedStepsError, match=r"3 optimizer steps in a row.*inf/NaN gradients in out.weight"):
        trainer(plugin, max_steps=10).fit(InfGradient(), regression_data(n=8, batch_size=1))


def test_the_limit_is_configurable_and_can_be_switched_off():
    model = NaNAt(("bf16-master", "fp32"), bad=range(1000))
    t = trainer(mode_plugin(("bf16-master", "fp32"), max_consecutive_skips=None), max_steps=12)
    t.fit(model, regression_data(n=8, batch_size=1))  # no error: every step skipped, as asked
    assert t.precision_plugin.skipped_steps == 12
    with pytest.raises(ValueError, match="max_consecutive_skips must be >= 1"):
        mode_plugin(("bf16-master", "fp32"), max_consecutive_skips=0)
    with pytest.raises(ValueError, match="must exceed hysteresis"):
        mode_plugin(("16-master", "fp32"), max_consecutive_skips=2, hysteresis=2)


def test_a_streak_resets_on_a_clean_step():
    # 4 NaN steps, a clean one, 4 more: never 5 in a row, so no warning and no error at a limit of 5
    model = NaNAt(("bf16-master", "fp32"), bad={0, 1, 2, 3, 5, 6, 7, 8})
    t = trainer(mode_plugin(("bf16-master", "fp32"), max_consecutive_skips=5), max_steps=10)
    t.fit(model, regression_data(n=10, batch_size=1))
    assert t.precision_plugin.skipped_steps == 8


def test_fp16_endless_overflow_ends_at_the_minimum_scale_naming_the_loss():
    model = NaNAt(("16-master", "fp32"), bad=range(1000))
    plugin = mode_plugin(("16-master", "fp32"), init_scale=2.0**4, min_scale=1.0)
    with pytest.raises(LossScaleError, match="minimum loss scale.*What went non-finite: the loss is nan"):
        trainer(plugin, max_steps=40).fit(model, regression_data(n=8, batch_size=1))


def test_collectives_take_the_process_groups_device(monkeypatch):
    """A rank with no gradients still joins the all-reduce, with a tensor on the group's device:
    NCCL's GPU (a CPU tensor fails there), gloo's CPU."""
    import torch.distributed as dist

    from lightning_mp.precision.skips import collective_device

    assert collective_device() == torch.device("cpu")  # no process group
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert collective_device() == torch.device("cpu")
