"""16-bit cost by default: bf16-master keeps the cheapest exact storage for the user's own torch AdamW,
Adam and SGD (int16 remainders, 12 bytes per parameter with AdamW), keeping the optimizer object
and its state format; anything else keeps FP32 masters."""

import logging

import pytest
import torch
from conftest import LinearLoss, TinyRegressor, fp32_values, regression_data, trainer
from roundoff import adamw_bound, assert_within
from test_fused import Trajectory

import lightning_mp
from lightning_mp import MasterWeightPrecision, memory_audit

BF16 = torch.bfloat16


class Returned(TinyRegressor):
    """Remembers the optimizer configure_optimizers returned."""

    def configure_optimizers(self):
        self.made = super().configure_optimizers()
        return self.made


@pytest.mark.parametrize("optimizer", ["adamw", "adamw-fused", "sgd"])
def test_the_users_torch_optimizer_keeps_its_object_and_state_format(optimizer, caplog):
    model = Returned(optimizer=optimizer, scheduler=True)
    with caplog.at_level(logging.INFO, logger="lightning_mp"):
        t = trainer("bf16-master", max_steps=3, limit_val_batches=1)
        t.fit(model, regression_data())
        t.validate(model, regression_data(), verbose=False)  # connects the fitted optimizer again: said once
    opt = t.optimizers[0]
    assert opt is model.made["optimizer"] and isinstance(opt, (torch.optim.AdamW, torch.optim.SGD))  # the user's
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # its groups, the scheduler's lr
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)  # LambdaLR: lr / (1 + 3)
    keys = {"step", "exp_avg", "exp_avg_sq"} if optimizer.startswith("adamw") else {"momentum_buffer"}
    for p, state in opt.state.items():
        assert keys <= set(state) and all(state[k].dtype == torch.float32 for k in keys - {"step"})
        assert ("remainder" in state) == (p.dtype == BF16)  # the FP32 value's low 16 bits beside the weight
    line = [r.getMessage() for r in caplog.records if "keeps each weight's FP32 value" in r.getMessage()]
    assert len(line) == 1 and "int16 remainder" in line[0] and "\n" not in line[0]


def test_adamw_costs_12_bytes_per_parameter_between_steps_and_14_at_the_step():
    class Audit(lightning_mp.SwallowedUpdateMonitor.__base__):  # a Callback
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.at_step = memory_audit(pl_module, trainer.optimizers, trainer.precision_plugin)

        def on_train_batch_end(self, trainer, pl_module, *args):
            self.between = memory_audit(pl_module, trainer.optimizers, trainer.precision_plugin)

    class Model(TinyRegressor):  # no norm: every parameter a bf16 weight
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.Identity()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    audit = Audit()
    trainer("bf16-master", max_steps=2, callbacks=[audit]).fit(Model(), regression_data())
    n = audit.between["n_params"]
    steps = 4 * 4  # four parameter tensors' `step` counters
    assert audit.between["total"] == 12 * n + steps  # bf16 weight + int16 remainder + FP32 moments
    assert audit.at_step["total"] == 14 * n + steps  # + the bf16 gradients


@pytest.mark.parametrize("precision", ["bf16-master", "16-master"])
def test_accumulated_micro_batches_are_summed_in_fp32_under_the_default(precision):
    """The default storage trains as FP32 masters to AdamW's round-off, micro-batches summed in FP32
    (a bf16 sum would put the gradients 2**-9 apart, far past the bound)."""
    runs, before = {}, None
    for master in ("fp32", "auto"):
        torch.manual_seed(0)
        values = Trajectory()
        plugin = MasterWeightPrecision(precision, master=master, **({"init_scale": 2.0**8} if precision == "16-master" else {}))
        t = trainer(plugin, max_steps=4, accumulate_grad_batches=3, callbacks=[values])
        t.fit(LinearLoss(optimizer="adamw", lr=1e-2), regression_data(n=96))
        runs[master] = fp32_values(t)
        before = before or values.before
    model = LinearLoss()
    gradients = model.gradients(regression_data(n=96), accumulate=3)
    for name, value in runs["fp32"].items():
        decay = 0.1 if name.endswith("weight") and "norm" not in name else 0.0
        lr = 1e-2 if decay else 0.5e-2
        bound = adamw_bound(gradients[name], [b[name] for b in before], lr, weight_decay=decay)
        assert_within(runs["auto"][name], value, bound, name)


def test_a_saved_state_loads_into_a_plain_torch_optimizer_and_back():
    model = Returned(optimizer="adamw")
    t = trainer("bf16-master", max_steps=2)
    t.fit(model, regression_data())
    saved = t.optimizers[0].state_dict()
    plain = torch.optim.AdamW([{"params": g["params"]} for g in t.optimizers[0].param_groups])
    plain.load_state_dict(saved)
    first = plain.state[model.inp.weight]  # torch casts the moments to its bf16 parameter's dtype
    assert torch.equal(first["exp_avg"], t.optimizers[0].state[model.inp.weight]["exp_avg"].to(BF16))
    again = Returned(optimizer="adamw")
    resumed = trainer("bf16-master", max_steps=3)
    again.configure_optimizers = lambda: _loaded(again, plain.state_dict())
    resumed.fit(again, regression_data())
    assert resumed.optimizers[0].state[again.inp.weight]["step"].item() == 5  # 2 loaded + 3 (a new fit, not a resume)


def _loaded(model, state):
    opt = TinyRegressor.configure_optimizers(model)  # a plain torch AdamW, the same groups
    opt.load_state_dict(state)
    return opt


@pytest.mark.parametrize("optimizer, reason", [
    ("adagrad", "Adagrad is not torch's AdamW, Adam or SGD"),
    ("sign", "SignSGD is not torch's AdamW, Adam or SGD"),
    ("adam-l2", "Adam's L2 weight decay"),
    ("amsgrad", "amsgrad=True"),
])
def test_other_optimizers_keep_fp32_masters_and_say_why(optimizer, reason, caplog):
    class Model(TinyRegressor):
        def configure_optimizers(self):
            if optimizer == "adam-l2":
                return torch.optim.Adam(self.parameters(), lr=1e-2, weight_decay=0.1)
            if optimizer == "amsgrad":
                return torch.optim.AdamW(self.parameters(), lr=1e-2, amsgrad=True)
            return super().configure_optimizers()

    with caplog.at_level(logging.INFO, logger="lightning_mp"):
        t = trainer("bf16-master", max_steps=2)
        t.fit(Model(optimizer=optimizer), regression_data())
    assert all("remainder" not in s for s in t.optimizers[0].state.values())
    assert t.precision_plugin.store.kind(t.lightning_module.inp.weight) == "fp32"
    line = next(r.getMessage() for r in caplog.records if "keeps each weight's FP32 value" in r.getMessage())
    assert "as an FP32 master" in line and reason in line


def test_master_fp32_still_forces_fp32_masters_and_master_remainder_adopts_torchs_adamw():
    t = trainer(MasterWeightPrecision("bf16-master", master="fp32"), max_steps=2)
    t.fit(TinyRegressor(optimizer="adamw"), regression_data())
    assert all("remainder" not in s for s in t.optimizers[0].state.values())
    t = trainer(MasterWeightPrecision("bf16-master", master="remainder"), max_steps=2)
    t.fit(TinyRegressor(optimizer="adamw"), regression_data())
    assert any("remainder" in s for s in t.optimizers[0].state.values())
    with pytest.raises(TypeError, match="master='remainder' needs an optimizer.*Adagrad is not torch's"):
        trainer(MasterWeightPrecision("bf16-master", master="remainder"), max_steps=1).fit(
            TinyRegressor(optimizer="adagrad"), regression_data())
