"""lightning_mp.optim.peers: the peers' AdamW (torchao, optimi) on bf16 weights, from the command
line and ``MoEModule(optimizer_impl=...)``, and their state counted by ``memory_audit``."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import run_cli

from lightning_mp import memory_audit
from lightning_mp.memory import plain_tensors
from lightning_mp.optim import peers

FAST = ["trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "data.max_bytes=200000"]
# Optimizer state per parameter (the moments; scalars such as ``step`` are left to the tolerance):
# moments in the weights' dtype (bf16); one byte per moment plus an FP32 scale per block of 256;
# bf16 moments and a bf16 Kahan compensation.
STATE = {"torchao-adamw": 4.0, "torchao-adamw8bit": 2 + 2 * 4 / 256, "optimi-adamw": 6.0}
CLASS = {"torchao-adamw": ("torchao", "_AdamW"), "torchao-adamw8bit": ("torchao", "AdamW8bit"),
         "optimi-adamw": ("optimi", "AdamW")}


def _needs(name: str) -> None:
    module, package = peers.REQUIRES[name]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{package} is not installed")


@pytest.mark.slow
@pytest.mark.parametrize("name", peers.PEERS)
def test_each_peer_steps_the_bf16_weights_from_the_command_line(name, tmp_path, capsys, monkeypatch):
    """``precision=bf16-true optimizer.impl=<peer>``: the peer's optimizer steps the bf16 weights (the
    no-decay group kept), and the run's bytes per parameter are 2 for the weights plus the peer's state."""
    _needs(name)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli([*FAST, "precision=bf16-true", f"optimizer.impl={name}"], capsys, monkeypatch)
    assert code == 0, err
    run = tmp_path / "outputs" / "tiny" / "latest"
    summary = json.loads((run / "summary.json").read_text())
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)  # (torchao's state: a tensor subclass)
    assert saved["hyper_parameters"]["optimizer_impl"] == name
    groups = saved["optimizer_states"][0]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    weights = {k: v for k, v in saved["state_dict"].items() if v.is_floating_point()}
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    # the summary's bytes: the bf16 weights and the optimizer state the checkpoint holds (each
    # storage once, the plain tensors inside torchao's subclass)
    seen, state = set(), 0
    for t in (v for st in saved["optimizer_states"][0]["state"].values() for v in st.values() if torch.is_tensor(v)):
        for inner in plain_tensors(t):
            if inner.untyped_storage().data_ptr() not in seen:
                seen.add(inner.untyped_storage().data_ptr())
                state += inner.untyped_storage().nbytes()
    assert summary["bytes_per_param"] == pytest.approx(2 + state / summary["n_params"], rel=1e-12)
    assert state / summary["n_params"] >= STATE[name]
    # and the run resumes (a torchao state is a tensor subclass: trusted, and loaded without
    # Lightning's callable map_location, which torch refuses for subclasses)
    code, _, err = run_cli([*FAST, "precision=bf16-true", f"optimizer.impl={name}", "trainer.max_steps=5",
                            f"resume={run}", "trust_checkpoint=true", "hydra.run.dir=resumed"], capsys, monkeypatch)
    assert code == 0, err
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == 5 and resumed["optimizer_states"][0]["state"]


@pytest.mark.parametrize("name", peers.PEERS)
def test_the_first_step_moves_each_weight_by_lr_within_one_bf16_step(name):
    """Adam's first step moves a weight by lr * g / (|g| + eps), i.e. lr against the gradient's
    sign (|g| >> eps), after decoupled decay (1 - lr * wd). The peer's bf16 weight is then that FP32
    value rounded stochastically (torchao: one of its two bf16 neighbours) or to nearest with the
    rest kept in the Kahan compensation (optimi): within one bf16 spacing of it either way."""
    _needs(name)
    lr, wd = 0.05, 0.1  # lr: about 6 bf16 spacings of a weight near 1
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(4096, generator=g).to(torch.bfloat16)
    p = torch.nn.Parameter(w0.clone())
    opt = peers.adamw(name, [{"params": [p], "weight_decay": wd}], lr=lr, betas=(0.9, 0.95))
    package, cls = CLASS[name]
    assert type(opt).__module__.startswith(package) and type(opt).__name__ == cls
    p.grad = torch.randn(4096, generator=g).to(torch.bfloat16)
    opt.step()
    exact = w0.double() * (1 - lr * wd) - lr * p.grad.double().sign()
    def spacing(x):  # bf16's spacing at |x|
        return torch.ldexp(torch.ones_like(x), torch.frexp(x)[1] - 8)

    bound = spacing(exact) + (spacing(w0.double()) / 2 if name == "optimi-adamw" else 0)
    assert p.dtype == torch.bfloat16
    assert ((p.double() - exact).abs() <= bound).all()
    assert (p != w0).float().mean() > 0.99  # and the weights moved


@pytest.mark.parametrize("name", peers.PEERS)
def test_memory_audit_counts_the_peer_state_inside_tensor_subclasses(name):
    """torchao's 8-bit state is a tensor subclass (codes, scales, code table): the audit counts the
    plain tensors inside it, and every peer's state comes to its bytes per parameter."""
    _needs(name)
    model = torch.nn.Linear(1024, 256, bias=False).to(torch.bfloat16)
    opt = peers.adamw(name, [{"params": list(model.parameters()), "weight_decay": 0.1}], lr=1e-3, betas=(0.9, 0.95))
    model.weight.grad = torch.randn_like(model.weight)
    opt.step()
    n = model.weight.numel()
    state = memory_audit(model, [opt])["optimizer_state"] / n
    assert STATE[name] <= state <= STATE[name] + (2 * 256 * 4 + 64) / n  # + a code table per moment and scalars


def test_a_missing_peer_is_one_line_naming_the_package(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    code, _, err = run_cli([*FAST, "precision=bf16-true", "optimizer.impl=torchao-adamw8bit"], capsys, monkeypatch)
    assert code == 2 and err.strip() == "lightning-mp-train: error: optimizer.impl=torchao-adamw8bit needs torchao: pip install torchao"


def test_the_module_refuses_a_peer_outside_bf16_true():
    """``MoEModule(optimizer_impl=...)`` under a precision whose weights the peer does not own."""
    from conftest import trainer
    from lightning_mp import MoEModule

    model = MoEModule(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_experts=2, top_k=1, optimizer_impl="optimi-adamw")
    model.configure_model()
    model.trainer = trainer("bf16-master", max_steps=1)
    with pytest.raises(ValueError, match="optimizer_impl=optimi-adamw steps bf16 weights itself: it needs precision='bf16-true'"):
        model.configure_optimizers()
