"""lightning_mp.diagnostics: the swallowed-update monitor, in closed form and through real runs it must not change."""

import pytest
import torch
from conftest import Audit, Dot, TinyRegressor, fp32_values, inverse_step, regression_data, trainer

import lightning_mp.optim
from lightning_mp import SwallowedUpdateMonitor


# -- the swallowed-update monitor: SGD on loss = w . x with w = 1, so every update is exactly lr * x --


def monitored(precision, lr, steps=4, **monitor_kwargs):
    monitor = SwallowedUpdateMonitor(every_n_steps=1, **monitor_kwargs)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(steps, 8)), batch_size=1)
    trainer(precision, max_steps=steps, callbacks=[monitor]).fit(Dot(d=8, lr=lr), data)
    return monitor.last


# Half a bf16 step: 2**-8 at exactly 1.0 (spacing 2**-7 in [1, 2)); 2**-9 just below 1, where an
# FP32-stored weight sits after its first update.
HALF_STEP = {"bf16-true": 2.0**-8, "32-true": 2.0**-9, "bf16-mixed": 2.0**-9, "bf16-master": 2.0**-9}


@pytest.mark.parametrize("precision, small, large", [
    ("bf16-true", 1.0, 0.0),  # the stored bf16 weight never takes an update below half a step
    ("32-true", 1.0, 0.0),  # would be lost in bf16 storage
    ("bf16-mixed", 1.0, 0.0),
    ("bf16-master", 0.0, 0.0),  # the masters keep every update
])
def test_swallowed_fraction_in_closed_form(precision, small, large):
    below = monitored(precision, lr=1e-4)  # update 1e-4 < 2**-8: rounds away in bf16
    above = monitored(precision, lr=0.05)  # update 0.05 > 2**-8: always applied
    assert below["precision/swallowed_frac"] == small and below["precision/swallowed_frac/pg0"] == small
    assert above["precision/swallowed_frac"] == large
    assert below["precision/update_to_half_step"] == pytest.approx(1e-4 / HALF_STEP[precision], rel=0.01)
    assert below["precision/update_ratio"] == pytest.approx(1e-4, rel=0.02)


def test_masters_report_what_they_saved():
    assert monitored("bf16-master", lr=1e-4)["precision/swallowed_without_masters"] == 1.0
    assert monitored("bf16-master", lr=0.05)["precision/swallowed_without_masters"] == 0.0


def test_warns_once_under_bf16_true_and_names_the_fix():
    with pytest.warns(UserWarning, match=r"100% of this step's weight updates.*precision='bf16-master'") as record:
        monitored("bf16-true", lr=1e-4, steps=6, patience=3)
    assert sum("rounded away" in str(w.message) for w in record) == 1


def test_no_warning_when_masters_keep_the_updates(recwarn):
    monitored("bf16-master", lr=1e-4, steps=6, patience=3)
    assert not [w for w in recwarn if "rounded away" in str(w.message)]


class DotStored(Dot):
    def configure_optimizers(self):
        return lightning_mp.optim.SGD(self.parameters(), lr=self.lr)


@pytest.mark.parametrize("master", ["remainder", "kahan"])
def test_storage_policies_keep_the_updates_their_weights_cannot(master):
    monitor = SwallowedUpdateMonitor(every_n_steps=1)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 8)), batch_size=1)
    trainer("bf16-master", {"master": master}, max_steps=4, callbacks=[monitor]).fit(DotStored(d=8, lr=1e-4), data)
    assert monitor.last["precision/swallowed_frac"] == 0.0  # the remainder (compensation) took each update
    assert monitor.last["precision/swallowed_without_masters"] == 1.0  # the bf16 weight alone could not
    assert monitor.last["precision/update_ratio"] == pytest.approx(1e-4, rel=0.02)


# -- watching never changes training: a run with the monitor at every step against one without --

WATCHED = [
    *[(p, None, o) for p in ("32-true", "bf16-mixed") for o in ("adamw", "adamw-fused", "sgd", "adagrad", "mp-adamw")],
    *[("bf16-true", None, o) for o in ("adamw", "adamw-fused", "sgd", "adagrad", "sign")],
    *[("bf16-master", m, o) for m in ("auto", "fp32") for o in ("adamw", "adamw-fused", "sgd", "adagrad", "sign", "mp-adamw")],
    *[("bf16-master", m, o) for m in ("remainder", "kahan", "stochastic") for o in ("mp-adamw", "mp-sgd", "mp-adamw-bf16")],
    *[("bf16-master", m, "mp-adamw-8bit") for m in ("auto", "stochastic")],
    *[("16-master", "fp32", o) for o in ("adamw", "adamw-fused", "sgd")],
]


class Watched(TinyRegressor):
    def configure_optimizers(self):
        if self.hparams.optimizer != "mp-adamw-bf16":
            return super().configure_optimizers()
        opt = lightning_mp.optim.AdamW(self.parameters(), lr=self.hparams.lr, moment_dtype=torch.bfloat16)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, inverse_step)}


def _bits(x):
    """``x`` with every tensor as its raw bytes (so -0.0 and 0.0, or two NaNs, compare by their bits)."""
    if isinstance(x, torch.Tensor):
        return x.detach().reshape(-1).view(torch.uint8).clone() if x.dtype != torch.bool else x.clone()
    if isinstance(x, dict):
        return {k: _bits(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_bits(v) for v in x]
    return x


def _assert_same_bits(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_bits(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_bits(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _train(precision, master, optimizer, callbacks):
    torch.manual_seed(0)
    plugin = {"master": master, **({"init_scale": 2.0**8} if precision == "16-master" else {})} if master else None
    model = Watched(optimizer=optimizer, scheduler=True)
    t = trainer(precision, plugin, max_steps=4, callbacks=callbacks)
    t.fit(model, regression_data())
    observed = {
        "weights": dict(model.named_parameters()),  # as stored: 16-bit under bf16-true and *-master
        "values": fp32_values(t, model),  # what the run holds: its FP32 masters under *-master
        "optimizer": t.optimizers[0].state_dict(),
        "scheduler": t.lr_scheduler_configs[0].scheduler.state_dict(),
        "plugin": t.precision_plugin.state_dict(),
        "rng": torch.get_rng_state(),
    }
    return _bits(observed)


@pytest.mark.parametrize("precision, master, optimizer", WATCHED, ids=["-".join(filter(None, c)) for c in WATCHED])
def test_the_monitor_leaves_the_run_bit_identical(precision, master, optimizer):
    monitor = SwallowedUpdateMonitor(every_n_steps=1)
    watched = _train(precision, master, optimizer, [monitor])
    assert monitor.last, "the monitor measured nothing"
    _assert_same_bits(watched, _train(precision, master, optimizer, []))


def test_the_memory_audit_leaves_the_run_bit_identical():
    watched = _train("bf16-master", "stochastic", "mp-adamw-bf16", [Audit()])
    _assert_same_bits(watched, _train("bf16-master", "stochastic", "mp-adamw-bf16", []))
