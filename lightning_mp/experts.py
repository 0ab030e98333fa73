"""Where the experts run: SwiGLU FFNs, stored stacked, on the tokens routed to them.

``MoELayer`` sorts the ``tokens * k`` assignments by expert, so each expert owns one contiguous
slice. Two ways to run the stacked experts on those slices:

- ``torch._grouped_mm`` on the gathered ``(tokens * k, d_model)`` rows: one kernel for all
  experts, what CUDA wants (``GroupedSwiGLU.forward``);
- :class:`SlicedSwiGLU`, one expert at a time with the gather and the weighted combine folded
  into the loop: no ``(tokens * k, d_model)`` tensor ever exists, forward or backward. On a
  CPU that measured faster than both ``grouped_mm`` and autograd's per-slice loop
  (``benchmarks/moe_layer.py``), and it saves a third of the activations.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.distributed.tensor import DTensor


def bucket_size(count: int, per_octave: int) -> int:
    """``count`` rounded up to a multiple of 16 rows and, with ``per_octave`` > 0, to one of
    ``per_octave`` sizes per power of two (a multiple of 1/``per_octave`` of the next one).

    Experts then see a few matmul shapes, not one per token count: on a CPU oneDNN compiles and
    caches a kernel per bf16 matmul shape, and a new count every step grew the process without
    bound (measured on the ``small`` model: peak RSS 2.7 GB after 60 steps against 1.3 GB under
    32-true, and half the tokens/s). Grouped GEMMs get 16-row-aligned groups. Padding is at most
    1/``per_octave`` of the next power of two; its rows are zeros and their outputs are dropped.
    """
    if count == 0:
        return 0
    granule = 16 if per_octave <= 0 else max(16, (1 << (count - 1).bit_length()) // per_octave)
    return -(-count // granule) * granule


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)``: one expert, or the dense FFN and the shared expert."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GroupedSwiGLU(nn.Module):
    """All experts' SwiGLU weights stacked: ``w1, w3: (E, d_model, d_ff)``, ``w2: (E, d_ff, d_model)``.

    ``grouped_mm``: ``None`` uses ``torch._grouped_mm`` on CUDA tensors and one expert at a
    time elsewhere (faster on a CPU: ``benchmarks/moe_layer.py``); ``True`` uses it wherever
    it applies, ``False`` never.
    """

    def __init__(self, n_experts: int, d_model: int, d_ff: int, grouped_mm: Optional[bool] = None,
                 init_std: Optional[float] = None, out_std: Optional[float] = None) -> None:
        super().__init__()
        self.grouped_mm = grouped_mm
        self.w1 = nn.Parameter(torch.empty(n_experts, d_model, d_ff))
        self.w3 = nn.Parameter(torch.empty(n_experts, d_model, d_ff))
        self.w2 = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        for w, fan_in, std in ((self.w1, d_model, init_std), (self.w3, d_model, init_std), (self.w2, d_ff, out_std)):
            if std is None:
                nn.init.uniform_(w, -(fan_in**-0.5), fan_in**-0.5)  # nn.Linear's default range
            else:
                nn.init.normal_(w, std=std)

    @staticmethod
    def compute_dtype(x: Tensor) -> torch.dtype:
        """Autocast's dtype where it is on, else ``x``'s: grouped_mm and our own loop are not on
        autocast's lists, so the weights are cast by hand, as autocast casts matmul operands."""
        return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype

    def compute_operands(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``x`` and the weights in the compute dtype."""
        dtype = self.compute_dtype(x)
        weights = [self._local(w) for w in (self.w1, self.w3, self.w2)]
        return tuple(t.to(dtype) for t in (x, *weights))  # type: ignore[return-value]

    @staticmethod
    def _local(w: Tensor) -> Tensor:
        """Expert parallelism: the weights are DTensors over the EP group (of ``ep`` ranks); this
        rank runs its own experts. Their gradients sum the contributions of the EP group's tokens,
        each from its rank's mean loss, and FSDP2 averages them over the ranks holding the same
        experts (``world / ep``): scaled by ``1 / ep`` here (exact for a power of two), they are
        the gradients of the mean of every rank's loss, as the dense parameters' are."""
        if not isinstance(w, DTensor):
            return w
        ep = w.device_mesh.size()
        return _ScaleGrad.apply(w.to_local(), 1.0 / ep) if ep > 1 else w.to_local()

    def uses_grouped_mm(self, x: Tensor) -> bool:
        """Whether :meth:`forward` on ``x`` runs ``torch._grouped_mm`` (else one expert at a time)."""
        grouped = x.device.type == "cuda" if self.grouped_mm is None else self.grouped_mm
        # grouped_mm needs 16-byte-aligned rows: 8 bf16 or 4 FP32 elements
        align = 16 // self.compute_dtype(x).itemsize
        return grouped and hasattr(torch, "_grouped_mm") and all(s % align == 0 for s in self.w1.shape[1:])

    def forward(self, x: Tensor, counts: Tensor, counts_list: list[int]) -> Tensor:
        """``x``: tokens sorted by expert; ``counts[e]`` of them belong to expert ``e``."""
        grouped = self.uses_grouped_mm(x)
        x, w1, w3, w2 = self.compute_operands(x)
        if grouped:
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            h = F.silu(torch._grouped_mm(x, w1, offs=offs)) * torch._grouped_mm(x, w3, offs=offs)
            return torch._grouped_mm(h, w2, offs=offs)
        return self.forward_loop(x, counts_list, w1, w3, w2)

    @staticmethod
    def forward_loop(x: Tensor, counts_list: list[int], w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
        """Reference path: one matmul per expert on its contiguous slice, through autograd."""
        # unbind, not w1[e]: indexing gives each expert's backward a full-size (E, ...) gradient
        # to fill, unbind's backward stacks the per-expert ones once
        outs = [(F.silu(xs @ a) * (xs @ b)) @ c
                for xs, a, b, c in zip(torch.split(x, counts_list), w1.unbind(0), w3.unbind(0), w2.unbind(0))]
        return torch.cat(outs)

    def forward_sliced(self, x: Tensor, token: Tensor, weight: Tensor, counts_list: list[int],
                       padded_list: list[int]) -> Tensor:
        """``y[t] = sum over t's assignments i of weight[i] * expert_i(x[t])``, in FP32, one expert
        at a time (:class:`SlicedSwiGLU`). ``token``/``weight``: each assignment's token and
        routing weight, sorted by expert, ``counts_list[e]`` of them expert ``e``'s, whose
        slice runs padded with zero rows to ``padded_list[e]``."""
        _, w1, w3, w2 = self.compute_operands(x[:0])
        return SlicedSwiGLU.apply(x, w1, w3, w2, token, weight, counts_list, padded_list)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def _padded(rows: Tensor, n_rows: int) -> Tensor:
    """``rows`` with zero rows appended up to ``n_rows`` (no copy when there are that many)."""
    return rows if rows.shape[0] == n_rows else F.pad(rows, (0, 0, 0, n_rows - rows.shape[0]))


class SlicedSwiGLU(torch.autograd.Function):
    """Gather, SwiGLU expert and FP32 weighted combine, one expert's slice at a time.

    Autograd's version of the same loop materialises the gathered rows, the concatenated expert
    outputs, their FP32 weighted copy and the gradients of all of them, each ``(tokens * k,
    d_model)``: 64 MB apiece at 4096 tokens, top-8, ``d_model`` 512 in FP32, above glibc's
    32 MB threshold, so every one is mapped fresh from the kernel and page-faulted in, every
    step. Here the only tensors of that height are per expert; forward keeps each expert's two
    pre-activations and its output (what autograd keeps too, less the gathered rows), and
    backward re-gathers the rows from ``x``. The arithmetic is autograd's, op for op, so the
    results are bit-identical to :meth:`GroupedSwiGLU.forward_loop` under
    :class:`~lightning_mp.moe.WeightedCombine`.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, token: Tensor, weight: Tensor,
                counts_list: list[int], padded_list: list[int]) -> Tensor:
        y_TD = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        saved: list[Tensor] = []
        for tok, w, a1, a3, a2, n, padded in zip(token.split(counts_list), weight.split(counts_list), w1.unbind(0),
                                                  w3.unbind(0), w2.unbind(0), counts_list, padded_list):
            xs_ND = _padded(x.index_select(0, tok).to(a1.dtype), padded)
            pre1_NF, pre3_NF = xs_ND @ a1, xs_ND @ a3
            out_ND = (F.silu(pre1_NF) * pre3_NF) @ a2
            y_TD.index_add_(0, tok, out_ND[:n].float() * w[:, None])  # the combine stays FP32
            saved += (pre1_NF, pre3_NF, out_ND)
        ctx.save_for_backward(x, w1, w3, w2, token, weight, *saved)
        ctx.counts, ctx.padded = counts_list, padded_list
        return y_TD

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y_TD: Tensor) -> tuple[Optional[Tensor], ...]:
        x, w1, w3, w2, token, weight, *saved = ctx.saved_tensors
        need_x, need_w1, need_w3, need_w2, _, need_weight = ctx.needs_input_grad[:6]
        grad_y_TD = grad_y_TD.float()
        # each token's k input gradients are summed in FP32, as the forward's combine is
        grad_x = torch.zeros_like(x, dtype=torch.float32) if need_x else None
        grad_w1, grad_w3, grad_w2 = (torch.empty_like(w) if need else None
                                     for w, need in ((w1, need_w1), (w3, need_w3), (w2, need_w2)))
        grad_weight = torch.empty_like(weight) if need_weight else None
        start = 0
        for e, (n, padded) in enumerate(zip(ctx.counts, ctx.padded)):
            if n == 0:  # an expert without tokens: its weights' gradients are zero
                for grad in (grad_w1, grad_w2, grad_w3):
                    if grad is not None:
                        grad[e].zero_()
                continue
            tok, w = token[start:start + n], weight[start:start + n]
            pre1_NF, pre3_NF, out_ND = saved[3 * e:3 * e + 3]
            grad_ND = grad_y_TD.index_select(0, tok)  # each assignment's token's gradient
            if grad_weight is not None:
                grad_weight[start:start + n] = (grad_ND * out_ND[:n].float()).sum(-1)
            grad_out_ND = _padded((grad_ND * w[:, None]).to(w2.dtype), padded)
            act_NF = F.silu(pre1_NF)  # recomputed: cheaper than keeping it
            if grad_w2 is not None:
                torch.mm((act_NF * pre3_NF).t(), grad_out_ND, out=grad_w2[e])
            grad_h_NF = grad_out_ND @ w2[e].t()
            grad_pre3_NF = grad_h_NF * act_NF
            grad_pre1_NF = torch.ops.aten.silu_backward(grad_h_NF * pre3_NF, pre1_NF)
            xs_ND = _padded(x.index_select(0, tok).to(w1.dtype), padded)
            if grad_w1 is not None:
                torch.mm(xs_ND.t(), grad_pre1_NF, out=grad_w1[e])
            if grad_w3 is not None:
                torch.mm(xs_ND.t(), grad_pre3_NF, out=grad_w3[e])
            if grad_x is not None:
                grad_x.index_add_(0, tok, (grad_pre1_NF @ w1[e].t() + grad_pre3_NF @ w3[e].t())[:n].float())
            start += n
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_w1, grad_w3, grad_w2, None, grad_weight, None, None
