"""8-bit Adam moments (lightning_mp.optim.quant): the codes, the step, checkpoints and memory."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import LinearLoss, TinyRegressor, regression_data, trainer

from lightning_mp import estimate_memory, memory_audit
from lightning_mp.optim import SGD, AdamW, quant

BF16 = torch.bfloat16
SHAPES = [(300, 7), (5,), (1000,)]  # blocks cut inside rows; a partial last block


def _table(key: str) -> torch.Tensor:
    """Every code's value, by decoding each code over a scale of 1."""
    dtype, _ = quant.CODES[key]
    codes = torch.arange(0, 121 if key == "exp_avg" else 249, dtype=torch.int32).to(dtype)  # up to 1.0's code
    return quant.decode(key, codes, torch.ones(quant.blocks(codes.numel())))


@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq"])
def test_every_code_decodes_and_encodes_back_to_itself(key):
    values = _table(key)
    assert values[0] == 0 and values.max() == 1.0 and bool((values.diff() > 0).all())  # monotonic, up to 1
    codes, absmax = quant.zeros(key, values)
    quant.encode_(key, values, codes, absmax)
    assert absmax.tolist() == [1.0] and codes.tolist() == list(range(values.numel()))


@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq"])
def test_encoding_rounds_to_the_nearest_code_ties_to_even(key):
    table = _table(key).double()
    g = torch.Generator().manual_seed(0)
    u = torch.cat([torch.rand(20000, generator=g) ** 8, ((table[1:] + table[:-1]) / 2).float(), torch.ones(1)])
    codes, absmax = quant.zeros(key, u)
    quant.encode_(key, u, codes, absmax)
    # the scale of each block is its largest value; each u over it, to the nearest code by brute force
    scale = absmax.repeat_interleave(quant.BLOCK)[: u.numel()].double()
    x = u.double() / scale
    distance = (table[None, :] - x[:, None]).abs()
    nearest = distance.min(dim=1).values
    got = codes.long()
    assert torch.equal(distance[torch.arange(u.numel()), got], nearest)  # never farther than the nearest code
    ties = (distance == nearest[:, None]).sum(dim=1) > 1
    assert bool(ties.any()) and bool((got[ties] % 2 == 0).all())  # midpoints: the even code


def _encoded(key, values):
    codes, absmax = quant.zeros(key, values)
    quant.encode_(key, values, codes, absmax)
    return codes, absmax


def test_relative_error_is_at_most_a_sixteenth_above_the_subnormal_codes():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(4096, generator=g) * torch.logspace(-3, 1, 4096)
    for key, x in (("exp_avg", m), ("exp_avg_sq", m * m)):
        codes, absmax = _encoded(key, x)
        back = quant.decode(key, codes, absmax)
        bias = quant.CODES[key][1]
        normal = x.abs() >= absmax.repeat_interleave(quant.BLOCK)[: x.numel()] * 2.0 ** (1 - bias)
        # 3 mantissa bits: half a spacing is 2**-4 of the binade's start (plus the scale's rounding)
        assert ((back - x).abs() <= x.abs() * (2**-4 + 2**-20))[normal].all()
        assert torch.equal(torch.sign(back[back != 0]), torch.sign(x[back != 0]))


def test_decoded_moments_encode_back_to_the_same_codes_and_scales():
    """What lets a checkpoint of decoded FP32 moments resume bit-exactly."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3000, generator=g) * torch.logspace(-8, 2, 3000)
    for key, values in (("exp_avg", x), ("exp_avg_sq", x * x)):
        codes, absmax = _encoded(key, values)
        again, absmax2 = _encoded(key, quant.decode(key, codes, absmax))
        assert torch.equal(codes, again) and torch.equal(absmax, absmax2)


def _run(moment_dtype="8bit", compile=None, master="remainder", steps=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.empty(s, dtype=BF16, requires_grad=True) for s in SHAPES]
    opt = AdamW(params, lr=1e-2, weight_decay=0.1, master=master, moment_dtype=moment_dtype, compile=compile)
    for p in params:
        opt.set_master(p, torch.randn(p.shape, generator=g))
    for _ in range(steps):
        for p in params:  # gradients that do not depend on the weights, spanning orders of magnitude
            p.grad = (torch.randn(p.shape, generator=g) * torch.logspace(-4, 0, p.numel()).view(p.shape)).to(BF16)
        opt.step()
    return params, opt


def test_state_is_a_byte_per_moment_and_a_scale_per_block():
    params, opt = _run(steps=1)
    for p in params:
        state = opt.state[p]
        assert state["exp_avg"].dtype == torch.int8 and state["exp_avg_sq"].dtype == torch.uint8
        assert state["exp_avg"].shape == p.shape and state["exp_avg_sq"].shape == p.shape
        assert state["exp_avg_absmax"].shape == state["exp_avg_sq_absmax"].shape == (quant.blocks(p.numel()),)


def test_first_step_is_the_fp32_moment_step_bit_for_bit():
    """The weights step with the FP32 moments, quantized only for storage: from zero moments step
    1 is the FP32-moment step (zero codes decode to exactly 0)."""
    for compile in (None, False):
        ours, opt = _run(steps=1, compile=compile)
        ref, ref_opt = _run("float32", steps=1, compile=compile)
        for a, b in zip(ours, ref):
            assert torch.equal(opt.master_value(a), ref_opt.master_value(b))


def test_each_step_is_fp32_adamw_on_the_decoded_moments():
    """Step 4 from the state after step 3 equals torch's AdamW (FP32 moments) from the decoded state."""
    params, opt = _run(steps=3, compile=False)
    values = [opt.master_value(p).clone() for p in params]
    ref = [v.clone().requires_grad_() for v in values]
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    decoded = AdamW([torch.zeros(s) for s in SHAPES], lr=1e-2, weight_decay=0.1)  # FP32 moments
    decoded.load_state_dict(copy.deepcopy(opt.state_dict()))
    ref_opt.load_state_dict(decoded.state_dict())
    g = torch.Generator().manual_seed(9)
    for p, r in zip(params, ref):
        p.grad = torch.randn(p.shape, generator=g).to(BF16)
        r.grad = p.grad.float()
    opt.step()
    ref_opt.step()
    for p, r in zip(params, ref):
        assert torch.equal(opt.master_value(p), r.detach())  # the eager path: torch's own ops


@pytest.mark.parametrize("compile", [None, True], ids=["fused-kernel", "torch-compile"])
def test_the_fused_paths_keep_the_codes_of_the_eager_path(compile):
    """Gradients independent of the weights: the moments are the same arithmetic in the C++
    kernel (``compile=None`` on CPU), the ``torch.compile``'d pass (CUDA's, here on CPU) and the
    eager path, but for the order of ``v``'s multiply-add (ATen's addcmul) and the products
    inductor fuses, an ulp or two per step: the scales agree to a few ulps, and a code differs by
    at most one where a value sat at a midpoint."""
    fused, opt_f = _run(compile=compile, steps=5)
    eager, opt_e = _run(compile=False, steps=5)
    # the kernel has a path for blocks whose codes are all normal and one for the others: both run
    below = torch.cat([(quant._padded(opt_e.state[p]["exp_avg"].int().abs() - 8) < 0) |  # (padding: 0, not below)
                       (quant._padded(opt_e.state[p]["exp_avg_sq"].int() - 8) < 0) for p in eager]).any(1)
    assert below.any() and not below.all()
    for a, b in zip(fused, eager):
        sf, se = opt_f.state[a], opt_e.state[b]
        for key in ("exp_avg", "exp_avg_sq"):
            assert ((sf[key].int() - se[key].int()).abs() <= 1).all()
            assert ((sf[key] != se[key]).float().mean() <= 0.01)
            absmax = key + quant.SCALE
            assert ((sf[absmax] - se[absmax]).abs() <= 8 * 2**-24 * se[absmax]).all()
        va, vb = opt_f.master_value(a), opt_e.master_value(b)
        # each step's update is at most lr / sqrt(1 - 0.999) ~ 0.32 (and 0.01 at a slightly
        # different v or m): the values stay within a few percent of the learning rate
        assert ((va - vb).abs() <= 5 * 1e-2 * 2**-4 + 2**-20 * vb.abs()).all()


@pytest.mark.parametrize("compile", [None, False], ids=["fused", "eager"])
@pytest.mark.parametrize("master", ["remainder", "stochastic", "kahan", "fp32"])
def test_state_dict_round_trip_resumes_bit_exactly(master, compile):
    params, opt = _run(master=master, compile=compile, steps=2)
    saved, weights = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
    values = [opt.master_value(p).clone() for p in params]
    g = torch.Generator().manual_seed(5)
    grads = [[torch.randn(s, generator=g).to(BF16) for s in SHAPES] for _ in range(3)]
    for step in grads:
        for p, gr in zip(params, step):
            p.grad = gr
        opt.step()
    fresh = [w.clone().requires_grad_() for w in weights]
    opt2 = AdamW(fresh, lr=1e-2, weight_decay=0.1, master=master, moment_dtype="8bit", compile=compile)
    opt2.load_state_dict(saved)
    if master != "stochastic":  # the checkpointed FP32 values (the plugin writes them from the model's file)
        for p, v in zip(fresh, values):
            opt2.set_master(p, v)
    for step in grads:
        for p, gr in zip(fresh, step):
            p.grad = gr
        opt2.step()
    for a, b in zip(params, fresh):
        assert torch.equal(a, b) and torch.equal(opt.master_value(a), opt2.master_value(b))
        assert all(torch.equal(opt.state[a][k], opt2.state[b][k]) for k in opt.state[a] if k != "step")


def test_loads_into_fp32_moments_and_back():
    params, opt = _run(steps=3)
    as_fp32 = AdamW([torch.zeros(s) for s in SHAPES], lr=1e-2)
    as_fp32.load_state_dict(copy.deepcopy(opt.state_dict()))
    first = next(iter(as_fp32.state.values()))
    assert first["exp_avg"].dtype == torch.float32 and "exp_avg_absmax" not in first
    back = AdamW([torch.zeros(s, dtype=BF16) for s in SHAPES], lr=1e-2, master="remainder", moment_dtype="8bit")
    back.load_state_dict(copy.deepcopy(as_fp32.state_dict()))
    for a, b in zip(params, back.param_groups[0]["params"]):
        for key in ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"):
            assert torch.equal(opt.state[a][key], back.state[b][key]), key
    # and a torch AdamW's FP32 state into 8-bit moments: encoded, within the codes' error
    ref = [torch.zeros(s, requires_grad=True) for s in SHAPES]
    ref_opt = torch.optim.AdamW(ref, lr=1e-2)
    for r in ref:
        r.grad = torch.randn(r.shape)
    ref_opt.step()
    mine = AdamW([torch.zeros(s, dtype=BF16) for s in SHAPES], lr=1e-2, master="remainder", moment_dtype="8bit")
    mine.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    for r, p in zip(ref, mine.param_groups[0]["params"]):
        m = ref_opt.state[r]["exp_avg"]
        got = quant.decode("exp_avg", mine.state[p]["exp_avg"], mine.state[p]["exp_avg_absmax"])
        assert ((got - m).abs() <= m.abs() / 16 + m.abs().max() * 2**-17).all()


def test_names_and_refusals():
    w = torch.zeros(3, dtype=BF16, requires_grad=True)
    assert AdamW([w], master="remainder", moment_dtype="bfloat16").moment_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="moment_dtype must be"):
        AdamW([w], master="remainder", moment_dtype="int4")
    with pytest.raises(ValueError, match="8bit"):
        SGD([w], master="remainder", momentum=0.9, moment_dtype="8bit")


class Audited(TinyRegressor):
    def __init__(self, moment_dtype="8bit", **kwargs):
        super().__init__(d=64, hidden=512, **kwargs)
        self.moment_dtype = moment_dtype

    def configure_optimizers(self):
        return AdamW(self.parameters(), lr=self.hparams.lr, moment_dtype=self.moment_dtype)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.audit = memory_audit(self, self.trainer.optimizers, self.trainer.precision_plugin)


@pytest.mark.parametrize("master, most", [("remainder", 6.1), ("stochastic", 4.1)])
def test_bytes_per_parameter_between_steps(master, most):
    model = Audited()
    trainer("bf16-master", {"master": master}, max_steps=1).fit(model, regression_data(d=64))
    n = model.audit["n_params"]
    state = model.audit["optimizer_state"] - 4 * 6  # Adam's `step` counter per tensor
    assert state == 2 * n + 4 * 2 * sum(quant.blocks(p.numel()) for p in model.parameters())
    # (LayerNorm's 1024 FP32 values under keep_fp32 add their 2 extra bytes)
    assert model.audit["total"] / n <= most
    estimate = estimate_memory(n, "bf16-master", "adamw", n_tensors=6, master=master, moment_dtype="8bit")
    assert abs(estimate["total"] - model.audit["total"]) <= 2 * 4 * 6 + 2 * 2 * 1024


class SignLoss(LinearLoss):
    """LinearLoss with coefficients of +-1: within a tensor every gradient, hence every moment, has
    one magnitude, which is each block's scale; every code is then that of 1.0 and decodes to the
    FP32 moment exactly."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.coefficients = {n: c.sign() for n, c in self.coefficients.items()}


def test_moments_that_code_exactly_train_bit_for_bit_as_fp32_moments_through_the_trainer():
    """Through the Trainer and the plugin (bf16-master, LayerNorm kept FP32, two groups with their
    own lr and decay, 20 steps): where the codes are exact, 8-bit moments are FP32 moments."""
    runs = {}
    for name in ("mp-adamw-8bit", "mp-adamw"):
        torch.manual_seed(0)
        model = SignLoss(optimizer=name)
        t = trainer("bf16-master", max_steps=20)
        t.fit(model, regression_data(n=160))
        runs[name] = (model, t.optimizers[0])
    (ours, opt), (ref, ref_opt) = runs["mp-adamw-8bit"], runs["mp-adamw"]
    for p, r in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(opt.master_value(p), ref_opt.master_value(r))
        assert set(opt.state[p]["exp_avg"].abs().unique().tolist()) == {120}  # the code of 1.0
        assert set(opt.state[p]["exp_avg_sq"].unique().tolist()) == {248}


def test_trains_through_the_trainer():
    """A convergence check, not a comparison (that is benchmarks/peers_quality.py, 3 seeds on two
    tasks): a tiny regression, loss about 100 at the start, fitted 60 steps with 8-bit moments. Its
    loss must fall 200-fold (to 0.5); it reaches about 0.02 (0.017 with FP32 moments), on the AMD
    EPYC, a margin that bf16 round-off, the only thing that differs between CPUs, cannot use up."""
    torch.manual_seed(0)
    t = trainer("bf16-master", max_epochs=15, limit_val_batches=1.0)
    model = Audited("8bit")
    t.fit(model, regression_data(d=64), regression_data(d=64))
    assert float(t.callback_metrics["val_loss"]) < 0.5
    assert {s["exp_avg"].dtype for s in t.optimizers[0].state.values()} == {torch.int8}
