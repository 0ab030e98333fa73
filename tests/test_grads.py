"""Gradients across backward passes: FP32 sums under FP32 masters, zero_grad as in 32-true, in every mode.

loss = w . x makes each backward's gradient exactly x. With SGD at lr 1 the FP32 value after a step
is 1 - (the summed gradient), so the sum each mode computed can be read back exactly.
"""

from __future__ import annotations

import functools

import lightning.pytorch as L
import pytest
import torch
from conftest import MODE_IDS, MODES, fp32_values, mode_plugin, mode_sgd, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_mp.optim

modes = pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
SMALL = 2.0**-9  # 1 + 2**-9 is not a bf16 value: a bf16 running sum of 1 and 2**-9 is 1


class Accumulate(L.LightningModule):
    """One optimizer step over two backward passes (gradients 1 and 2**-9), with ``between`` run between them."""

    def __init__(self, mode, between: str = "nothing", raw_backward: bool = False, optimizer=None):
        super().__init__()
        self.automatic_optimization = False
        self.mode, self.between, self.raw, self.optimizer = mode, between, raw_backward, optimizer
        self.w = nn.Parameter(torch.ones(4096))

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        for i, scale in enumerate((1.0, SMALL)):
            loss = (self.w * scale).sum()
            if self.raw:
                loss.backward()  # bypasses Lightning's backward hooks
            else:
                self.manual_backward(loss)
            if i == 0 and self.between == "zero_grad":
                opt.zero_grad()
            elif i == 0 and self.between == "zero_grad(set_to_none=False)":
                opt.zero_grad(set_to_none=False)
        opt.step()
        opt.zero_grad()

    def configure_optimizers(self):
        if self.optimizer is not None:
            return self.optimizer([self.w], lr=1.0)
        return mode_sgd(self.mode, [self.w], lr=1.0)


def summed(mode, **kwargs) -> torch.Tensor:
    t = trainer(mode_plugin(mode), max_steps=1)
    t.fit(Accumulate(mode, **kwargs), DataLoader(TensorDataset(torch.zeros(1, 1)), batch_size=1))
    return 1 - fp32_values(t)["w"]  # the gradient the step used


def used(got: torch.Tensor, want: float, mode) -> bool:
    """The step used gradient ``want``: exactly, or under stochastic rounding in the mean of 4096
    weights (noise 2**-14; the alternatives here are 2**-9 apart)."""
    if mode[1] == "stochastic":
        return abs(got.mean().item() - want) < 2.0**-11
    return torch.equal(got, torch.full_like(got, want))


@modes
def test_backward_passes_sum_in_fp32_under_every_storage_policy(mode):
    assert used(summed(mode), 1 + SMALL, mode)  # summed in FP32 (a bf16 sum would lose SMALL)


@pytest.mark.parametrize("precision", ["bf16-master", "16-master"])
@pytest.mark.parametrize("compile", [None, False])
def test_lightning_mp_optimizers_on_fp32_masters_sum_in_fp32(precision, compile):
    # lightning_mp.optim.SGD stepping the plugin's FP32 masters reads the FP32 sums, as torch's does
    optimizer = functools.partial(lightning_mp.optim.SGD, compile=compile)
    assert used(summed((precision, "fp32"), optimizer=optimizer), 1 + SMALL, (precision, "fp32"))


@pytest.mark.parametrize("master", ["fp32", "remainder"])
def test_a_raw_loss_backward_sums_like_manual_backward(master):
    # (bf16 only: under fp16, as with Lightning's own AMP, a raw backward skips the loss scale)
    mode = ("bf16-master", master)
    assert torch.equal(summed(mode, raw_backward=True), summed(mode))


@modes
@pytest.mark.parametrize("between", ["zero_grad", "zero_grad(set_to_none=False)"])
def test_zero_grad_between_backward_passes_drops_the_earlier_gradients(mode, between):
    assert used(summed(mode, between=between), SMALL, mode)
