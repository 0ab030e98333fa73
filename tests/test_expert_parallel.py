"""Expert parallelism (``MoEModule(expert_parallel=ep)``) on 2 and 4 gloo CPU processes against
one process running the same micro-batches (``tests/ep_run.py``).

Bounds: the EP runs regroup FP32 sums (an expert's weight gradient sums its rows from every rank
in one matmul; one process sums them micro-batch by micro-batch), each regrouping changing a
result by at most a few units of 2^-24 of the terms' magnitude. Over the tiny model's sums of at
most a few hundred terms, 2^-24 * 256 = 1.5e-5 relative bounds every gradient, logit and (SGD)
weight difference; the runs print about 2e-7.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

RUN = Path(__file__).with_name("ep_run.py")
FP32_REL = 2.0**-24 * 256
# one training setup: SGD with momentum (weights move linearly in the gradients: differences bounded as theirs),
# clipping by norm, a capacity factor that drops tokens, the expert bias moving each step
COMMON = dict(sgd=0.5, steps=3, clip=0.05, cf=1.25)


def run(out: Path, **args) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, str(RUN), json.dumps({"out": str(out), **args})],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(f) for f in sorted(out.glob("rank*.pt"))]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_close(a: dict, b: dict, bound: float = FP32_REL) -> None:
    assert a.keys() == b.keys()
    worst = max(rel(a[k], b[k]) for k in b)
    assert worst <= bound, worst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ep")
    one = run(root / "one", accumulate=4, **COMMON)  # the 4 micro-batches of a step, one after another
    ep2 = run(root / "ep2", devices=2, ep=2, accumulate=2, save_every=2, **COMMON)
    return root, one, ep2


def test_expert_parallel_trains_as_one_process(runs):
    """ep = world = 2: routing, drops, bias, gradients, clipping, weights and logits as one process."""
    _, (one,), ep2 = runs
    assert [r["local_experts"] for r in ep2] == [{"shape": [2, 32, 64], "dtype": "torch.float32"}] * 2  # half each
    assert_close(ep2[0]["grads0"], one["grads0"])  # every expert's and dense gradient of the first step
    for step in range(3):  # clipped SGD steps
        assert_close(ep2[0]["weights"][step], one["weights"][step])
    assert rel(ep2[0]["logits"], one["logits"]) <= FP32_REL
    # the same routing: the same assignments dropped by capacity, per micro-batch and layer
    assert sorted(d for r in ep2 for d in r["drops"]) == sorted(one["drops"])
    assert any(frac > 0 for *_, fracs in one["drops"] for frac in fracs)
    # the expert bias moves from every rank's counts: identical on every rank and to one process's
    for r in ep2:
        for got, want in zip(r["bias"], one["bias"]):
            assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert any(b.abs().max() > 0 for b in one["bias"][-1])
    # the all-to-all's balance is logged per layer: each EP rank's share of the tokens, max / mean
    assert ep2[0]["metrics"]["moe/layer0/ep_imbalance"] >= 1.0
    assert "moe/layer0/ep_imbalance" not in one["metrics"]


def test_expert_parallel_over_replicas_on_four_processes(runs, tmp_path):
    """ep = 2 < world = 4: each expert held by 2 ranks (FSDP2 over them), one process's training."""
    _, (one,), _ = runs
    four = run(tmp_path / "four", devices=4, ep=2, **COMMON)
    assert [r["local_experts"]["shape"] for r in four] == [[1, 32, 64]] * 4  # 4 experts / ep 2 / 2 replicas
    assert_close(four[0]["grads0"], one["grads0"])
    assert_close(four[0]["weights"][-1], one["weights"][-1])
    assert sorted(d for r in four for d in r["drops"]) == sorted(one["drops"])


def test_bf16_master_expert_parallel_trains_as_without_it(tmp_path):
    """bf16-master on 2 processes, ep=2 against ep=1 (FSDP2 alone): bf16 compute differs only where
    rows meet in one expert matmul. An expert weight's gradient is one bf16 rounding (2^-9 relative)
    of the FP32 sum over both ranks' rows under EP, two of the ranks' partial sums without: at
    most 3 * 2^-9 of their magnitudes; an expert output differs by at most a bf16 rounding, which
    the other gradients inherit. 2^-7 bounds both (measured: 2.3e-3)."""
    common = dict(devices=2, accumulate=2, precision="bf16-master", master="fp32", sgd=0.5, steps=1)
    dense, expert = run(tmp_path / "ep1", ep=1, **common), run(tmp_path / "ep2", ep=2, **common)
    assert expert[0]["local_experts"]["shape"] == [2, 32, 64] and dense[0]["local_experts"]["shape"] == [2, 32, 64]
    assert_close(expert[0]["grads0"], dense[0]["grads0"], bound=2.0**-7)
    assert_close(expert[0]["weights"][0], dense[0]["weights"][0], bound=2.0**-7)


def test_full_checkpoint_holds_every_expert_whole_and_loads_into_one_process(runs):
    from lightning_mp import MoEModule

    root, _, ep2 = runs
    path = root / "ep2" / "checkpoints" / "epoch=1-step=2.ckpt"
    model = MoEModule.load_from_checkpoint(path, map_location="cpu", expert_parallel=1)
    model.configure_model()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["state_dict"])
    state = dict(model.named_parameters())
    assert state["model.blocks.0.ffn.experts.w1"].shape == (4, 32, 64)
    for name, value in ep2[0]["weights"][1].items():  # after step 2, as the ranks held them
        assert torch.equal(state[name].detach(), value), name


@pytest.mark.parametrize("devices,ep", [(4, 4), (2, 1)])
def test_resume_under_another_expert_parallel_size(runs, tmp_path, devices, ep):
    """A full checkpoint of ep=2 on 2 processes resumes on 4 processes with ep=4, or with ep=1."""
    root, (one,), _ = runs
    resumed = run(tmp_path / "resumed", devices=devices, ep=ep, accumulate=4 // devices,
                  resume=str(root / "ep2" / "checkpoints" / "epoch=1-step=2.ckpt"), **COMMON)
    assert_close(resumed[0]["weights"][-1], one["weights"][-1])  # step 3, as the straight run's
    if devices == 4:
        assert [r["local_experts"]["shape"] for r in resumed] == [[1, 32, 64]] * 4


def test_distributed_checkpoint_of_bf16_expert_shards_resumes_bit_exactly(tmp_path):
    """bf16-master's default storage (bf16 shards with int16 remainders, lightning_mp's AdamW) on
    expert and dense shards: a resume from the step-2 DCP checkpoint ends as the straight run."""
    common = dict(devices=2, ep=2, precision="bf16-master", accumulate=2, steps=3, clip=0.05)
    straight = run(tmp_path / "straight", save_every=2, dcp=True, **common)
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "straight" / "checkpoints" / "epoch=1-step=2.ckpt"),
                  **common)
    for a, b in zip(straight, resumed):
        assert a["local_experts"] == {"shape": [2, 32, 64], "dtype": "torch.bfloat16"}  # bf16 shards, remainders beside
        assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])  # FP32 values, every expert
        assert all(torch.equal(x, y) for x, y in zip(a["bias"][-1], b["bias"][-1]))


def test_a_nan_in_one_ranks_expert_gradient_skips_the_step_on_every_rank(tmp_path):
    """bf16-master, FP32 expert shards: rank 1's expert gradient holds a NaN at step 1 only."""
    ranks = run(tmp_path / "nan", devices=2, ep=2, precision="bf16-master", master="fp32", nan_at=1, steps=3,
                sgd=0.5)
    for r in ranks:
        assert r["skipped"] == 1
        before, skipped, after = r["weights"]
        assert all(torch.equal(skipped[k], before[k]) for k in before)  # nothing moved, experts or dense
        assert any(not torch.equal(after[k], skipped[k]) for k in after)  # and training went on
        assert all(torch.isfinite(v).all() for v in after.values())


def test_expert_parallel_must_divide_the_experts_and_needs_model_parallel_strategy():
    import lightning.pytorch as L

    from lightning_mp import MoEModule

    with pytest.raises(ValueError, match="expert_parallel=3 must be >= 1 and divide n_experts=8"):
        MoEModule(expert_parallel=3)
    model = MoEModule(n_experts=4, expert_parallel=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    model.trainer = trainer
    with pytest.raises(ValueError, match="expert_parallel=2 needs ModelParallelStrategy"):
        model.configure_model()


def test_command_line_expert_parallel_under_lightnings_32_true_trains_as_without_it(tmp_path):
    """`trainer=fsdp2 precision=32-true model.expert_parallel=2`: Lightning's own precision, the
    module shards itself; the validation loss is the ep=1 run's to FP32 round-off. (AdamW steps
    here: a gradient element's round-off change moves its update by at most lr * |change| / eps,
    about 3e-3 * 1e-11 / 1e-8 = 3e-6 for an element near eps, far inside the bound; measured
    2e-8 relative.)"""
    exe = Path(sys.executable).parent / "lightning-mp-train"
    common = ["trainer=fsdp2", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=3",
              "trainer.val_check_interval=3", "trainer.limit_val_batches=2", "data.max_bytes=100000",
              "precision=32-true"]
    losses = {}
    for ep in (1, 2):
        out = tmp_path / f"ep{ep}"
        result = subprocess.run([str(exe), *common, f"model.expert_parallel={ep}", f"hydra.run.dir={out}"],
                                cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["precision"] == "32-true" and summary["steps"] == 3
        losses[ep] = summary["val_loss"]
        header = (out / "metrics.csv").read_text().splitlines()[0]
        assert ("moe/layer0/ep_imbalance" in header) == (ep == 2)  # the experts were split at ep=2
    assert abs(losses[2] - losses[1]) <= FP32_REL * losses[1]
