"""Lightning's own patterns under every (precision, master) mode, through a real Trainer, against
``32-true`` or a closed form: what a user reaches for must train as under ``32-true``.

Most models here are linear in their weights (loss = w . x), so each gradient is exactly the data
and every update is known in closed form. Updates of 2**-10 are below half a bf16 step of a
weight near 1 (2**-9): a 16-bit weight alone would never take them; the FP32 values must.
"""

from __future__ import annotations

import lightning.pytorch as L
import lightning_mp
import pytest
import torch
from conftest import (
    MODE_IDS,
    MODES,
    TinyRegressor,
    exact,
    fp32_values,
    mode_adamw,
    mode_plugin,
    mode_sgd,
    regression_data,
    trainer,
)
from lightning.pytorch.callbacks import (
    BackboneFinetuning,
    BatchSizeFinder,
    Callback,
    EarlyStopping,
    EMAWeightAveraging,
    ModelCheckpoint,
    ModelPruning,
    StochasticWeightAveraging,
)
from lightning.pytorch.tuner import Tuner
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

LR = 2.0**-10  # 1/2 of half a bf16 step at 1: each update alone rounds away in bf16
modes = pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)


def ones_data(n: int, d: int, value: float = 1.0) -> DataLoader:
    return DataLoader(TensorDataset(torch.full((n, d), value)), batch_size=1)


def close_to(got: torch.Tensor, want: torch.Tensor, mode) -> bool:
    """Equal under FP32 masters and remainders; to Kahan's ~16 significant bits; under stochastic
    rounding, equal in the mean to half a bf16 step below 1 (2**-9): over 256 elements and 8 steps
    the mean's noise is 3.5e-4, and the trap (no update landing) would be 8 updates = 4 half-steps away."""
    if mode[1] == "kahan":
        return torch.allclose(got, want, rtol=2.0**-15, atol=0)
    if exact(mode):
        return torch.equal(got, want)
    return abs(got.mean().item() - want.mean().item()) < 2.0**-9


def close_after(got: torch.Tensor, want: torch.Tensor, mode, updates: int) -> bool:
    """``close_to`` for a few weights in [0.5, 1) after ``updates`` updates: under stochastic
    rounding each update is rounded up or down once, so within ``updates`` bf16 steps (2**-8 each)."""
    if mode[1] == "stochastic":
        return torch.allclose(got, want, rtol=0, atol=updates * 2.0**-8)
    return close_to(got, want, mode)


# -- 1. two optimizers and toggle_optimizer (Lightning's GAN recipe) ----------------------------------


class GAN(L.LightningModule):
    """The generator's loss reaches the discriminator's weights; toggling keeps them out of its step."""

    def __init__(self, mode, d: int = 512):
        super().__init__()
        self.automatic_optimization = False
        self.mode = mode
        self.gen = nn.Parameter(torch.ones(d))
        self.disc = nn.Parameter(torch.ones(d))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        opt_g, opt_d = self.optimizers()
        self.toggle_optimizer(opt_g)
        g_loss = (self.gen * x).sum() + (self.disc * x).sum()  # d/d disc = x, if it were not toggled off
        self.manual_backward(g_loss)
        opt_g.step()
        opt_g.zero_grad()
        self.untoggle_optimizer(opt_g)
        self.toggle_optimizer(opt_d)
        d_loss = (self.disc * 2 * x).sum()
        self.manual_backward(d_loss)
        opt_d.step()
        opt_d.zero_grad()
        self.untoggle_optimizer(opt_d)

    def configure_optimizers(self):
        return mode_sgd(self.mode, [self.gen], lr=LR), mode_sgd(self.mode, [self.disc], lr=LR)


@modes
def test_toggle_optimizer_steps_each_optimizer_with_its_own_loss_only(mode):
    model = GAN(mode)
    t = trainer(mode_plugin(mode), max_steps=8)  # 4 batches x 2 optimizers
    t.fit(model, ones_data(4, 512))
    values = fp32_values(t)
    assert close_to(values["gen"], torch.full((512,), 1 - 4 * LR), mode)
    assert close_to(values["disc"], torch.full((512,), 1 - 4 * 2 * LR), mode)  # not 1 - 4 * 3 * LR
    assert model.gen.dtype == model.disc.dtype == (torch.float16 if mode[0] == "16-master" else torch.bfloat16)


# -- 2 and 5. freezing, unfreezing, and frozen parameters in checkpoints ----------------------------------

INIT = 1 + 2.0**-12  # not a bf16 (nor fp16) value: rounding it to 16 bits loses it


class FineTune(L.LightningModule):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.backbone = nn.Linear(256, 1, bias=False)
        self.head = nn.Linear(128, 1, bias=False)  # another shape: BaseFinetuning matches parameters by value
        nn.init.constant_(self.backbone.weight, INIT)
        nn.init.constant_(self.head.weight, INIT)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return (self.backbone.weight * x[:, :256]).sum() + (self.head.weight * x[:, :128]).sum()

    def configure_optimizers(self):
        return mode_sgd(self.mode, [p for p in self.parameters() if p.requires_grad], lr=LR)


class Unfreeze(Callback):
    """The manual way: requires_grad_(True) and add_param_group, at the start of epoch 1."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            pl_module.backbone.requires_grad_(True)
            trainer.optimizers[0].add_param_group({"params": [pl_module.backbone.weight], "lr": LR})


class SaveAt(Callback):
    """A full checkpoint at the end of each epoch."""

    def __init__(self, path):
        self.path = path

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.save_checkpoint(self.path / f"epoch{trainer.current_epoch}.ckpt")


@modes
@pytest.mark.parametrize("how", ["BackboneFinetuning", "add_param_group"])
def test_unfreezing_mid_training_trains_the_exact_fp32_values(mode, how, tmp_path):
    model = FineTune(mode)
    if how == "BackboneFinetuning":
        unfreeze = BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda epoch: 1.0,
                                      backbone_initial_lr=LR, should_align=False)
    else:
        model.backbone.requires_grad_(False)
        unfreeze = Unfreeze()
    t = trainer(mode_plugin(mode), max_epochs=3, callbacks=[unfreeze, SaveAt(tmp_path)])
    t.fit(model, ones_data(4, 256))
    frozen = torch.load(tmp_path / "epoch0.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(frozen["backbone.weight"], torch.full((1, 256), INIT))  # frozen: exact, not 1.0
    assert close_to(frozen["head.weight"], torch.full((1, 128), INIT - 4 * LR), mode)
    final = torch.load(tmp_path / "epoch2.ckpt", weights_only=True)["state_dict"]
    assert close_to(final["backbone.weight"], torch.full((1, 256), INIT - 8 * LR), mode)  # 8 steps since unfreezing
    assert close_to(final["head.weight"], torch.full((1, 128), INIT - 12 * LR), mode)
    assert t.precision_plugin.skipped_steps == 0


# -- 4. stochastic weight averaging and EMA --------------------------------------------------------------


class Linear1(L.LightningModule):
    """loss = w . x with SGD: w moves by exactly lr * x per step."""

    def __init__(self, mode=None, lr=2.0**-6, d=64):
        super().__init__()
        self.mode, self.lr = mode, lr
        self.w = nn.Parameter(torch.ones(d))

    def training_step(self, batch, batch_idx):
        loss = (self.w * batch[0]).sum()
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", (self.w * batch[0]).sum().float())

    def configure_optimizers(self):
        return (mode_sgd(self.mode, [self.w], lr=self.lr) if self.mode else torch.optim.SGD([self.w], lr=self.lr))


@modes
def test_swa_checkpoint_holds_the_average_as_under_32_true(mode, tmp_path):
    # Steps of 2**-10: the iterates are not bf16 values, so only an average of the FP32 values
    # (not of the 16-bit weights) equals 32-true's.
    results = {}
    for name, plugin, model in [("32", "32-true", Linear1(lr=LR, d=256)), ("ours", mode_plugin(mode), Linear1(mode, LR, 256))]:
        t = trainer(plugin, max_epochs=4, callbacks=[StochasticWeightAveraging(swa_lrs=LR, swa_epoch_start=2)])
        t.fit(model, ones_data(2, 256))
        t.save_checkpoint(tmp_path / f"{name}.ckpt")
        results[name] = torch.load(tmp_path / f"{name}.ckpt", weights_only=True)["state_dict"]["w"]
    last_iterate = torch.full((256,), 1 - 8 * LR)
    assert not torch.equal(results["32"], last_iterate)  # the average, not the last weights
    assert close_to(results["ours"], results["32"], mode)


@modes
def test_ema_weight_averaging_checkpoints_the_average_as_under_32_true(mode, tmp_path):
    results = {}
    for name, plugin, model in [("32", "32-true", Linear1()), ("ours", mode_plugin(mode), Linear1(mode))]:
        ckpt = ModelCheckpoint(dirpath=tmp_path / name, save_last=True)
        t = trainer(plugin, max_epochs=2, limit_val_batches=1, callbacks=[EMAWeightAveraging(decay=0.5), ckpt],
                    enable_checkpointing=True)
        t.fit(model, ones_data(4, 64), ones_data(1, 64))
        results[name] = torch.load(tmp_path / name / "last.ckpt", weights_only=False)
    ours, ref = results["ours"]["state_dict"]["w"], results["32"]["state_dict"]["w"]
    assert ours.dtype == torch.float32
    if exact(mode):  # the EMA of the FP32 iterates, swapped in and out for validation without rounding
        assert close_to(ours, ref, mode)
    else:  # stochastic rounding keeps only bf16 weights: the swapped average is rounded to one
        assert torch.allclose(ours, ref, rtol=2.0**-8, atol=0)
    assert close_to(results["ours"]["current_model_state"]["w"], results["32"]["current_model_state"]["w"], mode)


# -- 7. the tuner before fit: fit starts from the exact FP32 values ----------------------------------------


class StartValues(Callback):
    def on_train_start(self, trainer, pl_module):
        self.values = fp32_values(trainer)


def _regressor(mode):
    return TinyRegressor(optimizer="adamw" if mode[1] in ("fp32", "auto") else "mp-adamw", lr=1e-2)


@modes
@pytest.mark.parametrize("tune", ["lr_find", "BatchSizeFinder"])
def test_fit_after_the_tuner_starts_from_the_fp32_values_and_trains_as_a_plain_fit(mode, tune):
    # The tuner saves a checkpoint, trains a few steps and restores it: the fit after it must start
    # from the FP32 values a plain fit starts from (not from 16-bit-rounded weights) and train alike.
    runs = []
    for tuned in (False, True):
        torch.manual_seed(0)
        model = _regressor(mode)
        start = StartValues()
        finder = [BatchSizeFinder(init_val=2, max_trials=2, steps_per_trial=1)] if tuned and tune != "lr_find" else []
        t = trainer(mode_plugin(mode), max_steps=6, callbacks=[start, *finder])
        if tuned and tune == "lr_find":
            Tuner(t).lr_find(model, train_dataloaders=regression_data(n=8, batch_size=8), num_training=5, update_attr=False)
        t.fit(model, datamodule=_BatchData())
        runs.append((start.values, fp32_values(t)))
    (plain_start, plain_end), (tuned_start, tuned_end) = runs
    init = {n: p.detach() for n, p in _init_weights(mode).items()}
    assert all(torch.equal(plain_start[n], tuned_start[n]) for n in init)
    if mode[1] in ("fp32", "remainder", "auto"):
        assert all(torch.equal(tuned_start[n], init[n]) for n in init)  # the exact FP32 initial values
    if tune == "lr_find":  # the same training as without the tuner, bit for bit
        assert all(torch.equal(plain_end[n], tuned_end[n]) for n in init)


def _init_weights(mode) -> dict:
    torch.manual_seed(0)
    return dict(_regressor(mode).named_parameters())


class _BatchData(L.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.batch_size = 8

    def train_dataloader(self):
        return regression_data(n=8, batch_size=self.batch_size)


# -- 8. manual optimization: clip_gradients acts on the unscaled FP32 gradients -----------------------------


class ManualClip(L.LightningModule):
    def __init__(self, mode, algorithm):
        super().__init__()
        self.automatic_optimization = False
        self.mode, self.algorithm = mode, algorithm
        self.w = nn.Parameter(torch.ones(2))

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward((self.w * batch[0]).sum())
        clip = 1.0 if self.algorithm == "norm" else 0.5
        self.clip_gradients(opt, gradient_clip_val=clip, gradient_clip_algorithm=self.algorithm)
        opt.step()

    def configure_optimizers(self):
        return mode_sgd(self.mode, [self.w], lr=2.0**-4)


@modes
@pytest.mark.parametrize("algorithm, clipped", [("norm", [0.6, 0.8]), ("value", [0.5, 0.5])])
def test_manual_clip_gradients_clips_the_unscaled_fp32_gradients(mode, algorithm, clipped):
    # grad (3, 4): norm 5, clipped to norm 1 -> (0.6, 0.8); by value 0.5 -> (0.5, 0.5)
    model = ManualClip(mode, algorithm)
    t = trainer(mode_plugin(mode), max_steps=1)
    t.fit(model, DataLoader(TensorDataset(torch.tensor([[3.0, 4.0]])), batch_size=1))
    want = 1 - 2.0**-4 * torch.tensor(clipped)
    got = fp32_values(t)["w"]
    assert close_after(got, want, mode, updates=1), (got, want)


# -- on_before_optimizer_step on the module's own parameters (Lightning's grad_norm, clipping by hand) ------


class GradHooks(L.LightningModule):
    """What Lightning's docs do in ``on_before_optimizer_step``, on the module's parameters: log
    ``grad_norm(self)``, clip a gradient in place, scale one in place, replace one, drop one."""

    def __init__(self, mode=None, optimizer=None):
        super().__init__()
        self.mode, self.optimizer = mode, optimizer
        self.w, self.u, self.r, self.v = (nn.Parameter(torch.ones(2)) for _ in range(4))
        self.norms = []

    def training_step(self, batch, batch_idx):
        return sum((p * batch[0]).sum() for p in (self.w, self.u, self.r, self.v))

    def on_before_optimizer_step(self, optimizer):
        from lightning.pytorch.utilities import grad_norm

        self.norms.append({k: v.item() for k, v in grad_norm(self, norm_type=2).items()})
        torch.nn.utils.clip_grad_norm_([self.w], max_norm=1.0)
        self.u.grad.mul_(0.5)
        self.r.grad = torch.full_like(self.r, 0.25)  # a new gradient in the parameter's dtype
        self.v.grad = None

    def configure_optimizers(self):
        if self.optimizer is not None:
            return self.optimizer(self.parameters(), lr=2.0**-4)
        return mode_sgd(self.mode, self.parameters(), lr=2.0**-4) if self.mode else torch.optim.SGD(self.parameters(), lr=2.0**-4)


@pytest.mark.parametrize("mode, optimizer", [*((m, None) for m in MODES), (("16-master", "fp32"), "ours")],
                         ids=[*MODE_IDS, "16-master-lightning_mp.optim"])
def test_on_before_optimizer_step_sees_and_changes_the_fp32_unscaled_gradients_on_the_parameters(mode, optimizer):
    # Two micro-batches of x = (3, 4), each loss halved by Lightning: every gradient is (3, 4),
    # norm 5. Before, the 16-bit parameters showed no gradient there (FP32 masters; accumulated
    # sums) or a scaled one (16-master): the logged norm was the norms' alone, the clip did nothing.
    data = DataLoader(TensorDataset(torch.tensor([[3.0, 4.0]] * 4)), batch_size=1)
    reference = GradHooks()
    trainer("32-true", max_steps=2, accumulate_grad_batches=2).fit(reference, data)
    model = GradHooks(mode, lightning_mp.optim.SGD if optimizer == "ours" else None)
    t = trainer(mode_plugin(mode), max_steps=2, accumulate_grad_batches=2)
    t.fit(model, data)
    assert model.norms == reference.norms and reference.norms[0]["grad_2.0_norm/w"] == 5.0
    values = fp32_values(t)
    assert torch.equal(values["v"], torch.ones(2))  # its gradient dropped: not stepped, as under 32-true
    for name in ("w", "u", "r"):  # w clipped to norm 1 (0.6, 0.8), u halved, r's replaced, in both steps
        want = getattr(reference, name).detach()
        assert close_after(values[name], want, mode, updates=2), name


class OwnClipping(L.LightningModule):
    """A ``configure_gradient_clipping`` that clips the module's parameters with torch's function."""

    def __init__(self, mode=None):
        super().__init__()
        self.mode = mode
        self.w = nn.Parameter(torch.ones(2))

    def training_step(self, batch, batch_idx):
        return (self.w * batch[0]).sum()

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm=gradient_clip_val)

    def configure_optimizers(self):
        return mode_sgd(self.mode, [self.w], lr=2.0**-4) if self.mode else torch.optim.SGD([self.w], lr=2.0**-4)


@modes
def test_a_configure_gradient_clipping_of_ones_own_clips_the_step(mode):
    data = DataLoader(TensorDataset(torch.tensor([[3.0, 4.0]] * 4)), batch_size=1)
    reference = OwnClipping()
    trainer("32-true", max_steps=2, accumulate_grad_batches=2, gradient_clip_val=1.0).fit(reference, data)
    model = OwnClipping(mode)
    t = trainer(mode_plugin(mode), max_steps=2, accumulate_grad_batches=2, gradient_clip_val=1.0)
    t.fit(model, data)
    want = reference.w.detach()
    assert torch.allclose(want, 1 - 2 * 2.0**-4 * torch.tensor([0.6, 0.8]), rtol=0, atol=1e-6)  # clipped, twice
    assert close_after(fp32_values(t)["w"], want, mode, updates=2)


class GradNormCallback(Callback):
    def __init__(self):
        self.norms = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        from lightning.pytorch.utilities import grad_norm

        self.norms.append(grad_norm(pl_module, norm_type=2)["grad_2.0_norm_total"].item())


class NoHooks(GradHooks):
    on_before_optimizer_step = L.LightningModule.on_before_optimizer_step


@modes
def test_a_callbacks_grad_norm_is_32_true_s(mode):
    data = DataLoader(TensorDataset(torch.tensor([[3.0, 4.0]] * 4)), batch_size=1)
    reference, ours = GradNormCallback(), GradNormCallback()
    trainer("32-true", max_steps=2, accumulate_grad_batches=2, callbacks=[reference]).fit(NoHooks(), data)
    trainer(mode_plugin(mode), max_steps=2, accumulate_grad_batches=2, callbacks=[ours]).fit(NoHooks(mode), data)
    assert ours.norms == reference.norms == [10.0, 10.0]  # four gradients (3, 4)


# -- 12. zero_grad(set_to_none=False): parameters with a zero gradient are still stepped ----------------------


class SometimesUnused(L.LightningModule):
    """``b`` takes part in even batches only; weight decay still shrinks it on the others with zero grads."""

    def __init__(self, mode=None, set_to_none=False):
        super().__init__()
        self.mode, self.set_to_none = mode, set_to_none
        self.a = nn.Parameter(torch.ones(256))
        self.b = nn.Parameter(torch.ones(256))

    def training_step(self, batch, batch_idx):
        loss = (self.a * batch[0]).sum()
        return loss + (self.b * batch[0]).sum() if batch_idx % 2 == 0 else loss

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        optimizer.zero_grad(set_to_none=self.set_to_none)

    def configure_optimizers(self):
        kwargs = dict(lr=2.0**-4, weight_decay=0.5)
        return mode_sgd(self.mode, self.parameters(), **kwargs) if self.mode else torch.optim.SGD(self.parameters(), **kwargs)


@modes
@pytest.mark.parametrize("set_to_none", [False, True])
def test_zero_grad_keeps_32_true_semantics(mode, set_to_none):
    reference = SometimesUnused(set_to_none=set_to_none)
    trainer("32-true", max_steps=6).fit(reference, ones_data(6, 256, 2.0**-6))
    model = SometimesUnused(mode, set_to_none)
    t = trainer(mode_plugin(mode), max_steps=6)
    t.fit(model, ones_data(6, 256, 2.0**-6))
    values = fp32_values(t)
    for name in ("a", "b"):
        assert close_to(values[name], getattr(reference, name).detach(), mode), name  # the same FP32 arithmetic
    decayed_only_when_used = torch.equal(reference.b.detach(), torch.full((256,), reference.b[0].item()))
    assert decayed_only_when_used  # (a sanity check of the reference: one value throughout)


# -- works today, and must keep working ------------------------------------------------------------------


class ManualNaN(L.LightningModule):
    def __init__(self, mode):
        super().__init__()
        self.automatic_optimization = False
        self.mode = mode
        self.w = nn.Parameter(torch.ones(256))

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        loss = (self.w * batch[0]).sum()
        self.manual_backward(loss * float("nan") if batch_idx == 1 else loss)
        opt.step()

    def configure_optimizers(self):
        return mode_sgd(self.mode, [self.w], lr=LR)


@modes
def test_manual_optimization_steps_and_skips_a_nan_step(mode):
    t = trainer(mode_plugin(mode), max_steps=4)
    t.fit(ManualNaN(mode), ones_data(4, 256))
    assert t.precision_plugin.skipped_steps == 1
    assert close_to(fp32_values(t)["w"], torch.full((256,), 1 - 3 * LR), mode)  # 3 of 4 steps taken


class Checkpointed(TinyRegressor):
    def forward(self, x):
        inner = lambda h: nn.functional.gelu(self.norm(self.inp(h)))  # noqa: E731
        return self.out(torch.utils.checkpoint.checkpoint(inner, x, use_reentrant=False))


@modes
def test_activation_checkpointing_is_bit_exact(mode):
    runs = []
    for cls in (TinyRegressor, Checkpointed):
        torch.manual_seed(0)
        t = trainer(mode_plugin(mode), max_steps=5)
        t.fit(cls(optimizer="adamw" if mode[1] in ("fp32", "auto") else "mp-adamw"), regression_data())
        runs.append(fp32_values(t))
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


class Evaluated(TinyRegressor):
    def test_step(self, batch, batch_idx):
        self.log("test_loss", nn.functional.mse_loss(self(batch[0]).float(), batch[1]))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])


@modes
def test_validate_test_predict_from_a_checkpoint_load_the_fp32_values(mode, tmp_path):
    torch.manual_seed(0)
    model = Evaluated(optimizer="adamw" if mode[1] in ("fp32", "auto") else "mp-adamw")
    t = trainer(mode_plugin(mode), max_steps=4, limit_val_batches=2)
    t.fit(model, regression_data())
    t.save_checkpoint(tmp_path / "a.ckpt")
    trained = fp32_values(t)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # spoil the weights: the checkpoint must bring the FP32 values back
    for run in ("validate", "test", "predict"):
        t2 = trainer(mode_plugin(mode), limit_val_batches=2, limit_test_batches=2, limit_predict_batches=2)
        getattr(t2, run)(model, regression_data(), ckpt_path=tmp_path / "a.ckpt")
        assert all(torch.equal(v, trained[n]) for n, v in fp32_values(t2).items()), run


@modes
def test_save_top_k_checkpoints_hold_fp32_values(mode, tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="train_loss", save_top_k=2, every_n_train_steps=1)
    torch.manual_seed(0)
    model = _regressor(mode)
    t = trainer(mode_plugin(mode), max_steps=5, callbacks=[ckpt], log_every_n_steps=1, enable_checkpointing=True)
    t.fit(model, regression_data())
    files = sorted(tmp_path.glob("*.ckpt"))
    assert len(files) == 2
    for f in files:
        state = torch.load(f, weights_only=True)["state_dict"]
        assert all(v.dtype == torch.float32 for v in state.values())
        plain = TinyRegressor()  # torch.load into a plain FP32 module
        plain.load_state_dict(state)
    assert torch.equal(plain.inp.weight, torch.load(ckpt.best_model_path, weights_only=True)["state_dict"]["inp.weight"])


class Pruned(TinyRegressor):
    """``inp.weight`` holds 38 entries of magnitude below 0.01 and 90 above 0.2: L1 pruning of 30 %
    (38 of 128) takes the small ones whatever their rounding, as the weights move at most 0.04 in
    an epoch (RMSprop's steps are at most about 10 lr)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(2)
        sign = torch.randint(0, 2, (16, 8), generator=g) * 2 - 1
        small = torch.randperm(128, generator=g)[:38]
        magnitude = 0.2 + 0.5 * torch.rand(128, generator=g)
        magnitude[small] = 0.01 * torch.rand(38, generator=g)
        with torch.no_grad():
            self.inp.weight.copy_(sign * magnitude.view(16, 8))

    def configure_optimizers(self):
        return torch.optim.RMSprop(self.parameters(), lr=1e-3)  # FP32 masters under every default


def test_model_pruning_with_the_lottery_ticket_reset_trains_as_bf16_mixed():
    """ModelPruning prunes after the first epoch and (its default) resets the kept weights to their
    values from before training, written through ``.data`` from FP32 copies: the pruned weight
    leaves 16 bits, as under bf16-mixed, and trains on from the reset, bit for bit as bf16-mixed.
    Before, the next step wrote the FP32 master back over the reset (0.73 off bf16-mixed at the end)."""
    finals = {}
    for name in ("bf16-mixed", "bf16-master"):
        torch.manual_seed(0)
        model = Pruned()
        pruning = ModelPruning("l1_unstructured", parameters_to_prune=[(model.inp, "weight")], amount=0.3,
                               apply_pruning=lambda epoch: epoch == 0, verbose=0)
        t = trainer(name, max_epochs=3, callbacks=[pruning])
        t.fit(model, regression_data())
        finals[name] = model.state_dict()
        assert model.inp.weight.dtype == torch.float32  # (pruning made permanent at the end, its default)
        assert int((model.inp.weight == 0).sum()) == 38
    mixed, ours = finals.values()
    assert mixed.keys() == ours.keys() and all(torch.equal(mixed[k], ours[k]) for k in mixed)


@modes
def test_early_stopping_stops_the_run(mode):
    model = Linear1(mode, lr=0.0)  # val_loss never improves
    stop = EarlyStopping(monitor="val_loss", patience=1, mode="min")
    t = trainer(mode_plugin(mode), max_epochs=10, limit_val_batches=1, callbacks=[stop])
    t.fit(model, ones_data(2, 64), ones_data(1, 64))
    assert t.current_epoch == 2 and t.should_stop


@modes
def test_accumulation_with_clipping_and_a_nan_micro_batch(mode):
    # 2 micro-batches per step, clipped at each step; the second step's first micro-batch is NaN
    class Model(Linear1):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if batch_idx == 2 else loss

    t = trainer(mode_plugin(mode), max_steps=3, accumulate_grad_batches=2, gradient_clip_val=1e3)
    t.fit(Model(mode, lr=LR, d=256), ones_data(6, 256))
    assert t.precision_plugin.skipped_steps == 1
    # each of the two steps taken moves w by lr * (0.5 + 0.5) (Lightning divides each micro-batch loss by 2)
    assert close_to(fp32_values(t)["w"], torch.full((256,), 1 - 2 * LR), mode)


class CompiledNet(L.LightningModule):
    """The usual way to compile under Lightning: the network, not the LightningModule (whose
    ``self.log`` calls dynamo cannot trace, under ``32-true`` too)."""

    def __init__(self, mode, backend=None):
        super().__init__()
        self.mode = mode
        self.net = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 1))
        if backend:
            self.net = torch.compile(self.net, backend=backend)

    def training_step(self, batch, batch_idx):
        loss = nn.functional.mse_loss(self.net(batch[0]).float(), batch[1])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return mode_adamw(self.mode, self.parameters(), lr=1e-2)


def _compiled_vs_eager(mode, backend):
    runs = []
    for b in (None, backend):
        torch.manual_seed(0)
        t = trainer(mode_plugin(mode), max_steps=3)
        t.fit(CompiledNet(mode, b), regression_data())
        runs.append(list(fp32_values(t).values()))
    return runs


@modes
def test_torch_compile_trains_as_eager(mode):
    # aot_eager: dynamo and AOTAutograd, which see the parameters and their gradient hooks
    eager, compiled = _compiled_vs_eager(mode, "aot_eager")
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))


@pytest.mark.slow
def test_torch_compile_with_inductor_trains_as_eager():
    eager, compiled = _compiled_vs_eager(("bf16-master", "fp32"), "inductor")
    assert all(torch.allclose(a, b, rtol=1e-2, atol=1e-3) for a, b in zip(eager, compiled))  # fused bf16 kernels round apart

KILLED_RUN = """
import os, signal, sys
import torch, lightning.pytorch as L
from lightning.pytorch.callbacks import ModelCheckpoint
sys.path.insert(0, {tests!r})
from conftest import TinyRegressor, mode_plugin, regression_data, trainer

mode = ({precision!r}, {master!r})

class Kill(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 5:  # last.ckpt of step 5 is on disk
            os.kill(os.getpid(), signal.SIGKILL)

torch.manual_seed(0)
model = TinyRegressor(optimizer="adamw" if mode[1] in ("fp32", "auto") else "mp-adamw", scheduler=True)
ckpt = ModelCheckpoint(dirpath={out!r}, save_last=True, every_n_train_steps=1)
t = trainer(mode_plugin(mode), max_steps=8, callbacks=[ckpt, Kill()], enable_checkpointing=True)
t.fit(model, regression_data(n=8, batch_size=8))
"""


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_from_last_ckpt_is_bit_exact_in_every_mode(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    runs = {}
    for precision, master in MODES:
        out = tmp_path / f"{precision}-{master}"
        script = tmp_path / f"{precision}-{master}.py"
        script.write_text(KILLED_RUN.format(tests=str(Path(__file__).parent), precision=precision, master=master,
                                            out=str(out)))
        runs[(precision, master)] = (out, subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE))
    for mode, (out, process) in runs.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == -9, stderr.decode()[-2000:]  # killed, mid-run
        assert (out / "last.ckpt").is_file()
        results = []
        for ckpt_path in (None, out / "last.ckpt"):
            torch.manual_seed(0)
            model = TinyRegressor(optimizer="adamw" if mode[1] in ("fp32", "auto") else "mp-adamw", scheduler=True)
            t = trainer(mode_plugin(mode), max_steps=8)
            t.fit(model, regression_data(n=8, batch_size=8), ckpt_path=ckpt_path)
            results.append((fp32_values(t), model.state_dict(), t.optimizers[0].state_dict()))
        (straight, straight_sd, straight_opt), (resumed, resumed_sd, resumed_opt) = results
        assert all(torch.equal(straight[n], resumed[n]) for n in straight), (mode, "values")
        assert all(torch.equal(a, b) for a, b in zip(straight_sd.values(), resumed_sd.values())), (mode, "state_dict")
        for index, state in straight_opt["state"].items():
            assert state.keys() == resumed_opt["state"][index].keys(), (mode, index)
            assert all(torch.equal(v, resumed_opt["state"][index][k]) for k, v in state.items()), (mode, index)
