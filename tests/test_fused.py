"""The fused optimizer step (lightning_mp.fused): same arithmetic as the eager path, built once, a fallback."""

from __future__ import annotations

import copy
import logging

import lightning.pytorch as L
import pytest
import torch

from roundoff import adamw_step_bound, assert_within

from lightning_mp import fused
from lightning_mp.optim import SGD, AdamW
from lightning_mp.storage import join_

BF16, FP16 = torch.bfloat16, torch.float16
SHAPES = [(300, 70), (33,), (5, 4, 3)]
needs_kernel = pytest.mark.skipif(not fused.available(), reason="no C++ compiler: the fused step falls back to eager")


def _values(seed=0):
    g = torch.Generator().manual_seed(seed)
    values = [torch.randn(s, generator=g) * 3 for s in SHAPES]
    values[0].view(-1)[:4] = torch.tensor([0.0, -0.0, 1e-40, 3e37])
    return values


def _optimizers(cls, master, dtype, compiles=(False, None), **kwargs):
    """The same parameters stepped by the eager and the fused (or ``compiles[1]``'s) path."""
    runs = []
    for compile in compiles:
        params = [torch.empty(v.shape, dtype=dtype, requires_grad=True) for v in _values()]
        opt = cls(params, master=master if dtype != torch.float32 else None, compile=compile, **kwargs)
        for p, v in zip(params, _values()):
            opt.set_master(p, v)
        runs.append((params, opt))
    return runs


def _one_step_from_the_same_state(cls, master, dtype, steps=4, compiles=(False, None), **kwargs):
    """Step both paths; before each step the fused optimizer takes the eager one's exact state, so
    the comparison is of one step's arithmetic. Yields (before, eager values, fused values, inputs) per
    step, inputs being each parameter's gradient and optimizer state before the step."""
    (ea, eager), (fu, fast) = _optimizers(cls, master, dtype, compiles, **kwargs)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        grads = [torch.randn(s, generator=g).to(dtype) for s in SHAPES]
        for p, q, grad in zip(ea, fu, grads):
            p.grad, q.grad = grad.clone(), grad.clone()
        fast.load_state_dict(copy.deepcopy(eager.state_dict()))  # no shared moment tensors
        inputs = [(grad, copy.deepcopy(eager.state[p])) for p, grad in zip(ea, grads)]
        before = [eager.master_value(p).clone() for p in ea]
        for p, q, b in zip(ea, fu, before):
            fast.set_master(q, b)
        eager.step()
        fast.step()
        yield before, [eager.master_value(p) for p in ea], [fast.master_value(q) for q in fu], inputs


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """The FP32 step at |x| (the smallest subnormal at 0)."""
    exponent = torch.frexp(x.abs())[1]
    return torch.where(x != 0, torch.ldexp(torch.ones_like(x), exponent - 24), torch.full_like(x, 2.0**-149))


@needs_kernel
@pytest.mark.parametrize("master, dtype", [(None, torch.float32), ("fp32", BF16), ("fp32", FP16), ("remainder", BF16),
                                           ("kahan", BF16)])
@pytest.mark.parametrize("kwargs", [dict(lr=1e-2, weight_decay=0.1), dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6,
                                                                          weight_decay=0.0, maximize=True)])
def test_fused_adamw_step_is_within_round_off_of_torchs(master, dtype, kwargs):
    # The kernel follows torch's AdamW op for op but takes IEEE square roots (torch's vector sqrt may be
    # 1 ulp off) and its own FMA choices: one step from the same state lands within the round-off of
    # two AdamW implementations (roundoff.adamw_step_bound)
    for before, eager, fast, inputs in _one_step_from_the_same_state(AdamW, master, dtype, **kwargs):
        for b, e, f, (grad, state) in zip(before, eager, fast, inputs):
            bound = adamw_step_bound(b, grad, state, **kwargs)
            if master == "kahan":  # weight + compensation: about 16 significant bits
                bound = bound + e.abs() * 2.0**-15
            assert_within(f, e, bound, "fused against eager")


@needs_kernel
@pytest.mark.parametrize("master, dtype", [(None, torch.float32), ("fp32", BF16), ("fp32", FP16), ("remainder", BF16),
                                           ("kahan", BF16)])
@pytest.mark.parametrize("kwargs", [dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-2),
                                    dict(lr=1e-2, momentum=0.9, dampening=0.5), dict(lr=1e-1, maximize=True)])
def test_fused_sgd_step_equals_the_eager_one_bit_for_bit(master, dtype, kwargs):
    for _, eager, fast, _ in _one_step_from_the_same_state(SGD, master, dtype, **kwargs):
        assert all(torch.equal(e, f) for e, f in zip(eager, fast))


@needs_kernel
def test_fused_16_bit_weights_are_the_rounded_masters_and_remainders_exact():
    (ea, eager), (fu, fast) = _optimizers(AdamW, "remainder", BF16, lr=1e-2)
    for p in fu:
        p.grad = torch.randn_like(p)
    fast.step()
    for p in fu:
        out = torch.empty_like(p, dtype=torch.float32)
        join_([out], [p.detach()], [fast.state[p]["remainder"]])
        assert torch.equal(out, fast.master_value(p))  # weight + remainder = the value, as the eager split
    (_, _), (fp, fopt) = _optimizers(AdamW, "fp32", FP16, lr=1e-2)
    for p in fp:
        p.grad = torch.randn_like(p)
    fopt.step()
    assert all(torch.equal(p, fopt.store.storage(p).to(FP16)) for p in fp)  # fp16 weights: round to nearest


@needs_kernel
@pytest.mark.parametrize("up, p_up", [(2.0**-9, 0.25), (3 * 2.0**-9, 0.75)])
def test_fused_stochastic_rounding_goes_up_with_the_exact_probability(up, p_up):
    # weights at 1.0 (bf16 step above 1: 2**-7); an SGD update of +up lands a quarter (three
    # quarters) of the way to the next bf16 value: it must round up with that probability
    n = 1 << 20
    w = torch.ones(n, dtype=BF16, requires_grad=True)
    opt = SGD([w], lr=1.0, master="stochastic", maximize=True)
    w.grad = torch.full((n,), up, dtype=BF16)
    opt.step()
    frac = (w.float() == 1 + 2.0**-7).float().mean().item()
    assert abs(frac - p_up) < 5 * (p_up * (1 - p_up) / n) ** 0.5
    assert set(w.float().unique().tolist()) == {1.0, 1 + 2.0**-7}
    before = w.detach().clone()
    w.grad = torch.full((n,), up, dtype=BF16)
    opt.step()
    assert not torch.equal(w.detach().view(torch.int16) - before.view(torch.int16), torch.zeros(n, dtype=torch.int16))


@pytest.mark.parametrize("compile", [None, False], ids=["fused", "eager"])
@pytest.mark.parametrize("up, p_up", [(2.0**-9, 0.25), (3 * 2.0**-9, 0.75)])
def test_8bit_adamw_stochastic_rounding_goes_up_with_the_exact_probability_independently(up, p_up, compile):
    """AdamW's first step moves every weight by lr (maximize, gradient 1: m/sqrt(v) is 1 to a few
    ulps, and 1 + lr is exact in FP32), a quarter (three quarters) of a bf16 step above 1. Each
    weight must round up with that probability, and elements 16 apart, which the kernel's noise
    draws from one hash, independently of each other."""
    n = 1 << 20
    w = torch.ones(n, dtype=BF16, requires_grad=True)
    opt = AdamW([w], lr=up, weight_decay=0.0, master="stochastic", moment_dtype="8bit", maximize=True, compile=compile)
    w.grad = torch.ones(n, dtype=BF16)
    opt.step()
    assert set(w.float().unique().tolist()) == {1.0, 1 + 2.0**-7}
    went_up = w.detach().float() == 1 + 2.0**-7
    assert abs(went_up.float().mean().item() - p_up) < 5 * (p_up * (1 - p_up) / n) ** 0.5
    pairs = went_up.view(-1, 32)
    both, q = (pairs[:, :16] & pairs[:, 16:]).float().mean().item(), p_up**2
    assert abs(both - q) < 5 * (q * (1 - q) / (n // 2)) ** 0.5


@needs_kernel
@pytest.mark.parametrize("moment_dtype, found", [(torch.float32, BF16), ("8bit", torch.float32)])
def test_the_fused_step_refuses_moments_of_another_dtype_in_one_line(moment_dtype, found):
    """The kernel reads the moments as moment_dtype: state of another dtype (put there by hand) is
    an error, and nothing is stepped."""
    p = torch.ones(300, dtype=BF16, requires_grad=True)
    opt = AdamW([p], lr=1e-2, master="remainder", moment_dtype=moment_dtype)
    p.grad = torch.ones_like(p)
    opt.step()
    before = p.detach().clone()
    opt.state[p]["exp_avg_sq"] = torch.zeros(300, dtype=found)
    with pytest.raises(TypeError, match=rf"^AdamW's moments are .*, found {found} state$"):
        opt.step()
    assert torch.equal(p.detach(), before)


@needs_kernel
def test_the_kernel_is_built_once_not_per_step_or_policy(monkeypatch):
    import subprocess

    def no_build(*args, **kwargs):
        raise AssertionError("the fused step was compiled again")

    monkeypatch.setattr(subprocess, "run", no_build)  # already built: no compiler may run from here on
    for cls, master, dtype, moments in [(AdamW, "remainder", BF16, torch.float32), (AdamW, "stochastic", BF16, BF16),
                                        (SGD, "kahan", BF16, torch.float32), (AdamW, "fp32", FP16, torch.float32)]:
        params = [torch.zeros(s, dtype=dtype, requires_grad=True) for s in SHAPES]
        opt = cls(params, lr=1e-3, master=master, moment_dtype=moments)
        for _ in range(3):
            for p in params:
                p.grad = torch.ones_like(p)
            opt.step()
        assert all(bool((p.float() < 0).all()) for p in params)  # stepped (down the gradient), by the kernel already built
    assert fused.available()


def test_without_a_compiler_the_step_falls_back_to_eager_and_says_so_once(monkeypatch, tmp_path):
    monkeypatch.setattr(fused, "_library", None)
    monkeypatch.setattr(fused, "_tried", False)
    monkeypatch.setenv("LIGHTNING_MP_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setattr(fused.shutil, "which", lambda name: None)
    runs = []
    with pytest.warns(UserWarning, match="fused optimizer step is not available.*no C\\+\\+ compiler"):
        for compile in (None, False):
            params = [torch.zeros(s, dtype=BF16, requires_grad=True) for s in SHAPES]
            opt = AdamW(params, lr=1e-2, master="remainder", compile=compile)
            for _ in range(2):
                for p in params:
                    p.grad = torch.ones_like(p)
                opt.step()
            runs.append([opt.master_value(p) for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*runs))  # the eager path, bit for bit
    assert not fused.available()


def test_a_fresh_build_is_reported_once_in_one_line(monkeypatch, tmp_path, caplog):
    try:
        fused.compiler()
    except RuntimeError:
        pytest.skip("no C++ compiler on this machine")
    monkeypatch.setattr(fused, "_library", None)
    monkeypatch.setattr(fused, "_tried", False)
    monkeypatch.setenv("LIGHTNING_MP_CACHE", str(tmp_path))
    with caplog.at_level(logging.INFO):
        assert fused.available()
        assert fused.available()
    lines = [r.getMessage() for r in caplog.records if "built the fused optimizer step" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and str(tmp_path) in lines[0]
    assert len(list(tmp_path.glob("step-*.so"))) == 1


@needs_kernel
def test_non_contiguous_parameters_step_eagerly():
    base = torch.zeros(8, 6)
    p = torch.nn.Parameter(base.t())  # non-contiguous FP32 parameter
    q = torch.nn.Parameter(base.t().clone())
    a, b = AdamW([p], lr=1e-2), AdamW([q], lr=1e-2, compile=False)
    for _ in range(2):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
        a.step()
        b.step()
    assert torch.equal(p, q)


# -- the 8-bit AdamW step's two loops: by hand with AVX-512, and portable ----------------------------

Q8_SHAPES = [(37, 29), (256,), (1000,), (17,), (300, 7), (33,), (287,)]  # 32-element steps cut to 1 to 31, blocks cut short


def _q8_run(master, wdtype, gdtype, transform):
    """Six 8-bit AdamW steps from random values, on gradients spread over 32 decades in some tensors
    (subnormal codes) and normal ones in others (blocks of normal codes), a step of zero gradients
    on part of each tensor, its last element the largest, one tensor's scales large; ``transform``: the
    unscale factor, clip value and ``maximize`` the plugin can pass, and a beta1 under 0.5 (the
    lerp's other form). Steps 4 to 6 count from 20000, where sqrt(1 - 0.999**step) is 1.0 in FP32
    (the hand-written loop then leaves out its division). Last, a tensor at lr 0 whose FP32 values'
    low halves take all 2**16 patterns (every remainder, its ties included): its weights must not
    move. Everything the step wrote, and that tensor's FP32 values before the steps."""
    g = torch.Generator().manual_seed(0)
    params = [torch.zeros(s, dtype=wdtype, requires_grad=True) for s in Q8_SHAPES]
    still = torch.zeros(1 << 16, dtype=wdtype, requires_grad=True)
    opt = AdamW([{"params": params}, {"params": [still], "lr": 0.0, "weight_decay": 0.0}], lr=1e-2, weight_decay=0.1,
                master=master, moment_dtype="8bit", maximize=transform, betas=(0.25 if transform else 0.9, 0.999))
    for p in params:
        opt.set_master(p, torch.randn(p.shape, generator=g))
    high = torch.randn(1 << 16, generator=g).to(BF16).float().view(torch.int32)  # (its low half zero)
    opt.set_master(still, (high | torch.arange(1 << 16, dtype=torch.int32)).view(torch.float32))
    before = opt.master_value(still).clone()
    params.append(still)
    for step in range(6):
        for k, p in enumerate(params):
            x = torch.randn(p.shape, generator=g)
            if k % 2 == 0:
                x *= torch.logspace(-30, 2, p.numel())[torch.randperm(p.numel(), generator=g)].view(p.shape)
            x.view(-1)[: 40 if step == 3 else 0] = 0
            if k == 1:  # scales past 2**16 (m) and 2**32 (v) over codes all normal
                x *= 1e3 if gdtype == torch.float16 else 1e7
            else:  # the largest of its block: a tail's last element sets the scale
                x.view(-1)[-1] = 1e3
            if gdtype == torch.float32 and wdtype != torch.float32:
                opt.step_grads[p] = x  # the plugin's FP32 gradients of 16-bit weights
            else:
                p.grad = x.to(gdtype)
        if transform:
            opt.grad_factor, opt.grad_clamp = torch.tensor(0.5), 0.01
        if step == 3:
            for p in params:
                opt.state[p]["step"].fill_(2e4)
        opt.step()
    return [t.clone() for p in params for t in (p.detach(), opt.master_value(p), *(
        v for k, v in opt.state[p].items() if k != "step"))] + [before, opt.master_value(still).clone()]


Q8_CASES = [(None, torch.float32, torch.float32)] + [
    (master, wdtype, gdtype) for master in ("fp32", "remainder", "kahan", "stochastic")
    for wdtype in ((BF16, FP16) if master == "fp32" else (BF16,)) for gdtype in (wdtype, torch.float32)]


@needs_kernel
@pytest.mark.skipif(not fused.available() or not fused.avx512(), reason="no AVX-512 on this CPU: the step is the portable loop")
def test_the_avx512_8bit_step_is_the_portable_loop_bit_for_bit():
    """Every storage kind, weight and gradient dtype, with and without unscale/clip/maximize, both
    forms of the lerp: the hand-written loop writes the same bits as the portable one (built with
    -DLMP_PORTABLE)."""
    subnormal_codes = normal_blocks = 0
    for (master, wdtype, gdtype), transform in [(case, t) for case in Q8_CASES for t in (False, True)]:
        runs = {"avx512": _q8_run(master, wdtype, gdtype, transform)}
        with fused.portable():
            assert not fused.avx512()
            runs["portable"] = _q8_run(master, wdtype, gdtype, transform)
        assert fused.avx512()
        if master in (None, "fp32", "remainder"):  # exact storage: the unmoved tensor's values, bit for bit
            assert torch.equal(runs["avx512"][-2].view(torch.int32), runs["avx512"][-1].view(torch.int32))
        for a, b in zip(runs["avx512"], runs["portable"]):
            assert a.dtype == b.dtype and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), (
                master, wdtype, gdtype, transform, a.dtype, a.shape)
        codes = [t for t in runs["portable"] if t.dtype in (torch.int8, torch.uint8)]
        subnormal_codes += sum(int((c.int().abs() < 8).sum()) for c in codes)
        normal_blocks += sum(int((c.int().abs().view(-1)[: c.numel() // 256 * 256].view(-1, 256) >= 8).all(1).sum())
                             for c in codes)
    assert subnormal_codes and normal_blocks  # both of each loop's block paths ran


# -- under MasterWeightPrecision(master="fp32"): the one-pass step on the plugin's FP32 masters ---------


@pytest.mark.parametrize("precision", ["bf16-master", "16-master"])
def test_lightning_mp_adamw_on_fp32_masters_trains_as_torchs_adamw(precision):
    """Accumulated micro-batches (summed in FP32), clipping by norm, fp16 loss scaling: lightning_mp's
    AdamW stepping the plugin's FP32 masters in one pass gives torch's AdamW's training, to the
    round-off of two AdamW implementations (a loss whose gradients do not depend on the weights)."""
    assert_trains_as_torchs_adamw(precision, ("mp-adamw-eager", "mp-adamw"))


def assert_trains_as_torchs_adamw(precision, names):
    from conftest import LinearLoss, fp32_values, mode_plugin, regression_data, trainer
    from roundoff import adamw_bound, assert_within

    runs, trajectories = {}, {}
    for name in ("adamw", *names):
        torch.manual_seed(0)
        values = Trajectory()
        t = trainer(mode_plugin((precision, "fp32")), max_steps=6, accumulate_grad_batches=2, gradient_clip_val=0.05,
                    callbacks=[values])
        t.fit(LinearLoss(optimizer=name, lr=1e-2), regression_data(n=96))
        runs[name], trajectories[name] = fp32_values(t), values.before
    torch.manual_seed(0)
    model = LinearLoss()
    initial, gradients = model.state_dict(), model.gradients(regression_data(n=96), accumulate=2)
    for name, values in runs["adamw"].items():
        assert not torch.equal(values, initial[name].float()), name  # trained
        if precision == "bf16-master" and "mp-adamw-eager" in runs:  # same FP32 gradients, clip coefficient, ops
            assert torch.equal(runs["mp-adamw-eager"][name], values), name
        before = [step[name] for step in trajectories["adamw"]]
        decay = 0.1 if name.endswith("weight") and "norm" not in name else 0.0  # TinyRegressor's groups
        lr = 1e-2 if decay else 0.5e-2
        for other in names:
            assert_within(runs[other][name], values, adamw_bound(gradients[name], before, lr, weight_decay=decay),
                          f"{other} {name}")


class Trajectory(L.Callback):
    """The FP32 value of every parameter before each optimizer step."""

    def __init__(self):
        self.before = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        from conftest import fp32_values

        self.before.append(fp32_values(trainer, pl_module))


@needs_kernel
def test_step_counters_count_in_one_call_as_torchs_foreach_add(monkeypatch):
    """AdamW's step counters: the kernel's one call adds 1 in FP32 as torch's foreach add does
    (2**24 + 1 rounds back to 2**24 in both) and returns the new counts; counters of another kind,
    or kernels not loaded yet, leave it to torch (nothing done)."""
    steps = [torch.tensor(float(k)) for k in (0, 1, 41, 2**24 - 1, 2**24)]
    expected = [t.clone() for t in steps]
    torch._foreach_add_(expected, 1)
    assert fused.available()
    assert fused.count(steps) == [t.item() for t in expected] == [1.0, 2.0, 42.0, 2.0**24, 2.0**24]
    assert all(torch.equal(a, b) for a, b in zip(steps, expected))
    other = [torch.tensor(3.0), torch.tensor(3.0, dtype=torch.float64)]
    assert fused.count(other) is None and other[0].item() == 3.0
    monkeypatch.setattr(fused, "_library", None)
    assert fused.count([torch.tensor(3.0)]) is None


@needs_kernel
def test_fused_helpers_round_upcast_and_check_as_torch():
    x = torch.randn(70001) * 3
    x[:6] = torch.tensor([0.0, -0.0, 1e-40, 3.4e38, float("inf"), 1 + 2.0**-8])  # subnormal, overflow, a tie
    for dtype in (BF16, FP16):
        got = torch.empty(x.shape, dtype=dtype)
        fused.round_into([got], [x])
        assert torch.equal(got.view(torch.int16), x.to(dtype).view(torch.int16)), dtype
    g = (torch.randn(70001) * 100).to(BF16)
    (up,), bad = fused.upcast_check([g], 0.125)
    assert not bad and torch.equal(up, g.float() * 0.125)
    assert not fused.check([g, g.float()])
    for poison in (float("nan"), float("inf"), -float("inf")):
        h = g.clone()
        h[12345] = poison
        assert fused.upcast_check([g, h], 1.0)[1] and fused.check([g, h]) and fused.check([h.float()])
