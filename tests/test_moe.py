"""The MoE layer: dispatch against a per-token reference, capacity, losses in closed form, FP32 routing."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import saved_bytes
from roundoff import U, assert_within, gamma, swiglu_error
from lightning_mp.experts import GroupedSwiGLU, SwiGLU
from lightning_mp.moe import MoEConfig, MoELayer


def reference_moe(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Naive: every token, every chosen expert, one at a time."""
    _, _, weights, idx = layer.route(x)
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t], idx[t]):
            if isinstance(layer.experts, GroupedSwiGLU):
                ex = layer.experts
                out = (F.silu(x[t] @ ex.w1[e]) * (x[t] @ ex.w3[e])) @ ex.w2[e]
            else:
                out = layer.experts[e](x[t : t + 1])[0]
            y[t] += w * out
    if layer.shared is not None:
        y += layer.shared(x)
    return y


def moe_error(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Bound on one float32 evaluation's distance from the exact layer output, both evaluations taking the
    same routing: each chosen expert's SwiGLU error times its weight, plus the combine's sum of
    top_k + 1 terms (gamma of its length times the terms' magnitudes, the weights' product included)."""
    _, _, weights, idx = layer.route(x)
    x64 = x.detach().double()
    error = torch.zeros_like(x64)
    magnitude = torch.zeros_like(x64)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t].detach().double(), idx[t]):
            ws = _expert_weights(layer.experts, e)
            error[t] += w.abs() * swiglu_error(x[t : t + 1], *ws)[0]
            h = F.silu(x64[t] @ ws[0].detach().double()) * (x64[t] @ ws[1].detach().double())
            magnitude[t] += (w * (h @ ws[2].detach().double())).abs()
    if layer.shared is not None:
        w1, w3, w2 = (w.detach().double() for w in _expert_weights([layer.shared], 0))
        error += swiglu_error(x, w1, w3, w2)
        magnitude += (F.silu(x64 @ w1) * (x64 @ w3)).abs() @ w2.abs()
    return error + gamma(layer.config.top_k + 2) * (magnitude + error)


def _expert_weights(experts, e):
    """Expert ``e``'s (w1, w3, w2) as ``x @ w`` operands."""
    if isinstance(experts, GroupedSwiGLU):
        return experts.w1[e], experts.w3[e], experts.w2[e]
    return experts[e].w1.weight.T, experts[e].w3.weight.T, experts[e].w2.weight.T


@pytest.mark.parametrize(
    "cfg",
    [
        dict(top_k=2),
        dict(top_k=1),
        dict(top_k=2, score_func="sigmoid"),
        dict(top_k=2, n_shared_experts=1),
        dict(top_k=3, n_experts=6),
    ],
)
@pytest.mark.parametrize("custom_experts", [False, True])
def test_dropless_dispatch_matches_per_token_reference(cfg, custom_experts):
    config = MoEConfig(d_model=16, d_ff=24, **{"n_experts": 4, **cfg})
    experts = [SwiGLU(16, 24) for _ in range(config.n_experts)] if custom_experts else None
    layer = MoELayer(config, experts=experts)
    x = torch.randn(37, 16)
    assert_within(layer(x), reference_moe(layer, x), 2 * moe_error(layer, x), "dispatch against the reference")
    assert layer.stats["drop_frac"].item() == 0.0


class FixedRouter(nn.Module):
    """Returns the given logits whatever the input (plus 0 * x so autograd sees the input)."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", torch.as_tensor(logits, dtype=torch.float32))

    def forward(self, x):
        return self.logits + 0 * x[:, :1]


def test_capacity_drops_overflow_and_reports_the_fraction():
    # 8 tokens, top-1, every token prefers expert 0: capacity ceil(1.0 * 8 / 4) = 2 keeps 2 of 8
    logits = torch.tensor([[5.0, 1.0, 0.0, 0.0]] * 8)
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, n_experts=4, top_k=1, capacity_factor=1.0),
                     router=FixedRouter(logits))
    x = torch.randn(8, 8)
    y = layer(x)
    assert layer.stats["drop_frac"].item() == pytest.approx(0.75)
    assert torch.all(y[2:] == 0)  # dropped tokens get no expert output (the residual carries them)
    full = MoELayer(MoEConfig(d_model=8, d_ff=8, n_experts=4, top_k=1), router=FixedRouter(logits))
    full.experts.load_state_dict(layer.experts.state_dict())
    torch.testing.assert_close(y[:2], full(x)[:2])  # the first tokens in order keep their slot
    # capacity 1.5 * 8 * 2 / 4 = 6 with top-2: expert 0 keeps 6 of 8, expert 1 keeps 6 of 8
    layer2 = MoELayer(MoEConfig(d_model=8, d_ff=8, n_experts=4, top_k=2, capacity_factor=1.5),
                      router=FixedRouter(logits))
    layer2(x)
    assert layer2.stats["drop_frac"].item() == pytest.approx(4 / 16)


def test_aux_and_z_loss_equal_their_formulas():
    l3 = math.log(3.0)
    logits = [[0.0, l3], [0.0, l3], [l3, 0.0], [0.0, l3]]  # probs (.25, .75) x3 and (.75, .25)
    layer = MoELayer(MoEConfig(d_model=4, d_ff=4, n_experts=2, top_k=1), router=FixedRouter(logits))
    layer(torch.randn(4, 4))
    # f = (1/4, 3/4) assignments, P = mean probs = (.375, .625): aux = 2 * (.25 * .375 + .75 * .625)
    assert layer.aux_loss.item() == pytest.approx(1.125)
    assert layer.z_loss.item() == pytest.approx(math.log(4.0) ** 2)  # logsumexp = log 4 for every token
    assert layer.stats["imbalance"].item() == pytest.approx(0.75 / 0.5)
    assert layer.stats["load"].tolist() == [0.25, 0.75]


def test_router_runs_fp32_under_autocast_even_with_16bit_input():
    layer = MoELayer(MoEConfig(d_model=16, d_ff=16, n_experts=4, top_k=2))
    seen = {}
    layer.router.register_forward_hook(lambda m, i, o: seen.update(inp=i[0].dtype, out=o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(8, 16, dtype=torch.bfloat16))
    assert seen == {"inp": torch.float32, "out": torch.float32}
    assert y.dtype == torch.bfloat16


def test_custom_router_must_return_fp32_and_is_flagged_keep_fp32():
    router = nn.Linear(8, 4)
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, n_experts=4, top_k=2), router=router)
    assert router.keep_fp32 is True
    layer(torch.randn(3, 8))

    class HalfRouter(nn.Module):
        def forward(self, x):
            return x[:, :4].half()

    with pytest.raises(TypeError, match="FP32 logits"):
        MoELayer(MoEConfig(d_model=8, d_ff=8, n_experts=4, top_k=2), router=HalfRouter())(torch.randn(3, 8))


def test_aux_loss_free_bias_moves_toward_underloaded_experts():
    logits = torch.tensor([[3.0, 2.0, 0.0, 0.0]] * 6)
    layer = MoELayer(MoEConfig(d_model=4, d_ff=4, n_experts=4, top_k=1, bias_update_rate=0.1),
                     router=FixedRouter(logits))
    layer.train()
    layer(torch.randn(6, 4))
    layer(torch.randn(6, 4))  # two micro-batches: counts add up
    load = layer.take_counts()
    assert load.tolist() == [12, 0, 0, 0]
    layer.balance.update(0.1, load)
    # sign(mean - load) * 0.1 = [-0.1, 0.1, 0.1, 0.1], centred (mean 0.05 removed)
    assert layer.balance.bias.tolist() == pytest.approx([-0.15, 0.05, 0.05, 0.05])
    assert layer.take_counts().sum() == 0  # the count restarts


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("norm_topk_prob", [None, False, True])
def test_the_router_learns_from_the_task_loss(score_func, top_k, norm_topk_prob):
    if norm_topk_prob and top_k == 1:
        with pytest.raises(ValueError, match="no gradient"):
            MoEConfig(top_k=1, norm_topk_prob=True)
        return
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=16, d_ff=16, n_experts=4, top_k=top_k, score_func=score_func,
                               norm_topk_prob=norm_topk_prob))
    x = torch.randn(64, 16)
    layer(x).square().mean().backward()  # the task loss alone: no aux or z loss
    grad = layer.router.gate.weight.grad
    assert grad.abs().max() > 1e-4 * layer(x).square().mean().item()


def test_routed_scaling_factor_scales_the_routed_sum():
    torch.manual_seed(0)
    plain = MoELayer(MoEConfig(d_model=16, d_ff=16, n_experts=4, top_k=2))
    scaled = MoELayer(MoEConfig(d_model=16, d_ff=16, n_experts=4, top_k=2, routed_scaling_factor=2.5))
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(20, 16)
    torch.testing.assert_close(scaled(x), 2.5 * plain(x))


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(n_experts=4, top_k=5)
    with pytest.raises(ValueError, match="score_func"):
        MoEConfig(score_func="relu")
    with pytest.raises(ValueError, match="capacity_factor"):
        MoEConfig(capacity_factor=0)
    with pytest.raises(ValueError, match="experts"):
        MoELayer(MoEConfig(n_experts=4), experts=[nn.Identity()])


@pytest.mark.parametrize("custom_experts", [False, True])
def test_padded_token_groups_give_the_unpadded_layer(custom_experts):
    def layer(token_buckets):
        torch.manual_seed(0)  # the same weights in both
        experts = [SwiGLU(16, 24) for _ in range(4)] if custom_experts else None
        return MoELayer(MoEConfig(d_model=16, d_ff=24, n_experts=4, top_k=2, token_buckets=token_buckets),
                        experts=experts).double()

    # float64: padding changes the matmuls' shapes and so their summation order; two orders differ by at
    # most 2 gamma_n(2**-53) of the terms' magnitudes, under 1e-13 here (sums of at most 53 terms below 10)
    x = torch.randn(53, 16, dtype=torch.float64, requires_grad=True)
    results = []
    for m in (layer(4), layer(0)):
        y = m(x)
        results.append((y, torch.autograd.grad(y.square().sum(), [x, *m.parameters()])))
    (y1, g1), (y2, g2) = results
    torch.testing.assert_close(y1, y2, rtol=0, atol=1e-12)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_combine_is_autograds_fp32_combine_without_its_fp32_copy(dtype):
    from lightning_mp.moe import WeightedCombine

    torch.manual_seed(0)
    n_tokens, k, d = 50, 2, 32
    token = torch.arange(n_tokens).repeat_interleave(k)[torch.randperm(n_tokens * k)]
    out = torch.randn(n_tokens * k, d, dtype=dtype, requires_grad=True)
    w = torch.rand(n_tokens * k, requires_grad=True)
    grad_y = torch.randn(n_tokens, d)

    def reference():
        return torch.zeros(n_tokens, d).index_add_(0, token, out.float() * w[:, None])

    expected, reference_bytes = saved_bytes(reference)
    got, saved = saved_bytes(lambda: WeightedCombine.apply(out, w, token, n_tokens))
    assert torch.equal(got, expected)
    grads = torch.autograd.grad(got, (out, w), grad_y)
    expected_grads = torch.autograd.grad(expected, (out, w), grad_y)
    # d/d out: one product per element (its bf16 rounding, of the same value, is the same); d/d w: a dot
    # product over d in any order, within gamma_d of its magnitudes, for each of the two
    terms = grad_y[token].abs() * out.detach().float().abs()
    bounds = (2 * U * (grad_y[token] * w.detach()[:, None]).abs(), 2 * gamma(d) * terms.sum(-1))
    for g, e, bound in zip(grads, expected_grads, bounds):
        assert_within(g, e, bound.to(g.dtype).float(), "combine gradient")
    assert saved == out.numel() * out.element_size() + w.numel() * 4 + token.numel() * 8
    if dtype == torch.bfloat16:  # autograd's version keeps an FP32 copy of the expert outputs
        assert reference_bytes - saved >= out.numel() * 2


def test_group_limited_routing_picks_experts_from_the_best_groups_only():
    torch.manual_seed(0)
    logits = torch.randn(64, 8) * 3
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, n_experts=8, top_k=2, n_groups=4, topk_groups=2),
                     router=FixedRouter(logits))
    _, scores, weights, idx = layer.route(torch.randn(64, 8))
    group_scores = scores.view(64, 4, 2).sum(-1)  # two experts a group: the sum of its two best
    best_groups = group_scores.topk(2, dim=-1).indices
    for t in range(64):
        allowed = torch.cat([torch.arange(2 * g, 2 * g + 2) for g in best_groups[t].tolist()])
        assert set(idx[t].tolist()) <= set(allowed.tolist())
        expected = allowed[scores[t, allowed].topk(2).indices]  # the best two within those groups
        assert set(idx[t].tolist()) == set(expected.tolist())
    plain = MoELayer(MoEConfig(d_model=8, d_ff=8, n_experts=8, top_k=2), router=FixedRouter(logits))
    assert not torch.equal(plain.route(torch.randn(64, 8))[3].sort(-1).values, idx.sort(-1).values)
    with pytest.raises(ValueError, match="n_groups must divide"):
        MoEConfig(n_experts=8, n_groups=3)
    with pytest.raises(ValueError, match="top_k=4 is more than"):
        MoEConfig(n_experts=8, top_k=4, n_groups=4, topk_groups=1)


def test_router_jitter_perturbs_training_routing_only():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=16, d_ff=16, n_experts=4, top_k=2, router_jitter=0.5))
    plain = MoELayer(MoEConfig(d_model=16, d_ff=16, n_experts=4, top_k=2))
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(256, 16)
    layer.train()
    assert not torch.equal(layer.route(x)[0], plain.route(x)[0])
    layer.eval()
    assert torch.equal(layer.route(x)[0], plain.route(x)[0])


def test_expert_init_std_and_depth_scaling():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=64, d_ff=128, n_experts=8, init_std=0.02, init_depth_scaled=True, n_layers=8))
    assert layer.experts.w1.std().item() == pytest.approx(0.02, rel=0.02)
    assert layer.experts.w3.std().item() == pytest.approx(0.02, rel=0.02)
    assert layer.experts.w2.std().item() == pytest.approx(0.02 / 4, rel=0.02)  # / sqrt(2 * 8)
    default = MoELayer(MoEConfig(d_model=64, d_ff=128, n_experts=8))
    assert default.experts.w1.abs().max().item() <= 64**-0.5  # nn.Linear's uniform range, as before


def test_global_balancing_loss_is_the_micro_batchs_in_one_process():
    torch.manual_seed(0)
    local = MoELayer(MoEConfig(d_model=16, d_ff=16, n_experts=4, top_k=2))
    glob = MoELayer(MoEConfig(d_model=16, d_ff=16, n_experts=4, top_k=2, aux_loss_scope="global"))
    glob.load_state_dict(local.state_dict())
    x = torch.randn(40, 16)
    local(x), glob(x)
    assert torch.equal(local.aux_loss, glob.aux_loss)  # across ranks: tests/test_ddp.py
    with pytest.raises(ValueError, match="aux_loss_scope"):
        MoEConfig(aux_loss_scope="batch")


def test_a_moe_layer_syncs_with_the_host_once_per_forward(monkeypatch):
    """The per-expert slice sizes are the layer's one host sync (documented at the tolist); the
    backward and the losses and statistics add none. Counted by instrumenting the ways a tensor
    reaches the host."""
    calls = []
    for name in ("item", "tolist", "cpu", "__bool__", "__int__", "__float__", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for cfg in (dict(), dict(capacity_factor=1.0), dict(n_shared_experts=1, token_buckets=4)):
        layer = MoELayer(MoEConfig(d_model=16, d_ff=24, n_experts=4, top_k=2, **cfg))
        x = torch.randn(37, 16, requires_grad=True)
        calls.clear()
        y = layer(x)
        (y.square().sum() + layer.aux_loss + layer.z_loss).backward()
        assert calls == ["tolist"], (cfg, calls)
