"""How a model is spread over processes under ``ModelParallelStrategy``: FSDP2 units, and with
expert parallelism the meshes that own the experts.

Dense parameters (attention, embeddings, norms, routers, shared experts) are FSDP2-sharded over
every data-parallel rank. With ``expert_parallel=ep`` (torchtitan's layout) the ranks form a
``(world / ep, ep)`` mesh: the ``ep`` consecutive ranks of an ``expert_parallel`` group each own
``n_experts / ep`` experts whole, and the routed experts are FSDP2-sharded only over the
``expert_replicate`` dimension, the ranks that hold the same experts. At the end of a run,
:func:`leave_process_group`, then :func:`exit_after_leaving`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_mp.storage import local


def expert_meshes(mesh: Any, ep: int) -> tuple[Any, Any]:
    """The ``(expert_replicate, expert_parallel)`` sub-meshes of the data-parallel ``mesh``'s ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    if mesh.size() % ep:
        raise ValueError(f"expert_parallel={ep} must divide the data-parallel size {mesh.size()}")
    if mesh.size() != _world_size():
        raise ValueError(f"expert_parallel needs a data-parallel mesh over every process ({_world_size()}), "
                         f"got {mesh.size()}: tensor parallelism with expert parallelism is not supported")
    grid = init_device_mesh(mesh.device_type, (mesh.size() // ep, ep),
                            mesh_dim_names=("expert_replicate", "expert_parallel"))
    return grid["expert_replicate"], grid["expert_parallel"]


def shard_units(
    module: nn.Module,
    mesh: Any,
    policy: Callable[[str], Any],
    kept: Sequence[nn.Module] = (),
    blocks: Iterable[type] = (),
    experts: Sequence[nn.Module] = (),
    expert_mesh: Optional[Any] = None,
) -> nn.Module:
    """``fully_shard`` ``module`` unit by unit, innermost first: ``kept`` (``policy("fp32")``, FP32
    compute) and ``experts`` (over ``expert_mesh``), then every instance of ``blocks`` outside the
    kept ones (``policy("unit")``), then ``module`` itself (``policy("root")``)."""
    from torch.distributed.fsdp import fully_shard

    for m in kept:
        fully_shard(m, mesh=mesh, mp_policy=policy("fp32"))
    for m in experts:
        fully_shard(m, mesh=expert_mesh, mp_policy=policy("unit"))
    block_types = tuple(blocks)
    in_kept = {id(sub) for m in kept for sub in m.modules()}  # FP32 units already, whole
    for m in reversed(list(module.modules())):  # inner blocks before the blocks holding them
        if block_types and isinstance(m, block_types) and m is not module and id(m) not in in_kept:
            fully_shard(m, mesh=mesh, mp_policy=policy("unit"))
    return fully_shard(module, mesh=mesh, mp_policy=policy("root"))


def global_norm(grads: Sequence[Tensor]) -> Tensor:
    """The 2-norm of all of ``grads``, whole tensors or DTensors on any meshes (dense and expert
    shards: each mesh's norm reduced over its ranks, so each element counts once, then combined;
    one mesh: its norm as torch computes it)."""
    from torch.distributed.tensor import DTensor

    by_mesh: dict[Any, list[Tensor]] = {}
    for g in grads:
        by_mesh.setdefault(g.device_mesh if isinstance(g, DTensor) else None, []).append(g)
    norms = [torch.nn.utils.get_total_norm(group, 2.0) for group in by_mesh.values()]
    norms = [n.full_tensor() if isinstance(n, DTensor) else n for n in norms]
    return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))


def clip_by_global_norm(grads: Sequence[Tensor], clip_val: float) -> None:
    """torch's ``clip_grad_norm_`` arithmetic by :func:`global_norm`, in place on the local shards."""
    if not grads:
        return
    coef = torch.clamp(clip_val / (global_norm(grads) + 1e-6), max=1.0)
    torch._foreach_mul_([local(g) for g in grads], local(coef))


def outermost(modules: list[nn.Module]) -> list[nn.Module]:
    """The modules not inside another one of them (a kept subtree is sharded once)."""
    inner = {id(sub) for m in modules for sub in m.modules() if sub is not m}
    return [m for m in modules if id(m) not in inner]


_left_group = False  # whether this process left a group of several processes


def leave_process_group() -> None:
    """At the end of a multi-process run: every rank waits for the others, then leaves the process
    group. Lightning destroys only NCCL groups at exit; a gloo group (CPU processes) left to the
    interpreter's exit makes torch abort now and then after the run has finished ("terminate called
    without an active exception"; pytorch PR 179291). Nothing to do in a single process."""
    global _left_group
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        _left_group = _left_group or dist.get_world_size() > 1
        dist.barrier()
        dist.destroy_process_group()


def exit_after_leaving() -> None:
    """End a process that left a group of several processes (:func:`leave_process_group`) as the
    interpreter's exit would begin: wait for its other non-daemon threads, run the exit handlers
    (``atexit``: the loggers', logging's, Lightning's), flush; then exit with code 0 without the
    interpreter's teardown, as ``multiprocessing``'s workers end. That teardown is
    where torch still aborted, rarely, on a CPU after the group was left (the same message, exit
    code -6; once in this project's 2-process tests, 2026-12-07). Returns, doing nothing, in a
    process that left no such group."""
    if not _left_group:
        return
    import atexit
    import os
    import sys
    import threading

    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
