"""Where routing happens: a token-choice top-k Mixture-of-Experts feed-forward layer.

Tokens are routed in FP32 (Switch Transformer's selective precision: the router's weights,
matmul and softmax never see 16 bits), sorted by expert, and each expert runs once on its
contiguous slice (dropless by default). The default experts are SwiGLU FFNs stored stacked
(:mod:`lightning_mp.experts`): on CUDA one grouped matmul, elsewhere one expert at a time with
the gather and combine folded in. Experts from ``MoEModule.make_expert`` run one module per slice.
Under expert parallelism (:meth:`MoELayer.parallelize_experts`) each rank holds some experts
whole, and the sorted rows travel to their experts' ranks and back (:mod:`lightning_mp.dispatch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from torch import Tensor, nn

from lightning_mp import dispatch
from lightning_mp.dispatch import ExpertGroup
from lightning_mp.experts import GroupedSwiGLU, SwiGLU, bucket_size


@dataclass
class MoEConfig:
    """One MoE layer. Defaults make a small, stable layer."""

    d_model: int = 128
    d_ff: int = 256  # hidden width of each expert
    n_experts: int = 8
    top_k: int = 2
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    capacity_factor: Optional[float] = None  # None: dropless; else keep ceil(cf * tokens * k / E) per expert
    n_shared_experts: int = 0  # DeepSeek-style always-on experts, each of width d_ff
    aux_loss_coef: float = 1e-2  # Switch/Mixtral load-balancing loss
    # The balancing loss's load fractions over this process's micro-batch ("micro_batch"), or
    # over every data-parallel rank's ("global": Megatron's global-batch balancing; one
    # all-reduce per MoE layer per training forward)
    aux_loss_scope: Literal["micro_batch", "global"] = "micro_batch"
    z_loss_coef: float = 1e-3  # ST-MoE router z-loss
    bias_update_rate: float = 0.0  # > 0: DeepSeek-V3 aux-loss-free balancing by a per-expert bias
    # Renormalise the top-k weights to sum to 1 (Mixtral, DeepSeek-V3; Qwen3-MoE's norm_topk_prob).
    # None: when top_k > 1; a lone top-1 weight renormalised is the constant 1, which would give
    # the router no gradient from the loss, so top-1 keeps its raw score (Switch).
    norm_topk_prob: Optional[bool] = None
    routed_scaling_factor: float = 1.0  # the routed experts' sum is multiplied by this (DeepSeek-V3: 2.5)
    # Group-limited routing (DeepSeek-V3): experts in n_groups groups; each token picks its
    # topk_groups best groups (a group scores the sum of its two best experts) and its top_k
    # experts among them. 1: off.
    n_groups: int = 1
    topk_groups: int = 1
    router_jitter: float = 0.0  # training: the router's input times U(1 - j, 1 + j) (Switch; HF's router_jitter_noise)
    # Expert weights: None keeps nn.Linear's uniform range; a std draws them from N(0, std), the
    # output projection (w2) from N(0, std / sqrt(2 n_layers)) with init_depth_scaled (Megatron).
    init_std: Optional[float] = None
    init_depth_scaled: bool = False
    n_layers: int = 1  # the model's depth, for init_depth_scaled (set by TransformerConfig)
    # Pad each expert's token count (see bucket_size): None picks by device (CPU: 4 sizes per power
    # of two for 16-bit matmuls, none for FP32; else multiples of 16); n > 0: n sizes per power of
    # two; 0: no padding.
    token_buckets: Optional[int] = None

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={self.n_experts}], got {self.top_k}")
        if self.score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"score_func must be 'softmax' or 'sigmoid', got {self.score_func!r}")
        if self.token_buckets is not None and self.token_buckets < 0:
            raise ValueError(f"token_buckets must be None, 0 or > 0, got {self.token_buckets}")
        if self.norm_topk_prob and self.top_k == 1:
            raise ValueError("norm_topk_prob=True with top_k=1 makes every weight 1: the router would get no "
                             "gradient from the loss; use norm_topk_prob=None or False")
        if self.n_groups < 1 or self.n_experts % self.n_groups:
            raise ValueError(f"n_groups must divide n_experts={self.n_experts}, got {self.n_groups}")
        if self.n_groups > 1 and not 1 <= self.topk_groups <= self.n_groups:
            raise ValueError(f"topk_groups must be in [1, n_groups={self.n_groups}], got {self.topk_groups}")
        if self.n_groups > 1 and self.top_k > self.topk_groups * (self.n_experts // self.n_groups):
            raise ValueError(f"top_k={self.top_k} is more than the {self.topk_groups} groups of "
                             f"{self.n_experts // self.n_groups} experts a token may use hold")
        if self.aux_loss_scope not in ("micro_batch", "global"):
            raise ValueError(f"aux_loss_scope must be 'micro_batch' or 'global', got {self.aux_loss_scope!r}")
        if not 0 <= self.router_jitter < 1:
            raise ValueError(f"router_jitter must be in [0, 1), got {self.router_jitter}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or None, got {self.capacity_factor}")


class Router(nn.Module):
    """Hidden states ``(tokens, d_model)`` to expert logits ``(tokens, n_experts)``, kept FP32."""

    keep_fp32 = True

    def __init__(self, d_model: int, n_experts: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, n_experts, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.gate(x)


class ExpertBias(nn.Module):
    """DeepSeek-V3's aux-loss-free balancing: a per-expert bias added to scores for selection only.

    ``MoEModule`` moves it once per optimizer step (:meth:`update`) from the layer's token counts
    of all of the step's micro-batches summed over the data-parallel ranks, as torchtitan does in
    its optimizer pre-step hook.
    """

    keep_fp32 = True

    def __init__(self, n_experts: int) -> None:
        super().__init__()
        self.register_buffer("bias", torch.zeros(n_experts))

    @torch.no_grad()
    def update(self, rate: float, load: Tensor) -> None:
        """Under-loaded experts' bias up by ``rate``, over-loaded ones' down, centred so the
        biases do not drift together (torchtitan); ``load``: tokens per expert (global)."""
        delta = rate * torch.sign(load.mean() - load)
        self.bias += delta - delta.mean()


class WeightedCombine(torch.autograd.Function):
    """``y[t] = sum of w_i * out_i over the assignments i of token t``, in FP32.

    Autograd's ``out.float() * w`` would save an FP32 copy of every expert output for backward,
    ``(tokens * k, d_model)`` at 4 bytes; this saves ``out`` as it is (16 bits under autocast,
    as Hugging Face's blocks do) and upcasts it in backward, with the same FP32 arithmetic.
    """

    @staticmethod
    def forward(ctx: Any, out: Tensor, w: Tensor, token: Tensor, n_tokens: int) -> Tensor:
        ctx.save_for_backward(out, w, token)
        y = out.new_zeros(n_tokens, out.shape[1], dtype=torch.float32)
        return y.index_add_(0, token, out.float() * w[:, None])

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Optional[Tensor], Optional[Tensor], None, None]:
        out, w, token = ctx.saved_tensors
        grad = grad_y.float()[token]  # each assignment's token's gradient
        grad_out = (grad * w[:, None]).to(out.dtype) if ctx.needs_input_grad[0] else None
        grad_w = (grad * out.float()).sum(-1) if ctx.needs_input_grad[1] else None
        return grad_out, grad_w, None, None


class MoELayer(nn.Module):
    """Token-choice top-k MoE feed-forward: ``(..., d_model) -> (..., d_model)``.

    After each forward, ``aux_loss`` and ``z_loss`` hold this layer's (unweighted) losses and
    ``stats`` its detached routing statistics: ``load`` (fraction of assignments per expert),
    ``imbalance`` (max load / mean load), ``entropy`` (mean router entropy, nats) and
    ``drop_frac`` (assignments dropped by the capacity limit). Training forwards also add to
    ``tokens_per_expert`` (:meth:`take_counts`), which ``MoEModule`` sums per optimizer step.
    """

    def __init__(
        self,
        config: MoEConfig,
        router: Optional[nn.Module] = None,
        experts: Optional[list[nn.Module]] = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.router = router if router is not None else Router(config.d_model, config.n_experts)
        self.router.keep_fp32 = True  # whatever the router is, its weights stay FP32
        if experts is not None:
            if len(experts) != config.n_experts:
                raise ValueError(f"expected {config.n_experts} experts, got {len(experts)}")
            self.experts: nn.Module = nn.ModuleList(experts)
        else:
            out_std = config.init_std
            if config.init_std is not None and config.init_depth_scaled:
                out_std = config.init_std / math.sqrt(2 * config.n_layers)
            self.experts = GroupedSwiGLU(config.n_experts, config.d_model, config.d_ff, init_std=config.init_std,
                                         out_std=out_std)
        self.shared = SwiGLU(config.d_model, config.d_ff * config.n_shared_experts) if config.n_shared_experts else None
        self.balance = ExpertBias(config.n_experts) if config.bias_update_rate > 0 else None
        # Tokens per expert over the training forwards since take_counts(): a plain tensor, not a
        # buffer, since DDP broadcasts rank 0's buffers before every forward.
        self.tokens_per_expert = torch.zeros(config.n_experts)
        self.aux_loss = torch.zeros(())
        self.z_loss = torch.zeros(())
        self.stats: dict[str, Tensor] = {}
        self.expert_group: Optional[ExpertGroup] = None  # set by parallelize_experts

    def parallelize_experts(self, mesh: Any) -> None:
        """Expert parallelism over the 1-D device ``mesh`` (an EP group): this rank keeps its
        ``n_experts / mesh.size()`` experts whole (the stacked weights become DTensors sharded on
        the expert dimension), and each forward sends the rows of the others' experts to them."""
        from torch.distributed.tensor import Shard, distribute_tensor

        if not isinstance(self.experts, GroupedSwiGLU):
            raise ValueError("expert parallelism needs the stacked SwiGLU experts (MoEModule's default); "
                             f"this layer's experts are {type(self.experts).__name__} (make_expert)")
        if self.config.n_experts % mesh.size():
            raise ValueError(f"expert_parallel={mesh.size()} must divide n_experts={self.config.n_experts}")
        for name, p in list(self.experts.named_parameters(recurse=False)):
            # every rank built all experts the same way (seeded); each keeps its own, no communication
            sharded = distribute_tensor(p.detach(), mesh, [Shard(0)], src_data_rank=None)
            self.experts.register_parameter(name, nn.Parameter(sharded, requires_grad=p.requires_grad))
        self.expert_group = ExpertGroup.of(mesh)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """FP32 routing: ``(logits, scores, top-k weights, top-k expert indices)``, all ``(tokens, ...)``."""
        cfg = self.config
        with torch.autocast(x.device.type, enabled=False):
            # FP32 math even where a plugin cast the router too (Lightning's bf16-true): run it on
            # upcast views of its tensors; the cast is differentiable, so its weights still train.
            state = {n: t.float() if t.is_floating_point() else t for n, t in self.router.state_dict(keep_vars=True).items()}
            x = x.float()
            if cfg.router_jitter and self.training:  # multiplicative input noise (Switch Transformer)
                x = x * torch.empty_like(x).uniform_(1.0 - cfg.router_jitter, 1.0 + cfg.router_jitter)
            logits = torch.func.functional_call(self.router, state, (x,))
            if logits.dtype != torch.float32:
                raise TypeError(f"the router must return FP32 logits, got {logits.dtype}")
            scores = logits.softmax(-1) if cfg.score_func == "softmax" else logits.sigmoid()
            select = scores if self.balance is None else scores + self.balance.bias
            if cfg.n_groups > 1:
                select = self._limit_to_groups(select)
            idx = select.topk(cfg.top_k, dim=-1).indices
            weights = scores.gather(-1, idx)
            # Mixtral and DeepSeek-V3 renormalise the top-k; top-1 keeps its raw score (Switch), or
            # the router would get no gradient from the loss (the one weight would be 1).
            if cfg.norm_topk_prob or (cfg.norm_topk_prob is None and cfg.top_k > 1):
                weights = weights / weights.sum(-1, keepdim=True)
            weights = weights * cfg.routed_scaling_factor
        return logits, scores, weights, idx

    def _limit_to_groups(self, select_TE: Tensor) -> Tensor:
        """``select`` with the experts outside each token's ``topk_groups`` best groups at -inf."""
        cfg = self.config
        grouped_TGe = select_TE.view(select_TE.shape[0], cfg.n_groups, -1)
        group_score_TG = grouped_TGe.topk(min(2, grouped_TGe.shape[-1]), dim=-1).values.sum(-1)
        keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
        keep_TG.scatter_(1, group_score_TG.topk(cfg.topk_groups, dim=-1).indices, True)
        return grouped_TGe.masked_fill(~keep_TG[..., None], float("-inf")).view_as(select_TE)

    def forward(self, x: Tensor) -> Tensor:
        cfg = self.config
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        n_tokens, k, n_exp = x.shape[0], cfg.top_k, cfg.n_experts
        logits, scores, weights, idx = self.route(x)

        # Sort the n_tokens * k assignments by expert: each expert's tokens become one slice.
        flat_expert = idx.reshape(-1)
        order = flat_expert.argsort(stable=True)
        counts = torch.bincount(flat_expert, minlength=n_exp)
        kept_counts = counts
        if cfg.capacity_factor is not None:
            capacity = math.ceil(cfg.capacity_factor * n_tokens * k / n_exp)
            starts = torch.cumsum(counts, 0) - counts
            sorted_expert = flat_expert[order]
            position = torch.arange(order.numel(), device=x.device) - starts[sorted_expert]
            order = order[position < capacity]  # stable sort: earlier tokens win, as in Switch
            kept_counts = counts.clamp(max=capacity)
        token, weight = order // k, weights.reshape(-1)[order]

        if self.expert_group is not None:  # the rows travel to their experts' ranks
            y = self._dispatch_and_combine(x, token, weight, kept_counts, None)
        elif isinstance(self.experts, GroupedSwiGLU) and not self.experts.uses_grouped_mm(x):
            counts_list = kept_counts.tolist()  # host sync: slice sizes for the per-expert path
            padded = self._padded_counts(x, counts_list)
            y = self.experts.forward_sliced(x, token, weight, counts_list, padded).to(x.dtype)
        else:
            y = self._dispatch_and_combine(x, token, weight, kept_counts, kept_counts.tolist())  # host sync
        if self.shared is not None:
            y = y + self.shared(x)

        self._losses_and_stats(logits, scores, counts, kept_counts, n_tokens)
        return y.reshape(shape)

    def _dispatch_and_combine(self, x: Tensor, token: Tensor, weight: Tensor, counts: Tensor,
                              counts_list: Optional[list[int]]) -> Tensor:
        """Gather the assignments' rows sorted by expert, run the experts on their slices,
        combine their outputs weighted in FP32: the path for grouped_mm, custom experts and
        expert parallelism (``counts_list`` None: the rows go to their experts' ranks first)."""
        # index_select, not x[token]: its backward is an index_add_, not a sorting index_put_
        xs = x.index_select(0, token)
        exchange = None
        if self.expert_group is not None:
            exchange = dispatch.plan(counts, self.expert_group)  # host sync
            # sent in the experts' compute dtype (they would cast the rows to it anyway): 16-bit
            # under bf16 compute, half the bytes of FP32 rows
            xs = dispatch.dispatch(xs.to(self.experts.compute_dtype(x)), exchange)
            counts_list = exchange.local_counts
            counts = torch.tensor(counts_list, device=x.device)
        xs, rows, counts_list = self._pad(xs, counts, counts_list)
        if isinstance(self.experts, GroupedSwiGLU):
            groups = counts if rows is None else torch.tensor(counts_list, device=x.device)
            out = self.experts(xs, groups, counts_list)
        else:
            out = torch.cat([expert(s) for expert, s in zip(self.experts, torch.split(xs, counts_list))])
        if rows is not None:
            out = out[rows]  # the padding rows' outputs are dropped: they get no gradient
        if exchange is not None:
            out = dispatch.combine(out, exchange)
        return WeightedCombine.apply(out, weight, token, x.shape[0]).to(x.dtype)

    def _padded_counts(self, x: Tensor, counts_list: list[int]) -> list[int]:
        """Each expert's token count padded to :func:`bucket_size` (unchanged where no padding applies)."""
        per_octave = self.config.token_buckets
        if per_octave is None:  # by device: only where it pays
            device = x.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
            if device == "cpu" and dtype == torch.float32:
                return counts_list  # FP32 CPU matmuls (MKL) cache nothing per shape
            per_octave = 4 if device == "cpu" else 0
        elif per_octave == 0:
            return counts_list
        return [bucket_size(c, per_octave) for c in counts_list]

    def _pad(self, xs: Tensor, counts: Tensor, counts_list: list[int]) -> tuple[Tensor, Optional[Tensor], list[int]]:
        """Each expert's slice of ``xs`` padded with zero rows to :func:`bucket_size`; returns the
        padded rows, where the real ones went (``None``: no padding) and the padded counts."""
        padded = self._padded_counts(xs, counts_list)
        if padded == counts_list:
            return xs, None, counts_list
        shift = torch.tensor([p - c for p, c in zip(padded, counts_list)], device=xs.device).cumsum(0)
        shift = torch.cat([shift.new_zeros(1), shift[:-1]])  # padding rows before each expert's slice
        rows = torch.arange(xs.shape[0], device=xs.device) + shift.repeat_interleave(counts, output_size=xs.shape[0])
        return xs.new_zeros(sum(padded), xs.shape[1]).index_copy(0, rows, xs), rows, padded

    def take_counts(self) -> Tensor:
        """Tokens per expert over the training forwards since the last call; the count restarts."""
        counts, self.tokens_per_expert = self.tokens_per_expert, torch.zeros_like(self.tokens_per_expert)
        return counts

    def _balancing_load(self, counts: Tensor, load: Tensor) -> Tensor:
        """The load fractions the aux loss weighs: this micro-batch's, or all ranks' (a collective)."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if self.config.aux_loss_scope != "global" or not self.training or not distributed:
            return load
        total = counts.float().clone()
        torch.distributed.all_reduce(total)  # every rank runs the same forwards, so the same collectives
        return total / total.sum()

    def _losses_and_stats(self, logits: Tensor, scores: Tensor, counts: Tensor, kept: Tensor, n_tokens: int) -> None:
        cfg = self.config
        with torch.autocast(logits.device.type, enabled=False):
            probs = scores / scores.sum(-1, keepdim=True)
            load = counts.float() / (n_tokens * cfg.top_k)  # f_i: share of assignments
            # Switch/Mixtral: E * sum_i f_i * P_i, 1.0 when perfectly balanced
            self.aux_loss = cfg.n_experts * (self._balancing_load(counts, load) * probs.mean(0)).sum()
            self.z_loss = torch.logsumexp(logits, -1).square().mean()  # ST-MoE
            entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1).mean()
        if self.training:
            if self.tokens_per_expert.device != counts.device:
                self.tokens_per_expert = self.tokens_per_expert.to(counts.device)
            self.tokens_per_expert += counts.float()
        self.stats = {
            "load": load.detach(),
            "imbalance": (load.max() / load.mean()).detach(),
            "entropy": entropy.detach(),
            "drop_frac": 1.0 - kept.sum().float().detach() / (n_tokens * cfg.top_k),
        }

