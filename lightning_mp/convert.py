"""Which modules stay FP32, and the cast of every other parameter to the 16-bit compute dtype.

Normalization layers keep FP32 weights (their statistics and tiny gains are where 16-bit
rounding hurts most, and they are a negligible share of the parameters), and so does any
module that sets ``keep_fp32 = True`` on itself, as an MoE router does. Buffers keep their dtype,
as under ``bf16-mixed``: they are not trained and cost little, and some are precision-critical
(a rotary ``inv_freq`` in bf16 puts angles off by radians).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from typing import Union

import torch
from torch import Tensor, nn

#: A ``keep_fp32`` entry: a module-name pattern (``fnmatch``, e.g. ``"*.router"``), a module
#: class (``isinstance``), or a predicate ``(qualified_name, module) -> bool``.
KeepFP32 = Union[str, type, Callable[[str, nn.Module], bool]]

TORCH_NORMS: tuple[type, ...] = tuple(
    cls
    for cls in (
        nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
        nn.LayerNorm,
        nn.GroupNorm,
        nn.LocalResponseNorm,
        getattr(nn, "RMSNorm", None),  # torch >= 2.4
    )
    if cls is not None
)
# Other libraries' norms by class name: LlamaRMSNorm, T5LayerNorm, FusedLayerNorm, MixedFusedRMSNorm...
_NORM_CLASS_NAME = re.compile(r"Norm(\d+d)?$")


def is_norm_layer(name: str, module: nn.Module) -> bool:
    """True for torch's normalization layers and any class whose name ends in ``Norm``."""
    return isinstance(module, TORCH_NORMS) or bool(_NORM_CLASS_NAME.search(type(module).__name__))


#: The default of ``MasterWeightPrecision(keep_fp32=...)``: every normalization layer.
#: Extend it with ``keep_fp32=[*DEFAULT_KEEP_FP32, "lm_head"]``.
DEFAULT_KEEP_FP32: tuple[KeepFP32, ...] = (is_norm_layer,)


def matcher(entry: KeepFP32) -> Callable[[str, nn.Module], bool]:
    if isinstance(entry, str):
        return lambda name, module: fnmatch.fnmatchcase(name, entry)
    if isinstance(entry, type):
        if not issubclass(entry, nn.Module):
            raise TypeError(f"keep_fp32 classes must be nn.Module subclasses, got {entry!r}")
        return lambda name, module: isinstance(module, entry)
    if callable(entry):
        return entry
    raise TypeError(
        f"keep_fp32 entries must be module-name patterns (str), nn.Module classes or "
        f"predicates (name, module) -> bool; got {entry!r}"
    )


def fp32_parameters_and_buffers(module: nn.Module, keep_fp32: Iterable[KeepFP32]) -> set[Tensor]:
    """The parameters and buffers owned by kept modules or their descendants.

    A module is kept when it sets ``keep_fp32 = True`` or matches any ``keep_fp32`` entry; a
    kept module keeps its whole subtree (a router's inner ``Linear`` stays FP32 too).
    """
    matchers = [matcher(entry) for entry in keep_fp32]
    kept_prefixes: list[str] = []
    kept: set[Tensor] = set()
    for name, sub in module.named_modules(remove_duplicate=False):
        inside = any(name == p or name.startswith(p + ".") for p in kept_prefixes)
        if inside or getattr(sub, "keep_fp32", False) is True or any(m(name, sub) for m in matchers):
            if not inside:
                kept_prefixes.append(name)
            kept.update(sub.parameters(recurse=False))
            kept.update(sub.buffers(recurse=False))
    return kept


def cast_module_(
    module: nn.Module,
    dtype: torch.dtype,
    keep_fp32: Iterable[KeepFP32],
    before_cast: Callable[[nn.Parameter], None] | None = None,
) -> nn.Module:
    """Cast floating-point parameters to ``dtype`` in place, except the kept ones; buffers keep their dtype.

    Parameters keep their identity (only ``.data`` is replaced), so optimizers and maps keyed
    by parameter object still work. ``before_cast(param)`` sees each parameter while it still
    holds its original (FP32) values: that is where the master copy is taken.
    """
    kept = fp32_parameters_and_buffers(module, keep_fp32)
    done: set[Tensor] = set()
    for sub in module.modules():
        for param in sub.parameters(recurse=False):
            if param in done or param in kept or not param.is_floating_point():
                continue
            done.add(param)
            if param.dtype != dtype:
                if before_cast is not None:
                    before_cast(param)
                param.data = param.data.to(dtype)
    return module
