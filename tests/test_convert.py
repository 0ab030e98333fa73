import copy

import pytest
import torch
from torch import nn

from lightning_mp.convert import DEFAULT_KEEP_FP32, cast_module_, follow_callers, is_norm_layer, kept_modules


class LlamaRMSNorm(nn.Module):  # another library's norm, recognised by its class name
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))


class Router(nn.Module):
    keep_fp32 = True

    def __init__(self, d, n):
        super().__init__()
        self.gate = nn.Linear(d, n, bias=False)


class Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.rms = LlamaRMSNorm(d)
        self.bn = nn.BatchNorm1d(d)
        self.proj = nn.Linear(d, d)
        self.router = Router(d, 4)
        self.head = nn.Linear(d, 3)
        self.register_buffer("table", torch.linspace(0, 1, d))
        self.register_buffer("index", torch.arange(d))


def dtypes(module):
    return {n: t.dtype for n, t in [*module.named_parameters(), *module.named_buffers()]}


def test_default_keeps_norms_and_flagged_modules():
    m = cast_module_(Block(), torch.bfloat16, DEFAULT_KEEP_FP32)
    d = dtypes(m)
    for name in ("ln.weight", "ln.bias", "rms.weight", "bn.weight", "bn.running_mean", "router.gate.weight"):
        assert d[name] == torch.float32, name
    for name in ("proj.weight", "proj.bias", "head.weight"):
        assert d[name] == torch.bfloat16, name
    assert d["table"] == torch.float32  # buffers keep their dtype, as under bf16-mixed
    assert d["index"] == torch.int64  # integer buffers are never cast
    assert d["bn.num_batches_tracked"] == torch.int64


def test_kept_modules_of_a_model_built_in_16_bits_become_fp32_exactly():
    """A model built or loaded in bf16 (``torch_dtype=torch.bfloat16``) keeps its norms, router and
    every kept module in FP32 all the same: their 16-bit values upcast exactly; buffers as they are."""
    block = Block().bfloat16()
    before = {n: p.detach().clone() for n, p in block.named_parameters()}
    d = dtypes(cast_module_(block, torch.bfloat16, DEFAULT_KEEP_FP32))
    for name in ("ln.weight", "ln.bias", "rms.weight", "bn.weight", "router.gate.weight"):
        assert d[name] == torch.float32 and torch.equal(dict(block.named_parameters())[name], before[name].float())
    assert d["proj.weight"] == torch.bfloat16 and d["table"] == d["bn.running_mean"] == torch.bfloat16


def test_patterns_classes_and_predicates():
    m = cast_module_(Block(), torch.float16, ["head", nn.LayerNorm, lambda name, mod: name == "proj"])
    d = dtypes(m)
    assert d["head.weight"] == d["ln.weight"] == d["proj.weight"] == torch.float32
    assert d["rms.weight"] == torch.float16  # the user's list replaces the default
    assert d["router.gate.weight"] == torch.float32  # the module's own flag always counts


def test_wildcard_pattern_and_empty_list():
    m = cast_module_(Block(), torch.bfloat16, ["*.gate", "r*"])
    assert dtypes(m)["rms.weight"] == torch.float32
    m = cast_module_(nn.Sequential(nn.LayerNorm(4)), torch.bfloat16, [])
    assert m[0].weight.dtype == torch.bfloat16


def test_parameter_identity_survives_and_before_cast_sees_fp32():
    m = Block()
    ids = {n: id(p) for n, p in m.named_parameters()}
    seen = {}
    cast_module_(m, torch.bfloat16, DEFAULT_KEEP_FP32, before_cast=lambda p: seen.setdefault(id(p), p.dtype))
    assert {n: id(p) for n, p in m.named_parameters()} == ids
    assert set(seen.values()) == {torch.float32}
    assert id(m.proj.weight) in seen and id(m.ln.weight) not in seen


def test_norm_detection():
    assert is_norm_layer("x", nn.GroupNorm(2, 4)) and is_norm_layer("x", LlamaRMSNorm(2))
    assert is_norm_layer("x", nn.InstanceNorm1d(3))
    assert not is_norm_layer("x", nn.Linear(2, 2))


def test_bad_entry_is_a_type_error():
    with pytest.raises(TypeError, match="keep_fp32"):
        cast_module_(Block(), torch.bfloat16, [3])
    with pytest.raises(TypeError, match="nn.Module"):
        cast_module_(Block(), torch.bfloat16, [int])


class HFRMSNorm(nn.Module):  # Hugging Face's LlamaRMSNorm: `weight * x`, FP32 out of an FP32 weight
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


def llama_like(dtype, keep):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), HFRMSNorm(8), nn.Linear(8, 8), nn.Linear(8, 3))
    fp32 = copy.deepcopy(net)
    cast_module_(net, dtype, keep)
    unhooked = copy.deepcopy(net)
    follow_callers(kept_modules(net, keep))
    follow_callers(kept_modules(net, keep))  # a second conversion (another Trainer) hooks nothing more
    return net, unhooked, fp32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_outside_autocast_kept_modules_take_and_give_the_callers_dtype(dtype):
    # A `generate` in a hook outside the step: the norm's FP32 output reached the 16-bit Linear
    # after it, and 16-bit inputs the FP32 head ("expected m1 and m2 to have the same dtype").
    keep = [*DEFAULT_KEEP_FP32, "3"]  # the head kept FP32, as a user keeps an lm_head
    net, _, fp32 = llama_like(dtype, keep)
    x = torch.randn(4, 8).to(dtype)
    y = net(x)
    # closed form: 16-bit layers in 16 bits; each kept one in FP32 on its input upcast, its output rounded once
    h = net[2](fp32[1](net[0](x).float()).to(dtype))
    assert y.dtype == dtype and torch.equal(y, fp32[3](h.float()).to(dtype))
    assert net[1](x).dtype == dtype and net[1](x.float()).dtype == torch.float32  # FP32 callers get FP32


def test_under_autocast_or_with_fp32_inputs_kept_modules_are_untouched():
    net, unhooked, _ = llama_like(torch.bfloat16, DEFAULT_KEEP_FP32)
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(net(x), unhooked(x))  # training's forward: bit for bit, dtypes included
        assert net[1](x.bfloat16()).dtype == torch.float32
    h = torch.randn(4, 8)  # FP32 in with autocast off, as the MoE router is called: FP32 out
    assert torch.equal(net[1](h), unhooked[1](h))
