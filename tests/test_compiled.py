"""The torch.compile'd step (lightning_mp.optim.compiled, CUDA's fused path; compile=True forces it
here): the eager step's arithmetic, compiled once per storage kind and dtypes, never per step."""

from __future__ import annotations

import logging

import pytest
import torch
from test_fused import BF16, FP16, _one_step_from_the_same_state, _ulp, assert_trains_as_torchs_adamw
from roundoff import adamw_step_bound, assert_within
from torch._dynamo.utils import counters

from lightning_mp.optim import SGD, AdamW, compiled

pytestmark = pytest.mark.skipif(not compiled.available(torch.device("cpu")), reason="torch.compile needs a C++ compiler")
EAGER_COMPILED = (False, True)


@pytest.mark.parametrize("master, dtype", [("remainder", BF16), ("fp32", FP16)])
def test_compiled_adamw_step_is_within_round_off_of_torchs(master, dtype):
    # inductor rounds each product of lerp and addcmul (ATen's CPU kernels fuse a multiply-add in lerp):
    # within the round-off of two AdamW implementations (roundoff.adamw_step_bound)
    kwargs = dict(lr=1e-2, weight_decay=0.1)
    for before, eager, fast, inputs in _one_step_from_the_same_state(AdamW, master, dtype, compiles=EAGER_COMPILED,
                                                                     **kwargs):
        for b, e, f, (grad, state) in zip(before, eager, fast, inputs):
            assert_within(f, e, adamw_step_bound(b, grad, state, **kwargs), "compiled against eager")


def test_compiled_sgd_kahan_step_matches_the_eager_one():
    kwargs = dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-2)
    for before, eager, fast, _ in _one_step_from_the_same_state(SGD, "kahan", BF16, compiles=EAGER_COMPILED, **kwargs):
        for b, e, f in zip(before, eager, fast):
            # weight + compensation: about 16 significant bits; the update itself a few ulps apart
            # (unfused multiply-adds; measured at most 6 ulps of the update, with momentum and nesterov)
            assert ((e - f).abs() <= e.abs() * 2.0**-15 + 8 * _ulp(e - b)).all()


def test_compiled_stochastic_rounding_is_unbiased_for_weights_and_bf16_moments():
    # Weights at 1.0 (bf16 step above 1: 2**-7), SGD (maximize) moves them up by g1, a quarter step
    # and a bit: that fraction must round up. The bf16 momentum buffer then holds
    # 0.5 * g1 + g2 = 2**-9 * (1.5 + 2**-8), half-way between two bf16 values: its mean is exact.
    n = 1 << 20
    g1, g2 = 2.0**-9 * (1 + 2.0**-7), 2.0**-9
    w = torch.ones(n, dtype=BF16, requires_grad=True)
    opt = SGD([w], lr=1.0, momentum=0.5, master="stochastic", moment_dtype=BF16, maximize=True, compile=True)
    w.grad = torch.full((n,), g1, dtype=BF16)
    opt.step()
    p_up = g1 / 2.0**-7
    assert abs((w.float() == 1 + 2.0**-7).float().mean().item() - p_up) < 5 * (p_up * (1 - p_up) / n) ** 0.5
    w.grad = torch.full((n,), g2, dtype=BF16)
    opt.step()
    buf = -opt.state[w]["momentum_buffer"].float()
    assert set(buf.unique().tolist()) == {2.0**-9 * 1.5, 2.0**-9 * (1.5 + 2.0**-7)}  # the two bf16 neighbours
    assert abs(buf.mean().item() - 2.0**-9 * (1.5 + 2.0**-8)) < 5 * 2.0**-17 / n**0.5


def test_the_step_compiles_once_per_kind_never_per_step_size_or_group(monkeypatch, caplog):
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(compiled, "REPORTED", set())
    shapes = [(300, 70), (33,), (5, 4, 3), (2, 2)]  # ranks and sizes differ: the step runs on flat aliases
    halves = [torch.zeros(s, dtype=BF16, requires_grad=True) for s in shapes]
    norms = [torch.ones(7, requires_grad=True)]  # FP32 parameters: a second kind
    groups = [{"params": halves[:3]}, {"params": halves[3:] + norms, "lr": 1e-3, "weight_decay": 0.0}]
    opt = AdamW(groups, lr=1e-2, master="remainder", compile=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (1 + step))
    caplog.set_level(logging.INFO)
    for step in range(5):
        for p in halves + norms:
            p.grad = torch.randn(p.shape).to(p.dtype) if step != 2 or p is not halves[0] else None  # one skips a step
        opt.grad_factor = torch.tensor(0.5) if step == 3 else None  # unscaling and clipping come as numbers
        opt.grad_clamp = 0.1 if step == 4 else None
        opt.step()
        scheduler.step()
    assert counters["stats"]["unique_graphs"] == 2  # bf16 weights with remainders, FP32 parameters
    assert not counters["recompiles"]
    reports = [r.getMessage() for r in caplog.records if "with torch.compile in" in r.getMessage()]
    assert len(reports) == 2 and all("\n" not in line for line in reports)  # the first step's compile, once per kind


def test_compiled_adamw_under_fp32_masters_trains_as_torchs():
    # accumulated micro-batches (FP32 sums), clipping by norm: the compiled step on the plugin's masters
    assert_trains_as_torchs_adamw("bf16-master", ("mp-adamw-compiled",))


def _two_groups(compile, moment_dtype=torch.bfloat16):
    """bf16 weights of 1 and 40 elements in a minimizing and a maximizing group."""
    torch.manual_seed(0)
    params = [torch.zeros(s, dtype=BF16, requires_grad=True) for s in ((1,), (40,), (1,), (8, 5))]
    opt = AdamW([{"params": params[:2]}, {"params": params[2:], "maximize": True}], lr=1e-2, master="remainder",
                moment_dtype=moment_dtype, compile=compile)
    for p in params:
        opt.set_master(p, torch.randn(p.shape))
    return params, opt


def test_compiled_variants_stay_under_dynamos_recompile_limit():
    # Four variants of one step (maximize or not, a one-element tensor or not): one compiled function
    # each, so none recompiles past a limit of 2 (dynamo's default is 8; with fullgraph it raises)
    from roundoff import adamw_bound

    results, grads, values = [], [], []
    for compile in (False, True):
        params, opt = _two_groups(compile, moment_dtype=torch.float32)
        for _ in range(3):
            if not compile:
                values.append([opt.master_value(p).clone() for p in params])
            for p in params:
                p.grad = torch.randn(p.shape).to(BF16)
                if not compile:
                    grads.append(p.grad.float())
            with torch._dynamo.config.patch(recompile_limit=2):  # (dynamo's own, restored after)
                opt.step()
        results.append([opt.master_value(p) for p in params])
    for k, (eager, fast) in enumerate(zip(*results)):
        bound = adamw_bound([grads[4 * t + k] for t in range(3)], [values[t][k] for t in range(3)], lr=1e-2,
                            weight_decay=1e-2)  # (lightning_mp's AdamW default)
        assert_within(fast, eager, bound, f"parameter {k}")
        assert not torch.equal(eager, values[0][k])  # it trained


def test_a_compile_that_fails_falls_back_to_the_eager_step_with_one_warning(monkeypatch):
    def broken(op, variant):
        def fail(*args):
            raise RuntimeError("no working C compiler for Triton's launcher\nmore detail")
        return fail

    monkeypatch.setattr(compiled, "_compiled", broken)
    monkeypatch.setattr(compiled, "_CHECKED", {})
    runs = []
    for compile in (False, True):
        params, opt = _two_groups(compile)
        with pytest.warns(UserWarning) as record:
            import warnings
            warnings.warn("a marker", UserWarning)  # pytest.warns needs one warning in any case
            for _ in range(2):
                for p in params:
                    p.grad = torch.ones(p.shape, dtype=BF16)
                opt.step()
        fallbacks = [w for w in record if "torch.compile could not build the adamw step" in str(w.message)]
        assert len(fallbacks) == (2 if compile else 0)  # one per variant tried (maximize or not), then silent
        assert all("\n" not in str(w.message) and "no working C compiler" in str(w.message) for w in fallbacks)
        runs.append([opt.master_value(p) for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*runs))  # the eager step, untouched by the failed compiles
