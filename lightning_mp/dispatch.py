"""Where tokens travel to their experts' ranks and back: expert parallelism's all-to-alls.

Under expert parallelism (``MoEModule(expert_parallel=ep)``) the ``ep`` ranks of an EP group each
hold ``n_experts / ep`` experts whole, rank ``r`` of the group experts ``[r * E_l, (r + 1) * E_l)``.
A MoE layer routes its own tokens (FP32, on its rank) and sorts the assignments by expert, as on
one device; then, per layer and forward:

1. :func:`plan`: the group exchanges per-expert counts (one small all-to-all) and reads them on
   the host (one sync: the next all-to-all's split sizes are Python ints);
2. :func:`dispatch`: each rank sends every other rank the rows of its experts (an all-to-all whose
   backward sends the rows' gradients back the same way), and the rows it receives, grouped by
   source rank, are regrouped by local expert with a stable permutation: within an expert, the
   group's rank 0's tokens first, each rank's in its own order, the order one process holding
   all of the group's tokens would give them;
3. :func:`combine`: after the experts, the inverse permutation and the reverse all-to-all return
   each output row to the rank and position it came from, where the FP32 weighted combine runs.

Capacity (``capacity_factor``) is applied per rank before dispatch, on the rank's own tokens, as
Megatron-LM does: routing and dropping never depend on ``ep``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class ExpertGroup:
    """The EP group of one rank: its process group, size and this rank's index in it."""

    group: Any  # torch.distributed.ProcessGroup
    size: int
    rank: int

    @classmethod
    def of(cls, mesh: Any) -> "ExpertGroup":
        """The group of a 1-D device mesh (the ``expert_parallel`` dimension)."""
        return cls(mesh.get_group(), mesh.size(), mesh.get_local_rank())


@dataclass(frozen=True)
class Plan:
    """One layer's exchange: rows sent to and received from each rank of the group, and how the
    received rows regroup by local expert (``order``: received row of each grouped row)."""

    group: ExpertGroup
    send_splits: list[int]
    recv_splits: list[int]
    order_N: Tensor
    local_counts: list[int]  # rows per local expert after regrouping


def plan(counts_E: Tensor, group: ExpertGroup) -> Plan:
    """The exchange for this rank's assignments, sorted by expert, ``counts_E[e]`` of expert ``e``."""
    ranks, n_experts = group.size, counts_E.numel()
    per_rank = n_experts // ranks
    send_PE = counts_E.reshape(ranks, per_rank)  # row j: the counts of rank j's experts
    recv_PE = torch.empty_like(send_PE)  # row i: what rank i sends, per local expert
    torch.distributed.all_to_all_single(recv_PE, send_PE.contiguous(), group=group.group)
    # host sync, once per layer and forward: split sizes and slice sizes as Python ints
    sizes = torch.cat([send_PE.sum(1), recv_PE.sum(1), recv_PE.sum(0)]).tolist()
    send_splits, recv_splits, local_counts = sizes[:ranks], sizes[ranks:2 * ranks], sizes[2 * ranks:]
    # received rows are source-major, expert-minor: each row's local expert, then a stable sort
    expert_N = torch.arange(per_rank, device=counts_E.device).repeat(ranks).repeat_interleave(
        recv_PE.reshape(-1), output_size=sum(recv_splits))
    return Plan(group, send_splits, recv_splits, expert_N.argsort(stable=True), local_counts)


def dispatch(rows_ND: Tensor, p: Plan) -> Tensor:
    """This rank's rows (sorted by expert) to their experts' ranks; returns the rows this rank's
    experts run, grouped by local expert (``p.local_counts`` each)."""
    received = _all_to_all(rows_ND, p.recv_splits, p.send_splits, p.group)
    return received.index_select(0, p.order_N)


def combine(out_ND: Tensor, p: Plan) -> Tensor:
    """The experts' outputs (grouped as :func:`dispatch` returned them) back to the ranks and
    positions their rows came from."""
    inverse_N = torch.empty_like(p.order_N)
    inverse_N[p.order_N] = torch.arange(p.order_N.numel(), device=p.order_N.device)
    return _all_to_all(out_ND.index_select(0, inverse_N), p.send_splits, p.recv_splits, p.group)


def _all_to_all(x: Tensor, output_splits: list[int], input_splits: list[int], group: ExpertGroup) -> Tensor:
    """Differentiable all-to-all of rows (backward: the reverse exchange of their gradients)."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

    return wait_tensor(all_to_all_single_autograd(x.contiguous(), output_splits, input_splits, group.group))
