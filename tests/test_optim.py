"""lightning_mp.optim: torch's AdamW and SGD on bf16 weights under each storage policy."""

from __future__ import annotations

import copy

import pytest
import torch

import lightning_mp.optim
from lightning_mp.optim import SGD, AdamW
from lightning_mp.storage import split_

BF16 = torch.bfloat16
SHAPES = [(64, 32), (7,), (3, 5, 2)]


def _masters(seed: int = 0) -> list[torch.Tensor]:
    """FP32 values including zeros, subnormals, exact bf16 ties, large and negative values."""
    g = torch.Generator().manual_seed(seed)
    values = [torch.randn(s, generator=g) * 10 for s in SHAPES]
    special = torch.tensor([0.0, -0.0, 1e-40, -1e-42, 1 + 2**-8, -(1 + 3 * 2**-8), 3e37, -2e38])
    values[0].view(-1)[: special.numel()] = special
    return values


def _pair(opt_cls, ref_cls, master="remainder", ref_kwargs=None, groups=None, our_kwargs=None, **kwargs):
    """Our optimizer on bf16 weights and torch's on FP32 copies of the same FP32 values."""
    values = _masters()
    ref = [v.clone().requires_grad_() for v in values]
    ours = [torch.empty_like(v, dtype=BF16, requires_grad=True) for v in values]
    if groups:  # two groups with their own options
        ref_params = [{"params": ref[:1], **groups}, {"params": ref[1:]}]
        our_params = [{"params": ours[:1], **groups}, {"params": ours[1:]}]
    else:
        ref_params, our_params = ref, ours
    ref_opt = ref_cls(ref_params, **kwargs, **(ref_kwargs or {}))
    opt = opt_cls(our_params, master=master, **kwargs, **{"compile": False, **(our_kwargs or {})})  # eager unless asked
    for p, v in zip(ours, values):
        opt.set_master(p, v)
    return ours, opt, ref, ref_opt


def _steps(ours, opt, ref, ref_opt, n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        grads = [torch.randn(s, generator=g).to(BF16) for s in SHAPES]  # the model's grads are bf16
        for p, gr in zip(ours, grads):
            p.grad = gr
        for p, gr in zip(ref, grads):
            p.grad = gr.float()
        opt.step()
        ref_opt.step()


@pytest.fixture(params=["default", "small"])
def blocks(request, monkeypatch):
    """The default blocks (one per step here), or 100-element blocks that split tensors and merge pieces."""
    if request.param == "small":
        monkeypatch.setitem(lightning_mp.optim.blocks.BLOCK_NUMEL, "cpu", 100)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(torch.int32)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize(
    "kwargs",
    [dict(lr=1e-2, weight_decay=0.1), dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.0, maximize=True)],
)
def test_adamw_remainder_is_bit_exact_with_torch_adamw_on_fp32_masters(foreach, kwargs, blocks):
    ours, opt, ref, ref_opt = _pair(AdamW, torch.optim.AdamW, ref_kwargs={"foreach": foreach},
                                    groups={"lr": 1e-3, "weight_decay": 0.5}, **kwargs)
    _steps(ours, opt, ref, ref_opt)
    for p, r in zip(ours, ref):
        assert torch.equal(_bits(opt.master_value(p)), _bits(r))
        assert p.dtype == BF16
    for p, r in zip(ours, ref):  # same state, same keys
        assert torch.equal(opt.state[p]["exp_avg"], ref_opt.state[r]["exp_avg"])
        assert torch.equal(opt.state[p]["exp_avg_sq"], ref_opt.state[r]["exp_avg_sq"])
        assert opt.state[p]["step"].item() == 5


@pytest.mark.parametrize(
    "kwargs",
    [dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-2), dict(lr=1e-2, momentum=0.9, dampening=0.5),
     dict(lr=1e-1, maximize=True)],
)
@pytest.mark.parametrize("compile", [False, None], ids=["eager", "fused"])
def test_sgd_remainder_is_bit_exact_with_torch_sgd_on_fp32_masters(kwargs, blocks, compile):
    ours, opt, ref, ref_opt = _pair(SGD, torch.optim.SGD, ref_kwargs={"foreach": True}, our_kwargs={"compile": compile},
                                    **kwargs)
    _steps(ours, opt, ref, ref_opt)
    for p, r in zip(ours, ref):
        assert torch.equal(_bits(opt.master_value(p)), _bits(r))


def test_fp32_parameters_are_stepped_as_by_torch():
    a = [torch.randn(s, requires_grad=True) for s in SHAPES]
    b = [t.detach().clone().requires_grad_() for t in a]
    opt, ref = AdamW(a, lr=1e-2, master="remainder", compile=False), torch.optim.AdamW(b, lr=1e-2)
    for _ in range(3):
        for x, y in zip(a, b):
            x.grad = torch.randn_like(x)
            y.grad = x.grad.clone()
        opt.step()
        ref.step()
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and "remainder" not in opt.state[a[0]]


def _trap_sgd(master, n=256, numel=20_000):
    """SGD on bf16 weights at 1.0 with a constant gradient: each update is 2**-11, 1/8 of half a bf16 step."""
    w = torch.ones(numel, dtype=BF16, requires_grad=True)
    opt = SGD([w], lr=2**-11, master=master, seed=0)
    for _ in range(n):
        w.grad = torch.ones_like(w)
        opt.step()
    return w, opt


def test_remainder_and_kahan_take_updates_far_below_half_a_step():
    expected = 1 - 256 * 2**-11  # 0.875, exactly
    for master in ("remainder", "kahan"):
        w, opt = _trap_sgd(master)
        assert torch.all(opt.master_value(w) == expected)
        assert torch.all(w.float() == expected)  # 0.875 is a bf16 value: the weight itself got there


def test_stochastic_rounding_moves_the_weight_in_expectation():
    w, _ = _trap_sgd("stochastic")
    assert abs(w.float().mean().item() - 0.875) < 2e-3
    w2, _ = _trap_sgd("stochastic")
    assert torch.equal(w, w2)  # seeded: reproducible


def test_stochastic_weight_decay_is_inside_the_rounded_update():
    # Zero gradients: each step only decays, by lr * wd = 1e-4, 1/40 of half a bf16 step at 1.0.
    # A separate bf16 multiply (optimi, AnyPrecisionAdamW) would leave every weight at 1.0.
    w = torch.ones(50_000, dtype=BF16, requires_grad=True)
    opt = AdamW([w], lr=1e-3, weight_decay=0.1, master="stochastic")
    for _ in range(200):
        w.grad = torch.zeros_like(w)
        opt.step()
    assert abs(w.float().mean().item() - (1 - 1e-4) ** 200) < 1e-3  # 0.98020


def test_bf16_moments_decay_in_expectation():
    # One gradient of 1, then zeros: v = 1e-3 * 0.999**k, each decay far below half a bf16 step of v.
    w = torch.ones(50_000, dtype=BF16, requires_grad=True)
    opt = AdamW([w], lr=0.0, weight_decay=0.0, master="stochastic", moment_dtype=BF16)
    for k in range(101):
        w.grad = torch.ones_like(w) if k == 0 else torch.zeros_like(w)
        opt.step()
    v = opt.state[w]["exp_avg_sq"]
    assert v.dtype == BF16 and opt.state[w]["exp_avg"].dtype == BF16
    assert v.float().mean().item() == pytest.approx(1e-3 * 0.999**100, rel=2e-3)
    assert torch.tensor(1e-3).to(BF16).float().item() == pytest.approx(1e-3 * 0.999**0, rel=4e-3)  # where RN sticks


def test_kahan_matches_fp32_to_its_compensation(blocks):
    ours, opt, ref, ref_opt = _pair(AdamW, torch.optim.AdamW, master="kahan", lr=1e-2)
    _steps(ours, opt, ref, ref_opt, n=20)
    for p, r in zip(ours, ref):
        assert p.dtype == BF16 and opt.state[p]["compensation"].dtype == BF16
        close = (opt.master_value(p) - r.detach()).abs() <= r.detach().abs() * 2**-14 + 1e-30
        assert close.float().mean() > 0.999


def test_weights_written_outside_the_optimizer_reset_their_remainder():
    ours, opt, ref, ref_opt = _pair(AdamW, torch.optim.AdamW, lr=1e-2)
    _steps(ours, opt, ref, ref_opt, n=2)
    new = torch.randn(SHAPES[0]).to(BF16)
    with torch.no_grad():
        ours[0].copy_(new)  # e.g. an EMA swap
        ref[0].copy_(new.float())
    with pytest.warns(UserWarning, match="written outside the optimizer"):
        assert torch.equal(opt.master_value(ours[0]), new.float())  # the new weight is the value
    _steps(ours, opt, ref, ref_opt, n=2, seed=2)  # and stepping continues bit-exact from it
    assert all(torch.equal(_bits(opt.master_value(p)), _bits(r)) for p, r in zip(ours, ref))


@pytest.mark.parametrize("compile", [False, None], ids=["eager", "fused"])
@pytest.mark.parametrize("master", ["remainder", "stochastic", "kahan"])
def test_state_dict_round_trip_continues_bit_exactly(master, blocks, compile):
    kwargs = dict(moment_dtype=BF16, compile=compile) if master == "stochastic" else dict(compile=compile)
    ours, opt, ref, ref_opt = _pair(AdamW, torch.optim.AdamW, master=master, lr=1e-2, our_kwargs=kwargs)
    _steps(ours, opt, ref, ref_opt, n=3)
    saved_weights = [p.detach().clone() for p in ours]
    saved = copy.deepcopy(opt.state_dict())
    assert saved["master"] == master
    _steps(ours, opt, ref, ref_opt, n=3, seed=7)
    # a fresh optimizer on fresh weights, restored from the weights and the state dict
    fresh = [w.clone().requires_grad_() for w in saved_weights]
    opt2 = AdamW(fresh, master=master, lr=1e-2, **kwargs)
    opt2.load_state_dict(saved)
    _steps(fresh, opt2, [r.detach().clone().requires_grad_() for r in ref], torch.optim.SGD(ref, lr=0), n=3, seed=7)
    for a, b in zip(ours, fresh):
        assert torch.equal(a, b) and torch.equal(_bits(opt.master_value(a)), _bits(opt2.master_value(b)))


def test_loads_a_torch_adamw_state_and_continues_as_torch_would():
    values = _masters()
    ref = [v.clone().requires_grad_() for v in values]
    ref_opt = torch.optim.AdamW(ref, lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        for r in ref:
            r.grad = torch.randn(r.shape, generator=g).to(BF16).float()
        ref_opt.step()
    ours = [torch.empty_like(v, dtype=BF16, requires_grad=True) for v in values]
    opt = AdamW(ours, lr=1e-2, master="remainder", compile=False)
    for p, r in zip(ours, ref):
        opt.set_master(p, r.detach())
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # as from a file: no shared tensors
    assert opt.state[ours[0]]["exp_avg"].dtype == torch.float32  # torch would have cast it to bf16
    _steps(ours, opt, ref, ref_opt, n=2, seed=3)
    assert all(torch.equal(_bits(opt.master_value(p)), _bits(r)) for p, r in zip(ours, ref))


def test_bf16_weights_need_a_policy_and_fp16_is_refused():
    w = torch.ones(3, dtype=BF16, requires_grad=True)
    w.grad = torch.ones_like(w)
    with pytest.raises(ValueError, match="master='remainder', 'stochastic' or 'kahan'"):
        AdamW([w]).step()
    h = torch.ones(3, dtype=torch.float16, requires_grad=True)
    h.grad = torch.ones_like(h)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        SGD([h], master="remainder").step()
    with pytest.raises(ValueError, match="master must be one of"):
        AdamW([w], master="fp64")


def test_split_storage_is_what_set_master_writes():
    v = _masters()[0]
    w = torch.empty_like(v, dtype=BF16, requires_grad=True)
    opt = AdamW([w], master="remainder")
    opt.set_master(w, v)
    hi, lo = torch.empty_like(w), torch.empty_like(v, dtype=torch.int16)
    split_([v.clone()], [hi], [lo])
    assert torch.equal(w, hi) and torch.equal(opt.state[w]["remainder"], lo)
