"""MasterWeightPrecision through a real Lightning Trainer on CPU: one test per promised behaviour."""

from __future__ import annotations

import copy
import csv
import pickle

import lightning.pytorch as L
import pytest
import torch
from conftest import Dot, TinyRegressor, regression_data, trainer
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mp import LossScaleError, MasterWeightPrecision, memory_audit, precision_plugin

BF16 = torch.bfloat16


def masters(t: L.Trainer) -> list[torch.Tensor]:
    """The FP32 values of the optimizers' parameters, in their order (the model's own parameters)."""
    params = [p for opt in t.optimizers for g in opt.param_groups for p in g["params"]]
    store = getattr(t.precision_plugin, "store", None)
    return store.values(params) if store is not None else [p.detach() for p in params]


# -- names and the factory -----------------------------------------------------------------------


def test_rejects_other_names_listing_the_accepted_ones():
    with pytest.raises(ValueError, match=r"\['16-master', 'bf16-master'\].*precision_plugin\('bf16-mixed'\)"):
        MasterWeightPrecision("bf16-mixed")
    with pytest.raises(ValueError, match="32-true.*bf16-master"):
        precision_plugin("bf16-masterr")


@pytest.mark.parametrize(
    "name, cls",
    [
        ("32-true", Precision),
        ("32", Precision),
        ("64-true", DoublePrecision),
        ("bf16-mixed", MixedPrecision),
        ("bf16", MixedPrecision),
        ("bf16-true", HalfPrecision),
        ("16-true", HalfPrecision),
        ("bf16-master", MasterWeightPrecision),
        ("16-master", MasterWeightPrecision),
    ],
)
def test_precision_plugin_builds_every_name(name, cls):
    plugin = precision_plugin(name)
    assert type(plugin) is cls
    if cls in (MixedPrecision, HalfPrecision, MasterWeightPrecision):
        assert plugin.precision == {"bf16": "bf16-mixed"}.get(name, name)


def test_lightning_names_train_as_before():
    for name in ("32-true", "bf16-mixed", "bf16-true"):
        model = TinyRegressor()
        trainer(name, max_steps=2).fit(model, regression_data())
        expected = BF16 if name == "bf16-true" else torch.float32
        assert model.inp.weight.dtype == expected


def test_options_only_for_master_modes():
    assert precision_plugin("16-master", init_scale=8.0).scaler.scale == 8.0
    with pytest.raises(TypeError, match="takes no options"):
        precision_plugin("32-true", init_scale=8.0)
    with pytest.raises(ValueError, match="loss_scale"):
        MasterWeightPrecision("16-master", loss_scale="static")


# -- 1. conversion: 16-bit weights, FP32 masters bit for bit ----------------------------------------


class SparseBag(TinyRegressor):
    """A sparse-gradient embedding beside the regressor."""

    def __init__(self, bag: bool):
        super().__init__(optimizer="sgd")
        self.ids = nn.EmbeddingBag(10, 8, sparse=True) if bag else nn.Embedding(10, 8, sparse=True)


@pytest.mark.parametrize("bag", [False, True], ids=["Embedding", "EmbeddingBag"])
def test_sparse_gradient_embeddings_are_one_line_before_the_first_step(bag):
    import lightning_mp

    model = SparseBag(bag)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    t = trainer("bf16-master", max_steps=1)
    with pytest.raises(ValueError) as info:
        t.fit(model, regression_data())
    kind = "EmbeddingBag" if bag else "Embedding"
    assert str(info.value) == (f"MasterWeightPrecision takes dense gradients only: ids is an nn.{kind} with sparse=True; "
                               "build it with sparse=False (and use torch's Adam or AdamW in place of SparseAdam)")
    assert t.global_step == 0 and all(torch.equal(p.float(), before[n]) for n, p in model.named_parameters())
    fabric = lightning_mp.Fabric(precision="bf16-master", accelerator="cpu", devices=1)
    with pytest.raises(ValueError, match=f"ids is an nn.{kind} with sparse=True"):
        other = SparseBag(bag)
        fabric.setup(other, torch.optim.SGD(other.parameters(), lr=0.1))


class Snapshot(Callback):
    def on_train_start(self, trainer, pl_module):
        self.masters = [m.detach().clone() for m in masters(trainer)]
        self.params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def test_masters_are_the_fp32_values_bit_for_bit():
    model = TinyRegressor()
    fp32 = {n: p.detach().clone() for n, p in model.named_parameters()}
    snap = Snapshot()
    trainer("bf16-master", max_steps=1, callbacks=[snap]).fit(model, regression_data())
    names = [n for n, _ in model.named_parameters()]
    by_name = dict(zip(["inp.weight", "out.weight", "inp.bias", "out.bias", "norm.weight", "norm.bias"], snap.masters))
    for name in names:
        assert torch.equal(by_name[name], fp32[name]), name  # nothing lost to the cast
        if not name.startswith("norm"):
            assert snap.params[name].dtype == BF16
            assert torch.equal(snap.params[name], fp32[name].to(BF16))  # round to nearest
    assert not torch.equal(fp32["inp.weight"].to(BF16).float(), fp32["inp.weight"])  # the cast did lose bits


@pytest.mark.parametrize("precision", ["bf16-master", "16-master"])
def test_a_model_handed_over_in_bf16_trains_as_the_same_values_in_fp32(precision):
    """A model loaded in bf16 (Hugging Face's ``torch_dtype=torch.bfloat16``) gets FP32 norms as
    one built in FP32 does, and trains bit for bit as the same values handed over in FP32.
    Before, its LayerNorm stayed bf16: 0.0038 apart after 4 steps under bf16-master, and under
    16-master the first step failed (a bf16 LayerNorm on fp16 activations: "mixed dtype")."""
    finals = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = TinyRegressor()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(BF16))  # the same values either way
        model.to(dtype)
        trainer(precision, max_steps=4).fit(model, regression_data())
        assert model.norm.weight.dtype == torch.float32
        finals.append(model.state_dict())
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


# -- 2. every optimizer sees FP32 masters; groups, options and state kept --------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "adagrad", "sign"])
def test_any_optimizer_steps_fp32_masters(optimizer):
    model = TinyRegressor(optimizer=optimizer)
    before = [p.detach().float().clone() for p in model.parameters()]
    t = trainer("bf16-master", max_steps=3)
    t.fit(model, regression_data())
    opt = t.optimizers[0]
    assert all(p.dtype == torch.float32 for p in masters(t))
    assert model.inp.weight.dtype == model.out.weight.dtype == BF16 and model.norm.weight.dtype == torch.float32
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.param_groups[1]["lr"] == opt.param_groups[0]["lr"] / 2
    params = list(model.parameters())
    in_groups = [p for g in opt.param_groups for p in g["params"]]
    assert len(in_groups) == 6 and all(any(p is q for q in params) for p in in_groups)  # the model's own parameters
    assert all(any(p is q for q in params) for p in opt.state) and len(opt.state) == 6
    for state in opt.state.values():  # (besides an adopted optimizer's int16 remainders)
        assert all(v.dtype == torch.float32 for v in state.values() if torch.is_tensor(v) and v.is_floating_point())
    if optimizer == "adagrad":  # state built in the constructor, keyed by the (then 16-bit) parameter
        assert opt.state[model.inp.weight]["sum"].dtype == torch.float32
    for master, p in zip(masters(t)[:2], [model.inp.weight, model.out.weight]):
        assert torch.equal(master.to(BF16), p)  # the weights are the rounded masters
    assert all(not torch.equal(b, p.float()) for b, p in zip(before, model.parameters()))  # and they trained


def test_lr_scheduler_and_lr_monitor_work_unchanged(tmp_path):
    model = TinyRegressor(scheduler=True, lr=0.1)
    t = trainer(
        "bf16-master",
        max_steps=4,
        logger=CSVLogger(tmp_path, name="run"),
        callbacks=[LearningRateMonitor(logging_interval="step")],
        log_every_n_steps=1,
    )
    t.fit(model, regression_data())
    sched = t.lr_scheduler_configs[0].scheduler
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    assert sched.get_last_lr()[0] == pytest.approx(0.1 / 5)  # LambdaLR after 4 steps: lr / (1 + 4)
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        lrs = [float(r["lr-AdamW/pg1"]) for r in csv.DictReader(f) if r.get("lr-AdamW/pg1")]
    assert lrs == pytest.approx([0.1 / k for k in range(1, 5)])


# -- 3 and 8. autocast in training, validation, test and predict ---------------------------------


class AutocastProbe(TinyRegressor):
    seen: dict

    def _probe(self, stage, x):
        out = self.inp(x)
        ce = nn.functional.cross_entropy(out, torch.zeros(len(x), dtype=torch.long))
        self.seen[stage] = (torch.is_autocast_enabled("cpu"), out.dtype, ce.dtype, self.inp.weight.dtype)

    def training_step(self, batch, batch_idx):
        self._probe("train", batch[0])
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self._probe("val", batch[0])

    def test_step(self, batch, batch_idx):
        self._probe("test", batch[0])

    def predict_step(self, batch, batch_idx):
        self._probe("predict", batch[0])


def test_all_stages_run_16bit_weights_under_autocast():
    model = AutocastProbe()
    model.seen = {}
    t = trainer("bf16-master", max_steps=1, limit_val_batches=1)
    t.fit(model, regression_data())
    t.validate(model, regression_data(), verbose=False)
    t.test(model, regression_data(), verbose=False)
    t.predict(model, regression_data())
    # matmul in bf16, the loss on autocast's FP32 list, weights 16-bit
    expected = (True, BF16, torch.float32, BF16)
    assert model.seen == {stage: expected for stage in ("train", "val", "test", "predict")}


# -- 4. gradient accumulation sums in FP32 ---------------------------------------------------------


class GradProbe(Callback):
    def __init__(self):
        self.after_batch, self.before_step = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        grad = pl_module.w.weight.grad
        audit = memory_audit(pl_module, trainer.optimizers, trainer.precision_plugin)
        self.after_batch.append((None if grad is None else grad.clone(), audit["gradients"]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        (master,) = trainer.precision_plugin.main_params(optimizer)  # during the step: the FP32 master
        self.before_step.append((master.dtype, master.grad.clone()))


def test_accumulated_gradients_are_summed_in_fp32_and_freed_with_the_step():
    # Micro-batch gradients 1 and 2**-9: a bf16 running sum rounds 1 + 2**-9 to 1.
    x = torch.tensor([[1.0] * 4, [2.0**-9] * 4])
    assert (torch.tensor(1.0, dtype=BF16) + torch.tensor(2.0**-9, dtype=BF16)).item() == 1.0
    probe = GradProbe()  # master="fp32": the step holds the FP32 masters with their FP32 gradients
    trainer(MasterWeightPrecision("bf16-master", master="fp32"), max_steps=1, accumulate_grad_batches=2,
            callbacks=[probe]).fit(
        Dot(), DataLoader(TensorDataset(x), batch_size=1)
    )
    # Lightning divides each micro-batch loss by 2; between micro-batches the gradient is the 16-bit one
    grad, grad_bytes = probe.after_batch[0]
    assert grad.dtype == BF16 and torch.equal(grad.float(), torch.full((1, 4), 0.5)) and grad_bytes == 4 * 2
    # at the step the sum is FP32: 0.5 + 2**-10, which bf16 would round to 0.5
    assert probe.before_step[0][0] == torch.float32
    assert torch.equal(probe.before_step[0][1], torch.full((1, 4), 0.5 + 2.0**-10))
    assert probe.after_batch[1] == (None, 0)  # gradients do not outlive the step (Lightning zeroes them anyway)


# -- 5. unscale -> check -> clip on FP32 grads -> step -> copy back --------------------------------


@pytest.mark.parametrize("precision", ["bf16-master", "16-master"])
@pytest.mark.parametrize("algorithm, expected", [("norm", [0.6, 0.8]), ("value", [0.5, 0.5])])
def test_clipping_acts_on_unscaled_fp32_grads(precision, algorithm, expected):
    x = torch.tensor([[3.0, 4.0]])  # grad (3, 4): norm 5 -> clip to 1 gives (0.6, 0.8); value 0.5 gives (0.5, 0.5)
    model = Dot(d=2, lr=0.01)
    plugin = MasterWeightPrecision(precision, init_scale=2.0**8)  # scaled grads (768, 1024) fit in fp16
    t = trainer(plugin, max_steps=1, gradient_clip_val=1.0 if algorithm == "norm" else 0.5,
                gradient_clip_algorithm=algorithm)
    t.fit(model, DataLoader(TensorDataset(x), batch_size=1))
    expected_master = 1.0 - 0.01 * torch.tensor([expected])
    assert torch.allclose(masters(t)[0], expected_master, rtol=0, atol=1e-6)
    assert torch.equal(model.w.weight, masters(t)[0].to(model.w.weight.dtype))
    assert t.precision_plugin.skipped_steps == 0


# -- 6. inf/NaN: skip the step, leave the state, hold the scheduler --------------------------------


class NaNBatch(TinyRegressor):
    bad_batches: tuple = (2,)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if batch_idx in self.bad_batches else loss


class StateProbe(Callback):
    def __init__(self, at):
        self.at, self.before, self.after = at, None, None

    def _state(self, trainer):
        sched = trainer.lr_scheduler_configs[0].scheduler
        return ([m.detach().clone() for m in masters(trainer)], copy.deepcopy(trainer.optimizers[0].state_dict()),
                sched.last_epoch, [p.detach().clone() for p in trainer.lightning_module.parameters()])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.at:
            self.before = self._state(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.at:
            self.after = self._state(trainer)


def _same(a, b):
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("precision", ["bf16-master", "16-master"])
def test_nan_step_is_skipped_whole(precision, tmp_path):
    model = NaNBatch(scheduler=True)
    probe = StateProbe(at=2)
    scale = {"init_scale": 2.0**8} if precision == "16-master" else {}  # no overflow but the NaN batch
    t = trainer(precision, scale, max_steps=4, callbacks=[probe], logger=CSVLogger(tmp_path, name="r"),
                log_every_n_steps=1)
    t.fit(model, regression_data())
    masters_b, opt_b, sched_b, params_b = probe.before
    masters_a, opt_a, sched_a, params_a = probe.after
    assert _same(masters_b, masters_a) and _same(params_b, params_a)  # the weights did not move
    assert _same(opt_b, opt_a)  # optimizer state untouched (Adam's step count included)
    assert sched_a == sched_b  # the scheduler did not advance
    sched = t.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == 3  # 4 optimizer steps, one skipped
    assert t.precision_plugin.skipped_steps == 1
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        logged = [float(r["precision/skipped_steps"]) for r in csv.DictReader(f) if r.get("precision/skipped_steps")]
    assert logged == [0.0, 0.0, 1.0, 1.0]
    # the skip-aware scheduler still pickles, deep-copies and reloads as the user's class
    clone = pickle.loads(pickle.dumps(sched))
    assert type(clone) is torch.optim.lr_scheduler.LambdaLR and clone.last_epoch == 3
    assert type(copy.deepcopy(sched)) is torch.optim.lr_scheduler.LambdaLR


class SkipCount(Callback):
    def __init__(self):
        self.counts = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.counts.append(trainer.precision_plugin.skipped_steps)


@pytest.mark.parametrize("precision", ["bf16-master", "16-master"])
@pytest.mark.parametrize("sync_free, host_counts", [(False, [0, 0, 1, 1]), (True, [0, 0, 0, 1])])
def test_fused_optimizer_skips_on_device_without_reading_the_flag(precision, sync_free, host_counts):
    model = NaNBatch(optimizer="adamw-fused", scheduler=True)
    probe, next_step, counts = StateProbe(at=2), StateProbe(at=3), SkipCount()
    # master="fp32": torch's fused AdamW steps the FP32 masters and skips on the device (the default
    # storage adopts it into lightning-mp's step, which reads the flag on the host)
    plugin = MasterWeightPrecision(precision, init_scale=2.0**8, sync_free=sync_free, master="fp32")
    t = trainer(plugin, max_steps=4, callbacks=[probe, next_step, counts])
    t.fit(model, regression_data())
    masters_b, opt_b, _, params_b = probe.before
    masters_a, opt_a, _, params_a = probe.after
    assert _same(masters_b, masters_a) and _same(params_b, params_a) and _same(opt_b["state"], opt_a["state"])
    # the step after the skipped one trains normally: its own gradients survive the late bookkeeping
    assert all(not torch.equal(b, a) for b, a in zip(next_step.before[0], next_step.after[0]))
    # Sync-free: the host reads the NaN step's flag only at the next step, then counts it and
    # holds that step's scheduler step instead; the totals are the same.
    assert counts.counts == host_counts
    assert t.precision_plugin.skipped_steps == 1
    assert t.lr_scheduler_configs[0].scheduler.last_epoch == 3


def test_sync_free_steps_equal_synced_steps_bit_for_bit():
    runs = []
    for sync_free in (False, True):
        torch.manual_seed(0)
        t = trainer(MasterWeightPrecision("16-master", init_scale=2.0**8, sync_free=sync_free), max_steps=6)
        t.fit(TinyRegressor(optimizer="adamw-fused", scheduler=True), regression_data())
        runs.append(t)
    assert _same(masters(runs[0]), masters(runs[1]))
    assert _same(runs[0].optimizers[0].state_dict(), runs[1].optimizers[0].state_dict())
    assert runs[0].precision_plugin.state_dict() == runs[1].precision_plugin.state_dict()


class ScaledOverflow(TinyRegressor):
    """Overflows (an inf loss) at steps 2 and 3 (hysteresis 2: the second backs off) and 6."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if batch_idx in (2, 3, 6) else loss

    def configure_optimizers(self):
        cls = torch.optim.AdamW if self.hparams.optimizer == "adamw" else torch.optim.SGD
        return cls(self.parameters(), lr=self.hparams.lr, fused=True)  # fused: skips on the device


class LossScales(Callback):
    def __init__(self):
        self.scales = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.scales.append(float(trainer.precision_plugin.scaler.current()))  # the scale this step's loss gets


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_sync_free_steps_equal_synced_steps_bit_for_bit_while_the_scale_changes(optimizer):
    # growth every clean step, two overflows in a row (hysteresis, then a back-off), recovery, one more
    runs, scales = [], []
    for sync_free in (False, True):
        torch.manual_seed(0)
        watch = LossScales()
        plugin = MasterWeightPrecision("16-master", init_scale=4.0, growth_interval=1, sync_free=sync_free)
        t = trainer(plugin, max_steps=10, callbacks=[watch])
        t.fit(ScaledOverflow(optimizer=optimizer), regression_data(n=80))
        runs.append(t)
        scales.append(watch.scales)
    assert scales[0] == scales[1] == [4, 8, 16, 16, 8, 16, 32, 32, 64, 128]  # step 6: hysteresis only
    assert _same(masters(runs[0]), masters(runs[1]))
    assert _same(runs[0].optimizers[0].state_dict(), runs[1].optimizers[0].state_dict())
    assert runs[0].precision_plugin.state_dict() == runs[1].precision_plugin.state_dict()


def test_sync_free_is_for_cuda_and_fused_optimizers_by_default():
    runner = MasterWeightPrecision("bf16-master", device="cpu").step_runner
    fused = torch.optim.AdamW([nn.Parameter(torch.ones(2))], fused=True)
    plain = torch.optim.AdamW([nn.Parameter(torch.ones(2))])
    runner.device = "cpu"
    assert not runner._is_sync_free(fused) and not runner._is_sync_free(plain)
    runner.device = "cuda"
    assert runner._is_sync_free(fused) and not runner._is_sync_free(plain)  # a plain step must be skipped on the host
    never = MasterWeightPrecision("bf16-master", device="cuda", sync_free=False).step_runner
    never.device = "cuda"
    assert not never._is_sync_free(fused)


class Scaled(Dot):
    def training_step(self, batch, batch_idx):
        return (self.w(batch[0]) * 2.0).sum()


class ScaleProbe(Callback):
    def __init__(self):
        self.scales = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.scales.append((trainer.precision_plugin.scaler.scale, trainer.precision_plugin.skipped_steps))


def test_dynamic_loss_scale_backs_off_with_hysteresis_and_grows():
    # grad of the scaled loss = 2 * scale: fp16 overflows (> 65504) while scale >= 2**15
    probe = ScaleProbe()
    plugin = MasterWeightPrecision("16-master", growth_interval=2)
    t = trainer(plugin, max_steps=7, callbacks=[probe])
    t.fit(Scaled(d=1, lr=0.0), DataLoader(TensorDataset(torch.ones(8, 1)), batch_size=1))
    assert probe.scales == [
        (2.0**16, 1),  # overflow, hysteresis 2 -> 1
        (2.0**15, 2),  # overflow, hysteresis spent: back off
        (2.0**14, 3),  # overflow again: back off again
        (2.0**14, 3),  # clean
        (2.0**15, 3),  # second clean step: grow, hysteresis refilled
        (2.0**15, 4),  # overflow, hysteresis 2 -> 1: no back-off
        (2.0**14, 5),  # overflow: back off
    ]


def test_overflow_at_min_scale_raises_instead_of_looping():
    model = NaNBatch()
    model.bad_batches = tuple(range(100))
    plugin = MasterWeightPrecision("16-master", init_scale=4.0, min_scale=2.0, hysteresis=1)
    with pytest.raises(LossScaleError, match="minimum loss scale"):
        trainer(plugin, max_steps=10).fit(model, regression_data())
    assert plugin.skipped_steps == 2


# -- 7. checkpoints: FP32, scaler state, bit-exact resume, cross-loading ---------------------------


def _fit(precision, steps, ckpt_in=None, ckpt_out=None, model=None):
    torch.manual_seed(0)  # every run starts from the same initial weights
    model = model or TinyRegressor(scheduler=True)
    t = trainer(precision, max_steps=steps)
    # One batch per epoch: Lightning's loop may replay a batch on resume; here every batch is the same.
    t.fit(model, regression_data(n=8, batch_size=8), ckpt_path=ckpt_in)
    if ckpt_out:
        t.save_checkpoint(ckpt_out)
    return t, model


@pytest.mark.parametrize("precision", ["bf16-master", "16-master"])
def test_checkpoint_holds_fp32_masters_and_scaler_state(precision, tmp_path):
    t, model = _fit(precision, 4, ckpt_out=tmp_path / "a.ckpt")
    ckpt = torch.load(tmp_path / "a.ckpt", weights_only=False)
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values())
    assert torch.equal(ckpt["state_dict"]["inp.weight"], masters(t)[0])
    assert ckpt["MasterWeightPrecision"]["skipped_steps"] == t.precision_plugin.skipped_steps
    if precision == "16-master":
        assert ckpt["MasterWeightPrecision"]["scaler"] == t.precision_plugin.scaler.state_dict()
    fp32 = TinyRegressor.load_from_checkpoint(tmp_path / "a.ckpt")  # any FP32 code can load it
    assert torch.equal(fp32.inp.weight, masters(t)[0])


@pytest.mark.parametrize("precision", ["bf16-master", "16-master"])
def test_resume_is_bit_exact(precision, tmp_path):
    straight, _ = _fit(precision, 8)
    _fit(precision, 4, ckpt_out=tmp_path / "half.ckpt")
    resumed, _ = _fit(precision, 8, ckpt_in=tmp_path / "half.ckpt")
    assert _same(masters(straight), masters(resumed))
    assert _same(straight.optimizers[0].state_dict(), resumed.optimizers[0].state_dict())
    assert _same(straight.lightning_module.state_dict(), resumed.lightning_module.state_dict())
    assert straight.precision_plugin.state_dict() == resumed.precision_plugin.state_dict()


def test_resume_restores_masters_into_an_already_16bit_model(tmp_path):
    # A model that is already bf16 (a second fit) loses the FP32 values at load: the plugin restores them.
    t, _ = _fit("bf16-master", 4, ckpt_out=tmp_path / "a.ckpt")
    model = TinyRegressor(scheduler=True).to(BF16)
    resumed, _ = _fit("bf16-master", 4, ckpt_in=tmp_path / "a.ckpt", model=model)
    assert _same(masters(resumed), masters(t))


def test_cross_loading_between_32_true_and_bf16_master(tmp_path):
    t32, _ = _fit("32-true", 4, ckpt_out=tmp_path / "fp32.ckpt")
    t16, _ = _fit("bf16-master", 4, ckpt_in=tmp_path / "fp32.ckpt")  # resumes at step 4: no step taken
    assert _same(masters(t16), masters(t32))
    t16.save_checkpoint(tmp_path / "bf16.ckpt")
    back, _ = _fit("32-true", 4, ckpt_in=tmp_path / "bf16.ckpt")
    assert _same(masters(back), masters(t32))
    # and both continue: 4 more steps under either mode from the other's checkpoint
    _fit("bf16-master", 8, ckpt_in=tmp_path / "fp32.ckpt")
    _fit("32-true", 8, ckpt_in=tmp_path / "bf16.ckpt")


# -- manual optimization and a training_step that returns None ------------------------------------


class Manual(TinyRegressor):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = nn.functional.mse_loss(self(batch[0]).float(), batch[1])
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


def test_manual_optimization_steps_the_masters():
    model = Manual()
    w0 = model.inp.weight.detach().clone()
    t = trainer("bf16-master", max_steps=3)
    t.fit(model, regression_data())
    assert not torch.equal(masters(t)[0], w0)
    assert torch.equal(masters(t)[0].to(BF16), model.inp.weight)


class SkipsBatch(TinyRegressor):
    def training_step(self, batch, batch_idx):
        return None if batch_idx == 1 else super().training_step(batch, batch_idx)


def test_training_step_returning_none_takes_no_step():
    t = trainer("bf16-master", max_steps=2)
    t.fit(SkipsBatch(), regression_data())
    assert t.precision_plugin.skipped_steps == 0


# -- the mantissa trap, the reason for all of this -------------------------------------------------


def _total_change(precision):
    # SGD on loss = w . 1 with lr 1e-4: every step moves each weight (1.0) by 1e-4, 1/40 of half a bf16 step
    model = Dot(d=8, lr=1e-4)
    t = trainer(precision, max_epochs=1)
    t.fit(model, DataLoader(TensorDataset(torch.ones(100, 8)), batch_size=1))
    weight = masters(t)[0] if precision == "bf16-master" else model.w.weight
    return (weight.float() - 1.0).abs().mean().item(), model.w.weight.float()


def test_mantissa_trap_bf16_true_freezes_bf16_master_tracks_fp32():
    fp32, _ = _total_change("32-true")
    trapped, w_true = _total_change("bf16-true")
    master, w_master = _total_change("bf16-master")
    assert fp32 == pytest.approx(100 * 1e-4, rel=1e-3)
    assert trapped == 0.0  # every update rounded away
    assert master == pytest.approx(fp32, rel=0.01)
    assert torch.all(w_master < 1.0)  # and the 16-bit weights moved too, once the masters crossed a step


# -- master storage policies (master="remainder" | "stochastic" | "kahan") --------------------------

POLICIES = ["remainder", "stochastic", "kahan"]


def _policy_fit(master, steps, optimizer="mp-adamw", ckpt_in=None, ckpt_out=None):
    torch.manual_seed(0)
    model = TinyRegressor(optimizer=optimizer, scheduler=True)
    t = trainer(precision_plugin("bf16-master", master=master) if master else "32-true", max_steps=steps)
    t.fit(model, regression_data(n=8, batch_size=8), ckpt_path=ckpt_in)
    if ckpt_out:
        t.save_checkpoint(ckpt_out)
    return t, model


def _values(t):
    """Each parameter's FP32 value as the run holds it, by name."""
    module, store = t.lightning_module, getattr(t.precision_plugin, "store", None)
    return {n: (store.value(p) if store else p.detach()).float().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("optimizer", ["mp-adamw", "mp-sgd"])
@pytest.mark.parametrize("master", POLICIES)
def test_every_policy_trains_bf16_weights_like_fp32(master, optimizer):
    reference, _ = _policy_fit("fp32", 40, optimizer)  # separate FP32 masters, same bf16 compute
    t, model = _policy_fit(master, 40, optimizer)
    assert model.inp.weight.dtype == BF16 and model.norm.weight.dtype == torch.float32
    assert not any(p.grad is not None for p in model.parameters())  # the bf16 grads die with the step
    key = {"remainder": "remainder", "kahan": "compensation"}.get(master)
    assert all((key in s) == (key is not None and p.dtype == BF16) for p, s in t.optimizers[0].state.items())
    ref, got = _values(reference), _values(t)
    if master == "remainder":  # the same FP32 values bit for bit, through 40 steps of training
        assert _same(got, ref)
    elif master == "kahan":  # weight + compensation keep about 16 significant bits
        rel = max(((got[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref)
        assert rel < 1e-3, rel
    else:  # random rounding: the weights wander, the loss follows fp32's (0.3 % apart measured)
        ref_loss, loss = reference.callback_metrics["train_loss"], t.callback_metrics["train_loss"]
        assert abs(loss - ref_loss) < 0.02 * ref_loss


def test_remainder_starts_from_the_fp32_values_bit_for_bit():
    class First(Callback):
        def on_train_start(self, trainer, pl_module):
            self.values = _values(trainer)

    torch.manual_seed(0)
    init = {n: p.detach().clone() for n, p in TinyRegressor(optimizer="mp-adamw").named_parameters()}
    torch.manual_seed(0)
    probe = First()
    trainer(precision_plugin("bf16-master", master="remainder"), max_steps=1, callbacks=[probe]).fit(
        TinyRegressor(optimizer="mp-adamw"), regression_data())
    assert all(torch.equal(probe.values[n], init[n]) for n in init)


def test_policies_reject_other_optimizers_and_fp16():
    with pytest.raises(TypeError, match="lightning_mp.optim.AdamW or SGD, or torch's AdamW, Adam or SGD"):
        trainer(precision_plugin("bf16-master", master="remainder"), max_steps=1).fit(
            TinyRegressor(optimizer="adagrad"), regression_data())
    with pytest.raises(ValueError, match="bf16-master"):
        MasterWeightPrecision("16-master", master="kahan")
    with pytest.raises(ValueError, match="master must be 'auto' or one of"):
        MasterWeightPrecision(master="fp16")


@pytest.mark.parametrize("master", POLICIES)
def test_policy_checkpoint_holds_fp32_values_and_resumes_bit_exactly(master, tmp_path):
    straight, _ = _policy_fit(master, 8)
    half, _ = _policy_fit(master, 4, ckpt_out=tmp_path / "half.ckpt")
    ckpt = torch.load(tmp_path / "half.ckpt", weights_only=False)
    values = _values(half)
    assert all(torch.equal(ckpt["state_dict"][n], values[n]) for n in values)  # canonical FP32 values
    resumed, _ = _policy_fit(master, 8, ckpt_in=tmp_path / "half.ckpt")
    assert _same(_values(straight), _values(resumed))
    assert _same(straight.optimizers[0].state_dict(), resumed.optimizers[0].state_dict())


@pytest.mark.parametrize("source, target", [("remainder", "fp32"), ("fp32", "remainder"), ("kahan", "remainder"),
                                            ("remainder", "stochastic")])
def test_a_run_resumes_under_another_policy(source, target, tmp_path):
    first, _ = _policy_fit(source, 4, ckpt_out=tmp_path / "a.ckpt")
    same, _ = _policy_fit(target, 4, ckpt_in=tmp_path / "a.ckpt")  # at step 4 already: no step taken
    exact = target != "stochastic"  # the stochastic policy keeps only the bf16 weight
    got, want = _values(same), _values(first)
    for n, p in same.lightning_module.named_parameters():
        expected = want[n] if exact or p.dtype == torch.float32 else want[n].to(BF16).float()
        assert torch.equal(got[n], expected), n
    _policy_fit(target, 8, ckpt_in=tmp_path / "a.ckpt")  # and it trains on


def test_policy_skips_a_nan_step_whole():
    model = NaNBatch(optimizer="mp-adamw", scheduler=True)
    probe = StateProbe(at=2)
    t = trainer(precision_plugin("bf16-master", master="remainder"), max_steps=4, callbacks=[probe])
    t.fit(model, regression_data())
    assert _same(probe.before, probe.after)  # weights, remainders, moments, scheduler
    assert t.precision_plugin.skipped_steps == 1


@pytest.mark.parametrize("optimizer", ["mp-adamw", "mp-sgd"])
def test_remainder_clips_exactly_as_fp32_masters_do(optimizer):
    # Clipping every step (max norm 0.05): the factor applies to the FP32 copies of the bf16 grads,
    # so the run equals master="fp32" (clip_grad_norm_ on FP32 master grads) bit for bit.
    runs = {}
    for master in ("fp32", "remainder"):
        torch.manual_seed(0)
        t = trainer(precision_plugin("bf16-master", master=master), max_steps=20, gradient_clip_val=0.05)
        t.fit(TinyRegressor(optimizer=optimizer, scheduler=True), regression_data(n=8, batch_size=8))
        runs[master] = _values(t)
    assert _same(runs["fp32"], runs["remainder"])


def test_16_mixed_on_a_cpu_is_fp16_or_refused(monkeypatch):
    """Lightning's Trainer(precision="16-mixed") runs bf16 on a CPU under the name 16-mixed; the factory does not."""
    import lightning_mp.precision.factory as factory

    plugin = precision_plugin("16-mixed", device="cpu")
    assert plugin.precision == "16-mixed"
    with plugin.forward_context():
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.float16
    monkeypatch.setattr(factory, "fp16_supported", lambda device: False)
    with pytest.raises(ValueError, match="needs fp16 autocast.*use 'bf16-mixed'"):
        precision_plugin("16-mixed", device="cpu")


def test_a_sync_free_step_reads_only_the_previous_steps_flag(monkeypatch):
    """Host reads inside lightning-mp during sync-free steps, counted by instrumenting the ways a
    tensor reaches the host: the previous step's overflow flag (on CUDA copied a step earlier
    through pinned memory) and, on a CPU only, the device's loss scale for the CPU kernel."""
    import traceback

    reads = []
    for name in ("item", "tolist", "cpu", "__bool__", "__int__", "__float__", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            frame = traceback.extract_stack(limit=2)[0]
            if "lightning_mp" in frame.filename:
                reads.append(frame.name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    plugin = MasterWeightPrecision("16-master", init_scale=2.0**8, sync_free=True, master="fp32")
    trainer(plugin, max_steps=4).fit(TinyRegressor(optimizer="adamw-fused"), regression_data())
    assert set(reads) <= {"settle", "host_inv_scale"}, reads
    assert reads.count("settle") == 4  # one flag per step, read a step later (the last at the end)
