"""lightning_mp.memory: the memory audit of a real run's live tensors, counted by hand, and the estimate beside it."""

import lightning.pytorch as L
import pytest
import torch
from conftest import Audit, regression_data, trainer
from torch import nn

import lightning_mp.optim
from lightning_mp import bytes_per_param, estimate_memory, memory_audit


class TwoLayer(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16, bias=False)
        self.b = nn.Linear(16, 1, bias=False)

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self.b(self.a(batch[0])).float(), batch[1])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


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
