"""Which modules stay FP32, and the cast of every other parameter to the 16-bit compute dtype.

Normalization layers keep FP32 weights (their statistics and tiny gains are where 16-bit
rounding hurts most, and they are a negligible share of the parameters), and so does any
module that sets ``keep_fp32 = True`` on itself, as an MoE router does. Buffers keep their dtype,
as under ``bf16-mixed``: they are not trained and cost little, and some are precision-critical
(a rotary ``inv_freq`` in bf16 puts angles off by radians).

Under autocast a kept module's FP32 weights meet 16-bit activations without trouble (autocast
casts at each op). Outside it (a ``generate`` call in ``on_validation_epoch_end``, a Fabric
module's unmarked method, the model used after ``fit``) they would not: an FP32 ``lm_head`` fed
bf16 fails, and a Hugging Face ``LlamaRMSNorm`` hands FP32 to the bf16 ``q_proj`` after it.
:func:`follow_callers` makes each kept module take its caller's 16-bit tensors in its own dtype
and hand its outputs back in the caller's, as FSDP's ``cast_forward_inputs`` and ``output_dtype``
do; under autocast it does nothing, so training is not touched.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from typing import Any, Optional, Union

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from lightning_mp.storage import HALF

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


def kept_modules(module: nn.Module, keep_fp32: Iterable[KeepFP32]) -> list[nn.Module]:
    """The outermost kept modules of ``module``: those that set ``keep_fp32 = True`` or match any
    ``keep_fp32`` entry, and are not inside another kept one (a kept module keeps its whole
    subtree: a router's inner ``Linear`` stays FP32 too)."""
    matchers = [matcher(entry) for entry in keep_fp32]
    kept_prefixes: list[str] = []
    kept: list[nn.Module] = []
    for name, sub in module.named_modules(remove_duplicate=False):
        if any(name == p or name.startswith(p + ".") for p in kept_prefixes):
            continue
        if getattr(sub, "keep_fp32", False) is True or any(m(name, sub) for m in matchers):
            kept_prefixes.append(name)
            kept.append(sub)
    return kept


def fp32_parameters_and_buffers(module: nn.Module, keep_fp32: Iterable[KeepFP32]) -> set[Tensor]:
    """The parameters and buffers owned by kept modules or their descendants."""
    kept: set[Tensor] = set()
    for sub in kept_modules(module, keep_fp32):
        kept.update(sub.parameters())
        kept.update(sub.buffers())
    return kept


class _FollowCallers:
    """The two hooks of one kept module (see :func:`follow_callers`)."""

    def __init__(self) -> None:
        # one entry per call running outside autocast: its device type, and where its inputs were
        # cast, the caller's dtype and the module's (a stack: a forward that raised leaves one
        # behind, harmlessly)
        self.calls: list[tuple[str, Optional[tuple[torch.dtype, torch.dtype]]]] = []
        self.handles: list[Any] = []

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
        # (this runs in every forward: the usual call, a tensor first, is looked at before the rest)
        x = args[0] if args and isinstance(args[0], Tensor) and args[0].is_floating_point() else None
        x = x if x is not None else next(_floats(args, kwargs), None)
        if x is None or torch.is_autocast_enabled(x.device.type):
            return None
        own = next((p.dtype for p in module.parameters() if p.is_floating_point()), x.dtype)
        cast = (x.dtype, own) if x.dtype in HALF and own != x.dtype else None
        self.calls.append((x.device.type, cast))
        if cast is None:
            return None
        to_own = _caster(*cast)
        return apply_to_collection(args, Tensor, to_own), apply_to_collection(kwargs, Tensor, to_own)

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self.calls or torch.is_autocast_enabled(self.calls[-1][0]):
            return None
        _, cast = self.calls.pop()
        if cast is None:
            return None
        caller, own = cast
        return apply_to_collection(output, Tensor, _caster(own, caller))


def _follower(module: nn.Module) -> Optional[_FollowCallers]:
    """The hooks :func:`follow_callers` gave ``module``, if any."""
    return next((h.__self__ for h in module._forward_pre_hooks.values()
                 if isinstance(getattr(h, "__self__", None), _FollowCallers)), None)


def _caster(src: torch.dtype, dst: torch.dtype) -> Callable[[Tensor], Tensor]:
    return lambda t: t.to(dst) if t.dtype == src else t


def _floats(args: tuple, kwargs: dict) -> Iterable[Tensor]:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor) and value.is_floating_point():
            yield value


def follow_callers(kept: Iterable[nn.Module]) -> None:
    """Outside autocast, each of the ``kept`` modules takes its caller's 16-bit floating tensors in
    its own dtype and gives its floating outputs back in the caller's (see the module's
    docstring). Hooked once per module, ahead of other hooks (FSDP's own casts see FP32 inputs)."""
    for module in kept:
        if _follower(module) is None:
            hooks = _FollowCallers()
            hooks.handles = [module.register_forward_pre_hook(hooks.before, prepend=True, with_kwargs=True),
                             module.register_forward_hook(hooks.after, with_kwargs=True)]


def unfollow_callers(module: nn.Module) -> None:
    """Remove :func:`follow_callers`' hooks from ``module`` and its submodules (a model turned back
    into FP32 needs none; ``torch.jit.script`` cannot compile them)."""
    for sub in module.modules():
        hooks = _follower(sub)
        if hooks is not None:
            for handle in hooks.handles:
                handle.remove()


def cast_module_(
    module: nn.Module,
    dtype: torch.dtype,
    keep_fp32: Iterable[KeepFP32],
    before_cast: Callable[[nn.Parameter], None] | None = None,
) -> nn.Module:
    """Cast floating-point parameters to ``dtype`` in place, and the kept ones to FP32 (a model
    built or loaded in 16 bits, e.g. a Hugging Face ``torch_dtype=torch.bfloat16``, gets FP32
    norms too: an exact upcast); buffers keep their dtype.

    Parameters keep their identity (only ``.data`` is replaced), so optimizers and maps keyed
    by parameter object still work. ``before_cast(param)`` sees each parameter while it still
    holds its original (FP32) values: that is where the master copy is taken.
    """
    kept = fp32_parameters_and_buffers(module, keep_fp32)
    done: set[Tensor] = set()
    for sub in module.modules():
        for param in sub.parameters(recurse=False):
            if param in done or not param.is_floating_point():
                continue
            done.add(param)
            if param in kept:
                if param.dtype in HALF:
                    param.data = param.data.float()
            elif param.dtype != dtype:
                if before_cast is not None:
                    before_cast(param)
                param.data = param.data.to(dtype)
    return module
