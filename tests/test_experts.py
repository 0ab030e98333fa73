"""The experts: bucketed token counts, grouped_mm against the per-expert loop, and the sliced path
(gather, experts and combine one expert at a time) against autograd's loop, bit for bit."""

import math

import pytest
from roundoff import assert_within, swiglu_error
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import saved_bytes
from lightning_mp.experts import GroupedSwiGLU, bucket_size
from lightning_mp.moe import MoEConfig, MoELayer


@pytest.mark.parametrize("per_octave", [0, 4, 16])
def test_bucket_sizes_are_aligned_close_and_few(per_octave):
    sizes = [bucket_size(c, per_octave) for c in range(1, 4097)]
    assert bucket_size(0, per_octave) == 0
    for c, b in zip(range(1, 4097), sizes):
        assert b >= c and b % 16 == 0
        assert b - c < max(16, (1 << (c - 1).bit_length()) // max(per_octave, 1) if per_octave else 16)
    if per_octave:  # per_octave sizes per power of two above 16 * per_octave, multiples of 16 below
        assert len(set(sizes)) <= per_octave + per_octave * math.log2(4096 / (16 * per_octave))


def test_grouped_mm_path_equals_per_expert_loop():
    ex = GroupedSwiGLU(4, 16, 32)
    x = torch.randn(50, 16)
    counts = torch.tensor([10, 0, 25, 15])  # an expert with no tokens too
    loop = GroupedSwiGLU.forward_loop(x, counts.tolist(), ex.w1, ex.w3, ex.w2)
    ex.grouped_mm = True
    bound = torch.cat([2 * swiglu_error(x_e, ex.w1[e], ex.w3[e], ex.w2[e])  # two orders, each within the bound
                       for e, x_e in enumerate(x.split(counts.tolist()))])
    assert_within(ex(x, counts, counts.tolist()), loop, bound, "grouped_mm against the loop")
    for choice in (False, None):  # None: the loop on a CPU
        ex.grouped_mm = choice
        assert torch.equal(ex(x, counts, counts.tolist()), loop)


class AutogradSlice(nn.Module):
    """Expert ``e`` of a stacked ``GroupedSwiGLU`` as a module of its own: a layer built from
    these runs autograd's per-slice loop (gather, per-expert matmuls, concatenation, combine)."""

    def __init__(self, stacked: GroupedSwiGLU, e: int) -> None:
        super().__init__()
        self.stacked, self.e = [stacked], e  # a list: not registered, the weights stay the layer's

    def forward(self, xs):
        ex = self.stacked[0]
        w1, w3, w2 = (w[self.e] for w in ex.compute_operands(xs[:0])[1:])
        xs = xs.to(w1.dtype)
        return (F.silu(xs @ w1) * (xs @ w3)) @ w2


def sliced_and_autograd_layers(**cfg):
    torch.manual_seed(0)
    sliced = MoELayer(MoEConfig(**{"d_model": 16, "d_ff": 24, "n_experts": 8, "top_k": 2, "bias_update_rate": 0.1, **cfg}))
    reference = MoELayer(sliced.config, experts=[AutogradSlice(sliced.experts, e) for e in range(8)])
    reference.router.load_state_dict(sliced.router.state_dict())
    for layer in (sliced, reference):
        layer.balance.bias[[3, 6]] = -10.0  # experts 3 and 6 get no tokens
    return sliced, reference


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("cfg", [{}, dict(token_buckets=4), dict(capacity_factor=0.5), dict(top_k=1)])
def test_sliced_path_is_autograds_per_slice_loop_bit_for_bit(autocast, cfg):
    sliced, reference = sliced_and_autograd_layers(**cfg)
    x = torch.randn(40, 16)
    results = []
    for layer in (sliced, reference):
        inp = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(inp)
        params = [inp, *layer.router.parameters(), *sliced.experts.parameters()]
        results.append((y, torch.autograd.grad(y.float().square().sum(), params)))
    assert sliced.stats["load"][[3, 6]].tolist() == [0, 0]
    (y, grads), (y_ref, grads_ref) = results
    assert torch.equal(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert torch.equal(g, g_ref)
    assert grads[-1].abs().sum() > 0  # the experts did learn


def test_sliced_path_with_frozen_experts_trains_the_router_only():
    sliced, reference = sliced_and_autograd_layers()
    sliced.experts.requires_grad_(False)
    x = torch.randn(40, 16)  # an input that needs no gradient either (an embedding's output under no_grad)
    sliced(x).square().sum().backward()
    reference(x).square().sum().backward()
    assert sliced.experts.w1.grad is None
    assert torch.equal(sliced.router.gate.weight.grad, reference.router.gate.weight.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sliced_path_saves_each_experts_pre_activations_and_output_only(dtype):
    # no (tokens * k, d_model) gather, concatenation or FP32 copy: per expert, its two
    # pre-activations (padded rows, d_ff) and its output (padded rows, d_model) in the compute dtype
    torch.manual_seed(0)
    ex = GroupedSwiGLU(4, 16, 24)
    x = torch.randn(30, 16, requires_grad=True)
    token = torch.randint(0, 30, (60,))
    weight = torch.rand(60, requires_grad=True)
    counts, padded = [20, 0, 25, 15], [32, 0, 32, 16]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        y, saved = saved_bytes(lambda: ex.forward_sliced(x, token, weight, counts, padded))
    size = dtype.itemsize
    weights = sum(w.numel() for w in ex.parameters()) * size  # FP32: the parameters themselves
    per_expert = sum(p * (2 * 24 + 16) for p in padded) * size
    assert saved == x.numel() * 4 + weights + token.numel() * 8 + weight.numel() * 4 + per_expert
    assert y.dtype == torch.float32 and y.shape == (30, 16)


class MatmulShapes(TorchDispatchMode):
    """Every dimension of every ``aten.mm`` operand while it is active, forward and backward."""

    def __init__(self):
        super().__init__()
        self.dims = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.mm.default:
            self.dims.update(d for a in args[:2] for d in a.shape)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("autocast, token_buckets", [(True, None), (False, 4)])
def test_experts_see_a_bounded_set_of_token_counts(autocast, token_buckets):
    # routing changes every step; the experts' matmuls must not see a new shape each time (a
    # CPU's oneDNN compiles and caches a bf16 kernel per shape): by default under bf16 on a CPU
    layer = MoELayer(MoEConfig(d_model=24, d_ff=40, n_experts=8, top_k=2, token_buckets=token_buckets))
    shapes = MatmulShapes()
    for _ in range(40):
        layer.router.gate.weight.data.normal_()
        with shapes, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            layer(torch.randn(512, 24, requires_grad=True)).float().sum().backward()
    counts = shapes.dims - {24, 40, 8, 512}  # d_model, d_ff, n_experts, the router's tokens
    assert counts and all(c % 16 == 0 for c in counts)
    assert len(counts) <= 4 * 4  # counts up to 1024: 4 octaves of 4 sizes
