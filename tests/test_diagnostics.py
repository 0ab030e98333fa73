import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from conftest import regression_data, trainer
from lightning_mp import bytes_per_param, memory_audit


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
        self.audit = memory_audit(pl_module, trainer.optimizers)


N = 8 * 16 + 16  # parameters
STEPS = 2 * 4  # AdamW's two FP32 scalar `step` tensors


@pytest.mark.parametrize(
    "precision, weights, masters, grads, state",
    [
        ("32-true", 4 * N, 0, 4 * N, 8 * N + STEPS),
        ("bf16-mixed", 4 * N, 0, 4 * N, 8 * N + STEPS),
        ("bf16-true", 2 * N, 0, 2 * N, 4 * N + STEPS),  # Adam moments in bf16 too
        ("bf16-master", 2 * N, 4 * N, 0, 8 * N + STEPS),  # grads freed inside the step
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
        "total": weights + masters + grads + state,
        "n_params": N,
    }


def test_shared_storage_is_counted_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied
    model = nn.ModuleDict({"emb": emb, "head": head})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # its group holds the module's own params
    audit = memory_audit(model, [opt])
    assert audit["weights"] == 40 * 4 and audit["masters"] == 0 and audit["n_params"] == 40
    assert bytes_per_param(audit)["total"] == 4.0
