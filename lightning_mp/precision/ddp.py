"""Gradient reduction under DDP: who all-reduces, and in which dtype.

DDP all-reduces each backward's 16-bit gradients in buckets, overlapped with the backward. That
is right for one micro-batch per step in the 16-bit dtype. The plugin takes the reduction over
when DDP's would be wrong or lossy:

- micro-batches accumulate in FP32 sums that DDP does not see (``accumulate_grad_batches > 1``,
  manual optimization, a ``GradientAccumulationScheduler``), or ``grad_reduce_dtype="fp32"``:
  DDP's hook becomes a no-op and the plugin all-reduces the FP32 sums once per step (in FP32 or
  the 16-bit dtype), no longer overlapped with the backward, under every storage policy.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from lightning_mp.optim.blocks import blocks


class GradReducer:
    """All-reduces FP32 gradient sums over a DDP process group at the optimizer step."""

    def __init__(self, ddp: DistributedDataParallel, dtype: torch.dtype) -> None:
        self.group = ddp.process_group
        self.dtype = dtype
        ddp.register_comm_hook(None, _leave_bucket)  # DDP's own all-reduce becomes a no-op

    @torch.no_grad()
    def all_reduce(self, grads: list[Tensor]) -> None:
        """Average ``grads`` over the ranks in place, in ``self.dtype``.

        Every rank holds gradients for the same parameters in the same order (DDP without
        ``find_unused_parameters`` requires every parameter to be used), so the flat buffers line up.
        """
        world = dist.get_world_size(self.group)
        for block in blocks(grads, 1 << 24):  # one collective per 2**24 elements
            chunk = [piece.of(piece.param) for piece in block]
            flat = torch.cat([g.reshape(-1) for g in chunk]).div_(world).to(self.dtype)  # average as DDP: divide first
            dist.all_reduce(flat, group=self.group)
            torch._foreach_copy_(chunk, [t.view_as(g) for t, g in zip(flat.split([g.numel() for g in chunk]), chunk)])


def takes_over(trainer: Any, grad_reduce_dtype: Optional[str]) -> bool:
    """Whether the plugin must reduce the FP32 gradient sums itself (see the module docstring)."""
    if grad_reduce_dtype == "fp32" or trainer is None:
        return grad_reduce_dtype == "fp32"
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    module = trainer.lightning_module
    manual = module is not None and not module.automatic_optimization
    scheduled = any(isinstance(c, GradientAccumulationScheduler) for c in trainer.callbacks)
    return manual or scheduled or trainer.accumulate_grad_batches > 1


@torch.no_grad()
def broadcast(tensors: list[Tensor], group: Any) -> None:
    """Rank 0's values of ``tensors`` on every rank (masters and their weights, at setup)."""
    src = dist.get_global_rank(group, 0) if group is not None else 0
    for t in tensors:
        dist.broadcast(t.view(-1).view(torch.uint8), src=src, group=group)  # bytes: gloo has no int16


# DDP checks a comm hook's annotations as objects, which `from __future__ import annotations`
# turns into strings: the hook below leaves `bucket` and the result unannotated.


def _leave_bucket(state: Any, bucket):  # type: ignore[no-untyped-def]
    """A DDP comm hook that reduces nothing: the plugin reduces the FP32 sums at the step."""
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future
