"""Where the FP32 values live: the MasterStore, seen through checkpoints, state dicts and loads, in every mode."""

from __future__ import annotations

import warnings

import lightning.pytorch as L
import pytest
import torch
from conftest import (MODE_IDS, MODES, TinyRegressor, clip_max, fp32_values, mode_adamw, mode_plugin, mode_sgd,
                      regression_data, trainer)
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_mp import MasterWeightPrecision, memory_audit

modes = pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
HALF = {"bf16-master": torch.bfloat16, "16-master": torch.float16}


class WithFrozen(TinyRegressor):
    """A frozen embedding-like layer beside the trained ones, initialised to values 16 bits cannot hold."""

    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.frozen = nn.Linear(8, 8, bias=False)
        with torch.no_grad():
            self.frozen.weight.copy_(torch.randn(8, 8) * 1.7 + 2.0**-12)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return super().forward(self.frozen(x))

    def configure_optimizers(self):
        return mode_adamw(self.mode, [p for p in self.parameters() if p.requires_grad], lr=1e-2)


def trained(mode, steps=3):
    """A WithFrozen model trained ``steps`` steps under ``mode``, and its trainer."""
    torch.manual_seed(0)
    model = WithFrozen(mode)
    t = trainer(mode_plugin(mode), max_steps=steps)
    t.fit(model, regression_data())
    return model, t


# -- 3 and 5. every checkpoint path holds FP32 values; frozen parameters keep theirs exactly ------------


@modes
def test_every_checkpoint_path_holds_the_fp32_values(mode, tmp_path):
    torch.manual_seed(0)
    model = WithFrozen(mode)
    frozen = model.frozen.weight.detach().clone()
    weights_only = ModelCheckpoint(dirpath=tmp_path / "w", save_weights_only=True, every_n_train_steps=4)
    full = ModelCheckpoint(dirpath=tmp_path / "f", every_n_train_steps=2, save_top_k=1, monitor="train_loss",
                           filename="last-step{step}")
    t = trainer(mode_plugin(mode), max_steps=4, callbacks=[weights_only, full], enable_checkpointing=True,
                log_every_n_steps=1)
    t.fit(model, regression_data())
    t.save_checkpoint(tmp_path / "trainer.ckpt")
    values = fp32_values(t)
    assert model.inp.weight.dtype == model.frozen.weight.dtype == HALF[mode[0]]
    states = {
        "save_weights_only": torch.load(next((tmp_path / "w").glob("*.ckpt")), weights_only=True)["state_dict"],
        "ModelCheckpoint": torch.load(tmp_path / "f" / "last-stepstep=4.ckpt", weights_only=True)["state_dict"],
        "trainer.save_checkpoint": torch.load(tmp_path / "trainer.ckpt", weights_only=True)["state_dict"],
        "model.state_dict()": model.state_dict(),
    }
    for path, state in states.items():
        assert all(v.dtype == torch.float32 for v in state.values()), path
        assert all(torch.equal(state[n], values[n]) for n in values), path
        assert torch.equal(state["frozen.weight"], frozen), path  # nothing trained it: its FP32 init, exactly
    assert not torch.equal(frozen.to(HALF[mode[0]]).float(), frozen)  # (16 bits would have lost it)


@modes
def test_load_state_dict_sets_the_fp32_values(mode):
    model, t = trained(mode, 2)
    target = {n: torch.randn_like(v) for n, v in model.state_dict().items()}
    model.load_state_dict(target)  # after fit too: the store still keeps the model's values
    got = model.state_dict()
    for name, value in got.items():
        stepped = name != "frozen.weight" and "norm" not in name
        if mode[1] in ("fp32", "remainder", "auto") or not stepped:  # exact FP32 values (frozen: an exact remainder)
            assert torch.equal(value, target[name]), name
        elif mode[1] == "kahan":  # weight and compensation: about 16 significant bits
            assert torch.allclose(value, target[name], rtol=2.0**-15, atol=1e-30), name
        else:  # stochastic rounding keeps the bf16 weight, rounded to nearest
            assert torch.equal(value, target[name].to(torch.bfloat16).float()), name


@modes
def test_a_non_finite_weight_in_a_checkpoint_is_refused_naming_it(mode, tmp_path):
    model, t = trained(mode, 2)
    t.save_checkpoint(tmp_path / "a.ckpt")
    ckpt = torch.load(tmp_path / "a.ckpt", weights_only=False)
    ckpt["state_dict"]["out.weight"][0, 3] = float("nan")
    torch.save(ckpt, tmp_path / "nan.ckpt")
    with pytest.raises(ValueError, match=r"'out.weight' holds 1 NaN/inf"):
        trainer(mode_plugin(mode), max_steps=4).fit(WithFrozen(mode), regression_data(), ckpt_path=tmp_path / "nan.ckpt")
    with pytest.raises(ValueError, match=r"'out.weight' holds 1 NaN/inf"):
        trainer(mode_plugin(mode)).validate(WithFrozen(mode), regression_data(), ckpt_path=tmp_path / "nan.ckpt")
    with pytest.raises(ValueError, match="out.weight"):
        model.load_state_dict(ckpt["state_dict"])


# -- 6. resume is bit-exact in every mode, Kahan's ties included ---------------------------------------------


class Wide(L.LightningModule):
    """65k parameters: enough that some Kahan pairs sit at a rounding tie of weight + compensation."""

    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.a = nn.Linear(256, 256)
        self.b = nn.Linear(256, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.b(torch.tanh(self.a(x))).float(), y)

    def configure_optimizers(self):
        return mode_adamw(self.mode, self.parameters(), lr=1e-3)


def _wide_fit(mode, steps, ckpt_in=None, ckpt_out=None):
    torch.manual_seed(0)
    model = Wide(mode)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 256, generator=g)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1] * 0.3), batch_size=16)
    t = trainer(mode_plugin(mode), max_steps=steps)
    t.fit(model, data, ckpt_path=ckpt_in)
    if ckpt_out:
        t.save_checkpoint(ckpt_out)
    return t, model


@modes
def test_resume_is_bit_exact_weights_and_storage(mode, tmp_path):
    straight, model_a = _wide_fit(mode, 8)
    _wide_fit(mode, 4, ckpt_out=tmp_path / "half.ckpt")
    resumed, model_b = _wide_fit(mode, 8, ckpt_in=tmp_path / "half.ckpt")
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(p.view(torch.int16), q.view(torch.int16)), name  # the 16-bit weights, bit for bit
    store_a, store_b = straight.precision_plugin.store, resumed.precision_plugin.store
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        sa, sb = store_a.storage(p), store_b.storage(q)
        assert (sa is None) == (sb is None) and (sa is None or torch.equal(sa, sb))  # masters, remainders, compensations


# -- 11. buffers keep their dtype ------------------------------------------------------------------------------


class WithRotaryBuffer(TinyRegressor):
    def __init__(self, mode=None):
        super().__init__(optimizer="mp-adamw" if mode and mode[1] not in ("fp32", "auto") else "adamw")
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))

    def training_step(self, batch, batch_idx):
        self.angles = torch.outer(torch.arange(4096.0), self.inv_freq)
        return super().training_step(batch, batch_idx)


@modes
def test_buffers_keep_fp32_so_rotary_angles_equal_bf16_mixed(mode):
    angles = {}
    for name, plugin, model in [("bf16-mixed", "bf16-mixed", WithRotaryBuffer()), ("ours", mode_plugin(mode),
                                                                                    WithRotaryBuffer(mode))]:
        trainer(plugin, max_steps=1).fit(model, regression_data())
        assert model.inv_freq.dtype == torch.float32
        angles[name] = model.angles
    assert torch.equal(angles["ours"], angles["bf16-mixed"])


# -- weights written outside the store ----------------------------------------------------------------------


@modes
def test_a_weight_written_in_place_becomes_the_value(mode):
    torch.manual_seed(0)
    model = TinyRegressor(optimizer="adamw" if mode[1] in ("fp32", "auto") else "mp-adamw")
    t = trainer(mode_plugin(mode), max_steps=2)
    t.fit(model, regression_data())
    new = torch.full_like(model.inp.weight, 0.375)
    with torch.no_grad():
        model.inp.weight.copy_(new)  # e.g. an EMA swap or a hand-made reset
    with pytest.warns(UserWarning, match="written outside the optimizer"):
        assert torch.equal(model.state_dict()["inp.weight"], new.float())


def test_a_weight_written_through_data_reaches_the_checkpoint_under_fp32_masters():
    # `.data.copy_` bypasses version counters (Lightning's WeightAveraging writes so); a read for a
    # checkpoint compares each FP32 master with its weight and takes the weight when they disagree.
    torch.manual_seed(0)
    model = TinyRegressor()
    t = trainer(mode_plugin(("bf16-master", "fp32")), max_steps=2)
    t.fit(model, regression_data())
    model.inp.weight.data.copy_(torch.full_like(model.inp.weight, 0.375))
    assert torch.equal(model.state_dict()["inp.weight"], torch.full((16, 8), 0.375))


class WrittenMidRun(L.LightningModule):
    """loss = w . x with x = 0.5, so every gradient is 0.5 and every SGD update lr * 0.5 = 2**-12,
    exact in FP32 and below half a bf16 step of the weights (they start at 1). Before step 4 a
    hook writes the weight, as weight clipping, a reset or a swap-in do."""

    def __init__(self, mode, write, optimizer="sgd"):
        super().__init__()
        self.mode, self.write, self.optimizer = mode, write, optimizer
        self.w = nn.Linear(4, 1, bias=False)
        nn.init.ones_(self.w.weight)

    def training_step(self, batch, batch_idx):
        return self.w(batch[0]).sum()

    def on_train_batch_start(self, batch, batch_idx):
        if self.trainer.global_step == 3:
            weight = self.w.weight
            if self.write == "element":  # one element, in place (tracked by the version counter)
                with torch.no_grad():
                    weight[0, 0] = 0.375
            elif self.write == "fill":
                with torch.no_grad():
                    weight.fill_(0.375)
            else:  # "swap": new memory under the same parameter (version counters miss it)
                weight.data = torch.full_like(weight.data, 0.375)

    def configure_optimizers(self):
        if self.optimizer == "adagrad":  # not adoptable: FP32 masters under every default
            return torch.optim.Adagrad(self.parameters(), lr=2.0**-11)
        return mode_sgd(self.mode, self.parameters(), lr=2.0**-11)


WRITES = ["element", "fill", "swap"]


def written_run(mode, write, optimizer="sgd"):
    model = WrittenMidRun(mode, write, optimizer)
    plugin = "32-true" if mode is None else mode_plugin(mode)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.full((6, 4), 0.5)), batch_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(plugin, max_steps=6).fit(model, data)
    return model.state_dict()["w.weight"]


@modes
@pytest.mark.parametrize("write", WRITES)
def test_a_weight_written_mid_run_trains_on_from_what_was_written(mode, write):
    """Under 32-true the weight goes on from what was written; so it does in every mode: the
    written elements from their 16-bit value, the others from their FP32 value under FP32
    masters (fp16's too), and rounded to 16 bits once where a remainder or compensation cannot
    tell them apart. Before, a master="fp32" step wrote the old masters back over the weights."""
    want = written_run(None, write)
    got = written_run(mode, write)
    untouched = 1 - 6 * 2.0**-12 if write == "element" else 0.375 - 3 * 2.0**-12
    assert want[0, 0] == 0.375 - 3 * 2.0**-12 and want[0, 1] == untouched  # the closed form
    if mode[1] == "stochastic":  # the weight is the value; each update rounds up or down once
        assert torch.allclose(got, want, rtol=0, atol=6 * 2.0**-8)
    elif write == "element" and mode[1] in ("auto", "remainder", "kahan"):
        assert got[0, 0] == want[0, 0]
        assert torch.equal(got[0, 1:], torch.full((3,), 1.0 - 3 * 2.0**-12))  # 1 - 3*2**-12 rounded to 1.0, once
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("precision", ["bf16-master", "16-master"])
@pytest.mark.parametrize("write", WRITES)
def test_a_weight_written_mid_run_under_an_optimizer_kept_on_fp32_masters(precision, write):
    want = written_run(None, write, optimizer="adagrad")
    got = written_run((precision, "auto" if precision == "bf16-master" else "fp32"), write, optimizer="adagrad")
    assert want[0, 0] != 1.0 and torch.equal(got, want)


class ClampedEachStep(L.LightningModule):
    """WGAN's weight clipping after every step, on FP32 values: w starts at (1, 0.75, 0.75, 0.75),
    each SGD update adds 2**-12 (below half a bf16 step), and the clip at c = 1 + 2.5 * 2**-12
    binds on the first element only, from the third step."""

    C = 1 + 2.5 * 2.0**-12

    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.w = nn.Linear(4, 1, bias=False)
        with torch.no_grad():
            self.w.weight.copy_(torch.tensor([[1.0, 0.75, 0.75, 0.75]]))

    def training_step(self, batch, batch_idx):
        return self.w(batch[0]).sum()

    def on_train_batch_end(self, *args):
        clip_max(self, self.w.weight, self.C)  # the FP32 value, set exactly (the weight rounds to nearest)

    def configure_optimizers(self):
        return mode_sgd(self.mode, self.parameters(), lr=2.0**-11)


@modes
def test_weights_clipped_each_step_through_the_store_train_as_32_true(mode):
    """What the warning for weights written outside the optimizer recommends where low bits matter."""
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.full((6, 4), -0.5)), batch_size=1)
    runs = {}
    for m in (None, mode):
        model = ClampedEachStep(m)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            trainer("32-true" if m is None else mode_plugin(m), max_steps=6).fit(model, data)
        assert not [w for w in seen if "written outside" in str(w.message)]  # nothing behind the store's back
        runs[m] = model.state_dict()["w.weight"]
    want = torch.tensor([[ClampedEachStep.C] + [0.75 + 6 * 2.0**-12] * 3])
    assert torch.equal(runs[None], want)  # the closed form
    if mode[1] == "stochastic":  # 6 updates, each rounded up or down once
        assert torch.allclose(runs[mode], want, rtol=0, atol=6 * 2.0**-8)
    else:
        assert torch.equal(runs[mode], want)


# -- tied weights -----------------------------------------------------------------------------------------------


class Tied(L.LightningModule):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.embed = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight

    def training_step(self, batch, batch_idx):
        tokens = batch[0]
        return nn.functional.cross_entropy(self.head(self.embed(tokens)).float(), tokens)

    def configure_optimizers(self):
        return mode_adamw(self.mode, self.parameters(), lr=1e-2)


@modes
def test_tied_weights_stay_tied_with_one_optimizer_entry_and_load_into_fp32(mode, tmp_path):
    model = Tied(mode)
    tokens = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(16).repeat(4)), batch_size=16)
    t = trainer(mode_plugin(mode), max_steps=3)
    t.fit(model, tokens)
    assert model.head.weight is model.embed.weight
    assert sum(p is model.embed.weight for g in t.optimizers[0].param_groups for p in g["params"]) == 1
    state = model.state_dict()
    assert state["head.weight"] is state["embed.weight"]  # one tensor under both names, as for FP32 weights
    plain = Tied(mode)
    plain.load_state_dict(state)
    assert plain.embed.weight.dtype == torch.float32 and torch.equal(plain.embed.weight, fp32_values(t)["embed.weight"])


# -- several optimizers, parameters added late, a second fit --------------------------------------------------


class StoreProbe(Callback):
    def on_train_start(self, trainer, pl_module):
        store = trainer.precision_plugin.store
        self.kinds = {n: store.kind(p) for n, p in pl_module.named_parameters()}


@pytest.mark.parametrize("master", ["fp32", "remainder", "kahan", "stochastic"])
def test_stepped_parameters_take_the_policy_frozen_ones_an_exact_remainder(master):
    probe = StoreProbe()
    trainer(mode_plugin(("bf16-master", master)), max_steps=1, callbacks=[probe]).fit(
        WithFrozen(("bf16-master", master)), regression_data())
    assert probe.kinds["inp.weight"] == master and probe.kinds["frozen.weight"] == "remainder"
    assert probe.kinds["norm.weight"] is None  # FP32 parameters are their own values
    fp16 = StoreProbe()
    trainer(mode_plugin(("16-master", "fp32")), max_steps=1, callbacks=[fp16]).fit(
        WithFrozen(("16-master", "fp32")), regression_data())
    assert fp16.kinds["frozen.weight"] == "fp32"  # no exact int16 split of an fp16 weight: an FP32 copy


def _as_16_bit(model, mode):
    """Its frozen layer made to hold 16-bit numbers, as a base loaded from a bf16 checkpoint does."""
    with torch.no_grad():
        model.frozen.weight.copy_(model.frozen.weight.to(HALF[mode[0]]).float())
    return model


@modes
def test_a_frozen_weight_of_16_bit_numbers_keeps_its_values_in_the_weight_alone(mode):
    """No storage beside it (the 64 frozen elements' 2-byte remainders or 4-byte copies are gone),
    its values exact; a value 16 bits cannot hold, loaded into it, gets exact storage again."""
    masters, models = {}, {}
    for kind in ("random", "16-bit"):
        torch.manual_seed(0)
        model = WithFrozen(mode) if kind == "random" else _as_16_bit(WithFrozen(mode), mode)
        expected = model.frozen.weight.detach().clone()
        t = trainer(mode_plugin(mode), max_steps=2)
        t.fit(model, regression_data())
        assert torch.equal(model.state_dict()["frozen.weight"], expected)
        masters[kind] = memory_audit(model, t.optimizers, t.precision_plugin)["masters"]
        models[kind] = (model, t)
    per_element = 2 if mode[0] == "bf16-master" else 4
    assert masters["random"] - masters["16-bit"] == 64 * per_element
    model, t = models["16-bit"]
    state = model.state_dict()
    state["frozen.weight"] = models["random"][0].state_dict()["frozen.weight"]  # not 16-bit numbers
    model.load_state_dict(state)
    assert torch.equal(model.state_dict()["frozen.weight"], state["frozen.weight"])
    assert memory_audit(model, t.optimizers, t.precision_plugin)["masters"] == masters["random"]


class Unfreeze(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2:
            pl_module.frozen.requires_grad_(True)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_frozen_weight_of_16_bit_numbers_in_the_optimizer_trains_from_its_exact_value_once_unfrozen(optimizer):
    """Held by the user's optimizer while frozen (torch skips it), then unfrozen: under the default
    it steps through an int16 remainder from its exact value, as FP32 masters step it (bit for bit
    with torch's SGD; AdamW's adopted step differs from torch's by round-off, as for any parameter)."""
    class Model(WithFrozen):
        def configure_optimizers(self):
            if optimizer == "sgd":
                return torch.optim.SGD(self.parameters(), lr=1e-2, momentum=0.9)
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    runs = {}
    for master in ("fp32", "auto"):
        torch.manual_seed(0)
        model = _as_16_bit(Model(("bf16-master", master)), ("bf16-master", master))
        t = trainer(MasterWeightPrecision("bf16-master", master=master), max_steps=5, callbacks=[Unfreeze()])
        t.fit(model, regression_data(n=64))
        runs[master] = fp32_values(t)
        assert t.precision_plugin.store.kind(model.frozen.weight) == master.replace("auto", "remainder")
    moved = runs["auto"]["frozen.weight"]
    assert not torch.equal(moved, moved.bfloat16().float())  # it trained: low bits the weight cannot hold
    if optimizer == "sgd":
        for name, value in runs["fp32"].items():
            assert torch.equal(runs["auto"][name], value), name


@modes
def test_a_second_trainer_continues_from_the_first_ones_fp32_values(mode):
    # fit, then fit again with a new Trainer and plugin: the new run starts from the exact FP32
    # values the first one ended with, not from its 16-bit weights
    model, first = trained(mode)
    ended = fp32_values(first)

    class Start(Callback):
        def on_train_start(self, trainer, pl_module):
            self.values = fp32_values(trainer)

    start = Start()
    trainer(mode_plugin(mode), max_steps=1, callbacks=[start]).fit(model, regression_data())
    assert all(torch.equal(start.values[n], ended[n]) for n in ended)


@modes
def test_the_model_pickles_and_deep_copies_with_its_fp32_values(mode, tmp_path):
    import copy

    model, t = trained(mode, 3)
    values = model.state_dict()
    torch.save(model, tmp_path / "model.pt")  # the whole module, as torch.save allows under 32-true
    for copied in (torch.load(tmp_path / "model.pt", weights_only=False), copy.deepcopy(model)):
        assert copied.inp.weight.dtype == model.inp.weight.dtype
        assert all(torch.equal(v, values[n]) for n, v in copied.state_dict().items())


@modes
def test_restore_fp32_turns_the_trained_model_back_into_exact_fp32(mode):
    from lightning_mp import MasterStore

    model, t = trained(mode, 3)
    values = fp32_values(t)
    MasterStore.of(model).restore_fp32()
    assert all(p.dtype == torch.float32 and torch.equal(p, values[n]) for n, p in model.named_parameters())
    assert MasterStore.of(model) is None


def test_a_restored_model_scripts_for_export():
    import lightning_mp
    from lightning_mp import MasterStore

    fabric = lightning_mp.Fabric(accelerator="cpu", devices=1, precision="bf16-master")
    model = fabric.setup(nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 2))).module
    MasterStore.of(model).restore_fp32()
    x = torch.randn(4, 8)
    assert torch.equal(torch.jit.script(model)(x), model(x))  # no hook of the plugin's left to compile


def test_a_model_cast_by_the_user_is_no_longer_decoded_as_16_bit():
    # model.float() upcasts the bf16 weights; the store must not read those as bf16 + remainder
    model, _ = trained(("bf16-master", "remainder"))
    model.float()
    with torch.no_grad():
        model.inp.weight.add_(2.0**-20)  # FP32 training after the cast
    assert torch.equal(model.state_dict()["inp.weight"], model.inp.weight)
