import lightning.pytorch as L
import pytest
import torch
from conftest import Dot, TinyRegressor, fp32_values, inverse_step, regression_data, trainer
from lightning.pytorch.callbacks import Callback
from torch import nn

import lightning_mp.optim
from lightning_mp import SwallowedUpdateMonitor, bytes_per_param, estimate_memory, memory_audit


class TwoLayer(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16, bias=False)
        self.b = nn.Linear(16, 1, bias=False)

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self.b(self.a(batch[0])).float(), batch[1])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class Audit(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.audit = memory_audit(pl_module, trainer.optimizers, trainer.precision_plugin)


N = 8 * 16 + 16  # parameters
STEPS = 2 * 4  # AdamW's two FP32 scalar `step` tensors


@pytest.mark.parametrize(
    "precision, weights, masters, grads, state",
    [
        ("32-true", 4 * N, 0, 4 * N, 8 * N + STEPS),
        ("bf16-mixed", 4 * N, 0, 4 * N, 8 * N + STEPS),
        ("bf16-true", 2 * N, 0, 2 * N, 4 * N + STEPS),  # Adam moments in bf16 too
        ("bf16-master", 2 * N, 2 * N, 0, 8 * N + STEPS),  # int16 remainders (the default); grads freed in the step
        ("16-master", 2 * N, 4 * N, 0, 8 * N + STEPS),
    ],
)
def test_audit_matches_hand_count_after_a_step(precision, weights, masters, grads, state):
    audit = Audit()
    options = {"init_scale": 2.0**8} if precision == "16-master" else None  # a step that does not overflow
    trainer(precision, options, max_steps=1, callbacks=[audit]).fit(TwoLayer(), regression_data())
    assert audit.audit == {
        "weights": weights,
        "masters": masters,
        "gradients": grads,
        "optimizer_state": state,
        "loss_scaler": 0,  # lightning-mp's scaler keeps Python floats
        "total": weights + masters + grads + state,
        "n_params": N,
    }
    assert estimate_memory(N, precision, "adamw", n_tensors=2) == audit.audit  # the estimate agrees


@pytest.mark.parametrize("precision", ["32-true", "bf16-true", "bf16-master"])
@pytest.mark.parametrize("optimizer, make", [
    ("sgd", lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9)),
    ("adagrad", lambda p: torch.optim.Adagrad(p, lr=1e-3)),
])
def test_estimate_agrees_with_the_audit_for_other_optimizers(precision, optimizer, make):
    class Model(TwoLayer):
        def configure_optimizers(self):
            return make(self.parameters())

    audit = Audit()
    trainer(precision, max_steps=1, callbacks=[audit]).fit(Model(), regression_data())
    assert estimate_memory(N, precision, optimizer, n_tensors=2) == audit.audit


@pytest.mark.parametrize(
    "master, moment_dtype, masters, state",
    [
        ("remainder", torch.float32, 2 * N, 8 * N + STEPS),  # 2 + 2 + 8: 12 bytes per parameter
        ("kahan", torch.float32, 2 * N, 8 * N + STEPS),
        ("stochastic", torch.bfloat16, 0, 4 * N + STEPS),  # 2 + 4: bf16 weight and moments only
        ("remainder", "8bit", 2 * N, 2 * N + 4 * 4 + STEPS),  # a code per moment, a scale per moment and tensor
        ("stochastic", "8bit", 0, 2 * N + 4 * 4 + STEPS),
    ],
)
def test_audit_of_the_storage_policies_matches_hand_count(master, moment_dtype, masters, state):
    class Model(TwoLayer):
        def configure_optimizers(self):
            return lightning_mp.optim.AdamW(self.parameters(), lr=1e-3, moment_dtype=moment_dtype)

    audit = Audit()
    trainer("bf16-master", {"master": master}, max_steps=1, callbacks=[audit]).fit(Model(), regression_data())
    expected = {"weights": 2 * N, "masters": masters, "gradients": 0, "optimizer_state": state, "loss_scaler": 0}
    assert audit.audit == {**expected, "total": sum(expected.values()), "n_params": N}
    dtype = {torch.bfloat16: "bfloat16", torch.float32: "float32"}.get(moment_dtype, moment_dtype)
    estimate = estimate_memory(N, "bf16-master", "adamw", n_tensors=2, master=master, moment_dtype=dtype)
    if dtype != "8bit":
        assert estimate == audit.audit
    else:  # the estimate counts N / 256 scales per moment: each tensor rounds its blocks up to a whole one
        assert 0 < audit.audit["total"] - estimate["total"] < 2 * 2 * 4


def test_estimate_rejects_unknown_names():
    with pytest.raises(ValueError, match="bf16-master"):
        estimate_memory(10, "fp8")
    with pytest.raises(ValueError, match="adamw"):
        estimate_memory(10, "32-true", "lion")


def test_shared_storage_is_counted_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied
    model = nn.ModuleDict({"emb": emb, "head": head})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # its group holds the module's own params
    audit = memory_audit(model, [opt])
    assert audit["weights"] == 40 * 4 and audit["masters"] == 0 and audit["n_params"] == 40
    assert bytes_per_param(audit)["total"] == 4.0


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
