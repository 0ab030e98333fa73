"""One MoE layer's forward + backward against a dense FFN of equal active parameters and a naive loop.

    python benchmarks/moe_layer.py [--tokens 4096] [--d-model 512] [--repeats 15]
    python benchmarks/moe_layer.py --experts 16 --top-k 4 --d-ff 512     # one shape of your own

By default two shapes with the same active parameters per token: 8 experts of d_ff 1024, top-2,
and 64 experts of d_ff 256, top-8. At each, these layers run on the same input, timed
alternately in one process (median of per-round ratios):

- ``moe (grouped_mm)`` and ``moe (sliced)``: lightning_mp's MoELayer (FP32 router, sorted
  dropless dispatch, stacked SwiGLU experts) forced onto each of its two paths: one
  ``torch._grouped_mm`` for all experts (the default on CUDA), or one expert at a time with the
  gather and combine folded in (``SlicedSwiGLU``, the default elsewhere);
- ``moe (autograd's per-slice loop)``: the same routing and experts through autograd's
  gather, per-expert matmuls, concatenation and combine (the sliced path before ``SlicedSwiGLU``);
- ``dense``: a SwiGLU FFN of width ``top_k * d_ff``, the same active parameters per token;
- ``naive``: the textbook loop over experts with a boolean mask per expert (gather, run, scatter);
- ``HF Mixtral block``: Hugging Face's ``MixtralSparseMoeBlock`` of the same shape (when
  ``transformers`` is installed), with its ``grouped_mm`` experts implementation and its eager one.

fp32 on CPU; bf16 under autocast on CUDA when a GPU is present. Activation memory: the bytes
autograd saves for backward in one forward (each storage once), per layer, in FP32 and under
bf16 autocast.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mp.experts import GroupedSwiGLU
from lightning_mp.machine import describe
from lightning_mp.moe import MoEConfig, MoELayer, SwiGLU, WeightedCombine


class NaiveMoE(nn.Module):
    """Boolean-mask loop over experts, sharing the router and experts of ``layer``."""

    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        _, _, weights, idx = self.layer.route(x)
        ex = self.layer.experts
        y = torch.zeros_like(x)
        for e in range(self.layer.config.n_experts):
            mask = idx == e  # (tokens, k)
            rows = mask.any(-1)
            if not rows.any():
                continue
            xs = x[rows]
            out = (F.silu(xs @ ex.w1[e]) * (xs @ ex.w3[e])) @ ex.w2[e]
            y[rows] += out * (weights * mask)[rows].sum(-1, keepdim=True)
        return y


class AutogradSlices(nn.Module):
    """``layer``'s routing and experts, each expert's slice through autograd (dropless)."""

    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        _, _, weights, idx = self.layer.route(x)
        order = idx.reshape(-1).argsort(stable=True)
        counts = torch.bincount(idx.reshape(-1), minlength=self.layer.config.n_experts).tolist()
        token = order // self.layer.config.top_k
        xs, w1, w3, w2 = self.layer.experts.compute_operands(x.index_select(0, token))
        out = GroupedSwiGLU.forward_loop(xs, counts, w1, w3, w2)
        return WeightedCombine.apply(out, weights.reshape(-1)[order], token, x.shape[0]).to(x.dtype)


class HFBlock(nn.Module):
    """Hugging Face's Mixtral MoE block of the same shape, on ``(tokens, d_model)``."""

    def __init__(self, cfg: MoEConfig, implementation: str) -> None:
        super().__init__()
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        config = MixtralConfig(hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_local_experts=cfg.n_experts,
                               num_experts_per_tok=cfg.top_k)
        config._experts_implementation = implementation
        self.block = MixtralSparseMoeBlock(config)
        for p in self.block.parameters():
            nn.init.normal_(p, std=cfg.d_model**-0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x[None])[0]


def hf_blocks(cfg: MoEConfig) -> dict[str, nn.Module]:
    try:
        return {f"HF Mixtral block ({impl})": HFBlock(cfg, impl) for impl in ("grouped_mm", "eager")}
    except ImportError:
        return {}


def saved_bytes(layer: nn.Module, x: Tensor, dtype: torch.dtype) -> int:
    """Bytes autograd keeps for ``layer``'s backward after one forward on ``x`` (shared storage once)."""
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    inp = x.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            layer(inp)
    storages.pop(inp.untyped_storage().data_ptr(), None)  # the input is the caller's
    return sum(storages.values())


def timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


# (experts, top_k, d_ff): 8 experts top-2 (Mixtral's routing) and 64 experts top-8 (Qwen3-MoE's), the
# same active parameters per token at d_ff 1024 and 256
SHAPES = ((8, 2, 1024), (64, 8, 256))
TARGETS = "targets: MoELayer's default path at most 1.5x dense at 64 experts top-8 and no slower than HF's " \
    "grouped_mm block at either shape; the sliced path at most 1.3x the grouped_mm one"


def run_shape(args: argparse.Namespace, n_experts: int, top_k: int, d_ff: int, device: torch.device) -> None:
    """Time every layer at one shape, alternating them, and print the table and the target ratios."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=args.d_model, d_ff=d_ff, n_experts=n_experts, top_k=top_k)
    moe = MoELayer(cfg).to(device)
    paths = {"moe (grouped_mm)": True, "moe (sliced)": False}  # the path forced while each runs
    layers: dict[str, nn.Module] = {
        **{name: moe for name in paths},
        "moe (autograd's per-slice loop)": AutogradSlices(moe),
        "dense": SwiGLU(args.d_model, top_k * d_ff).to(device),
        "naive": NaiveMoE(moe),
        **{name: block.to(device) for name, block in hf_blocks(cfg).items()},
    }
    x = torch.randn(args.tokens, args.d_model, device=device)

    def step(name: str, layer: nn.Module) -> Callable[[], None]:
        def run() -> None:
            moe.experts.grouped_mm = paths.get(name, False)
            inp = x.detach().requires_grad_()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out = layer(inp)
            out.float().square().mean().backward()

        return run

    times: dict[str, list[float]] = {name: [] for name in layers}
    for i in range(args.repeats + 2):
        for name, layer in layers.items():
            t = timed(step(name, layer), device)
            if i >= 2:
                times[name].append(t)
    moe.experts.grouped_mm = None
    default = "moe (grouped_mm)" if moe.experts.uses_grouped_mm(x) else "moe (sliced)"
    print(f"\n## {n_experts} experts of d_ff {d_ff}, top-{top_k}\n")
    print(f"device: {device}, dtype {dtype}; {args.tokens} tokens, d_model {args.d_model}; forward + backward, "
          f"{args.repeats} alternating rounds; MoELayer's default path here: {default}\n")

    def ratio(name: str, base: str) -> float:
        return statistics.median(t / b for t, b in zip(times[name], times[base]))

    print("| layer | median ms | ratio to dense (median of per-round ratios) | saved for backward, FP32 / bf16 (MiB) |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        moe.experts.grouped_mm = paths.get(name, False)
        memory = " / ".join(f"{saved_bytes(layers[name], x, d) / 2**20:.0f}" for d in (torch.float32, torch.bfloat16))
        print(f"| {name} | {1e3 * statistics.median(ts):.1f} | {ratio(name, 'dense'):.2f}x | {memory} |")
    hf = "HF Mixtral block (grouped_mm)"
    versus_hf = f", vs {hf} {ratio(default, hf):.2f}x" if hf in times else ""
    print(f"\nMoELayer's default path: {ratio(default, 'dense'):.2f}x dense{versus_hf}; sliced path vs grouped_mm "
          f"path {ratio('moe (sliced)', 'moe (grouped_mm)'):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--experts", type=int, help="one shape only (with --top-k and --d-ff); default: both shapes")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"machine: {describe()}")
    print(TARGETS)
    shapes = SHAPES if args.experts is None else ((args.experts, args.top_k, args.d_ff),)
    for shape in shapes:
        run_shape(args, *shape, device)


if __name__ == "__main__":
    main()
