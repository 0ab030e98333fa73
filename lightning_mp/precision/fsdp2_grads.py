"""FP32 gradient shards for 16-bit FSDP2 parameters.

FSDP2 reduce-scatters a unit's gradients in its policy's ``reduce_dtype`` (FP32 here) into one
flat buffer, then rounds that buffer to the parameters' dtype before it assigns each parameter's
``.grad``. With bf16 parameters that rounding would make the step differ from the FP32-shard
path, whose gradients stay FP32. :class:`FP32GradShards` keeps the FP32 buffer instead: FSDP2's
all-reduce hook hands it over (after the reduce-scatter, before the rounding; FSDP2's division
by the world size happens in place on it afterwards), and each parameter's post-accumulate-grad
hook, which FSDP2 calls in the buffer's order, takes its slice and frees the bf16 ``.grad``.
Micro-batches that reduce separately are summed in FP32, as FSDP2 sums FP32 shards.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor


class FP32GradShards:
    """The FP32 gradient shard of every hooked parameter, until a step takes it."""

    def __init__(self) -> None:
        self.grads: dict[Tensor, Tensor] = {}

    def install(self, unit: Any) -> None:
        """Hook the FSDP2 unit ``unit`` (an ``FSDPModule``): its FP32 reduce-scatter output becomes
        its trainable parameters' gradient shards."""
        group = unit._get_fsdp_state()._fsdp_param_group
        if group is None:  # a unit without parameters of its own
            return
        cursor: dict[str, Any] = {"flat": None, "offset": 0}
        unit.set_all_reduce_hook(partial(_start, cursor))
        for fsdp_param in group.fsdp_params:
            if fsdp_param.sharded_param.requires_grad:
                fsdp_param.sharded_param.register_post_accumulate_grad_hook(partial(self._take, fsdp_param, cursor))

    def _take(self, fsdp_param: Any, cursor: dict[str, Any], param: Tensor) -> None:
        # FSDP2 lays out the reduce-scatter output parameter by parameter (those with a gradient,
        # in order), each padded to its padded shard size; it calls this hook in that order.
        flat, start = cursor["flat"], cursor["offset"]
        grad = flat[start : start + fsdp_param.sharded_size.numel()].view(fsdp_param.sharded_size)
        cursor["offset"] = start + fsdp_param.padded_sharded_param_size.numel()
        if flat.is_cuda:  # the step reads it on the default stream; FSDP2 wrote it on its own
            flat.record_stream(torch.cuda.default_stream(flat.device))
        held = self.grads.get(param)
        if held is None:
            self.grads[param] = grad
        else:
            held += grad  # another micro-batch's reduce-scatter: summed in FP32
        param.grad = None  # FSDP2's bf16 rounding of it

    def sums(self) -> list[Tensor]:
        """The gradients held now (for the memory audit)."""
        return list(self.grads.values())

    def pop(self, params: list[Tensor]) -> None:
        """Forget (free) the gradients of ``params``: their step is done or skipped."""
        for p in params:
            self.grads.pop(p, None)


def _start(cursor: dict[str, Any], flat: Tensor) -> None:
    """FSDP2's all-reduce hook: a unit's FP32 reduce-scatter output, read by the hooks that follow."""
    cursor["flat"], cursor["offset"] = flat, 0
